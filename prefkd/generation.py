"""Generated responses: the ones a loss trains on, generated during the run (`InRunGeneration`,
for a loss spec's `Generation`), and generation files written for people and external judges.

In-run generation. Before any forward pass, the responses the loss's `Generation` names are
generated for the batch's prompts by its source (the teacher, the frozen starting student or the
current policy) and replace the batch's chosen or rejected responses. A frozen source's
generations are kept per prompt (each prompt is generated once), or read from `generations=`
files written by generate.py; the draw of a probability < 1 and every cache decision are the
same on every rank (sharded models generate together).

Generation files.

evaluate.py keeps one record per held-out prompt:

    {"id": 0, "dataset": "local", "prompt": <the original prompt: a string, or the message list>,
     "prompt_text": <the prompt as plain text>, "model_input": <the exact text the model was
     given, chat template included>, "completion": <greedy completion>, "reference": <the data
     set's chosen / SFT answer>, "generator": <model id>, "scores": {name: value}}

and writes them as JSON lines (``write_jsonl``), as AlpacaEval's model-outputs file
(``write_alpaca_eval``: a JSON list of {instruction, output, generator, dataset}) and as an
MT-Bench (FastChat llm_judge) answer file (``write_mt_bench``: one line per question,
{question_id, answer_id, model_id, choices: [{index: 0, turns: [completion]}], tstamp}, with
the matching question file {question_id, category, turns: [prompt_text]} beside it).

``prompt_text``: a string prompt as it is; one user message: its content; a longer
conversation: its turns as "System: ...", "User: ...", "Assistant: ..." paragraphs.
"""
import hashlib
import json
import os
import time
from typing import Callable, Dict, List, Optional

import torch
from omegaconf import OmegaConf

import utils
from prefkd import checkpoints
from prefkd.logprobs import IGNORE_INDEX
from utils import atomic_write_text, rank0_print

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def prompt_text(prompt) -> str:
    """The plain text of an original prompt (a string, or a list of {role, content} messages)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n\n".join(f"{ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}" for m in prompt)


def write_jsonl(records: List[Dict], path: str) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_alpaca_eval(records: List[Dict], path: str) -> None:
    """AlpacaEval's model outputs: a JSON list of {instruction, output, generator, dataset}."""
    rows = [{"instruction": r["prompt_text"], "output": r["completion"], "generator": r["generator"],
             "dataset": r["dataset"]} for r in records]
    atomic_write_text(path, json.dumps(rows, ensure_ascii=False, indent=1) + "\n")


def mt_bench_questions_path(answers_path: str) -> str:
    root, ext = os.path.splitext(answers_path)
    return f"{root}.questions{ext or '.jsonl'}"


def write_mt_bench(records: List[Dict], path: str, questions_path: Optional[str] = None) -> str:
    """An MT-Bench answer file (FastChat llm_judge's model_answer/<model>.jsonl) and its
    question file (questions_path; default <path stem>.questions.jsonl). question_id is the
    record's id + 1 (its position among the evaluated held-out prompts, from 1). Only the
    last assistant turn is generated, so a question has one turn (the whole prompt as plain
    text) and an answer one turn. Returns the question file's path."""
    stamp = time.time()
    answers, questions = [], []
    for r in records:
        qid = r["id"] + 1
        answer_id = hashlib.sha256(f"{r['generator']}|{qid}|{r['completion']}".encode()).hexdigest()[:22]
        answers.append({"question_id": qid, "answer_id": answer_id, "model_id": r["generator"],
                        "choices": [{"index": 0, "turns": [r["completion"]]}], "tstamp": stamp})
        questions.append({"question_id": qid, "category": r["dataset"], "turns": [r["prompt_text"]]})
    write_jsonl(answers, path)
    questions_path = questions_path or mt_bench_questions_path(path)
    write_jsonl(questions, questions_path)
    return questions_path


# ---------------------------------------------------------------- reading generate.py's files

