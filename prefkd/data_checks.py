"""The start-up data report: what train.py checks and prints before any model is loaded.

For every data set split of a run it says which files (or hub split) feed it and how many
rows and examples it has; it refuses a data set whose splits are formatted differently
(plain text vs chat-templated conversations); it measures how many examples the
truncation rule cuts at the run's max_length / max_prompt_length and by how much; it checks
the model's (and teacher's) max_position_embeddings against max_length; it loads and probes
the scorer (data.scorer); and it notes an evaluation count larger than the test split.

The result is printed and written to <run>/data_summary.json by train.py's check_data:

    {"splits": {"<name>/<split>": {"source", "holdout", "rows", "examples", "skipped",
                                   "format", "truncation": {...}}},
     "scorers": {"<name>": "<spec>" | null},
     "model": {"max_length", "max_prompt_length", "max_position_embeddings": {"model", "teacher"}},
     "warnings": ["..."]}
"""
import json
import os
from typing import Dict, List, Optional, Tuple

from prefkd import scorers
from prefkd import checkpoints
from prefkd.data import sources as data_sources
from prefkd.data import rows as data_rows
from prefkd.data import loading as data_loading
from prefkd.data import encoding

# More than this share of a split's examples truncated is reported prominently.
TRUNCATION_WARN_SHARE = 0.05
FORMAT_SHORT = {"chat": "conversational (chat template)", "text": "plain text (no chat template)",
                "mixed": "MIXED plain text and conversational rows"}
FORMAT_NAMES = {"chat": "conversational (message lists, formatted with the chat template)",
                "text": "plain text (strings, no chat template)", "mixed": "a mix of plain text and conversational rows"}


# ---------------------------------------------------------------- formats

def split_format(examples: List[Dict]) -> str:
    """"chat", "text" or "mixed"."""
    kinds = {bool(ex.get("chat")) for ex in examples}
    return "mixed" if len(kinds) > 1 else ("chat" if kinds == {True} else "text")


def dataset_formats(names: List[str], options=None, splits=data_rows.SPLITS) -> Dict[str, Dict[str, str]]:
    """{name: {split: format}}."""
    return {n: {s: split_format(data_loading.load_dataset_checked(n, s, options, silent=True)[0]) for s in splits}
            for n in names}


def check_formats(formats: Dict[str, Dict[str, str]], options=None) -> List[str]:
    """A data set whose splits differ in format (or mix formats within one) is refused: the
    model would be trained on one prompt format and evaluated on another. With
    data.allow_mixed_formats=true it is a warning instead. Returns the warnings."""
    allow = bool(data_loading.data_options(options)["allow_mixed_formats"])
    warnings = []
    for name, per_split in formats.items():
        if len(set(per_split.values())) == 1 and "mixed" not in per_split.values():
            continue
        what = "; ".join(f"{split} is {FORMAT_NAMES[f]}" for split, f in per_split.items())
        msg = (f"data set {name!r} is formatted inconsistently: {what}. Give every split (and every row) the same "
               "format -- all prompts as strings, or all as message lists -- or pass data.allow_mixed_formats=true "
               "if this is intended")
        if not allow:
            raise data_rows.DataError(msg)
        warnings.append(msg)
    return warnings


def role_format(formats: Dict[str, Dict[str, str]]) -> str:
    """The one format of a group of data sets (all their splits), or "mixed"."""
    kinds = {f for per_split in formats.values() for f in per_split.values()}
    return kinds.pop() if len(kinds) == 1 else "mixed"


# ---------------------------------------------------------------- truncation

