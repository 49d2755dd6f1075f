"""Build the framework's embedded tokenizers (no downloads).

Usage (from the repo root):

    python scripts/build_tokenizer.py [--out assets/tokenizer]              # the character tokenizer
    python scripts/build_tokenizer.py --bpe [--out assets/tokenizer_bpe]    # the second one (BPE)

The second tokenizer (``embedded_bpe``, the cross-tokenizer teacher's: config/model/
tiny_teacher_bpe.yaml) is a byte-level BPE trained here with ``tokenizers`` on the embedded
task's train text (prompts and responses), 320 entries: the 256 bytes, the same eight special
tokens and 56 merges (e.g. "sort" and pairs of digits), so it splits the same text into other
and fewer tokens than the character tokenizer, with other ids. Its chat template differs too
(a newline after each role marker and after each turn), so a teacher reading its own
tokenization of a conversation sees its own template.

The output is deterministic: running the script twice produces byte-identical
files, so ``assets/tokenizer/`` can be committed and regenerated at will.

Vocabulary (ids are fixed by construction order):

    0 <pad>   1 <s> (bos)   2 </s> (eos)   3 <unk>
    4 <|system|>   5 <|user|>   6 <|assistant|>   7 <|end|>
    8..102  printable ASCII chr(32)..chr(126)
    103 "\\n"   104 "\\t"

Design notes (why it is built this way):
* The model is a BPE with an EMPTY merge list and no pre-tokenizer, so every
  input character becomes exactly one token; characters outside the vocab
  become ``<unk>`` (one ``<unk>`` per char: ``fuse_unk=False``).  Byte
  fallback is not used because it would add 256 ``<0xNN>`` tokens.
* The decoder is ``Fuse``: tokens are concatenated without inserting spaces,
  so ``decode(encode(s)) == s`` for any string over the vocab.
* The special tokens are "added tokens", so a chat-templated string such as
  ``"<|user|>hi<|end|>"`` is encoded with one id per special token.
* With ``add_special_tokens=True`` a ``<s>`` is prepended (Llama-style); the
  data pipeline always calls the tokenizer with ``add_special_tokens=False``
  and adds bos/eos itself.
* The chat template does NOT emit ``<s>`` (the data pipeline adds it), it
  renders each message as ``<|role|>content<|end|>`` with no separators and
  appends ``<|assistant|>`` when ``add_generation_prompt`` is true.
"""
import argparse
import os

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast
from prefkd.data import loading as data_loading

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK] + ROLE_TOKENS
CHARS = [chr(i) for i in range(32, 127)] + ["\n", "\t"]

# Jinja chat template. Whitespace control ({%- -%}) keeps the rendered string
# free of template newlines: only message content contributes characters.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('Unknown role: ' + message['role'] + ' (expected system/user/assistant)') }}"
    "{%- endif -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

MODEL_MAX_LENGTH = 2048


def build_vocab() -> dict:
    """Token -> id, specials first, then the character alphabet."""
    tokens = SPECIAL_TOKENS + CHARS
    assert len(set(tokens)) == len(tokens)
    return {tok: i for i, tok in enumerate(tokens)}


def build_backend() -> Tokenizer:
    """The raw `tokenizers` object: char-level BPE without merges."""
    vocab = build_vocab()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    return tok


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The transformers wrapper with special tokens and chat template set."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_backend(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        # Never let decode() "clean up" spaces before punctuation: decoding
        # must reproduce the text exactly.
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


BPE_VOCAB_SIZE = 320
BPE_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('Unknown role: ' + message['role'] + ' (expected system/user/assistant)') }}"
    "{%- endif -%}"
    "<|{{ message['role'] }}|>{{ '\\n' }}{{ message['content'] }}<|end|>{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{{ '\\n' }}{%- endif -%}"
)


def bpe_corpus():
    """The embedded task's train text, in its fixed order (the generator is seeded)."""
    for ex in data_loading.get_dataset("embedded", "train", silent=True):
        yield ex["prompt"]
        yield ex["chosen"]
        yield ex["rejected"]


def build_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the embedded task's text (deterministic: one thread's worth of
    fixed input, ties broken by the trainer's ordering)."""
    from tokenizers import pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(bpe_corpus(), trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                  additional_special_tokens=ROLE_TOKENS, model_max_length=MODEL_MAX_LENGTH,
                                  padding_side="right", clean_up_tokenization_spaces=False)
    out.chat_template = BPE_CHAT_TEMPLATE
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpe", action="store_true", help="build the second (byte-level BPE) tokenizer")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    default_out = os.path.join(os.path.dirname(here), "assets", "tokenizer_bpe" if args.bpe else "tokenizer")
    args.out = args.out or default_out

    tok = build_bpe_tokenizer() if args.bpe else build_tokenizer()
    os.makedirs(args.out, exist_ok=True)
    files = tok.save_pretrained(args.out)
    print(f"vocab size {len(tok)}; saved: {', '.join(sorted(os.path.basename(f) for f in files))}")


if __name__ == "__main__":
    main()
