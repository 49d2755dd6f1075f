"""Preference data: data sets, tokenisation, truncation, collation and batching.

The embedded task (data set name ``"embedded"``)
------------------------------------------------
The framework ships its own task so that everything runs offline: sort a list of
digits, an answer any program can check.

* prompt ``"sort {digits}="`` with 3 to 12 digits (length uniform, digits uniform
  0-9); answer: the digits in ascending order (``"sort 5281="`` -> ``"1258"``;
  leading zeros are normal: ``"sort 301="`` -> ``"013"``).
* Why sorting: a model of a few hundred thousand to a few million parameters
  learns it well above chance within a minute on 2 CPU cores (measured at lr 2e-3:
  0.35 M params reach ~50% exact / 0.63 partial after 12k examples, 2.7 M params
  ~58% / 0.68 after 9.6k), and lists of up to 12 digits keep a gap between the
  small and the larger model. Integer addition, tried first, was learned far too
  slowly (0.35 M params: 3% exact after 40k examples).
* Train/test split by a hash of the ANSWER (the sorted multiset): about 10% of
  answers are test answers, so no test answer is ever a training target.
  Independent of the seed.
* Sizes: ``EMBEDDED_TRAIN_SIZE`` (20000) train examples, drawn with replacement,
  and ``EMBEDDED_TEST_SIZE`` (500) distinct test prompts.
* ``score_answer(prompt, completion)``: the completion is cut at the first
  non-digit (after stripping leading spaces); ``exact`` = 1.0 iff it equals the
  sorted digits; ``partial`` = number of positions (left-aligned) with the right
  digit over ``max(len(pred), len(gold))`` (0.0 for an empty prediction).
  E.g. gold "0123": "0132" -> 0.5, "012" -> 0.75.
* Preference pairs with a graded margin: ``chosen`` is the correct answer half of
  the time, otherwise the correct answer with one error (a digit changed or two
  adjacent digits swapped); ``rejected`` has 1-3 more errors (changes, swaps, a
  dropped or inserted digit), re-drawn until ``partial(chosen) >
  partial(rejected)`` strictly. ``sft_target`` is the correct answer.

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
import os
import random
import re
from functools import lru_cache
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

EMBEDDED_TRAIN_SIZE = 20000
EMBEDDED_TEST_SIZE = 500
EMBEDDED_SEED = 0  # seed used by get_dataset("embedded", ...)
EMBEDDED_TEST_PERCENT = 10  # share of answers (sorted digit multisets) held out for test
EMBEDDED_MIN_LEN, EMBEDDED_MAX_LEN = 3, 12  # digits per list

EMBEDDED_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer")

IGNORE_INDEX = -100  # label value ignored by the loss (prompt and padding positions)
SPLITS = ("train", "test")
TRUNCATION_MODES = ("keep_end", "keep_start")

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def get_tokenizer(name_or_path: str):
    """Load a tokenizer. ``"embedded"`` -> the shipped char-level tokenizer.

    Anything else goes to ``AutoTokenizer.from_pretrained`` (a local path works
    offline). A missing pad token falls back to eos, as padded positions are
    masked out anyway.
    """
    from transformers import AutoTokenizer  # lazy: keeps `import preference_datasets` cheap

    if name_or_path == "embedded":
        if not os.path.isfile(os.path.join(EMBEDDED_TOKENIZER_DIR, "tokenizer.json")):
            raise FileNotFoundError(
                f"embedded tokenizer not found in {EMBEDDED_TOKENIZER_DIR}; run `python scripts/build_tokenizer.py`"
            )
        tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_TOKENIZER_DIR)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------
# The embedded task: sort a list of digits
# ---------------------------------------------------------------------------


def answer_split(gold: str) -> str:
    """"test" for ~EMBEDDED_TEST_PERCENT % of ANSWERS (sorted digit multisets), else "train".

    Splitting by answer, not by prompt, means no test answer is ever seen in training:
    a model must sort, not recall. sha256 (not Python's ``hash``) keeps it stable across
    processes and independent of the seed."""
    digest = hashlib.sha256(gold.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < EMBEDDED_TEST_PERCENT else "train"


def sample_digits(rng: random.Random) -> str:
    n = rng.randint(EMBEDDED_MIN_LEN, EMBEDDED_MAX_LEN)
    return "".join(rng.choice("0123456789") for _ in range(n))


def parse_prompt(prompt: str) -> str:
    """The digits of the LAST ``sort <digits>=`` in the prompt (so templated prompts work too)."""
    matches = re.findall(r"sort (\d+)=", prompt)
    if not matches:
        raise ValueError(f"not a sorting prompt (expected 'sort <digits>='): {prompt!r}")
    return matches[-1]


def gold_answer(prompt: str) -> str:
    return "".join(sorted(parse_prompt(prompt)))


def extract_answer(completion: str) -> str:
    """Leading digits of the completion after stripping leading spaces."""
    match = re.match(r"\d*", completion.lstrip(" "))
    return match.group(0)


def partial_match(pred: str, gold: str) -> float:
    """Share of positions (left-aligned) where the prediction has the right digit, over the
    longer string's length: a missing or extra digit costs at least one position."""
    if not pred:
        return 0.0
    matches = sum(p == g for p, g in zip(pred, gold))
    return matches / max(len(pred), len(gold))


def score_answer(prompt: str, completion: str) -> Dict[str, float]:
    """Verifiable reward of the sorting task: {"exact": 0/1, "partial": [0, 1]}."""
    gold = gold_answer(prompt)
    pred = extract_answer(completion)
    return {"exact": float(pred == gold), "partial": partial_match(pred, gold)}


def _one_error(answer: str, rng: random.Random) -> str:
    """``answer`` with one mistake: a digit changed, or two adjacent unequal digits swapped
    (the typical error of a sorter)."""
    swaps = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    if swaps and rng.random() < 0.5:
        i = rng.choice(swaps)
        return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:]
    i = rng.randrange(len(answer))
    return answer[:i] + rng.choice([d for d in "0123456789" if d != answer[i]]) + answer[i + 1:]


