"""Chat formatting, tokenisation and truncation of one example, and the token cache.

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
"""
import hashlib
import json
import os
from typing import Callable, Dict, List, Optional, Tuple

from prefkd.data.rows import DataError
from prefkd.logprobs import IGNORE_INDEX

TRUNCATION_MODES = ("keep_end", "keep_start")
# A plain template for tokenizers that ship none (base checkpoints): used, with a
# warning, unless data.chat_template is set.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}")



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
