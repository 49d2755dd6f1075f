"""Tokenizer facts, in one place: which tokenizer a model config's name loads, the id a batch is
padded with and the side it is padded on.

Every module that pads token ids asks here (the data module's batches, the trainer's stacked
pairs, the teacher's own rows, generation prompts, reward-model scoring), so that one rule holds
for the embedded tokenizer (pad id 0) and a real one (Llama 3, Mistral, SmolLM: no pad token of
their own, or one that is eos).
"""
import os

EMBEDDED_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tokenizer")
# the shipped tokenizers, by the name a model config's `tokenizer` gives (scripts/build_tokenizer.py):
# the character tokenizer, and a byte-level BPE (the cross-tokenizer teacher's, tiny_teacher_bpe)
EMBEDDED_TOKENIZERS = {"embedded": EMBEDDED_TOKENIZER_DIR,
                       "embedded_bpe": os.path.join(os.path.dirname(EMBEDDED_TOKENIZER_DIR), "tokenizer_bpe")}

# Which side each kind of row is padded on. Responses (chosen_* / rejected_*, the stacked pairs,
# the teacher's rows) are RIGHT-padded, so every position's next token is where teacher forcing
# reads it and a row's length is its attention mask's sum; prompts (prompt_*) are LEFT-padded, so
# generation starts right after every row's last prompt token.
RESPONSE_SIDE, PROMPT_SIDE = "right", "left"


def ensure_pad(tokenizer):
    """`tokenizer` with a pad token: its own, else its eos (set on the tokenizer, which is returned).

    Why eos and not a new token: a new token would need a new embedding row the model has not
    learned; the causal LM never reads padded positions (attention mask 0, labels -100). The trap is
    the sequence-classification head (a reward model): transformers reads each row's score at its
    last token that is *not* `config.pad_token_id`, and ignores the attention mask there. So a
    reward model's batch must be padded with exactly `pad_id(tokenizer)` (padding with 0, or any
    other constant, moves the score onto a padding position), and with pad = eos the score is read
    at the token before a trailing eos, padded or not, as plain transformers reads it."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an eos "
                             "token: give it a pad token (tokenizer.pad_token = ...) before training on it")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_id(tokenizer) -> int:
    """The id every padded input_ids tensor of `tokenizer`'s rows is filled with (see ensure_pad)."""
    return ensure_pad(tokenizer).pad_token_id


def get_tokenizer(name_or_path: str):
    """Load a tokenizer. ``"embedded"`` -> the shipped char-level tokenizer, ``"embedded_bpe"`` ->
    the shipped byte-level BPE (EMBEDDED_TOKENIZERS).

    Anything else goes to ``AutoTokenizer.from_pretrained`` (a local path works
    offline). A missing pad token falls back to eos (ensure_pad says why and where that
    matters).
    """
    from transformers import AutoTokenizer  # lazy: keeps importing this module cheap

    if name_or_path in EMBEDDED_TOKENIZERS:
        where = EMBEDDED_TOKENIZERS[name_or_path]
        if not os.path.isfile(os.path.join(where, "tokenizer.json")):
            raise FileNotFoundError(f"{name_or_path} tokenizer not found in {where}; run `python "
                                    f"scripts/build_tokenizer.py{' --bpe' if name_or_path != 'embedded' else ''}`")
        tokenizer = AutoTokenizer.from_pretrained(where)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return ensure_pad(tokenizer)