def truncation_stats(name: str, split: str, tokenizer, options, max_length: int, max_prompt_length: int,
                     truncation_mode: str = "keep_end", sft_mode: bool = False, limit: Optional[int] = 1000,
                     cache_dir: Optional[str] = None) -> Dict:
    """How many examples of a split the truncation rule (encoding.build_pair) cuts,
    on up to `limit` evenly spaced examples (all when limit is None or >= the split's size).
    Token ids go through the tokenisation cache, so the training run reuses them."""
    examples, fingerprint = data_loading.load_dataset_checked(name, split, options, silent=True)
    n = len(examples)
    k = n if not limit or limit >= n else int(limit)
    idx = sorted({i * n // k for i in range(k)})
    template = data_loading.data_options(options)["chat_template"]
    cache = encoding.token_cache(cache_dir, name, split, fingerprint, tokenizer, template)
    prompt_cuts, response_cuts, longest_prompt, longest_total, n_truncated = [], [], 0, 0, 0
    keys = ("sft_target", "sft_target") if sft_mode else ("chosen", "rejected")
    for i in idx:
        ex = examples[i]
        ids = cache.get(i, lambda: encoding.encode_example(ex, tokenizer, template))
        prompt, chosen, rejected = ids["prompt"], ids[keys[0]], ids[keys[1]]
        out = encoding.build_pair(prompt, chosen, rejected, tokenizer.bos_token_id, max_length, max_prompt_length,
                              truncation_mode)
        kept = len(out["prompt_input_ids"])
        p_cut = len(prompt) - kept
        r_cut = max(len(chosen) - (len(out["chosen_input_ids"]) - kept),
                    len(rejected) - (len(out["rejected_input_ids"]) - kept))
        if p_cut:
            prompt_cuts.append(p_cut)
        if r_cut:
            response_cuts.append(r_cut)
        n_truncated += bool(p_cut or r_cut)
        longest_prompt = max(longest_prompt, len(prompt))
        longest_total = max(longest_total, len(prompt) + max(len(chosen), len(rejected)))
    cache.flush()

    def mean(xs):
        return round(sum(xs) / len(xs), 1) if xs else 0

    return {"checked": len(idx), "of": n, "truncated": n_truncated, "share": round(n_truncated / max(1, len(idx)), 4),
            "prompt_cut": len(prompt_cuts), "prompt_cut_tokens_mean": mean(prompt_cuts),
            "prompt_cut_tokens_max": max(prompt_cuts, default=0),
            "response_cut": len(response_cuts), "response_cut_tokens_mean": mean(response_cuts),
            "response_cut_tokens_max": max(response_cuts, default=0),
            "longest_prompt": longest_prompt, "longest_total": longest_total}


def truncation_warning(key: str, t: Dict, max_length: int, max_prompt_length: int) -> Optional[str]:
    if t["share"] <= TRUNCATION_WARN_SHARE:
        return None
    parts = []
    if t["prompt_cut"]:
        parts.append(f"{t['prompt_cut']} prompts cut by {t['prompt_cut_tokens_mean']:g} tokens on average "
                     f"(up to {t['prompt_cut_tokens_max']})")
    if t["response_cut"]:
        parts.append(f"{t['response_cut']} responses cut by {t['response_cut_tokens_mean']:g} tokens on average "
                     f"(up to {t['response_cut_tokens_max']})")
    return (f"{key}: {t['truncated']} of {t['checked']} examples ({100 * t['share']:.0f}%) are truncated at "
            f"max_length={max_length}, max_prompt_length={max_prompt_length}: " + "; ".join(parts) +
            f". To keep them whole raise max_length (longest prompt + response: {t['longest_total']} tokens) and "
            f"max_prompt_length (longest prompt: {t['longest_prompt']} tokens; it must stay below max_length)")


# ---------------------------------------------------------------- model length

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def max_positions(model_cfg) -> Optional[Dict]:
    """{"value": max_position_embeddings, "from": where it was read}, or None when it cannot
    be known without loading (a hub name): from the checkpoint in `archive`, a local
    `name_or_path` directory's config.json, or `init_config` (models built here)."""
    def from_json(path):
        try:
            with open(os.path.join(path, "config.json")) as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            return None
        cfg = cfg.get("text_config", cfg) if not any(k in cfg for k in POSITION_KEYS) else cfg
        for k in POSITION_KEYS:
            if isinstance(cfg.get(k), int):
                return {"value": cfg[k], "from": os.path.join(path, "config.json")}
        return None

    archive = model_cfg.get("archive")
    if archive:
        return from_json(checkpoints.resolve_checkpoint(archive))
    path = model_cfg.get("name_or_path")
    if path:
        return from_json(os.path.expanduser(str(path))) if os.path.isdir(os.path.expanduser(str(path))) else None
    init = model_cfg.get("init_config") or {}
    value = init.get("max_position_embeddings")
    return {"value": int(value), "from": f"model {model_cfg.get('name')}: init_config"} if value else None


def position_warnings(cfg) -> Tuple[Dict, List[str]]:
    found, warnings = {}, []
    roles = [("model", cfg.model)]
    if cfg.get("teacher") is not None and cfg.teacher.get("name", "none") != "none":
        roles.append(("teacher", cfg.teacher))
    for role, model_cfg in roles:
        info = max_positions(model_cfg)
        found[role] = info["value"] if info else None
        if info and int(cfg.max_length) > info["value"]:
            warnings.append(f"max_length={cfg.max_length} is longer than the {role}'s max_position_embeddings="
                            f"{info['value']} ({info['from']}): positions past it are untrained (or fail); lower "
                            f"max_length to <= {info['value']}" + (" and max_prompt_length below it" if
                                                                   int(cfg.max_prompt_length) >= info["value"] else ""))
    return found, warnings


# ---------------------------------------------------------------- scorers

def probe_scorers(names: List[str], options) -> Tuple["scorers.ScorerSet", List[str]]:
    """Load the scorer of every data set (a bad data.scorer fails here, before any model is
    loaded) and call it once on the first held-out example's reference answer."""
    task = scorers.for_config(names, options)
    lines = []
    for name, scorer in task.by_dataset.items():
        if scorer is None:
            continue
        ex = data_loading.load_dataset_checked(name, "test", options, silent=True)[0][0]
        got = scorer(ex["prompt"], ex["sft_target"])
        lines.append(f"scorer of {name}: {scorer.spec}; on the reference answer of {ex.get('where', name + '/test')}: "
                     + ", ".join(f"{k}={v:g}" for k, v in got.items()))
    return task, lines


# ---------------------------------------------------------------- paths

def absolute_data_paths(cfg) -> None:
    """Make the run's data paths (and a scorer file) absolute in `cfg`, so the config saved in
    the run directory still finds them from another working directory (evaluate.py)."""
    d = cfg.get("data")
    if d is None:
        return
    local = d.get("local") or {}
    folder = None
    if local.get("path"):
        d["local"]["path"] = os.path.abspath(os.path.expanduser(str(local["path"])))
        folder = d["local"]["path"] if os.path.isdir(d["local"]["path"]) else None
    for key in ("train", "test"):
        spec = local.get(key)
        if spec and spec != data_sources.HOLDOUT:
            try:
                d["local"][key] = data_sources._named_file(spec, folder, f"data.local.{key}")
            except data_rows.DataError:
                pass  # reported when the split is loaded
    for name, p in (d.get("paths") or {}).items():
        if p:
            d["paths"][name] = os.path.abspath(os.path.expanduser(str(p)))
    spec = d.get("scorer")
    if isinstance(spec, str) and ":" in spec:
        target, attr = spec.rsplit(":", 1)
        if target.endswith(".py") or "/" in target or os.sep in target:
            d["scorer"] = os.path.abspath(os.path.expanduser(target)) + ":" + attr


# ---------------------------------------------------------------- the report

def split_lines(key: str, s: Dict) -> List[str]:
    """The report's lines on one split (`key` = <name>/<split>): its source, rows and examples,
    format, skipped and flipped rows, truncation, and files in its directory no split reads."""
    src = s["source"] if isinstance(s["source"], str) else ", ".join(s["source"])
    held = f" ({100 * s['holdout']:g}% of its prompts by hash)" if s["holdout"] else ""
    skipped = (f", {s['skipped']} invalid rows skipped (data.skip_invalid=true)" if s["skipped"] else "") + (
        f", labels of {s['flipped']} pairs flipped (data.flip_fraction)" if s.get("flipped") else "")
    t = s["truncation"]
    trunc = "" if not t else (f"; truncated: {t['truncated']}/{t['checked']}" +
                              (f" checked of {t['of']}" if t["checked"] < t["of"] else ""))
    lines = [f"data: {key} <- {src}{held}: {s['rows']} rows -> {s['examples']} examples, "
             f"{FORMAT_SHORT[s['format']]}{skipped}{trunc}"]
    if s["unread"] and key.endswith("/test"):
        lines.append(f"data: {key.split('/')[0]}: also in its directory, read by no split: {', '.join(s['unread'])} "
                     "(name a file with data.local.train / data.local.test)")
    return lines


def startup_report(cfg, tokenizer, need_pairs: bool, sft_mode: bool, echo=print) -> Dict:
    """Validate and describe the run's data (see the module docstring); raises DataError /
    ScorerError (ValueErrors naming the file, row or config key) on bad input."""
    names, options = list(cfg.datasets), cfg.get("data")
    absolute_data_paths(cfg)
    data_loading.check_datasets(names, tokenizer, options, need_pairs=need_pairs)  # row validation
    formats = dataset_formats(names, options)
    warnings = check_formats(formats, options)
    task, scorer_lines = probe_scorers(names, options)
    opts = data_loading.data_options(options)
    limit = opts["check_lengths"]
    cache_dir = data_loading.cache_dir_of(options)
    splits = {}
    for name in names:
        for split in data_rows.SPLITS:
            key = f"{name}/{split}"
            info = data_loading.describe_split(name, split, options)
            info["format"] = formats[name][split]
            info["truncation"] = truncation_stats(name, split, tokenizer, options, int(cfg.max_length),
                                                  int(cfg.max_prompt_length), cfg.get("truncation_mode", "keep_end"),
                                                  sft_mode, limit, cache_dir) if limit else None
            splits[key] = info
    positions, pos_warnings = position_warnings(cfg)
    warnings += [w for w in (truncation_warning(k, s["truncation"], cfg.max_length, cfg.max_prompt_length)
                             for k, s in splits.items() if s["truncation"]) if w]
    warnings += pos_warnings
    warnings += [s["note"] for s in splits.values() if s["note"]]
    warnings = list(dict.fromkeys(warnings))  # a note of a hash-split file comes from both its splits
    notes = list(scorer_lines)
    n_test = sum(s["examples"] for k, s in splits.items() if k.endswith("/test"))
    for key in ("n_eval_examples",) + (("n_eval_samples",) if cfg.get("sample_during_eval") else ()):
        if cfg.get(key) is not None and int(cfg[key]) > n_test:
            notes.append(f"{key}={cfg[key]} is more than the {n_test} held-out examples: the evaluation uses each "
                         f"of the {n_test} once")
    if cfg.get("sample_during_eval") and task.common() is None and any(task.by_dataset.values()):
        notes.append("sample_during_eval: the data sets have different scorers, so no task score is logged during "
                     "training (evaluate.py scores each data set with its own)")

    for key, s in splits.items():
        for line in split_lines(key, s):
            echo(line)
    for line in notes:
        echo(f"data: {line}")
    for w in warnings:
        bar = "!" * 100
        echo(f"{bar}\nWARNING: {w}\n{bar}")
    return {"splits": splits, "scorers": task.specs(),
            "model": {"max_length": int(cfg.max_length), "max_prompt_length": int(cfg.max_prompt_length),
                      "max_position_embeddings": positions},
            "notes": notes, "warnings": warnings}
