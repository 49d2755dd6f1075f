"""The data sets by name: the data: options, loading a split checked (rows validated, label
noise applied), describing and validating every split before training, and where the token
cache lives. The sets themselves are in embedded_task.py and sources.py."""
import hashlib
import json
import os
from typing import Dict, List, Optional, Tuple

from prefkd.data.embedded_task import EMBEDDED_TEST_SIZE, EMBEDDED_TRAIN_SIZE, embedded_fingerprint, load_embedded
from prefkd.data.encoding import format_example
from prefkd.data.rows import SPLITS, DataError
from prefkd.data.sources import SE_TEST_PERCENT, SOURCES, _load_source, split_plan

DEFAULT_OPTIONS = {
    "skip_invalid": False, "cache_dir": None, "test_fraction": 0.05, "chat_template": None,
    "paths": {}, "local": {"path": None, "train": None, "test": None, "prompt": "prompt", "chosen": "chosen",
                           "rejected": "rejected", "messages": "messages", "completion": "completion"},
    "scorer": None, "allow_mixed_formats": False, "check_lengths": 1000, "flip_fraction": 0.0, "flip_seed": 0,
}


def data_options(options=None) -> Dict:
    """The `data:` config section (an OmegaConf node or a dict) merged over the defaults."""
    if options is not None and not isinstance(options, dict):
        from omegaconf import OmegaConf
        options = OmegaConf.to_container(options, resolve=True)
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULT_OPTIONS.items()}
    for k, v in (options or {}).items():
        if k not in out:
            raise ValueError(f"unknown option data.{k}; known: {sorted(out)}")
        out[k] = {**out[k], **(v or {})} if isinstance(out[k], dict) else v
    if not 0 < float(out["test_fraction"]) < 1:
        raise ValueError(f"data.test_fraction={out['test_fraction']} must be in (0, 1)")
    if not isinstance(out["flip_fraction"], (int, float)) or not 0 <= float(out["flip_fraction"]) <= 1:
        raise ValueError(f"data.flip_fraction={out['flip_fraction']!r} must be a share in [0, 1] of the train pairs")
    if not isinstance(out["flip_seed"], int):
        raise ValueError(f"data.flip_seed={out['flip_seed']!r} must be a whole number")
    return out


def flipped_pairs(examples: List[Dict], fraction: float, seed: int) -> List[int]:
    """The indices of the pairs (rows with a chosen and a rejected response) whose labels
    data.flip_fraction swaps: round(fraction x pairs) of them, the lowest by a hash of
    (seed, the row's content), so the choice is deterministic, independent of row order and of
    other rows, and a larger fraction flips a superset of a smaller one's pairs."""
    pairs = [i for i, ex in enumerate(examples) if ex.get("chosen") is not None and ex.get("rejected") is not None]
    if not pairs or fraction <= 0:
        return []

    def rank(i: int) -> str:
        ex = examples[i]
        row = json.dumps([seed, ex["prompt"], ex["chosen"], ex["rejected"]], sort_keys=True, default=str)
        return hashlib.sha256(row.encode()).hexdigest()
    return sorted(sorted(pairs, key=rank)[:int(round(fraction * len(pairs)))])


def flip_labels(examples: List[Dict], fingerprint: str, split: str, opts: Dict) -> Tuple[List[Dict], str]:
    """Label noise (data.flip_fraction): a train split with its chosen and rejected swapped in
    the chosen pairs (flipped_pairs); test splits untouched. The fingerprint names the flip
    (the token cache and the teacher / reference caches are keyed by it)."""
    fraction = float(opts["flip_fraction"])
    if split != "train" or fraction <= 0:
        return examples, fingerprint
    for i in flipped_pairs(examples, fraction, int(opts["flip_seed"])):
        examples[i]["chosen"], examples[i]["rejected"] = examples[i]["rejected"], examples[i]["chosen"]
    return examples, f"{fingerprint}-flip{fraction:g}s{int(opts['flip_seed'])}"




# Scorers of generated completions live in prefkd/scorers.py (data.scorer; the embedded task's default
# is score_answer, in prefkd/data/embedded_task.py).
DATASETS = ["embedded"] + sorted(SOURCES)


