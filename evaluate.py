"""Evaluate a checkpoint on held-out data.

    python evaluate.py runs/<run>/LATEST                          # embedded task, 256 held-out prompts
    python evaluate.py runs/<run>/LATEST --reference runs/<sft run>/LATEST --beta 0.1
    python evaluate.py <ckpt> --datasets dpomix --n 500 --generations out.jsonl

Metrics (one JSON object on stdout, and returned by `evaluate_checkpoint`):

* `task_exact`, `task_partial`: greedy generations scored by the task, where the data set
  has verifiable answers (the embedded task): the stand-in for the paper's reward model.
* `logp_accuracy`: share of held-out pairs whose chosen response has a higher
  log-probability than the rejected one under the model alone (needs no reference, so it
  ranks SFT and preference-trained models on one scale).
* `pref_accuracy`, `pref_margin`: with a reference, the implicit-reward accuracy
  beta [log pi(y_w) - log ref(y_w)] > beta [log pi(y_l) - log ref(y_l)] and its mean
  margin: the paper's "Margin Acc.".
* with `--generations F`, every prompt and greedy completion is written to F as JSONL, for
  external judges (AlpacaEval, MT-Bench).
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf

import losses
import preference_datasets as data
import utils


def load(path: str):
    from transformers import AutoModelForCausalLM
    ckpt = utils.resolve_checkpoint(path)
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        raise ValueError(f"{path} is not a checkpoint (no config.json at {ckpt})")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return model, data.get_tokenizer(ckpt)


@torch.no_grad()
def sequence_logps(model, batch: Dict) -> torch.Tensor:
    """[2B] summed response log-probs: chosen rows first, then rejected."""
    from trainers import concatenated_inputs
    inp = concatenated_inputs(batch, pairwise=True)
    logits = model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], use_cache=False).logits
    return losses.sequence_logps(losses.token_logps(logits, inp["labels"]), losses.response_mask(inp["labels"]))


@torch.no_grad()
def evaluate_checkpoint(path: str, reference: Optional[str] = None, datasets: List[str] = ("embedded",),
                        n_examples: int = 256, batch_size: int = 32, beta: float = 0.1, max_new_tokens: int = 16,
                        max_length: int = 48, max_prompt_length: int = 24, generations: Optional[str] = None,
                        options=None) -> Dict:
    """`options`: the `data:` config section (local copies, chat template). SFT-only data sets
    have no pairs: only the generations are scored and saved."""
    model, tokenizer = load(path)
    pairs = data.pairs_available(list(datasets), options)
    ref = load(reference)[0] if reference and pairs else None
    sums: Dict[str, List[float]] = {}
    rows = []
    batches = data.get_batch_iterator(list(datasets), tokenizer, split="test", batch_size=batch_size, shuffle=False,
                                      max_length=max_length, max_prompt_length=max_prompt_length,
                                      n_examples=n_examples, silent=True, sft_mode=not pairs, options=options)
    for batch in batches:
        b = len(batch["prompt"])
        lp = sequence_logps(model, batch) if pairs else None
        if pairs:
            sums.setdefault("logp_accuracy", []).extend((lp[:b] > lp[b:]).float().tolist())
        if ref is not None:
            r = beta * (lp - sequence_logps(ref, batch))
            sums.setdefault("pref_accuracy", []).extend((r[:b] > r[b:]).float().tolist())
            sums.setdefault("pref_margin", []).extend((r[:b] - r[b:]).tolist())
        out = model.generate(input_ids=batch["prompt_input_ids"], attention_mask=batch["prompt_attention_mask"],
                             do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        for i, (prompt, ids) in enumerate(zip(batch["prompt"], out[:, batch["prompt_input_ids"].shape[1]:])):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            name = batch["dataset"][i] if "dataset" in batch else datasets[0]
            score = data.task_score(name, prompt, text)
            if score is not None:
                sums.setdefault("task_exact", []).append(score["exact"])
                sums.setdefault("task_partial", []).append(score["partial"])
            rows.append({"dataset": name, "prompt": prompt, "completion": text, **(score or {})})
    if generations:
        tmp = generations + ".tmp"
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, generations)
    result = {k: sum(v) / len(v) for k, v in sums.items()}
    result["n"] = len(rows)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a step-* directory, a run directory or its LATEST file")
    p.add_argument("--reference", help="reference checkpoint for the implicit-reward metrics")
    p.add_argument("--datasets", nargs="+", default=["embedded"])
    p.add_argument("--n", type=int, default=256, help="held-out examples")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--max-prompt-length", type=int, default=24)
    p.add_argument("--generations", help="write prompts and greedy completions to this JSONL file")
    p.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE",
                   help="data options as in the config, e.g. paths.dpomix=/data/dpo-mix-7k skip_invalid=true")
    a = p.parse_args(argv)
    try:
        result = evaluate_checkpoint(a.checkpoint, a.reference, a.datasets, a.n, a.batch_size, a.beta,
                                     a.max_new_tokens, a.max_length, a.max_prompt_length, a.generations,
                                     OmegaConf.to_container(OmegaConf.from_dotlist(a.data)) if a.data else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