def generation_key(prompt) -> str:
    """The key of an original prompt (a string or a message list) in a generation file."""
    return json.dumps(prompt, sort_keys=True)


def read_generation_meta(path: str) -> Dict:
    """The settings generate.py wrote beside a complete generation file (`<file>.meta.json`)."""
    meta = path + ".meta.json"
    if not os.path.isfile(path):
        raise ValueError(f"generations: no file {path} (write it with python generate.py <checkpoint> out={path})")
    if not os.path.isfile(meta):
        raise ValueError(f"generations: {path} has no {os.path.basename(meta)} beside it, so what generated it "
                         "cannot be checked; write it with generate.py (which records its checkpoint and decoding)")
    with open(meta) as f:
        return json.load(f)


def read_generations(paths: List[str]) -> Dict[str, str]:
    """generation_key(prompt) -> completion text, from generate.py's prompt/completion rows (a
    conversational completion: its assistant message's content). A prompt in several files must
    have the same completion in each."""
    out: Dict[str, str] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    completion = row["completion"]
                    if isinstance(completion, list):
                        completion = completion[-1]["content"]
                    key = generation_key(row["prompt"])
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    raise ValueError(f"generations: {path} line {i} is not a prompt/completion row of "
                                     f"generate.py ({type(e).__name__}: {e})") from None
                if out.setdefault(key, completion) != completion:
                    raise ValueError(f"generations: {path} line {i}: its prompt has another completion in an "
                                     "earlier file; give each prompt's generation once")
    return out


# ------------------------------------------------------------------ in-run generation

