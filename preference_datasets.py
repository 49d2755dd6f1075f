"""Preference data: the registry of data sets, chat formatting, tokenisation, truncation,
the token cache, collation and batching (as in eric-mitchell/direct-preference-optimization).

The data sets themselves live below, in prefkd/data/ (imports point down only):
``prefkd/data/embedded_task.py`` is the built-in sorting task (data set ``"embedded"``:
generator, flaws and its scorer ``score_answer``), ``prefkd/data/sources.py`` the named
sources (hh, shp, se, dpomix, ultrafeedback, helpsteer2, deita, local), their converters
and reading local files, and ``prefkd/data/rows.py`` the shared basics (splits, errors,
row validation, the example shape). Callers import those names from their own module (this
one re-exports none); the tokenizers a model config names load in prefkd/tokenizer_facts.py.

Tokenisation (as in eric-mitchell/direct-preference-optimization)
-----------------------------------------------------------------
* prompt ids   = ``[bos]`` (if the tokenizer has one) + ``tok(prompt)``
* response ids = ``tok(response) + [eos]``
  (``tok`` always uses ``add_special_tokens=False``; the strings are NOT put
  through a chat template -- the model learns the raw
  ``"sort 5281=" -> "1258</s>"`` format.)
* Truncation, only if ``len(prompt) + max(len(chosen), len(rejected)) >
  max_length``:
  1. the prompt is cut to ``max_prompt_length`` tokens.  The bos token is
     always kept as the first token (it counts towards ``max_prompt_length``);
     ``keep_end`` keeps the LAST ``max_prompt_length - 1`` prompt tokens,
     ``keep_start`` the FIRST ones.
  2. if still too long, both responses are cut to their first
     ``max_length - max_prompt_length`` tokens (the eos may be cut off).
* labels = ``-100`` on every prompt position, the token id on every response
  position.

Batching
--------
``get_batch_iterator`` forms GLOBAL batches of ``batch_size`` consecutive
examples of a (per-epoch, seeded) permutation and yields, on each rank, only
that rank's contiguous slice of ``batch_size // world_size`` examples, so the
concatenation of all ranks' batches in rank order is the global batch.  See
its docstring for the epoch / n_examples / last-batch / resume rules.
"""
import hashlib
import json
import os
import random
from typing import Callable, Dict, Iterator, List, Optional, Tuple


import utils
from prefkd.data.embedded_task import embedded_fingerprint, EMBEDDED_TEST_SIZE, EMBEDDED_TRAIN_SIZE, load_embedded
from prefkd.data.rows import DataError, SPLITS
from prefkd.data.sources import _load_source, SE_TEST_PERCENT, SOURCES, split_plan
from prefkd.logprobs import IGNORE_INDEX

# ---------------------------------------------------------------------------
# Constants and options
# ---------------------------------------------------------------------------

TRUNCATION_MODES = ("keep_end", "keep_start")
# A plain template for tokenizers that ship none (base checkpoints): used, with a
# warning, unless data.chat_template is set.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}")

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


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# Chat formatting
# ---------------------------------------------------------------------------


def chat_template_of(tokenizer, override: Optional[str] = None) -> str:
    if override:
        return override
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if not getattr(tokenizer, "_warned_default_template", False):
        print("warning: the tokenizer has no chat template; conversational data uses the framework's "
              "DEFAULT_CHAT_TEMPLATE (set data.chat_template to choose one)")
        tokenizer._warned_default_template = True
    return DEFAULT_CHAT_TEMPLATE


def format_example(ex: Dict, tokenizer, template: Optional[str] = None) -> Tuple[str, Dict[str, Optional[str]]]:
    """(prompt text, {"chosen", "rejected", "sft_target": response text or None}).

    Raw examples: the strings as they are. Chat examples: prompt = the template applied to
    the prompt messages with the generation prompt; a response = what the template adds
    when the assistant turn is appended, i.e. exactly that turn with its end-of-turn
    marker (trailing whitespace, the separator before a next turn, is dropped). Raises
    DataError if the template does not render the prompt as a prefix of the conversation."""
    if not ex.get("chat"):
        return ex["prompt"], {k: ex[k] for k in ("chosen", "rejected", "sft_target")}
    tpl = chat_template_of(tokenizer, template)
    prompt = tokenizer.apply_chat_template(ex["prompt"], chat_template=tpl, tokenize=False,
                                           add_generation_prompt=True)
    out = {}
    for k in ("chosen", "rejected", "sft_target"):
        if ex[k] is None:
            out[k] = None
            continue
        full = tokenizer.apply_chat_template(ex["prompt"] + [{"role": "assistant", "content": ex[k]}],
                                             chat_template=tpl, tokenize=False)
        if not full.startswith(prompt):
            raise DataError(f"{ex.get('where', '?')}: the chat template does not render the prompt (with the "
                            "generation prompt) as a prefix of prompt + response, so the response tokens cannot "
                            "be cut exactly; set data.chat_template to a template that does")
        out[k] = full[len(prompt):].rstrip()
    return prompt, out


