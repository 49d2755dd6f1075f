"""Evaluate a checkpoint on held-out data, by default exactly as its run was configured.

    python evaluate.py runs/<run>                                 # the run's own data, lengths and scorer
    python evaluate.py runs/<run>/LATEST --reference runs/<sft run> --beta 0.1
    python evaluate.py <ckpt> --datasets dpomix --n 500 --generations out.jsonl --alpaca-eval out.json

Every setting defaults to the run's config (the checkpoint's trainer_state.json, else
<run>/config.yaml): data sets and every data option (local files, chat template, scorer),
max_length, max_prompt_length, truncation_mode, max_new_tokens, eval_batch_size and the
loss's beta. Flags override one setting each; --data KEY=VALUE overrides one data option
(merged over the run's). A checkpoint with no run config falls back to the embedded task
and the config defaults (said on stderr). The held-out split is evaluated once, every row
at most once: --n larger than the split is capped (and said); no --n: the whole split.

Metrics (one JSON object on stdout, and returned by `evaluate_checkpoint`):

* `task_<name>`: greedy generations scored by the data set's scorer (data.scorer, see
  prefkd/scorers.py; the embedded task's gives `task_exact`, `task_partial`): the stand-in for the
  paper's reward model.
* `logp_accuracy`: share of held-out pairs whose chosen response has a higher
  log-probability than the rejected one under the model alone (needs no reference, so it
  ranks SFT and preference-trained models on one scale).
* `pref_accuracy`, `pref_margin`: with a reference, the implicit-reward accuracy
  beta [log pi(y_w) - log ref(y_w)] > beta [log pi(y_l) - log ref(y_l)] and its mean
  margin: the paper's "Margin Acc.".
* `n` (rows evaluated) and `settings` (what was used).

Generations (prefkd/generations.py): --generations F writes one JSON line per prompt (the original
prompt, its plain text, the model input, the completion, the reference answer, the scores);
--alpaca-eval F AlpacaEval's model-outputs JSON; --mt-bench F an MT-Bench answer file (and
its question file beside it).
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf

from prefkd import generation as gen
import losses
import preference_datasets as data
from prefkd import scorers
from prefkd import checkpoints

DEFAULTS = {"datasets": ["embedded"], "max_length": 48, "max_prompt_length": 24, "truncation_mode": "keep_end",
            "max_new_tokens": 16, "batch_size": 32, "beta": 0.1}


def load(path: str):
    from transformers import AutoModelForCausalLM
    ckpt = checkpoints.resolve_checkpoint(path)
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        raise ValueError(f"{path} is not a checkpoint (no config.json at {ckpt})")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return model, data.get_tokenizer(ckpt)


def run_config(path: str):
    """(the config the checkpoint was trained with as a dict, where it was read) or (None, None):
    the checkpoint's trainer_state.json, else config.yaml of its run directory."""
    try:
        ckpt = checkpoints.resolve_checkpoint(path)
    except Exception:
        ckpt = path
    state = os.path.join(ckpt, "trainer_state.json")
    if os.path.isfile(state):
        with open(state) as f:
            cfg = json.load(f).get("config")
        if cfg:
            return cfg, state
    for d in (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)), os.path.dirname(ckpt)):
        yaml = os.path.join(d, "config.yaml")
        if os.path.isfile(yaml):
            return OmegaConf.to_container(OmegaConf.load(yaml), resolve=True), yaml
    return None, None


def model_name(path: str) -> str:
    """A generator / model id for judges: the run directory's name."""
    p = os.path.abspath(path)
    if os.path.basename(p) == "LATEST" or os.path.basename(p).startswith("step-"):
        p = os.path.dirname(p)
    return os.path.basename(p)


