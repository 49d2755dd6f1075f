"""Scoring generated completions with a reward model (evaluate.py reward_model=...): any Hugging Face
`AutoModelForSequenceClassification` with one output, with its own tokenizer and chat template
(never assumed to share the policy's), and the win rate of one model's answers against another's
on the same prompts (AlpacaEval's statistic, with the reward model as the judge).

Formatting. A prompt (a string, or a list of {role, content} messages) and its completion become
one conversation, [the prompt's messages (a string: one user message), {assistant: completion}],
formatted with the reward model's chat template. A reward model without a chat template scores
[bos] + prompt + completion + [eos] when the prompt is plain text; a conversational prompt is then
refused (joining messages by hand would invent a template the model was not trained with). A
reward model trained here (a loss=rm run) is scored on exactly the ids its trainer built, plain
or through the chat template as its data were: it scores what it was trained on.

Scores are computed in length-sorted batches (less padding), right-padded, in eval mode, and
returned in the records' order; under torchrun the batches are shared out among the processes.
"""
import math
from typing import Dict, List, Optional, Sequence

import torch

from prefkd import tokenizer_facts
from prefkd.data import encoding
from prefkd import checkpoints


def check(path: str) -> str:
    """The reward model's location (a run of loss=rm or its LATEST resolved to its checkpoint; a hub id
    as it is), refused unless it has exactly one output; reads only its config."""
    import os
    from transformers import AutoConfig
    resolved = checkpoints.resolve_checkpoint(path) if os.path.exists(path) else path
    try:
        labels = getattr(AutoConfig.from_pretrained(resolved), "num_labels", None)
    except (OSError, ValueError) as e:  # no such directory or hub id, or no hub access
        raise ValueError(f"reward_model={path}: cannot read its config ({str(e).splitlines()[0]}); give a local "
                         "directory (a loss=rm run, or a downloaded reward model) or a hub id reachable here") from None
    if labels != 1:
        raise ValueError(f"reward_model={path}: it has {labels} outputs; a reward model has one "
                         "(AutoModelForSequenceClassification with num_labels=1)")
    return resolved


def load(path: str, device: torch.device, dtype: Optional[torch.dtype] = None):
    """(model, tokenizer) of a reward model (a hub id or a local directory, `check`ed). bf16 on a
    GPU, fp32 on the CPU unless `dtype` says otherwise."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = check(path)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device).eval()
    head_pad_id(model, tokenizer)  # the head finds each row's last token by it (tokenizer_facts)
    return model, tokenizer


def training_format(path: str) -> Optional[Dict]:
    """How a reward model of this framework (a loss=rm run: trainer_state.json beside its weights)
    was trained to read a row: {chat_template, max_length, max_prompt_length, truncation_mode} of
    its run's config, so that `encode` scores what it was trained on; None for any other model."""
    import json
    import os
    state = os.path.join(checkpoints.resolve_checkpoint(path), "trainer_state.json") if os.path.exists(path) else ""
    if not os.path.isfile(state):
        return None
    with open(state) as f:
        cfg = json.load(f).get("config") or {}
    return {"chat_template": (cfg.get("data") or {}).get("chat_template"), "max_length": cfg.get("max_length"),
            "max_prompt_length": cfg.get("max_prompt_length"), "truncation_mode": cfg.get("truncation_mode", "keep_end")}


def encode(tokenizer, prompt, completion: str, name: str = "the reward model",
           as_trainer: Optional[Dict] = None) -> List[int]:
    """The ids the reward model scores. as_trainer (`training_format` of a loss=rm run of this
    framework): exactly the ids its trainer built for a (prompt, response) row
    (encoding.format_example with the run's data.chat_template, encode_text, then
    build_pair's truncation to the run's max_length / max_prompt_length / truncation_mode), so that
    a long generation is scored on the text the model saw in training. Otherwise: the reward
    model's chat template's text (holding its own special tokens), or, without one,
    [bos] + prompt + completion + [eos] for a plain-text prompt."""
    if as_trainer or not getattr(tokenizer, "chat_template", None):
        if not as_trainer:
            format_text(tokenizer, prompt, completion, name)  # refuses a conversation without a template
        ex = {"chat": not isinstance(prompt, str), "prompt": prompt, "chosen": completion, "rejected": None,
              "sft_target": None}
        prompt_text, responses = encoding.format_example(ex, tokenizer, (as_trainer or {}).get("chat_template"))
        if tokenizer.eos_token_id is not None:
            ids = encoding.encode_text(prompt_text, {"r": responses["chosen"]}, tokenizer)
            if not as_trainer:
                return ids["prompt"] + ids["r"]
            row = encoding.build_pair(ids["prompt"], ids["r"], ids["r"], tokenizer.bos_token_id, as_trainer["max_length"],
                                  as_trainer["max_prompt_length"], as_trainer["truncation_mode"])
            return row["chosen_input_ids"]
        return tokenizer(prompt_text + responses["chosen"], add_special_tokens=False)["input_ids"]
    return tokenizer(format_text(tokenizer, prompt, completion, name), add_special_tokens=False)["input_ids"]