# ---------------------------------------------------------------------------
# Tokenisation and truncation
# ---------------------------------------------------------------------------


def _keep(ids: List[int], n: int, truncation_mode: str) -> List[int]:
    """The first (keep_start) or last (keep_end) ``n`` ids."""
    n = max(n, 0)
    if truncation_mode == "keep_start":
        return ids[:n]
    return ids[max(len(ids) - n, 0) :]  # not ids[-n:]: ids[-0:] would be the whole list


def encode_text(prompt: str, responses: Dict[str, Optional[str]], tokenizer) -> Dict[str, Optional[List[int]]]:
    """Untruncated ids: "prompt" = [bos] + tok(prompt) (bos only if the tokenizer has one and
    the text does not already start with it, as a chat template's may); each response =
    tok(response) + [eos] (eos only if the response does not already end with it)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token; responses must end with one")
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = {"prompt": ([bos] if bos is not None and p[:1] != [bos] else []) + p}
    for k, text_ in responses.items():
        if text_ is None:
            out[k] = None
            continue
        ids = tokenizer(text_, add_special_tokens=False)["input_ids"]
        out[k] = ids + ([] if ids[-1:] == [eos] else [eos])
    return out


def build_pair(prompt_ids: List[int], chosen_ids: List[int], rejected_ids: List[int], bos: Optional[int],
               max_length: int, max_prompt_length: int, truncation_mode: str = "keep_end") -> Dict:
    """Truncate as in the DPO repo and build ids / masks / labels (see the module docstring).
    A leading bos stays first when the prompt is cut."""
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"unknown truncation_mode {truncation_mode!r}; expected one of {TRUNCATION_MODES}")
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
    head = prompt_ids[:1] if bos is not None and prompt_ids[:1] == [bos] else []
    longer = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longer > max_length:
        # bos stays first: the model was trained with it at position 0.
        prompt_ids = head + _keep(prompt_ids[len(head):], max_prompt_length - len(head), truncation_mode)
    if len(prompt_ids) + longer > max_length:
        chosen_ids = chosen_ids[: max_length - max_prompt_length]
        rejected_ids = rejected_ids[: max_length - max_prompt_length]
    out = {}
    for kind, response_ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        ids = list(prompt_ids) + list(response_ids)
        out[f"{kind}_input_ids"] = ids
        out[f"{kind}_attention_mask"] = [1] * len(ids)
        out[f"{kind}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)
    out["prompt_input_ids"] = list(prompt_ids)
    out["prompt_attention_mask"] = [1] * len(prompt_ids)
    return out


def tokenize_pair(
    prompt: str,
    chosen: str,
    rejected: str,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
) -> Dict:
    """Token ids, masks and labels of one raw (prompt, chosen, rejected) triple."""
    ids = encode_text(prompt, {"chosen": chosen, "rejected": rejected}, tokenizer)
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    out.update(build_pair(ids["prompt"], ids["chosen"], ids["rejected"], tokenizer.bos_token_id, max_length,
                          max_prompt_length, truncation_mode))
    return out


# -- the tokenisation cache ---------------------------------------------------

CACHE_VERSION = 1


def tokenizer_fingerprint(tokenizer) -> str:
    cached = getattr(tokenizer, "_pd_fingerprint", None)
    if cached:
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    h = hashlib.sha256(body.encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)])
             .encode())
    tokenizer._pd_fingerprint = h.hexdigest()[:20]
    return tokenizer._pd_fingerprint


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


def encode_example(ex: Dict, tokenizer, template: Optional[str] = None) -> Dict:
    """Untruncated ids of one example (format_example, then encode_text), plus its prompt text."""
    prompt, responses = format_example(ex, tokenizer, template)
    return encode_text(prompt, responses, tokenizer) | {"prompt_text": prompt}


def token_cache(cache_dir: Optional[str], name: str, split: str, fingerprint: str, tokenizer,
                template: Optional[str], rank: int = 0) -> "TokenCache":
    key = json.dumps([CACHE_VERSION, name, split, fingerprint, tokenizer_fingerprint(tokenizer), template])
    return TokenCache(cache_dir, key, rank)


class TokenCache:
    """Token ids of examples, tokenised once and kept on disk.

    One directory per (data set, split, source fingerprint, tokenizer, chat template); each
    rank stores only the examples it tokenised in its own file (rank<r>.pkl, written
    atomically), and reads every rank's file. So each rank tokenises only what it trains
    on, and a second run of the same config tokenises nothing."""

    def __init__(self, root: Optional[str], key: str, rank: int = 0):
        self.dir = os.path.join(root, hashlib.sha256(key.encode()).hexdigest()[:24]) if root else None
        self.rank, self.entries, self.new = rank, {}, 0
        self.hits = self.misses = 0
        if self.dir and os.path.isdir(self.dir):
            import pickle
            for name in sorted(os.listdir(self.dir)):
                if name.endswith(".pkl"):
                    try:
                        with open(os.path.join(self.dir, name), "rb") as f:
                            self.entries.update(pickle.load(f))
                    except Exception:  # a damaged cache file is only a cache miss
                        pass

    def get(self, i: int, compute: Callable[[], Dict]) -> Dict:
        hit = self.entries.get(i)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        value = self.entries[i] = compute()
        self.new += 1
        return value

    def flush(self) -> None:
        if not self.dir or not self.new:
            return
        import pickle
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"rank{self.rank}.pkl")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(self.entries, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
        self.new = 0


# ---------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------


def collate(examples: List[Dict], pad_token_id: int) -> Dict:
    """Pad each tensor key to the longest in the batch; other keys become lists.

    ``*_input_ids`` -> pad_token_id, ``*_attention_mask`` -> 0, ``*_labels`` ->
    -100.  Responses (chosen_*/rejected_*) are RIGHT-padded for teacher
    forcing; ``prompt_*`` are LEFT-padded so generation can start right after
    the last prompt token of every row.  Each key is padded on its own, so
    chosen and rejected tensors can have different lengths.
    """
    batch = {}
    for key in examples[0]:
        values = [ex[key] for ex in examples]
        if key.endswith("_input_ids"):
            batch[key] = utils.pad_sequences(values, pad_token_id, left=key.startswith("prompt_"))
        elif key.endswith("_attention_mask"):
            batch[key] = utils.pad_sequences(values, 0, left=key.startswith("prompt_"))
        elif key.endswith("_labels"):
            batch[key] = utils.pad_sequences(values, IGNORE_INDEX, left=key.startswith("prompt_"))
        else:
            batch[key] = values
    return batch


# ---------------------------------------------------------------------------
# Batch iteration
# ---------------------------------------------------------------------------


def global_batch_indices(
    n: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    n_epochs: Optional[int],
    n_examples: Optional[int],
    world_size: int = 1,
) -> Iterator[List[int]]:
    """Plan of global batches as lists of example indices (no data touched).

    Epoch e uses ``random.Random(seed + e)`` to permute if shuffle, else the
    natural order. Batches never straddle epochs. A final partial batch is
    dropped if shuffle (training: constant batch size), else kept but trimmed
    to a multiple of world_size so every rank gets the same number of
    examples. Stops after n_epochs epochs or once at least n_examples examples
    were planned, whichever comes first; one epoch if both are None.
    """
    if n_epochs is None and n_examples is None:
        n_epochs = 1
    planned = 0
    epoch = 0
    while n_epochs is None or epoch < n_epochs:
        order = list(range(n))
        if shuffle:
            random.Random(seed + epoch).shuffle(order)
        produced = False
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < batch_size:
                if shuffle:
                    break
                idx = idx[: len(idx) - len(idx) % world_size]
                if not idx:
                    break
            yield idx
            produced = True
            planned += len(idx)
            if n_examples is not None and planned >= n_examples:
                return
        if not produced:  # too few examples for even one batch: avoid looping forever
            return
        epoch += 1


def _batch_sources(names: List[str], split: str, tokenizer, template: Optional[str], sft_mode: bool, options,
                   silent: bool, cache_dir: Optional[str], rank: int) -> Tuple[List[Tuple[str, int, Dict]], Dict]:
    """(data, caches) of get_batch_iterator: every example as (data set name, index within it,
    example), and each data set's TokenCache. Pairwise training refuses SFT-only rows."""
    data = []  # (data set name, index within it, example)
    caches = {}
    for name in names:
        examples, fingerprint = load_dataset_checked(name, split, options, silent=silent)
        if not sft_mode:
            bad = next((ex for ex in examples if ex["chosen"] is None), None)
            if bad is not None:
                raise DataError(f"data set {name!r} has SFT rows without preference pairs (e.g. {bad.get('where')}); "
                                "use it with loss=sft")
        data.extend((name, i, ex) for i, ex in enumerate(examples))
        caches[name] = token_cache(cache_dir, name, split, fingerprint, tokenizer, template, rank)
    return data, caches


