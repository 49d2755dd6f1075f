"""A teacher with another tokenizer than the student's: its per-sequence signal computed on its
own tokenization of the same text.

A loss whose teacher signal reduces to one number per response (tvkd's paper equation with any
potential and any gamma: every potential enters only through its sum over the response; ddpo:
the teacher's implicit reward of each response) declares that reduction as
``LossSpec.sequence_teacher``. When the teacher's tokenizer differs from the student's, the
teacher reads the batch's prompt and responses as text, formatted with the teacher's own chat
template and tokenised, truncated and labelled by the teacher's tokenizer exactly as the data
module does for the student (``teacher_rows``); its features are computed on those rows (live,
or from a teacher cache whose rows are the teacher's tokens of the text, so one cache serves any
student) and reduced with the teacher's own response mask to per-sequence quantities, which the
loss reads as ``LossInputs.teacher_sequence``. With the same tokenizer the rows are the student's
rows, so the numbers are exactly the per-token path's.

Losses that read the teacher per token of the student's sequence (vanillakd, dckd, dpkd, gkd,
adpa, tvkd's released variants, which collapse the student onto the teacher's token ids) are
refused before any model loads (``problem``). seqkd trains on the teacher's text: across
tokenizers it reads the teacher's answers from ``generations=`` files (generate.py runs the
teacher with its own tokenizer), never from an in-run generation in the teacher's vocabulary.

``teacher.tokenization``: ``auto`` (the teacher's own tokens when the vocabularies differ, else
the student's), ``own`` (always the teacher's tokenizer and chat template, e.g. a teacher of the
same vocabulary with another template), ``student`` (the student's tokens; refused if the
vocabularies differ).
"""
from typing import Dict, List, Optional

import torch

import utils
from prefkd import tokenizer_facts
from prefkd import logprobs
from prefkd.data import loading as data_loading
from prefkd.data import encoding
from prefkd.logprobs import IGNORE_INDEX

TOKENIZATIONS = ("auto", "own", "student")
PROBE = "The quick brown fox: 12+34=46.\n"


def same_vocabulary(student_tok, teacher_tok) -> bool:
    """One vocabulary: the same size, special ids and ids of a probe text."""
    ids = lambda t: t(PROBE, add_special_tokens=False).input_ids  # noqa: E731
    specials = lambda t: (t.bos_token_id, t.eos_token_id)  # noqa: E731
    return len(student_tok) == len(teacher_tok) and ids(student_tok) == ids(teacher_tok) \
        and specials(student_tok) == specials(teacher_tok)


def describe(tok) -> str:
    return f"{getattr(tok, 'name_or_path', '?')} ({len(tok)} entries)"


def teacher_tokens(cfg, student_tok, teacher_tok) -> str:
    """"own" (the teacher reads its own tokenization of the text) or "student" (the student's
    token ids), from teacher.tokenization and the two tokenizers."""
    mode = cfg.teacher.get("tokenization") or "auto"
    if mode not in TOKENIZATIONS:
        raise ValueError(f"teacher.tokenization={mode!r} is not one of {list(TOKENIZATIONS)}")
    same = same_vocabulary(student_tok, teacher_tok)
    if mode == "student" and not same:
        raise ValueError(f"teacher.tokenization=student, but the teacher's tokenizer {describe(teacher_tok)} is not "
                         f"the student's {describe(student_tok)}: the teacher cannot read the student's token ids; "
                         "use teacher.tokenization=auto")
    return "own" if mode == "own" or not same else "student"


def problem(spec, cfg) -> Optional[str]:
    """Why loss `cfg.loss` cannot read a teacher on the teacher's own tokens (None: it can)."""
    loss = cfg.loss
    gen = spec.generation_need(loss)
    if spec.teacher_features is None and gen is not None and gen.source == "teacher":
        if cfg.get("generations"):
            return None  # the teacher's answers as text, re-tokenised by the student
        return (f"loss={spec.name} generates its training responses with the teacher during the run, in the "
                "teacher's vocabulary: write the teacher's answers with `python generate.py checkpoint=<teacher> "
                "out=<file>` (it uses the teacher's own tokenizer) and pass generations=[<files>] (the pipeline does)")
    if spec.sequence_teacher is None:
        return (f"loss={spec.name} reads the teacher per token of the student's sequence (its distribution or "
                "log-probs at each student token), which exists only when the teacher shares the student's "
                "tokenizer")
    if spec.sequence_teacher_problem is not None:
        return spec.sequence_teacher_problem(loss)
    return None


