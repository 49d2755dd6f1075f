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
import re
from functools import lru_cache
from html.parser import HTMLParser
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
# Share of the training SFT targets that carry the systematic flaw (after the largest digit, the
# smallest written once more): the majority, so that greedy decoding of an SFT model follows it.
EMBEDDED_SFT_FLAW_RATE = 0.7
# Share of the preference pairs whose rejected answer is that flaw (the others: random errors).
EMBEDDED_PAIR_FLAW_RATE = 0.8

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


# ---------------------------------------------------------------------------
# Real data sets: sources, schemas, conversion and validation
# ---------------------------------------------------------------------------
#
# Every data set becomes a list of examples of ONE shape:
#   {"prompt": str | [messages], "chosen": str | None, "rejected": str | None,
#    "sft_target": str, "chat": bool, "where": "file:row"}
# With chat=False the strings are used raw (the DPO repo's format: HH, SHP, SE, embedded);
# with chat=True, prompt is the message list before the scored assistant turn and
# chosen/rejected/sft_target are the contents of that turn, formatted with the tokenizer's
# chat template at tokenisation time. chosen/rejected are None for SFT-only data sets.
#
# Rows come from the hub (datasets.load_dataset(<hub id>, split=...)) or, for any data
# set, from a local copy (data.paths.<name>: a file, or a directory holding one file per
# split named after the hub's split, e.g. train_prefs.jsonl). Both go through the same
# converter, so a local file in the public schema is loaded exactly like the hub.

MESSAGE_ROLES = ("system", "user", "assistant")
LOCAL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".csv")
# A plain template for tokenizers that ship none (base checkpoints): used, with a
# warning, unless data.chat_template is set.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}")


class DataError(ValueError):
    """Invalid input data; the message names the file, the row and the problem."""


class RowError(ValueError):
    """One row is invalid (the problem only; the caller adds where)."""