def _corrupt(gold: str, n_errors: int, rng: random.Random) -> str:
    """``gold`` with ``n_errors`` random mistakes (changes, adjacent swaps, a dropped or an
    inserted digit)."""
    out = gold
    for _ in range(n_errors):
        kind = rng.random()
        if kind < 0.15 and len(out) > 1:
            i = rng.randrange(len(out))
            out = out[:i] + out[i + 1:]
        elif kind < 0.3:
            i = rng.randrange(len(out) + 1)
            out = out[:i] + rng.choice("0123456789") + out[i:]
        else:
            out = _one_error(out, rng)
    return out


def make_preference_pair(gold: str, rng: random.Random) -> Tuple[str, str]:
    """(chosen, rejected) with partial(chosen) > partial(rejected) strictly.

    chosen is the gold answer half of the time, else the gold answer with one error;
    rejected has 1-3 more errors than chosen. The margin is graded, and a wrong chosen
    means the pair teaches "better", not only "right vs wrong"."""
    n_wrong = 0 if rng.random() < 0.5 else 1
    chosen = _one_error(gold, rng) if n_wrong else gold
    chosen_score = partial_match(chosen, gold)
    for _ in range(100):
        rejected = _corrupt(gold, n_wrong + rng.randint(1, 3), rng)
        if rejected != chosen and partial_match(rejected, gold) < chosen_score:
            return chosen, rejected
    # Practically unreachable: reversing the digits of a sorted non-constant answer moves
    # almost every position; a constant answer gets every digit changed.
    bad = "".join(rng.choice([d for d in "0123456789" if d != g]) for g in gold)
    return chosen, bad


def make_task_examples(split: str, n: int, seed: int = EMBEDDED_SEED) -> List[Dict[str, str]]:
    """``n`` deterministic examples of ``split``; train samples with replacement, test
    draws distinct prompts."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = random.Random(f"embedded-sort-{split}-{seed}")  # str seeds hash with sha512: stable
    seen = set()
    examples = []
    while len(examples) < n:
        digits = sample_digits(rng)
        gold = "".join(sorted(digits))
        if answer_split(gold) != split:
            continue
        if split == "test":
            if digits in seen:
                continue
            seen.add(digits)
        chosen, rejected = make_preference_pair(gold, rng)
        examples.append({"prompt": f"sort {digits}=", "chosen": chosen, "rejected": rejected, "sft_target": gold})
    return examples


@lru_cache(maxsize=None)
def _cached_embedded(split: str) -> Tuple[Tuple[str, str, str, str], ...]:
    size = EMBEDDED_TRAIN_SIZE if split == "train" else EMBEDDED_TEST_SIZE
    examples = make_task_examples(split, size, EMBEDDED_SEED)
    return tuple((e["prompt"], e["chosen"], e["rejected"], e["sft_target"]) for e in examples)


def load_embedded(split: str, silent: bool = False) -> List[Dict[str, str]]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for data set 'embedded'; expected one of {SPLITS}")
    # Fresh dicts on every call: callers may mutate them without corrupting the cache.
    return [dict(prompt=p, chosen=c, rejected=r, sft_target=t) for p, c, r, t in _cached_embedded(split)]


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

# name -> loader(split, silent) -> list of {prompt, chosen, rejected, sft_target}
DATASETS: Dict[str, Callable[..., List[Dict[str, str]]]] = {"embedded": load_embedded}
# name -> scorer(prompt, completion) -> dict of floats; data sets without verifiable answers are absent
TASK_SCORERS: Dict[str, Callable[[str, str], Dict[str, float]]] = {"embedded": score_answer}


def get_dataset(name: str, split: str, silent: bool = False) -> List[Dict[str, str]]:
    """Examples of data set ``name``: dicts with str keys prompt/chosen/rejected/sft_target."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {sorted(DATASETS)}")
    data = DATASETS[name](split, silent=silent)
    if not silent:
        print(f"Loaded {len(data)} examples of {name}/{split}")
    return data