def format_text(tokenizer, prompt, completion: str, name: str = "the reward model") -> str:
    """The text the reward model scores for one prompt and completion (see the module docstring)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
    if not isinstance(prompt, str):
        raise ValueError(f"{name} has no chat template and the prompts are conversations (message lists): "
                         "score them with a reward model that has one (or give its tokenizer a chat_template)")
    return prompt + completion


def check_records(records: Sequence[Dict], what: str) -> None:
    for i, r in enumerate(records):
        if "prompt" not in r or "completion" not in r:
            raise ValueError(f"{what}: row {i + 1} has no {'prompt' if 'prompt' not in r else 'completion'} field; "
                             "a generations file (evaluate.py generations=..., generate.py) has both")


@torch.no_grad()
def score_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: Optional[int] = None) -> List[float]:
    """One reward per text, batched by length (longest first), in the texts' order. Under torchrun
    (a process group started) each process scores every world-th batch of the length-sorted
    order and all processes get every score."""
    encoded = [tokenizer(t, add_special_tokens=False, truncation=max_length is not None, max_length=max_length)["input_ids"]
               for t in texts]
    return score_ids(model, head_pad_id(model, tokenizer), encoded, batch_size)


def head_pad_id(model, tokenizer) -> int:
    """The id a reward model's batch is padded with: the one its head reads (config.pad_token_id,
    which need not be the tokenizer's own; set from tokenizer_facts when the model has none)."""
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer_facts.pad_id(tokenizer)
    return model.config.pad_token_id


@torch.no_grad()
def score_ids(model, pad: int, encoded: Sequence[List[int]], batch_size: int = 8) -> List[float]:
    """One reward per id list (right-padded with `pad`), batched by length (longest first), in
    their order; under torchrun shared out as score_texts says."""
    import torch.distributed as dist
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out = [0.0] * len(encoded)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    for start in range(rank * batch_size, len(order), batch_size * world):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, :len(encoded[i])] = 1
        rewards = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().cpu()
        for row, i in enumerate(idx):
            out[i] = float(rewards[row])
    if world > 1:
        mine = {i: out[i] for b in range(rank * batch_size, len(order), batch_size * world)
                for i in order[b:b + batch_size]}
        gathered: List = [None] * world
        dist.all_gather_object(gathered, mine)
        for part in gathered:
            for i, v in part.items():
                out[i] = v
    return out


def score_records(model, tokenizer, records: Sequence[Dict], batch_size: int = 8, name: str = "the reward model",
                  max_length: Optional[int] = None, as_trainer: Optional[Dict] = None) -> List[float]:
    """The reward of each record's (prompt, completion); generation records hold the original
    prompt. as_trainer: the `training_format` of a reward model trained here (see `encode`)."""
    check_records(records, "generations")
    encoded = [encode(tokenizer, r["prompt"], r["completion"], name, as_trainer) for r in records]
    if max_length is not None:
        encoded = [ids[:max_length] for ids in encoded]
    return score_ids(model, head_pad_id(model, tokenizer), encoded, batch_size)


def mean_and_stderr(values: Sequence[float]):
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def prompt_key(prompt) -> str:
    import json
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def win_rate(scores: Sequence[float], records: Sequence[Dict], baseline_scores: Sequence[float],
             baseline_records: Sequence[Dict], what: str = "the baseline") -> float:
    """Share of prompts on which a model's answer out-scores the baseline's (ties count a half), on
    matched prompts. Two sets of records whose prompts differ are refused."""
    mine = {prompt_key(r["prompt"]): s for r, s in zip(records, scores)}
    theirs = {prompt_key(r["prompt"]): s for r, s in zip(baseline_records, baseline_scores)}
    if set(mine) != set(theirs):
        only, other = len(set(mine) - set(theirs)), len(set(theirs) - set(mine))
        raise ValueError(f"win rate against {what}: the two generation sets answer different prompts ({only} only "
                         f"in this model's, {other} only in the baseline's); generate both on the same prompts")
    wins = [1.0 if mine[k] > theirs[k] else 0.5 if mine[k] == theirs[k] else 0.0 for k in mine]
    return sum(wins) / len(wins)