DEFAULT_OPTIONS = {
    "skip_invalid": False, "cache_dir": None, "test_fraction": 0.05, "chat_template": None,
    "paths": {}, "local": {"path": None, "train": None, "test": None, "prompt": "prompt", "chosen": "chosen",
                           "rejected": "rejected", "messages": "messages", "completion": "completion"},
    "scorer": None, "allow_mixed_formats": False, "check_lengths": 1000,
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
    return out


# -- checks shared by every converter ---------------------------------------


def need(row: Dict, key: str, kind=str):
    """row[key], checked to exist and be of `kind` (str: a non-empty text)."""
    if key not in row:
        raise RowError(f"missing column {key!r} (columns: {sorted(row)})")
    value = row[key]
    if kind is str:
        if not isinstance(value, str):
            raise RowError(f"column {key!r} is {type(value).__name__}, expected text")
        if not value.strip():
            raise RowError(f"column {key!r} is empty")
    elif kind is list and not isinstance(value, list):
        # parquet/arrow may hand over tuples or numpy arrays; accept any sequence of dicts
        if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
            value = value.tolist()
        if not isinstance(value, list):
            raise RowError(f"column {key!r} is {type(value).__name__}, expected a list of messages")
    return value


def text(value, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} is {type(value).__name__}, expected text")
    if not value.strip():
        raise RowError(f"{what} is empty")
    return value


def messages(value, what: str) -> List[Dict[str, str]]:
    """A validated list of {"role", "content"} messages (extra keys dropped)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes, list)):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise RowError(f"{what} must be a non-empty list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"{what}[{i}] must be a message {{'role': ..., 'content': ...}}, got {str(m)[:80]!r}")
        if m["role"] not in MESSAGE_ROLES:
            raise RowError(f"{what}[{i}] has role {m['role']!r}; expected one of {MESSAGE_ROLES}")
        out.append({"role": m["role"], "content": text(m["content"], f"{what}[{i}].content")})
    return out


def split_conversation(conv: List[Dict[str, str]], what: str) -> Tuple[List[Dict[str, str]], str]:
    """(prompt messages, last assistant content): the last turn is the one being scored."""
    if conv[-1]["role"] != "assistant":
        raise RowError(f"{what} must end with an assistant message, ends with {conv[-1]['role']!r}")
    if len(conv) < 2:
        raise RowError(f"{what} has no prompt before the assistant message")
    return conv[:-1], conv[-1]["content"]


def pair_example(prompt, chosen: str, rejected: str, chat: bool, sft_target: Optional[str] = None) -> Dict:
    if chosen == rejected:
        raise RowError("chosen is identical to rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "sft_target": chosen if sft_target is None else sft_target, "chat": chat}


def sft_example(prompt, target: str, chat: bool) -> Dict:
    return {"prompt": prompt, "chosen": None, "rejected": None, "sft_target": target, "chat": chat}


def conversational_pair(chosen_conv, rejected_conv, prompt=None) -> Dict:
    """chosen/rejected as full conversations (prompt included; TRL's implicit-prompt format)
    or, with `prompt` given, as completions after it."""
    c = messages(chosen_conv, "chosen")
    r = messages(rejected_conv, "rejected")
    if prompt is not None:
        p = [{"role": "user", "content": text(prompt, "prompt")}] if isinstance(prompt, str) else messages(prompt, "prompt")
        if len(c) == 1 and len(r) == 1:  # explicit prompt + one assistant message each
            return pair_example(p, split_conversation(p + c, "chosen")[1], split_conversation(p + r, "rejected")[1], True)
    pc, c_text = split_conversation(c, "chosen")
    pr, r_text = split_conversation(r, "rejected")
    if pc != pr:
        raise RowError("chosen and rejected conversations differ before their last assistant message")
    return pair_example(pc, c_text, r_text, True)


# -- converters: rows -> examples (generators; a RowError marks one bad row) --


def anthropic_prompt(dialogue: str, what: str) -> str:
    """The text up to and including the last '\\n\\nAssistant:' (the DPO repo's HH rule)."""
    i = dialogue.rfind("\n\nAssistant:")
    if i < 0:
        raise RowError(f"{what} has no '\\n\\nAssistant:' turn")
    return dialogue[: i + len("\n\nAssistant:")]


def convert_hh(row: Dict) -> List[Dict]:
    """Anthropic/hh-rlhf {chosen, rejected}: full Human/Assistant dialogues sharing a prefix;
    the prompt ends with the last '\\n\\nAssistant:', as in the DPO repo."""
    chosen, rejected = need(row, "chosen"), need(row, "rejected")
    prompt = anthropic_prompt(chosen, "chosen")
    if not rejected.startswith(prompt):
        raise RowError("rejected does not continue the same dialogue as chosen")
    c, r = chosen[len(prompt):], rejected[len(prompt):]
    return [pair_example(prompt, text(c, "the chosen response"), text(r, "the rejected response"), False)]


def convert_shp(row: Dict) -> List[Dict]:
    """stanfordnlp/SHP: one pair per row, kept when the score ratio is at least 2 (as in the
    DPO repo); labels=1 means A is preferred. Prompt '\\n\\nHuman: <history>\\n\\nAssistant:'."""
    history = need(row, "history")
    a, b = need(row, "human_ref_A"), need(row, "human_ref_B")
    sa, sb, label = (need(row, k, None) for k in ("score_A", "score_B", "labels"))
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (sa, sb)) or label not in (0, 1):
        raise RowError(f"score_A/score_B must be numbers and labels 0 or 1, got {sa!r}, {sb!r}, {label!r}")
    if min(sa, sb) <= 0 or max(sa / sb, sb / sa) < 2:
        return []  # the DPO repo's filter, not an error
    chosen, rejected = (a, b) if label == 1 else (b, a)
    return [pair_example(f"\n\nHuman: {history}\n\nAssistant:", " " + chosen, " " + rejected, False)]


class _HTMLText(HTMLParser):
    """Text of top-level <p> elements and of <code> inside <pre> or at top level, as the DPO
    repo's strip_html_tags keeps them (stdlib only). One difference: text inside inline tags
    of a paragraph (<b>, <a>, <code>) is kept, where the DPO repo drops it."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.stack, self.buf = [], [], None

    def handle_starttag(self, tag, attrs):
        if (tag == "p" and not self.stack) or (tag == "code" and (not self.stack or self.stack == ["pre"])):
            self.buf = []
        self.stack.append(tag)

    def handle_endtag(self, tag):
        while self.stack:
            top = self.stack.pop()
            if top == tag:
                break
        if self.buf is not None and ((tag == "p" and not self.stack) or
                                     (tag == "code" and (not self.stack or self.stack == ["pre"]))):
            body = "".join(self.buf)
            self.parts.append(body if tag == "p" else f"<code>{body}</code>")
            self.buf = None

    def handle_data(self, data):
        if self.buf is not None:
            self.buf.append(data)


def strip_html(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return "\n\n".join(parser.parts)


def convert_se(row: Dict) -> List[Dict]:
    """HuggingFaceH4/stack-exchange-preferences {question, answers[{text, pm_score}]}: every
    pair of answers with different scores, the higher-scored chosen (the DPO repo pairs all
    answers); HTML stripped to paragraphs and code."""
    question = strip_html(need(row, "question"))
    answers = need(row, "answers", list)
    texts, scores = [], []
    for i, a in enumerate(answers):
        if not isinstance(a, dict) or "text" not in a or "pm_score" not in a:
            raise RowError(f"answers[{i}] must have 'text' and 'pm_score'")
        texts.append(" " + strip_html(text(a["text"], f"answers[{i}].text")))
        scores.append(a["pm_score"])
    prompt = f"\n\nHuman: {text(question, 'question (after stripping HTML)')}\n\nAssistant:"
    best = texts[max(range(len(texts)), key=lambda i: scores[i])] if texts else None
    out = []
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            if scores[i] != scores[j] and texts[i].strip() and texts[j].strip() and texts[i] != texts[j]:
                w, l = (i, j) if scores[i] > scores[j] else (j, i)
                out.append(pair_example(prompt, texts[w], texts[l], False, best))
    return out


def convert_pairs_conversational(row: Dict) -> List[Dict]:
    """argilla/dpo-mix-7k and HuggingFaceH4/ultrafeedback_binarized: chosen and rejected are
    whole conversations (lists of {role, content}) sharing every turn but the last."""
    return [conversational_pair(need(row, "chosen", list), need(row, "rejected", list))]


def convert_deita(row: Dict) -> List[Dict]:
    """HuggingFaceH4/deita-10k-v0-sft {messages}: SFT only; the last assistant turn is the
    target, everything before it the prompt."""
    prompt, target = split_conversation(messages(need(row, "messages", list), "messages"), "messages")
    return [sft_example(prompt, target, True)]


HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def convert_helpsteer2(rows: Iterator[Tuple[str, Dict]]) -> Iterator[Tuple[str, Dict]]:
    """nvidia/HelpSteer2 {prompt, response, helpfulness, ...}: the data set lists two responses
    per prompt in consecutive rows. Each such pair becomes a preference pair with the higher
    `helpfulness` chosen (HelpSteer2's primary attribute); pairs with equal helpfulness are
    dropped (no preference). Yields (where, example or RowError)."""
    pending = None
    for where, row in rows:
        try:
            prompt, response = need(row, "prompt"), need(row, "response")
            score = need(row, "helpfulness", None)
            if not isinstance(score, (int, float)) or isinstance(score, bool):
                raise RowError(f"column 'helpfulness' is {type(score).__name__}, expected a number")
        except RowError as e:
            yield where, e
            pending = None
            continue
        if pending is None or pending[1] != prompt:
            pending = (where, prompt, response, score)
            continue
        _, p, r0, s0 = pending
        pending = None
        if s0 == score:
            continue
        (c, r) = (r0, response) if s0 > score else (response, r0)
        user = [{"role": "user", "content": p}]
        try:
            yield where, pair_example(user, c, r, True)
        except RowError as e:
            yield where, e


def convert_local(row: Dict, opts: Dict) -> List[Dict]:
    """TRL's standard formats, with column names from data.local:
    preference  {prompt, chosen, rejected}: strings, or message lists (the prompt optional:
                chosen/rejected then hold the whole conversation);
    SFT         {messages} or {prompt, completion} (strings or message lists)."""
    col = opts["local"]
    p, c, r, m, comp = col["prompt"], col["chosen"], col["rejected"], col["messages"], col["completion"]
    if c in row or r in row:
        chosen, rejected = row.get(c), row.get(r)
        if c not in row or r not in row:
            raise RowError(f"missing column {(c if c not in row else r)!r} (columns: {sorted(row)}); "
                           f"set data.local.chosen / data.local.rejected to the column names")
        if isinstance(chosen, str) and isinstance(rejected, str):
            return [pair_example(need(row, p), text(chosen, f"column {c!r}"), text(rejected, f"column {r!r}"), False)]
        return [conversational_pair(chosen, rejected, row.get(p))]
    if m in row:
        prompt, target = split_conversation(messages(row[m], f"column {m!r}"), f"column {m!r}")
        return [sft_example(prompt, target, True)]
    if p in row and comp in row:
        prompt, completion = row[p], row[comp]
        if isinstance(prompt, str) and isinstance(completion, str):
            return [sft_example(text(prompt, f"column {p!r}"), text(completion, f"column {comp!r}"), False)]
        conv = messages(prompt, f"column {p!r}") + messages(completion, f"column {comp!r}")
        prompt_msgs, target = split_conversation(conv, "prompt + completion")
        return [sft_example(prompt_msgs, target, True)]
    raise RowError(f"no known format: expected columns {p}/{c}/{r}, {m}, or {p}/{comp} (columns: {sorted(row)}); "
                   "set data.local.<prompt|chosen|rejected|messages|completion> to your column names")


class Source:
    """A data set: where its rows come from and how a row becomes examples."""

    def __init__(self, name: str, hub: Optional[str], splits: Dict[str, str], convert: Callable,
                 pairs: bool = True, doc: str = "", grouped: bool = False, hold_out: Optional[str] = None):
        self.name, self.hub, self.splits, self.convert = name, hub, splits, convert
        self.pairs, self.doc, self.grouped, self.hold_out = pairs, doc, grouped, hold_out


SOURCES: Dict[str, Source] = {s.name: s for s in [
    Source("hh", "Anthropic/hh-rlhf", {"train": "train", "test": "test"}, convert_hh,
           doc="Anthropic Helpful-Harmless; Human/Assistant text kept as is"),
    Source("shp", "stanfordnlp/SHP", {"train": "train", "test": "test"}, convert_shp,
           doc="Stanford Human Preferences; score ratio >= 2"),
    Source("se", "HuggingFaceH4/stack-exchange-preferences", {"train": "train", "test": "train"}, convert_se,
           hold_out="qid", doc="StackExchange; 1% of questions (by qid hash) held out as test"),
    Source("dpomix", "argilla/dpo-mix-7k", {"train": "train", "test": "test"}, convert_pairs_conversational,
           doc="DPO-MIX-7K, the paper's preference data"),
    Source("ultrafeedback", "HuggingFaceH4/ultrafeedback_binarized", {"train": "train_prefs", "test": "test_prefs"},
           convert_pairs_conversational, doc="UltraFeedback binarized"),
    Source("helpsteer2", "nvidia/HelpSteer2", {"train": "train", "test": "validation"}, convert_helpsteer2,
           grouped=True, doc="HelpSteer2; consecutive responses to one prompt, higher helpfulness chosen"),
    Source("deita", "HuggingFaceH4/deita-10k-v0-sft", {"train": "train_sft", "test": "test_sft"}, convert_deita,
           pairs=False, doc="Deita-10k, the paper's SFT data (SFT only)"),
    Source("local", None, {"train": "train", "test": "test"}, None,
           doc="a local file or directory in TRL's standard formats (data.local)"),
]}
SE_TEST_PERCENT = 1


# -- reading rows ------------------------------------------------------------


def _read_bytes(path: str) -> bytes:
    import gzip
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        body = f.read()
    return body[3:] if body.startswith(b"\xef\xbb\xbf") else body  # a UTF-8 byte-order mark is not data


def _utf8_problem(line: bytes, e: UnicodeDecodeError) -> str:
    return (f"not valid UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line); "
            "save the file as UTF-8")


def _decode_whole(path: str, body: bytes) -> str:
    """The text of a whole-file format (a JSON array, CSV); a non-UTF-8 byte is a DataError
    naming the file and the line."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = body.count(b"\n", 0, e.start) + 1
        line = body[body.rfind(b"\n", 0, e.start) + 1:]
        e2 = UnicodeDecodeError(e.encoding, line, e.start - (len(body) - len(line)), e.end, e.reason)
        raise DataError(f"{path}: line {line_no}: {_utf8_problem(line, e2)}") from None


def read_rows(path: str) -> Iterator[Tuple[str, object]]:
    """(where, row) of a local file; where = '<path>:<line or row number>' (1-based). A broken
    JSON line (bad JSON, or bytes that are not UTF-8) yields a RowError in place of the row, so
    the caller can name it or skip it; lines are split on '\\n' only (a JSON string may hold
    U+2028)."""
    base = path[:-3] if path.endswith(".gz") else path
    if base.endswith(".json") or base.endswith(".jsonl"):
        body = _read_bytes(path)
        if base.endswith(".json") and body.lstrip().startswith(b"["):  # one JSON array
            try:
                rows = json.loads(_decode_whole(path, body))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: broken JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
            for i, row in enumerate(rows, 1):
                yield f"{path}: row {i}", row
            return
        for i, raw in enumerate(body.split(b"\n"), 1):  # JSON lines
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}: line {i}", RowError(_utf8_problem(raw, e))
                continue
            try:
                yield f"{path}: line {i}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}: line {i}", RowError(f"broken JSON ({e.msg} at column {e.colno})")
    elif base.endswith(".parquet"):
        import pyarrow.parquet as pq
        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}: row {i}", row
    elif base.endswith(".csv"):
        import csv
        import io
        body = _decode_whole(path, _read_bytes(path))
        for i, row in enumerate(csv.DictReader(io.StringIO(body, newline="")), 2):  # line 1 is the header
            yield f"{path}: line {i}", row
    else:
        raise DataError(f"{path}: unsupported file type; use one of {LOCAL_SUFFIXES}")


def _data_files(folder: str) -> List[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(LOCAL_SUFFIXES)
                  and os.path.isfile(os.path.join(folder, n)))


def _named_file(spec: str, folder: Optional[str], key: str) -> str:
    """data.local.train / data.local.test: a file path (relative to data.local.path when that
    is a directory, else to the working directory), or a file stem inside that directory
    (`train_prefs` -> train_prefs.jsonl)."""
    spec = os.path.expanduser(str(spec))
    candidates = [os.path.join(folder, spec)] if folder and not os.path.isabs(spec) else []
    candidates.append(os.path.abspath(spec))
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    if folder:
        stems = [n for n in _data_files(folder) if n.split(".")[0] == spec]
        if len(stems) == 1:
            return os.path.join(folder, stems[0])
    where = f" (looked in {folder} and the working directory)" if folder else ""
    raise DataError(f"{key}={spec}: no such file{where}")


TEST_NAMES = ("test", "validation", "valid", "val", "dev", "eval")


def sibling_test_files(path: str) -> List[str]:
    """Files beside a single data file that look like its test split: the name with `train`
    replaced by test / validation / val / dev / eval (`train.jsonl` -> `test.jsonl`,
    `sft_train.jsonl` -> `sft_test.jsonl`)."""
    folder, name = os.path.split(path)
    if "train" not in name:
        return []
    head, _, tail = name.rpartition("train")
    stems = {(head + t + tail).split(".")[0] for t in TEST_NAMES}
    return [os.path.join(folder, n) for n in _data_files(folder) if n.split(".")[0] in stems]


HOLDOUT = "holdout"


def _split_files(folder: str, src: Source, split: str) -> List[str]:
    names = _data_files(folder)
    for stem in dict.fromkeys((src.splits[split], split)):
        found = [os.path.join(folder, n) for n in names if n.split(".")[0] == stem]
        if found:
            return found
    hint = (f"; name the file with data.local.{split}=<file>" +
            (f" (or data.local.test={HOLDOUT} to hold out data.test_fraction of the train prompts)"
             if split == "test" else "")) if src.name == "local" else ""
    raise DataError(f"{folder}: no file for split {split!r} (expected {src.splits[split]}.jsonl/.json/.parquet/"
                    f".csv; found {names[:10]}){hint}")


def split_plan(src: Source, split: str, opts: Dict) -> Dict:
    """Where the rows of one split come from, without reading them: {"hub": "<id>[<split>]"},
    or {"files": [paths], "holdout": the files are split by prompt hash (data.test_fraction
    of the prompts to test), "unread": data files of the directory that feed neither split,
    "note": a warning or None}.

    Local rules: data.local.train / data.local.test name a split's file; else a directory
    gives its train.* / test.* files (or the hub's split names), and a single file (the path,
    or a named train file with no test file named) serves both splits by prompt hash."""
    path = local_path(src, opts)
    col = opts["local"] if src.name == "local" else {}
    train_spec, test_spec = col.get("train"), col.get("test")
    if not path and not train_spec:
        return {"hub": f"{src.hub}[{src.splits[split]}]"}
    folder = path if path and os.path.isdir(path) else None
    if path and not folder and not os.path.isfile(path):
        raise DataError(f"{path}: no such file or directory")

    def train_files():
        if train_spec:
            return [_named_file(train_spec, folder, "data.local.train")]
        return _split_files(folder, src, "train") if folder else [path]

    single = bool(train_spec) or folder is None  # one file serves train; the test is held out of it by default

    def test_files():
        if test_spec and test_spec != HOLDOUT:
            return [_named_file(test_spec, folder, "data.local.test")], False
        if test_spec == HOLDOUT or single:
            return train_files(), True
        return _split_files(folder, src, "test"), False

    if split == "train":
        files = train_files()
        try:
            holdout = test_files()[1]
        except DataError:
            holdout = False
    else:
        files, holdout = test_files()
    note = None
    if holdout and test_spec is None and not src.hold_out:
        beside = sibling_test_files(files[0])
        if beside:
            key = "data.local.test" if src.name == "local" else f"data.paths.{src.name}=<the directory>"
            note = (f"{files[0]} is split by prompt hash ({float(opts['test_fraction']):g} of its prompts are the "
                    f"test split), but {', '.join(os.path.basename(b) for b in beside)} lies beside it: to test on "
                    f"it pass {key}" + (f"={os.path.basename(beside[0])}" if src.name == "local" else "") +
                    (f" (data.local.test={HOLDOUT} keeps the hash split and silences this)"
                     if src.name == "local" else ""))
    unread = []
    if folder:
        used = set(files)
        for other in (train_files, lambda: test_files()[0]):
            try:
                used.update(other())
            except DataError:
                pass
        unread = [n for n in _data_files(folder) if os.path.join(folder, n) not in used]
    return {"files": files, "holdout": holdout, "unread": unread, "note": note}


def hub_rows(hub: str, split: str) -> Iterator[Tuple[str, object]]:
    import datasets
    ds = datasets.load_dataset(hub, split=split)
    for i, row in enumerate(ds):
        yield f"{hub}[{split}]: row {i + 1}", row


def local_path(src: Source, opts: Dict) -> Optional[str]:
    path = opts["local"]["path"] if src.name == "local" else (opts.get("paths") or {}).get(src.name)
    if src.name == "local" and not path and not opts["local"].get("train"):
        raise DataError("datasets=[local] needs data.local.path=<file or directory> (or data.local.train=<file>)")
    return os.path.abspath(os.path.expanduser(str(path))) if path else None


def source_fingerprint(src: Source, split: str, opts: Dict) -> str:
    """What the examples of `split` are made from: the hub id and split, or the local files
    with their sizes and modification times (a changed file is a new fingerprint), plus the
    options that change the conversion (column names, the held-out share), since the token
    cache is keyed by example index."""
    plan = split_plan(src, split, opts)
    if "hub" in plan:
        return plan["hub"]
    files = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in plan["files"]]
    extra = [opts["local"] if src.name == "local" else None, plan["holdout"] and float(opts["test_fraction"])]
    return json.dumps([files, extra], sort_keys=True)