def task_score(dataset_name: str, prompt: str, completion: str) -> Optional[Dict[str, float]]:
    """Verifiable score of a completion, or None if the data set has no checker."""
    scorer = TASK_SCORERS.get(dataset_name)
    return None if scorer is None else scorer(prompt, completion)


# ---------------------------------------------------------------------------
# Tokenisation and truncation
# ---------------------------------------------------------------------------


def _keep(ids: List[int], n: int, truncation_mode: str) -> List[int]:
    """The first (keep_start) or last (keep_end) ``n`` ids."""
    n = max(n, 0)
    if truncation_mode == "keep_start":
        return ids[:n]
    return ids[max(len(ids) - n, 0) :]  # not ids[-n:]: ids[-0:] would be the whole list


def tokenize_pair(
    prompt: str,
    chosen: str,
    rejected: str,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
) -> Dict:
    """Token ids, masks and labels of one (prompt, chosen, rejected) triple; see module docstring."""
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"unknown truncation_mode {truncation_mode!r}; expected one of {TRUNCATION_MODES}")
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token; responses must end with one")

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_body = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    chosen_ids = tokenizer(chosen, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rejected_ids = tokenizer(rejected, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    prompt_ids = bos + prompt_body
    longer = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longer > max_length:
        # bos stays first: the model was trained with it at position 0.
        prompt_ids = bos + _keep(prompt_body, max_prompt_length - len(bos), truncation_mode)
    if len(prompt_ids) + longer > max_length:
        chosen_ids = chosen_ids[: max_length - max_prompt_length]
        rejected_ids = rejected_ids[: max_length - max_prompt_length]

    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for kind, response_ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        ids = prompt_ids + response_ids
        out[f"{kind}_input_ids"] = ids
        out[f"{kind}_attention_mask"] = [1] * len(ids)
        out[f"{kind}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)
    out["prompt_input_ids"] = list(prompt_ids)
    out["prompt_attention_mask"] = [1] * len(prompt_ids)
    return out


# ---------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------


def pad_sequences(seqs: List[List[int]], value: int, left: bool = False) -> torch.LongTensor:
    """Stack ragged lists into a (batch, longest) LongTensor filled with ``value``."""
    longest = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), longest), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            if left:
                out[i, longest - len(s) :] = torch.tensor(s, dtype=torch.long)
            else:
                out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


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
            batch[key] = pad_sequences(values, pad_token_id, left=key.startswith("prompt_"))
        elif key.endswith("_attention_mask"):
            batch[key] = pad_sequences(values, 0, left=key.startswith("prompt_"))
        elif key.endswith("_labels"):
            batch[key] = pad_sequences(values, IGNORE_INDEX, left=key.startswith("prompt_"))
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
    * Each batch also carries ``dataset`` (list of data set names) for
      ``task_score``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")
    if batch_size < 1 or batch_size % world_size != 0:
        raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of world_size ({world_size})")
    if skip_batches < 0:
        raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")

    data = []  # (data set name, example)
    for name in names:
        data.extend((name, ex) for ex in get_dataset(name, split, silent=silent or rank != 0))

    def element(i: int) -> Dict:
        name, ex = data[i]
        chosen = ex["sft_target"] if sft_mode else ex["chosen"]
        rejected = ex["sft_target"] if sft_mode else ex["rejected"]
        out = tokenize_pair(ex["prompt"], chosen, rejected, tokenizer, max_length, max_prompt_length, truncation_mode)
        out["dataset"] = name
        return out

    plan = global_batch_indices(len(data), batch_size, shuffle, seed, n_epochs, n_examples, world_size)
    for batch_idx, idx in enumerate(plan):
        if batch_idx < skip_batches:
            continue
        per_rank = len(idx) // world_size
        local = idx[rank * per_rank : (rank + 1) * per_rank]
        yield collate([element(i) for i in local], tokenizer.pad_token_id)