class InRunGeneration:
    """The responses a loss's `Generation` asks for, for one run. All state is created here:
    the per-prompt cache of a frozen source, the `generations` files' responses, the draw
    counter of a probability < 1."""

    def __init__(self, cfg, gen, tokenizer, device, agree: Callable, generate_kwargs: Dict):
        self.cfg, self.gen, self.tokenizer, self.device = cfg, gen, tokenizer, device
        self.agree, self.generate_kwargs = agree, generate_kwargs
        self.cache: Dict[tuple, torch.Tensor] = {}  # prompt ids -> response ids of a frozen source
        self.from_file: set = set()  # the cache's keys read from the files (not saved: the files hold them)
        # original prompt -> response text, from generate.py files (`generations`, checked at start-up)
        self.file = read_generations(list(cfg.get("generations") or []))
        self.warned = False
        self.draw_key, self.draw_index = None, 0

    def apply(self, batch: Dict, train: bool, step: int, models: Dict):
        """(batch, generated): the batch with the generated responses in place of the ones the
        Generation replaces; generated is None when the loss trains on data responses only (or
        this is an evaluation batch of a train_only generation), else whether this micro-batch
        was generated. models: {"teacher", "reference", "policy"} -> model."""
        gen = self.gen
        if gen is None or (gen.train_only and not train):
            return batch, None
        if gen.probability < 1.0 and not self.draw(gen.probability, train, step):
            return batch, False
        prompts = [ids[m.bool()].tolist() for ids, m in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]
        keys = [tuple(p) for p in prompts]
        cache = self.cache if gen.frozen else None
        if cache is not None and self.file:
            self.fill_from_file(keys, batch.get("original_prompt", batch["prompt"]))
        missing = cache is None or any(k not in cache for k in keys)
        if cache is not None:
            (missing,) = self.agree([missing])
        if missing and models.get(gen.source) is None:  # a teacher of another tokenizer is read from files only
            raise ValueError(f"generations: prompts of this batch are not in {list(self.cfg.get('generations') or [])}, "
                             f"and the {gen.source} (another tokenizer than the student's) cannot generate them in the "
                             "run: write its answers to every train and test prompt with generate.py")
        if missing:
            responses = self.responses(models[gen.source], batch["prompt_input_ids"], batch["prompt_attention_mask"])
            if cache is not None:  # a frozen source's generation is kept: each prompt is generated once
                responses = [cache.setdefault(k, r) for k, r in zip(keys, responses)]
        else:
            responses = [cache[k] for k in keys]
        out = replace_responses(batch, gen.replaces, prompts, [r.tolist() for r in responses],
                                self.tokenizer.pad_token_id, self.cfg.max_length)
        out[gen.replaces] = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return out, True

    def state(self) -> Dict[tuple, torch.Tensor]:
        """What a checkpoint must hold of this rank's generation: the frozen source's responses
        generated so far. Past the data's end (n_examples above its size) the uninterrupted run
        reuses each prompt's first response; a resume without them would draw them again (a
        sampled decoding: other responses)."""
        return {k: v for k, v in self.cache.items() if k not in self.from_file}

    def load_state(self, states: List[Dict[tuple, torch.Tensor]]) -> None:
        """Restore `state()`s saved by every rank of the interrupted run (their union: a resume with
        another number of processes sees other prompts on each rank)."""
        for part in states:
            for k, v in part.items():
                self.cache.setdefault(k, v)

    def fill_from_file(self, keys: List[tuple], originals: List) -> None:
        """Put the `generations` files' responses for these prompts into the cache: the text as
        the data module encodes a response (its tokens, then EOS)."""
        absent = 0
        for key, original in zip(keys, originals):
            if key in self.cache:
                continue
            text = self.file.get(generation_key(original))
            if text is None:
                absent += 1
                continue
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            self.cache[key] = torch.tensor(ids, dtype=torch.long)
            self.from_file.add(key)
        if absent and not self.warned:
            self.warned = True
            rank0_print(f"WARNING: {absent} prompt(s) of a batch are not in the generations files "
                        f"{list(self.cfg.generations)}: they are generated in the run (warned once)")

    def draw(self, probability: float, train: bool, step: int) -> bool:
        """True with `probability`, from a generator seeded by (seed, step, micro-batch index):
        the same on every rank and after a resume."""
        key = (step, train)
        self.draw_index = self.draw_index + 1 if self.draw_key == key else 0
        self.draw_key = key
        g = torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + step * 1_009 + self.draw_index
                                          + (0 if train else 500_000_000))
        return bool(torch.rand((), generator=g) < probability)

    @torch.no_grad()
    def responses(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> List[torch.Tensor]:
        """Responses of `model` to left-padded prompts: one CPU LongTensor per row, cut after the
        first EOS (kept, as data responses end with it); at most max_length - prompt width tokens."""
        gen = self.gen
        ids, mask = prompt_ids.to(self.device), prompt_mask.to(self.device)
        budget = max(1, self.cfg.max_length - ids.shape[1])
        max_new = min(gen.max_new_tokens or budget, budget)
        if gen.temperature is None:
            decoding = {"do_sample": False, "num_beams": gen.num_beams}
        else:
            decoding = {"do_sample": True, "temperature": float(gen.temperature), "top_k": 0, "top_p": 1.0}
        was_training = model.training
        model.eval()
        try:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                 pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                                 **decoding, **self.generate_kwargs)
        finally:
            model.train(was_training)
        return through_eos(out[:, ids.shape[1]:].cpu(), self.tokenizer.eos_token_id)


def through_eos(generated: torch.Tensor, eos: int) -> List[torch.Tensor]:
    """Each generated row [N, T] up to and including its first eos (the whole row without one):
    what follows is padding, whichever id pads (a tokenizer may pad with its eos id)."""
    rows = []
    for row in generated:
        hits = (row == eos).nonzero() if eos is not None else []
        rows.append(row[: int(hits[0]) + 1 if len(hits) else len(row)].clone())
    return rows