def source_rows(src: Source, split: str, opts: Dict) -> Tuple[Iterator[Tuple[str, object]], bool]:
    """(rows, holdout): the rows of `split`, and whether they must still be split into train
    and test by prompt hash."""
    plan = split_plan(src, split, opts)
    if "hub" in plan:
        return hub_rows(src.hub, src.splits[split]), False
    return (item for f in plan["files"] for item in read_rows(f)), plan["holdout"]


def _hash_percent(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10000 / 100.0


def convert_rows(src: Source, rows: Iterator[Tuple[str, object]], opts: Dict) -> Iterator[Tuple[str, object]]:
    """(where, example or RowError) for every example of every row."""
    for where, row in rows:
        if isinstance(row, RowError):
            yield where, row
            continue
        if not isinstance(row, dict):
            yield where, RowError(f"a row must be an object with named columns, got {type(row).__name__}")
            continue
        try:
            out = convert_local(row, opts) if src.name == "local" else src.convert(row)
        except RowError as e:
            yield where, e
            continue
        for ex in out:
            ex["key"] = str(row.get("qid", "")) if src.hold_out else None
            yield where, ex


def _prompt_key(ex: Dict) -> str:
    return json.dumps(ex["prompt"], sort_keys=True)


def _load_source(name: str, split: str, opts: Dict):
    """(examples, problems, fingerprint, rows read), memoised per process while the source is unchanged."""
    fingerprint = source_fingerprint(SOURCES[name], split, opts)
    return _load_source_cached(name, split, json.dumps(opts, sort_keys=True), fingerprint)


@lru_cache(maxsize=32)
def _load_source_cached(name: str, split: str, opts_json: str, fingerprint: str):
    opts = json.loads(opts_json)
    src = SOURCES[name]
    rows, whole_file = source_rows(src, split, opts)
    n_rows = [0]

    def counted(items):
        for item in items:
            n_rows[0] += 1
            yield item

    rows = counted(rows)
    if src.grouped:  # bad rows must still be named: check them on the way in
        rows = list(rows)
        broken = [(w, r) for w, r in rows if isinstance(r, RowError)]
        items = broken + list(src.convert((w, r) for w, r in rows if isinstance(r, dict)))
        items += [(w, RowError(f"a row must be an object, got {type(r).__name__}"))
                  for w, r in rows if not isinstance(r, (dict, RowError))]
    else:
        items = list(convert_rows(src, rows, opts))
    examples, problems = [], []
    for where, item in items:
        if isinstance(item, RowError):
            problems.append(f"{where}: {item}")
            continue
        item["where"] = where
        if src.hold_out:  # one hub split serves both: hold out SE_TEST_PERCENT of questions
            in_test = _hash_percent(item.pop("key")) < SE_TEST_PERCENT
            if in_test != (split == "test"):
                continue
        else:
            item.pop("key", None)
            if whole_file:  # one local file serves both: hold out prompts by hash
                in_test = _hash_percent(_prompt_key(item)) < 100 * float(opts["test_fraction"])
                if in_test != (split == "test"):
                    continue
        examples.append(item)
    return examples, problems, fingerprint, n_rows[0]


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

# Scorers of generated completions live in prefkd/scorers.py (data.scorer; the embedded task's default
# is score_answer above).
DATASETS = ["embedded"] + sorted(SOURCES)


def has_pairs(name: str) -> bool:
    """Whether a data set has preference pairs (False: SFT only). `local` is known only
    once loaded: see check_datasets."""
    return name == "embedded" or (name in SOURCES and SOURCES[name].pairs)


def load_dataset_checked(name: str, split: str, options=None, silent: bool = False) -> Tuple[List[Dict], str]:
    """(examples, fingerprint) of one data set split, validated. Invalid rows raise a
    DataError naming up to 5 of them, or with data.skip_invalid are skipped and counted."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for data set {name!r}; expected one of {SPLITS}")
    if name == "embedded":
        fp = (f"embedded-v3-{EMBEDDED_TRAIN_SIZE}-{EMBEDDED_TEST_SIZE}-{EMBEDDED_SEED}-{EMBEDDED_TEST_PERCENT}"
              f"-{EMBEDDED_SFT_FLAW_RATE}-{EMBEDDED_PAIR_FLAW_RATE}")
        return load_embedded(split, silent=silent), fp
    opts = data_options(options)
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
    return [dict(ex) for ex in examples], fingerprint


def skipped_rows(name: str, split: str, options=None) -> int:
    if name == "embedded":
        return 0
    return len(_load_source(name, split, data_options(options))[1])


def describe_split(name: str, split: str, options=None) -> Dict:
    """Where a split's examples come from and how many there are (after load_dataset_checked):
    {"source": "built in" | "<hub id>[<split>]" | [files], "holdout": share held out by prompt
    hash or None, "rows": rows read, "examples": n, "skipped": k, "unread": [...], "note": ...}."""
    if name == "embedded":
        n = EMBEDDED_TRAIN_SIZE if split == "train" else EMBEDDED_TEST_SIZE
        return {"source": "built in (the sorting task)", "holdout": None, "rows": n, "examples": n, "skipped": 0,
                "unread": [], "note": None}
    opts = data_options(options)
    src = SOURCES[name]
    plan = split_plan(src, split, opts)
    examples, problems, _, n_rows = _load_source(name, split, opts)
    share = SE_TEST_PERCENT / 100 if src.hold_out else float(opts["test_fraction"])
    held = src.hold_out or plan.get("holdout")  # SE: questions held out by qid hash; else prompts of one file
    return {"source": plan.get("hub") or plan["files"],
            "holdout": (share if split == "test" else 1 - share) if held else None,
            "rows": n_rows, "examples": len(examples), "skipped": len(problems),
            "unread": plan.get("unread", []), "note": plan.get("note")}


def get_dataset(name: str, split: str, silent: bool = False, options=None) -> List[Dict]:
    """Examples of data set ``name``: dicts with prompt/chosen/rejected/sft_target (see above)."""
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
    data = []  # (data set name, index within it, example)
    caches = {}
    for name in names:
        examples, fingerprint = load_dataset_checked(name, split, options, silent=silent or rank != 0)
        if not sft_mode:
            bad = next((ex for ex in examples if ex["chosen"] is None), None)
            if bad is not None:
                raise DataError(f"data set {name!r} has SFT rows without preference pairs (e.g. {bad.get('where')}); "
                                "use it with loss=sft")
        data.extend((name, i, ex) for i, ex in enumerate(examples))
        caches[name] = token_cache(cache_dir, name, split, fingerprint, tokenizer, template, rank)

    def element(j: int) -> Dict:
        name, i, ex = data[j]
        ids = caches[name].get(i, lambda: encode_example(ex, tokenizer, template))
        chosen, rejected = ("sft_target", "sft_target") if sft_mode else ("chosen", "rejected")
        out = {"prompt": ids["prompt_text"], "chosen": ex[chosen], "rejected": ex[rejected]}
        out.update(build_pair(ids["prompt"], ids[chosen], ids[rejected], tokenizer.bos_token_id, max_length,
                              max_prompt_length, truncation_mode))
        out["dataset"] = name
        out["original_prompt"] = ex["prompt"]  # before the chat template: what scorers and judges read
        out["reference"] = ex["sft_target"]
        return out

    plan = global_batch_indices(len(data), batch_size, shuffle, seed, n_epochs, n_examples, world_size)
    try:
        for batch_idx, idx in enumerate(plan):
            if batch_idx < skip_batches:
                continue
            per_rank = len(idx) // world_size
            local = idx[rank * per_rank : (rank + 1) * per_rank]
            yield collate([element(i) for i in local], tokenizer.pad_token_id)
    finally:
        for cache in caches.values():
            cache.flush()
            if stats is not None:
                stats["hits"] = stats.get("hits", 0) + cache.hits
                stats["misses"] = stats.get("misses", 0) + cache.misses
