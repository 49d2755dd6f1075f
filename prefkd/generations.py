"""Generations written for people and for external judges.

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
from typing import Dict, List, Optional

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def prompt_text(prompt) -> str:
    """The plain text of an original prompt (a string, or a list of {role, content} messages)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n\n".join(f"{ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}" for m in prompt)


def _atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_jsonl(records: List[Dict], path: str) -> None:
    _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_alpaca_eval(records: List[Dict], path: str) -> None:
    """AlpacaEval's model outputs: a JSON list of {instruction, output, generator, dataset}."""
    rows = [{"instruction": r["prompt_text"], "output": r["completion"], "generator": r["generator"],
             "dataset": r["dataset"]} for r in records]
    _atomic_write(path, json.dumps(rows, ensure_ascii=False, indent=1) + "\n")


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