def _deep_merge(base: Dict, over: Dict) -> Dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_settings(path: str, datasets=None, n_examples=None, batch_size=None, beta=None, max_new_tokens=None,
                     max_length=None, max_prompt_length=None, options=None, truncation_mode=None,
                     scorer=None) -> Dict:
    """The evaluation settings: each given value, else the run's config, else DEFAULTS."""
    cfg, source = run_config(path)
    cfg = cfg or {}
    if options is not None and not isinstance(options, dict):
        options = OmegaConf.to_container(options, resolve=True)
    data_opts = _deep_merge(cfg.get("data") or {}, options or {})
    if scorer is not None:
        data_opts["scorer"] = scorer
    loss_beta = (cfg.get("loss") or {}).get("beta")

    def pick(value, key, run_key=None):
        if value is not None:
            return value
        got = cfg.get(run_key or key)
        return got if got is not None else DEFAULTS[key]

    return {"config": source, "datasets": list(datasets or cfg.get("datasets") or DEFAULTS["datasets"]),
            "data": data_opts, "n": n_examples,
            "batch_size": int(pick(batch_size, "batch_size", "eval_batch_size")),
            "beta": float(beta if beta is not None else (loss_beta if isinstance(loss_beta, (int, float))
                                                         else DEFAULTS["beta"])),
            "max_new_tokens": int(pick(max_new_tokens, "max_new_tokens")),
            "max_length": int(pick(max_length, "max_length")),
            "max_prompt_length": int(pick(max_prompt_length, "max_prompt_length")),
            "truncation_mode": str(pick(truncation_mode, "truncation_mode"))}


@torch.no_grad()
def sequence_logps(model, batch: Dict) -> torch.Tensor:
    """[2B] summed response log-probs: chosen rows first, then rejected (through the chunked
    output layer, logits.output_logits: no [2B, L, V] logits tensor)."""
    from prefkd.logits import output_logits
    from trainers import concatenated_inputs
    inp = concatenated_inputs(batch, pairwise=True)
    logits = output_logits(model, {"input_ids": inp["input_ids"], "attention_mask": inp["attention_mask"]}, chunk=True)
    return losses.sequence_logps(losses.token_logps(logits, inp["labels"]), losses.response_mask(inp["labels"]))


def _take(batch: Dict, n: int) -> Dict:
    return {k: v[:n] for k, v in batch.items()}