def _batch_element(entry: Tuple[str, int, Dict], caches: Dict, tokenizer, template: Optional[str], sft_mode: bool,
                   max_length: int, max_prompt_length: int, truncation_mode: str) -> Dict:
    """One example of a batch: its (cached) ids, truncated by build_pair, plus what scorers read."""
    name, i, ex = entry
    ids = caches[name].get(i, lambda: encode_example(ex, tokenizer, template))
    chosen, rejected = ("sft_target", "sft_target") if sft_mode else ("chosen", "rejected")
    out = {"prompt": ids["prompt_text"], "chosen": ex[chosen], "rejected": ex[rejected]}
    out.update(build_pair(ids["prompt"], ids[chosen], ids[rejected], tokenizer.bos_token_id, max_length,
                          max_prompt_length, truncation_mode))
    out["dataset"] = name
    out["original_prompt"] = ex["prompt"]  # before the chat template: what scorers and judges read
    out["reference"] = ex["sft_target"]
    return out


def get_batch_iterator(
    names: List[str],
    tokenizer,
    split: str = "train",
    batch_size: int = 8,
    shuffle: bool = True,
    max_length: int = 512,
    max_prompt_length: int = 128,
    sft_mode: bool = False,
    n_epochs: Optional[int] = None,
    n_examples: Optional[int] = None,
    seed: int = 0,
    silent: bool = False,
    rank: int = 0,
    world_size: int = 1,
    truncation_mode: str = "keep_end",
    skip_batches: int = 0,
    options=None,
    cache_dir: Optional[str] = None,
    stats: Optional[Dict[str, int]] = None,
) -> Iterator[Dict]:
    """Yield this rank's slice of each global batch, tokenised and collated.

    * ``batch_size`` is the GLOBAL batch size; each rank gets the contiguous
      slice ``[rank*b:(rank+1)*b]`` with ``b = batch_size // world_size``
      (ValueError if it does not divide). A trimmed final eval batch of size
      p is split the same way with ``b = p // world_size``.
    * Order, epochs, n_examples and the final partial batch follow
      ``global_batch_indices``.
    * ``skip_batches=k`` skips the first k GLOBAL batches (counted across
      epochs) without tokenising them: resuming with the same arguments plus
      skip_batches continues the exact same stream.
    * ``sft_mode``: chosen AND rejected are replaced by ``sft_target`` so the
      truncation depends only on the target; use only the chosen_* keys.
    * Only this rank's examples are tokenised, lazily; with ``cache_dir`` their ids are
      kept in a TokenCache there, so the next run with the same data and tokenizer
      tokenises nothing. ``stats`` (a dict) receives the cache's hits and misses.
    * ``options``: the ``data:`` config section (data_options).
    * Each batch also carries ``dataset`` (data set names), ``original_prompt`` (the prompt
      before any chat template: a string or a message list) and ``reference`` (the SFT
      target), for scorers (prefkd/scorers.py) and judges.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")
    if batch_size < 1 or batch_size % world_size != 0:
        raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of world_size ({world_size})")
    if skip_batches < 0:
        raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")

    template = data_options(options)["chat_template"]
    data, caches = _batch_sources(names, split, tokenizer, template, sft_mode, options, silent or rank != 0,
                                  cache_dir, rank)
    plan = global_batch_indices(len(data), batch_size, shuffle, seed, n_epochs, n_examples, world_size)
    try:
        for batch_idx, idx in enumerate(plan):
            if batch_idx < skip_batches:
                continue
            per_rank = len(idx) // world_size
            local = idx[rank * per_rank : (rank + 1) * per_rank]
            yield collate([_batch_element(data[i], caches, tokenizer, template, sft_mode, max_length,
                                          max_prompt_length, truncation_mode) for i in local], tokenizer.pad_token_id)
    finally:
        for cache in caches.values():
            cache.flush()
            if stats is not None:
                stats["hits"] = stats.get("hits", 0) + cache.hits
                stats["misses"] = stats.get("misses", 0) + cache.misses


def run_batches(cfg, tokenizer, spec, split: str, rank: int = 0, world_size: int = 1, skip_batches: int = 0,
                pairs: bool = False) -> Iterator[Dict]:
    """The batches a run of config `cfg` reads of `split` on process `rank` of `world_size` (the
    trainer, precompute.py and the tests read exactly these): pairs, or single targets when the
    loss's spec (loss_spec.LossSpec) trains on SFT targets (pairs=True: pairs regardless, for the
    held-out preference accuracy)."""
    train = split == "train"
    return get_batch_iterator(
        list(cfg.datasets), tokenizer, split=split,
        batch_size=cfg.batch_size if train else cfg.eval_batch_size,
        shuffle=train, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
        sft_mode=spec.sft_targets and not pairs, n_epochs=cfg.n_epochs if train else 1,
        n_examples=cfg.n_examples if train else cfg.n_eval_examples, seed=cfg.seed, silent=True,
        rank=rank, world_size=world_size, truncation_mode=cfg.truncation_mode,
        skip_batches=skip_batches, options=cfg.get("data"), cache_dir=cache_dir_of(cfg.get("data")))
