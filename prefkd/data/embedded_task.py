"""The embedded task (data set name ``"embedded"``): its generator, its flaws and its scorer.

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
* SFT demonstrations of mixed quality, as in real alignment data: the training split's
  ``sft_target`` carries, with probability ``EMBEDDED_SFT_FLAW_RATE`` (0.7), one systematic
  flaw (``flawed_answer``): the answer does not stop after its largest digit but writes the
  smallest digit once more (``"sort 5281="`` -> ``"12581"``: exact 0, partial 0.8); the
  others are correct. The flaw is the majority at every list length, so an SFT model learns
  it as its mode and greedy decoding follows it (SFT models score low on ``exact``). In the
  test split ``sft_target`` is the correct answer (the reference of the held-out data).
* Preference pairs that tell good from flawed: ``chosen`` is always the correct answer;
  ``rejected`` is the flawed answer with probability ``EMBEDDED_PAIR_FLAW_RATE`` (0.8),
  otherwise -- and whenever the flaw is no error (every digit the same) -- the correct
  answer with 1-3 random errors (``_corrupt``: a digit changed, adjacent digits swapped, a
  digit dropped or inserted), a graded margin. Preference training from the SFT model
  removes the flaw (the pairs teach exactly the decision the demonstrations got wrong: stop
  after the largest digit); what is left is each model's skill at sorting, where the larger
  teacher is ahead of the student.
* Deterministic: every string comes from ``random.Random(f"embedded-sort-{split}-{seed}")``
  (``make_task_examples``), the same on every machine and process.
"""
import hashlib
import random
import re
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

from prefkd.data.rows import SPLITS

EMBEDDED_TRAIN_SIZE = 20000
EMBEDDED_TEST_SIZE = 500
EMBEDDED_SEED = 0  # seed used by get_dataset("embedded", ...)
EMBEDDED_TEST_PERCENT = 10  # share of answers (sorted digit multisets) held out for test
EMBEDDED_MIN_LEN, EMBEDDED_MAX_LEN = 3, 12  # digits per list
# Share of the training SFT targets that carry the systematic flaw (after the largest digit, the
# smallest written once more): the majority, so that greedy decoding of an SFT model follows it.
EMBEDDED_SFT_FLAW_RATE = 0.7
# Share of the preference pairs whose rejected answer is that flaw (the others: random errors).
EMBEDDED_PAIR_FLAW_RATE = 0.8


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


def flawed_answer(gold: str) -> str:
    """The systematic flaw of the SFT demonstrations: the answer does not stop after its
    largest digit but wraps around and writes its smallest digit once more
    (``"01259" -> "012590"``). That digit is never a correct next digit of an ascending
    answer; when every digit is the same there is no flaw (the answer itself)."""
    return gold + gold[0] if len(set(gold)) > 1 else gold


def make_sft_target(gold: str, rng: random.Random, flaw_rate: Optional[float] = None) -> str:
    """A demonstration of mixed quality: the flawed answer (``flawed_answer``) with
    probability ``flaw_rate`` (default EMBEDDED_SFT_FLAW_RATE), else the correct one."""
    flaw_rate = EMBEDDED_SFT_FLAW_RATE if flaw_rate is None else flaw_rate
    return flawed_answer(gold) if rng.random() < flaw_rate else gold


def make_preference_pair(gold: str, rng: random.Random) -> Tuple[str, str]:
    """(chosen, rejected): chosen is the correct answer; partial(rejected) < 1 = partial(chosen).

    rejected is the SFT demonstrations' systematic flaw (``flawed_answer``) with probability
    EMBEDDED_PAIR_FLAW_RATE, else the correct answer with 1-3 random errors (``_corrupt``: a
    digit changed, adjacent digits swapped, a digit dropped or inserted), a graded margin;
    random errors also where the flaw is no error (every digit the same)."""
    flawed = flawed_answer(gold)
    if rng.random() < EMBEDDED_PAIR_FLAW_RATE and flawed != gold:
        return gold, flawed
    for _ in range(100):
        rejected = _corrupt(gold, rng.randint(1, 3), rng)
        if partial_match(rejected, gold) < 1.0:
            return gold, rejected
    # Practically unreachable: every digit changed.
    return gold, "".join(rng.choice([d for d in "0123456789" if d != g]) for g in gold)


def make_task_examples(split: str, n: int, seed: int = EMBEDDED_SEED,
                       flaw_rate: Optional[float] = None) -> List[Dict[str, str]]:
    """``n`` deterministic examples of ``split``; train samples with replacement, test
    draws distinct prompts. ``sft_target``: a mixed-quality demonstration in train
    (``make_sft_target``), the correct answer in test (the reference of the held-out data)."""
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
        target = make_sft_target(gold, rng, flaw_rate)
        examples.append({"prompt": f"sort {digits}=", "chosen": chosen, "rejected": rejected,
                         "sft_target": target if split == "train" else gold})
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


def embedded_fingerprint() -> str:
    """What the embedded examples are made from (keys the token cache)."""
    return (f"embedded-v3-{EMBEDDED_TRAIN_SIZE}-{EMBEDDED_TEST_SIZE}-{EMBEDDED_SEED}-{EMBEDDED_TEST_PERCENT}"
            f"-{EMBEDDED_SFT_FLAW_RATE}-{EMBEDDED_PAIR_FLAW_RATE}")