@torch.no_grad()
def evaluate_checkpoint(path: str, reference: Optional[str] = None, datasets: Optional[List[str]] = None,
                        n_examples: Optional[int] = None, batch_size: Optional[int] = None,
                        beta: Optional[float] = None, max_new_tokens: Optional[int] = None,
                        max_length: Optional[int] = None, max_prompt_length: Optional[int] = None,
                        generations: Optional[str] = None, options=None, truncation_mode: Optional[str] = None,
                        scorer: Optional[str] = None, model_id: Optional[str] = None,
                        alpaca_eval: Optional[str] = None, mt_bench: Optional[str] = None,
                        log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> Dict:
    """Evaluate `path` (a step-* directory, a run directory or its LATEST file). Settings left
    None come from the run's config (resolve_settings); `options` is merged over the run's
    `data:` section. The data and the scorer are loaded and checked before any model. SFT-only
    data sets have no pairs: only the generations are scored and saved."""
    s = resolve_settings(path, datasets, n_examples, batch_size, beta, max_new_tokens, max_length,
                         max_prompt_length, options, truncation_mode, scorer)
    names, opts = s["datasets"], s["data"]
    if s["config"] is None:
        log(f"evaluate: {path} has no run config (trainer_state.json / config.yaml); using defaults: "
            f"datasets {names}, max_length {s['max_length']}, max_prompt_length {s['max_prompt_length']}")
    task = scorers.for_config(names, opts)  # a bad data.scorer fails here, before the model is loaded
    available = sum(len(data.load_dataset_checked(n, "test", opts, silent=True)[0]) for n in names)
    n = available if s["n"] is None else int(s["n"])
    if n > available:
        log(f"evaluate: n={n} is more than the {available} held-out examples of {names}: evaluating each of the "
            f"{available} once")
        n = available
    if n < 1:
        raise ValueError(f"n={n}: evaluate at least one example")
    s["n"] = n
    pairs = data.pairs_available(names, opts)
    log(f"evaluate: {path}: {n} of {available} held-out examples of {names}, max_length {s['max_length']}, "
        f"max_prompt_length {s['max_prompt_length']}, scorer {task.specs()}"
        + (f" (settings from {s['config']})" if s["config"] else ""))

    model, tokenizer = load(path)
    ref = load(reference)[0] if reference and pairs else None
    generator = model_id or model_name(path)
    sums: Dict[str, List[float]] = {}
    records = []
    batches = data.get_batch_iterator(names, tokenizer, split="test", batch_size=s["batch_size"], shuffle=False,
                                      max_length=s["max_length"], max_prompt_length=s["max_prompt_length"],
                                      truncation_mode=s["truncation_mode"], n_epochs=1, silent=True,
                                      sft_mode=not pairs, options=opts)
    for batch in batches:
        if len(records) >= n:
            break
        batch = _take(batch, n - len(records))
        b = len(batch["prompt"])
        lp = sequence_logps(model, batch) if pairs else None
        if pairs:
            sums.setdefault("logp_accuracy", []).extend((lp[:b] > lp[b:]).float().tolist())
        if ref is not None:
            r = s["beta"] * (lp - sequence_logps(ref, batch))
            sums.setdefault("pref_accuracy", []).extend((r[:b] > r[b:]).float().tolist())
            sums.setdefault("pref_margin", []).extend((r[:b] - r[b:]).tolist())
        out = model.generate(input_ids=batch["prompt_input_ids"], attention_mask=batch["prompt_attention_mask"],
                             do_sample=False, max_new_tokens=s["max_new_tokens"], pad_token_id=tokenizer.pad_token_id)
        for i, ids in enumerate(out[:, batch["prompt_input_ids"].shape[1]:]):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            name, original = batch["dataset"][i], batch["original_prompt"][i]
            score = task(name, original, text)
            for k, v in (score or {}).items():
                sums.setdefault(f"task_{k}", []).append(v)
            records.append({"id": len(records), "dataset": name, "prompt": original,
                            "prompt_text": gen.prompt_text(original), "model_input": batch["prompt"][i],
                            "completion": text, "reference": batch["reference"][i], "generator": generator,
                            "scores": score or {}})
    if generations:
        gen.write_jsonl(records, generations)
    if alpaca_eval:
        gen.write_alpaca_eval(records, alpaca_eval)
    if mt_bench:
        gen.write_mt_bench(records, mt_bench)
    result = {k: sum(v) / len(v) for k, v in sums.items()}
    result["n"] = len(records)
    result["settings"] = {k: v for k, v in s.items() if k != "data"} | {"scorers": task.specs(),
                                                                       "generator": generator}
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a step-* directory, a run directory or its LATEST file")
    p.add_argument("--reference", help="reference checkpoint for the implicit-reward metrics")
    p.add_argument("--datasets", nargs="+", help="data sets (default: the run's `datasets`)")
    p.add_argument("--n", type=int, help="held-out examples (default: the whole test split)")
    p.add_argument("--batch-size", type=int, help="default: the run's eval_batch_size")
    p.add_argument("--beta", type=float, help="beta of the implicit reward (default: the run's loss.beta, or 0.1)")
    p.add_argument("--max-new-tokens", type=int, help="default: the run's max_new_tokens")
    p.add_argument("--max-length", type=int, help="default: the run's max_length")
    p.add_argument("--max-prompt-length", type=int, help="default: the run's max_prompt_length")
    p.add_argument("--truncation-mode", choices=data.TRUNCATION_MODES, help="default: the run's truncation_mode")
    p.add_argument("--scorer", help="'<module>:<function>' or '<file.py>:<function>' (default: the run's data.scorer)")
    p.add_argument("--data", nargs="*", default=[], metavar="KEY=VALUE",
                   help="data options merged over the run's, e.g. paths.dpomix=/data/dpo-mix-7k skip_invalid=true")
    p.add_argument("--generations", help="write prompts, completions and scores to this JSONL file")
    p.add_argument("--alpaca-eval", help="write AlpacaEval model outputs (a JSON list) to this file")
    p.add_argument("--mt-bench", help="write an MT-Bench answer file (JSONL; questions beside it) to this file")
    p.add_argument("--model-id", help="generator / model_id in the judge files (default: the run's name)")
    a = p.parse_args(argv)
    try:
        result = evaluate_checkpoint(
            a.checkpoint, a.reference, a.datasets, a.n, a.batch_size, a.beta, a.max_new_tokens, a.max_length,
            a.max_prompt_length, a.generations,
            OmegaConf.to_container(OmegaConf.from_dotlist(a.data)) if a.data else None,
            truncation_mode=a.truncation_mode, scorer=a.scorer, model_id=a.model_id, alpaca_eval=a.alpaca_eval,
            mt_bench=a.mt_bench)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