def check(cfg, spec, student_tok, teacher_tok) -> str:
    """teacher_tokens, refusing (ValueError naming the loss and why) a loss that needs the
    student's tokens from a teacher that reads its own."""
    mode = teacher_tokens(cfg, student_tok, teacher_tok)
    if mode == "own":
        why = problem(spec, cfg)
        if why:
            differ = "is not" if not same_vocabulary(student_tok, teacher_tok) else "is read with its own template as"
            raise ValueError(f"teacher={cfg.teacher.name}: its tokenizer {describe(teacher_tok)} {differ} the "
                             f"student's {describe(student_tok)}, and {why}. Choose a teacher of the student's "
                             "tokenizer, or a loss with a per-sequence teacher signal (tvkd with loss.variant=paper, "
                             "ddpo; seqkd with generations=)")
    return mode


def student_kept_chars(batch: Dict, i: int, kind: str, ex: Dict, student_tok, template) -> Optional[int]:
    """How many characters of row i's `kind` response content the student's row kept, or None when
    it kept the whole response (its last response token is eos)."""
    labels = batch[f"{kind}_labels"][i]
    kept = batch[f"{kind}_input_ids"][i][labels != IGNORE_INDEX].tolist()
    if kept and kept[-1] == student_tok.eos_token_id:
        return None
    formatted = encoding.format_example(ex, student_tok, template)[1][kind]  # the text the student's ids encode
    start = max(0, formatted.find(ex[kind]))
    if kept and getattr(student_tok, "is_fast", False):
        # The kept ids are the first len(kept) of tok(formatted) (encoding.encode_text): the character
        # where the last of them ends is exact. decode() is not: it can merge or drop spaces.
        offsets = student_tok(formatted, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        end = offsets[min(len(kept), len(offsets)) - 1][1]
    else:
        end = len(student_tok.decode(kept))  # a slow tokenizer has no offsets: the decoded length
    return max(0, min(len(ex[kind]), end - start))


def cut_at(formatted: str, content: str, n: int) -> str:
    """The teacher's formatted response up to the end of the first n characters of its content."""
    start = formatted.find(content)
    return formatted[: max(0, start) + n]


def template_of(cfg) -> Optional[str]:
    """The teacher's chat template: teacher.chat_template, else its tokenizer's own."""
    return cfg.teacher.get("chat_template") or None


def teacher_rows(batch: Dict, teacher_tok, cfg, pairwise: bool, student_tok) -> Dict[str, torch.Tensor]:
    """The teacher's own rows of a batch: {input_ids, attention_mask, labels} [N, L'] (chosen
    rows first, then rejected, as batches.concatenated_inputs stacks the student's), built from
    the batch's text (`original_prompt`, `chosen`, `rejected`) with the teacher's tokenizer and
    chat template, by the data module's own functions.

    The cut follows the student's text, not the teacher's token count: a response the student's
    row cut (max_length) is cut for the teacher after the same characters of its content (no eos),
    and the teacher's own rows are not truncated further, so both describe the same response. (Cut
    in teacher tokens, a long response's teacher features would describe another prefix than the
    student's.) A prompt the student's row cut is read whole by the teacher: a cut through a chat
    template's markup has no equivalent in another template (the start-up report counts them)."""
    rows: Dict[str, List[List[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    kinds = ("chosen", "rejected") if pairwise else ("chosen",)
    student_template = data_loading.data_options(cfg.get("data"))["chat_template"]
    built = []
    for i, prompt in enumerate(batch["original_prompt"]):
        ex = {"prompt": prompt, "chat": not isinstance(prompt, str), "chosen": batch["chosen"][i],
              "rejected": batch["rejected"][i], "sft_target": None}
        text, responses = encoding.format_example(ex, teacher_tok, template_of(cfg))
        ids = encoding.encode_text(text, {k: responses[k] for k in ("chosen", "rejected")}, teacher_tok)
        for kind in kinds:
            n = student_kept_chars(batch, i, kind, ex, student_tok, student_template)
            if n is not None:  # cut for the student: the same characters of the content, no eos
                ids[kind] = teacher_tok(cut_at(responses[kind], ex[kind], n), add_special_tokens=False)["input_ids"]
        longest = len(ids["prompt"]) + max(len(ids[k]) for k in ("chosen", "rejected") if ids[k] is not None)
        built.append(encoding.build_pair(ids["prompt"], ids["chosen"], ids["rejected"], teacher_tok.bos_token_id,
                                     max(cfg.max_length, longest), cfg.max_prompt_length, cfg.truncation_mode))
    for kind in kinds:
        for pair in built:
            for k in rows:
                rows[k].append(pair[f"{kind}_{k}"])
    return {"input_ids": utils.pad_sequences(rows["input_ids"], tokenizer_facts.pad_id(teacher_tok)),
            "attention_mask": utils.pad_sequences(rows["attention_mask"], 0),
            "labels": utils.pad_sequences(rows["labels"], logprobs.IGNORE_INDEX)}