def load_dataset_checked(name: str, split: str, options=None, silent: bool = False) -> Tuple[List[Dict], str]:
    """(examples, fingerprint) of one data set split, validated. Invalid rows raise a
    DataError naming up to 5 of them, or with data.skip_invalid are skipped and counted."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for data set {name!r}; expected one of {SPLITS}")
    opts = data_options(options)
    if name == "embedded":
        return flip_labels(load_embedded(split, silent=silent), embedded_fingerprint(), split, opts)
    examples, problems, fingerprint, _ = _load_source(name, split, opts)
    if problems and not opts["skip_invalid"]:
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise DataError(f"data set {name!r} ({split}): {len(problems)} invalid row(s):\n  " +
                        "\n  ".join(problems[:5]) + more +
                        "\nfix the data, or pass data.skip_invalid=true to skip such rows (they are counted)")
    if not examples:
        raise DataError(f"data set {name!r} ({split}) has no examples" +
                        (f" ({len(problems)} invalid rows skipped)" if problems else ""))
    if problems and not silent:
        print(f"data set {name!r} ({split}): skipped {len(problems)} invalid row(s) (data.skip_invalid=true); "
              f"first: {problems[0]}")
    return flip_labels([dict(ex) for ex in examples], fingerprint, split, opts)


def _flip_report(examples: List[Dict], flip: float, opts: Dict) -> Dict:
    """{"flipped": n} with label noise on (data.flip_fraction > 0), else {}."""
    if not float(opts["flip_fraction"]):
        return {}
    return {"flipped": len(flipped_pairs(examples, flip, int(opts["flip_seed"])))}


def skipped_rows(name: str, split: str, options=None) -> int:
    if name == "embedded":
        return 0
    return len(_load_source(name, split, data_options(options))[1])


def describe_split(name: str, split: str, options=None) -> Dict:
    """Where a split's examples come from and how many there are (after load_dataset_checked):
    {"source": "built in" | "<hub id>[<split>]" | [files], "holdout": share held out by prompt
    hash or None, "rows": rows read, "examples": n, "skipped": k, "unread": [...], "note": ...,
    "flipped": pairs whose labels data.flip_fraction swapped (only with the option on)}."""
    opts = data_options(options)
    flip = float(opts["flip_fraction"]) if split == "train" else 0.0
    if name == "embedded":
        n = EMBEDDED_TRAIN_SIZE if split == "train" else EMBEDDED_TEST_SIZE
        return {"source": "built in (the sorting task)", "holdout": None, "rows": n, "examples": n, "skipped": 0,
                "unread": [], "note": None, **_flip_report(load_embedded(split), flip, opts)}
    src = SOURCES[name]
    plan = split_plan(src, split, opts)
    examples, problems, _, n_rows = _load_source(name, split, opts)
    share = SE_TEST_PERCENT / 100 if src.hold_out else float(opts["test_fraction"])
    held = src.hold_out or plan.get("holdout")  # SE: questions held out by qid hash; else prompts of one file
    return {"source": plan.get("hub") or plan["files"],
            "holdout": (share if split == "test" else 1 - share) if held else None,
            "rows": n_rows, "examples": len(examples), "skipped": len(problems),
            "unread": plan.get("unread", []), "note": plan.get("note"), **_flip_report(examples, flip, opts)}


def get_dataset(name: str, split: str, silent: bool = False, options=None) -> List[Dict]:
    """Examples of data set ``name``: dicts with prompt/chosen/rejected/sft_target (the shape: prefkd/data/rows.py)."""
    data = load_dataset_checked(name, split, options, silent=silent)[0]
    if not silent:
        print(f"Loaded {len(data)} examples of {name}/{split}")
    return data


def check_datasets(names: List[str], tokenizer, options=None, need_pairs: bool = True,
                   splits=SPLITS) -> Dict[str, Dict[str, int]]:
    """Load and validate every data set split before training; returns
    {name/split: {"examples": n, "skipped": k}}. Raises DataError (naming the file, the row
    and the problem) for invalid rows, SFT-only data under a pairwise loss, and a chat
    template that cannot split prompt from response."""
    if not names:
        raise ValueError("datasets=[] is empty: name at least one data set, e.g. datasets=[embedded]")
    report = {}
    for name in names:
        for split in splits:
            examples, _ = load_dataset_checked(name, split, options, silent=True)
            if need_pairs and any(ex["chosen"] is None for ex in examples):
                where = next(ex.get("where", name) for ex in examples if ex["chosen"] is None)
                raise DataError(f"data set {name!r} has SFT rows without preference pairs (e.g. {where}); this "
                                "loss trains on pairs: use it with loss=sft, or give a data set with chosen/rejected")
            if any(ex.get("chat") for ex in examples[:1]):
                first = next(ex for ex in examples if ex.get("chat"))
                format_example(first, tokenizer, data_options(options)["chat_template"])
            report[f"{name}/{split}"] = {"examples": len(examples), "skipped": skipped_rows(name, split, options)}
    return report


def default_cache_dir() -> str:
    return os.environ.get("PREFERENCE_DATA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "preference-data")


def cache_dir_of(options=None) -> Optional[str]:
    """data.cache_dir: null -> $PREFERENCE_DATA_CACHE or ~/.cache/preference-data; false -> no cache."""
    value = data_options(options)["cache_dir"]
    if value is False or value == "":
        return None
    return os.path.abspath(os.path.expanduser(str(value))) if value else default_cache_dir()


def pairs_available(names: List[str], options=None) -> bool:
    """Whether every data set's held-out split has preference pairs (SFT-only sets have none)."""
    return all(ex["chosen"] is not None for n in names for ex in load_dataset_checked(n, "test", options, True)[0])
