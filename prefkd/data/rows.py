"""Row basics shared by every data set: the splits, the errors, and the checks that turn a
row's values into validated example fields.

Every data set becomes a list of examples of ONE shape:
  {"prompt": str | [messages], "chosen": str | None, "rejected": str | None,
   "sft_target": str, "chat": bool, "where": "file:row"}
With chat=False the strings are used raw (the DPO repo's format: HH, SHP, SE, embedded);
with chat=True, prompt is the message list before the scored assistant turn and
chosen/rejected/sft_target are the contents of that turn, formatted with the tokenizer's
chat template at tokenisation time. chosen/rejected are None for SFT-only data sets.

This module imports nothing else of the data package: everything above it imports it.
"""
from typing import Dict, List, Optional, Tuple

SPLITS = ("train", "test")
MESSAGE_ROLES = ("system", "user", "assistant")
LOCAL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".csv")


class DataError(ValueError):
    """Invalid input data; the message names the file, the row and the problem."""


class RowError(ValueError):
    """One row is invalid (the problem only; the caller adds where)."""


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