def sample_and_score(batches, generate: Callable, tokenizer, scorer, device, n_wanted: int, world_size: int):
    """({task/<name>: scores}, [(prompt, completion)]): greedy completions `generate(ids, mask)` of
    held-out prompts (at least n_wanted over all ranks), scored by `scorer(original prompt,
    completion)` (None: no scores)."""
    scores, samples, seen = {}, [], 0
    for batch in batches:
        if seen >= n_wanted:
            break
        ids = batch["prompt_input_ids"].to(device)
        mask = batch["prompt_attention_mask"].to(device)
        out = generate(ids, mask)
        for prompt, original, row in zip(batch["prompt"], batch["original_prompt"], out[:, ids.shape[1]:]):
            text = tokenizer.decode(row, skip_special_tokens=True)
            samples.append((prompt, text))
            for name, value in (scorer(original, text) if scorer is not None else {}).items():
                scores.setdefault(f"task/{name}", []).append(value)
        seen += len(batch["prompt"]) * world_size
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in scores.items() if v}, samples


def replace_responses(batch: Dict, key: str, prompts: List[List[int]], responses: List[List[int]],
                      pad_token_id: int, max_length: int) -> Dict:
    """A copy of `batch` whose `key` ("chosen" / "rejected") responses are `responses`: per row,
    ids = prompt + response (cut to max_length), labels = IGNORE_INDEX on the prompt, right-padded
    like the data module's batches. prompts: unpadded prompt ids per row."""
    ids, labels = [], []
    for p, r in zip(prompts, responses):
        r = list(r)[: max(0, max_length - len(p))]
        ids.append(list(p) + r)
        labels.append([IGNORE_INDEX] * len(p) + r)
    out = dict(batch)
    out[f"{key}_input_ids"] = utils.pad_sequences(ids, pad_token_id)
    out[f"{key}_attention_mask"] = utils.pad_sequences([[1] * len(s) for s in ids], 0)
    out[f"{key}_labels"] = utils.pad_sequences(labels, IGNORE_INDEX)
    return out


def check_files(cfg, gen, check_archives: bool) -> None:
    """`generations=[files]` (written by generate.py) stand in for the responses a loss generates
    with a frozen model; each file's recorded checkpoint and decoding must be the loss's own.
    check_archives=False (a pipeline's later stage): the files may not exist yet."""
    files = cfg.generations
    if isinstance(files, str) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"generations={files!r} must be a list of files written by generate.py, e.g. "
                         "generations=[gen_train.jsonl,gen_test.jsonl]")
    if gen is None or not gen.frozen:
        raise ValueError(f"generations=...: loss={cfg.loss.name} "
                         + ("trains on the data's responses" if gen is None else "samples from the current policy")
                         + "; a generations file is read only by losses whose responses come from a frozen model "
                         "(seqkd: the teacher; adpa: the starting student). Remove the key")
    if not check_archives:
        return
    source_key = "teacher.archive" if gen.source == "teacher" else "model.archive"
    source = OmegaConf.select(cfg, source_key)
    expected = {"checkpoint": checkpoints.resolve_checkpoint(source) if source else None,
                "do_sample": gen.temperature is not None, "max_prompt_length": cfg.max_prompt_length,
                "truncation_mode": cfg.truncation_mode}
    if gen.temperature is not None:
        expected.update({"temperature": float(gen.temperature), "top_p": 1.0})
    if gen.max_new_tokens is not None:
        expected["max_new_tokens"] = int(gen.max_new_tokens)
    for path in files:
        meta = read_generation_meta(path)
        if gen.num_beams != 1:
            raise ValueError(f"generations: loss.num_beams={gen.num_beams}, but generate.py decodes greedily "
                             f"or samples ({path}); set loss.num_beams=1 or drop generations=")
        for key, want in expected.items():
            got = meta.get(key)
            same = (got == want) if not isinstance(want, float) else (got is not None and abs(float(got) - want) < 1e-9)
            if not same:
                raise ValueError(f"generations: {path} was written with {key}={got!r}, but this run's "
                                 f"{source_key if key == 'checkpoint' else key} gives {want!r}; regenerate it "
                                 "with generate.py for this run's settings, or drop generations=")


