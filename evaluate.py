"""Evaluate a checkpoint on held-out data, by default exactly as its run was configured.

    python evaluate.py checkpoint=runs/<run>                    # the run's own data, lengths and scorer
    python evaluate.py checkpoint=runs/<run>/LATEST reference=runs/<sft run>
    python evaluate.py checkpoint=<ckpt> datasets=[dpomix] n=500 generations=out.jsonl alpaca_eval=out.json
    python evaluate.py checkpoint=runs/<run> reward_model=runs/<rm run>/LATEST reward_baseline=sft_gen.jsonl
    torchrun --nproc_per_node=8 evaluate.py checkpoint=runs/<run> reward_model=<hub id>   # data parallel

Arguments are Hydra-style key=value (config/evaluate.yaml lists them). Every setting left null
defaults to the run's config (the checkpoint's trainer_state.json, else <run>/config.yaml):
data sets and every data option (local files, chat template, scorer), max_length,
max_prompt_length, truncation_mode, max_new_tokens and eval_batch_size; data.<key>=<value>
overrides one data option (merged over the run's). The implicit reward's beta is a common
beta = 0.1 for every run (so margins compare across methods), not the run's loss.beta,
unless beta= is given; the pipeline follows the same rule. A checkpoint with no run config
falls back to the embedded task and the defaults (said on stderr). The held-out split is
evaluated once, every row at most once: n larger than the split is capped (and said); n=null:
the whole split.

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
* `kl_ref`: with a reference, how far the model has moved from it where it answers: the
  per-token KL(pi || ref) of the full next-token distributions at every state of its own greedy
  answer (through its eos), averaged per answer, then over answers.
* `reward`, `reward_stderr` (with reward_model=<hub id or directory>): the mean and standard error
  of a reward model's scores of the generations (prefkd/reward_scoring.py: its own tokenizer and
  chat template; written per row into the generations' scores); `reward_win_rate` (with
  reward_baseline=<generations file>): the share of prompts on which this model's answer
  out-scores the baseline's (ties a half), on the same prompts only.
* `n` (rows evaluated) and `settings` (what was used).

Generations (prefkd/generation.py): generations=F writes one JSON line per prompt (the original
prompt, its plain text, the model input, the completion, the reference answer, the scores);
alpaca_eval=F AlpacaEval's model-outputs JSON; mt_bench=F an MT-Bench answer file (and
its question file beside it). Under torchrun every process evaluates every world-th batch (on
its GPU, in bf16; fp32 on the CPU) and scores every world-th reward batch; rank 0 gathers, writes
the files and prints: the numbers of one process. With wandb_summary=true, a run trained with wandb on gets the
metrics in its wandb run's summary as eval/<metric> (prefkd/tracking.py).
"""
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from prefkd import generation as gen
import preference_datasets as data
import utils
from prefkd import batches, checkpoints, config_compose, logprobs, models, packing, reward_scoring, scorers, tracking
from prefkd.logits import output_logits
from prefkd.data import loading as data_loading
from prefkd.data import encoding

DEFAULTS = {"datasets": ["embedded"], "max_length": 48, "max_prompt_length": 24, "truncation_mode": "keep_end",
            "max_new_tokens": 16, "batch_size": 32, "beta": 0.1}


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
    """The evaluation settings: each given value, else the run's config, else DEFAULTS. The
    beta of the implicit reward is DEFAULTS' common beta unless given (not the run's loss.beta)."""
    cfg, source = run_config(path)
    cfg = cfg or {}
    if options is not None and not isinstance(options, dict):
        options = OmegaConf.to_container(options, resolve=True)
    data_opts = _deep_merge(cfg.get("data") or {}, options or {})
    if scorer is not None:
        data_opts["scorer"] = scorer

    def pick(value, key, run_key=None):
        if value is not None:
            return value
        got = cfg.get(run_key or key)
        return got if got is not None else DEFAULTS[key]

    return {"config": source, "datasets": list(datasets or cfg.get("datasets") or DEFAULTS["datasets"]),
            "data": data_opts, "n": n_examples,
            "batch_size": int(pick(batch_size, "batch_size", "eval_batch_size")),
            "beta": float(beta if beta is not None else DEFAULTS["beta"]),
            "max_new_tokens": int(pick(max_new_tokens, "max_new_tokens")),
            "max_length": int(pick(max_length, "max_length")),
            "max_prompt_length": int(pick(max_prompt_length, "max_prompt_length")),
            "truncation_mode": str(pick(truncation_mode, "truncation_mode")),
            # the run's padding_free: its log-probs on packed rows (the same numbers, no padding computed)
            "padding_free": bool(cfg.get("padding_free", False))}


@torch.no_grad()
def sequence_logps(model, batch: Dict, pad_id: int, padding_free: bool = False) -> torch.Tensor:
    """[2B] summed response log-probs: chosen rows first, then rejected (through the chunked
    output layer, logits.output_logits: no [2B, L, V] logits tensor; padding_free: on packed rows)."""
    def logits_of(model_in):
        plan = packing.plan(model_in["attention_mask"], model_in["input_ids"].shape[1]) if padding_free else None
        return output_logits(model, model_in, chunk=True, packing=plan)
    return batches.pair_logps(batch, logits_of, pad_id)


def _take(batch: Dict, n: int) -> Dict:
    return {k: v[:n] for k, v in batch.items()}


def held_out_count(s: Dict, log) -> Tuple[int, int]:
    """(how many held-out rows to evaluate: s["n"] capped at the split's size (and said), the split's size)."""
    names, opts = s["datasets"], s["data"]
    available = sum(len(data_loading.load_dataset_checked(n, "test", opts, silent=True)[0]) for n in names)
    n = available if s["n"] is None else int(s["n"])
    if n > available:
        log(f"evaluate: n={n} is more than the {available} held-out examples of {names}: evaluating each of the "
            f"{available} once")
        n = available
    if n < 1:
        raise ValueError(f"n={n}: evaluate at least one example")
    return n, available


def score_batch(model, ref, tokenizer, batch: Dict, s: Dict, task, pairs: bool, sums: Dict, records: List,
                generator: str, first_id: int) -> None:
    """The metrics of one batch added to `sums`, its generations to `records` (ids from `first_id`:
    the batch's first row among the evaluated ones)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    b = len(batch["prompt"])
    lp = sequence_logps(model, batch, tokenizer.pad_token_id, s.get("padding_free", False)) if pairs else None
    if pairs:
        sums.setdefault("logp_accuracy", []).extend((lp[:b] > lp[b:]).float().tolist())
    if ref is not None:
        r = s["beta"] * (lp - sequence_logps(ref, batch, tokenizer.pad_token_id, s.get("padding_free", False)))
        sums.setdefault("pref_accuracy", []).extend((r[:b] > r[b:]).float().tolist())
        sums.setdefault("pref_margin", []).extend((r[:b] - r[b:]).tolist())
    out = model.generate(input_ids=batch["prompt_input_ids"], attention_mask=batch["prompt_attention_mask"],
                         do_sample=False, max_new_tokens=s["max_new_tokens"], pad_token_id=tokenizer.pad_token_id)
    if ref is not None:
        sums.setdefault("kl_ref", []).extend(own_answer_kl(model, ref, batch, out, tokenizer).tolist())
    for i, ids in enumerate(out[:, batch["prompt_input_ids"].shape[1]:]):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        name, original = batch["dataset"][i], batch["original_prompt"][i]
        score = task(name, original, text)
        for k, v in (score or {}).items():
            sums.setdefault(f"task_{k}", []).append(v)
        records.append({"id": first_id + i, "dataset": name, "prompt": original,
                        "prompt_text": gen.prompt_text(original), "model_input": batch["prompt"][i],
                        "completion": text, "reference": batch["reference"][i], "generator": generator,
                        "scores": score or {}})


@torch.no_grad()
def own_answer_kl(model, ref, batch: Dict, generated: torch.Tensor, tokenizer) -> torch.Tensor:
    """[B] the per-token KL(model || ref) on the model's own greedy answers (`generated`: the
    prompts and answers model.generate returned): each prompt without its left padding, then its
    answer through the first eos, right-padded, so that positions count from 0 as in training;
    the states that predict an answer token are averaged."""
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"].bool()
    answers = gen.through_eos(generated[:, prompt_ids.shape[1]:], tokenizer.eos_token_id)
    prompts = [ids[m].tolist() for ids, m in zip(prompt_ids, prompt_mask)]
    rows = [p + a.tolist() for p, a in zip(prompts, answers)]
    device = prompt_ids.device
    model_in = {"input_ids": utils.pad_sequences(rows, tokenizer.pad_token_id).to(device),
                "attention_mask": utils.pad_sequences([[1] * len(r) for r in rows], 0).to(device)}
    states = torch.zeros(model_in["input_ids"].shape, device=device)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        states[i, len(p) - 1:len(p) + len(a) - 1] = 1.0  # the logits at position t predict token t+1
    return logprobs.answer_kl(output_logits(model, model_in, chunk=True), output_logits(ref, model_in, chunk=True),
                              states)


@torch.no_grad()
def evaluate_checkpoint(path: str, reference: Optional[str] = None, datasets: Optional[List[str]] = None,
                        n_examples: Optional[int] = None, batch_size: Optional[int] = None,
                        beta: Optional[float] = None, max_new_tokens: Optional[int] = None,
                        max_length: Optional[int] = None, max_prompt_length: Optional[int] = None,
                        generations: Optional[str] = None, options=None, truncation_mode: Optional[str] = None,
                        scorer: Optional[str] = None, model_id: Optional[str] = None,
                        alpaca_eval: Optional[str] = None, mt_bench: Optional[str] = None,
                        reward_model: Optional[str] = None, reward_baseline: Optional[str] = None,
                        log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> Dict:
    """Evaluate `path` (a step-* directory, a run directory or its LATEST file). Settings left
    None come from the run's config (resolve_settings); `options` is merged over the run's
    `data:` section. The data and the scorer are loaded and checked before any model. SFT-only
    data sets have no pairs: only the generations are scored and saved."""
    s = resolve_settings(path, datasets, n_examples, batch_size, beta, max_new_tokens, max_length,
                         max_prompt_length, options, truncation_mode, scorer)
    names, opts = s["datasets"], s["data"]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    log = log if rank == 0 else (lambda msg: None)  # rank 0 speaks for all
    if s["config"] is None:
        log(f"evaluate: {path} has no run config (trainer_state.json / config.yaml); using defaults: "
            f"datasets {names}, max_length {s['max_length']}, max_prompt_length {s['max_prompt_length']}")
    task = scorers.for_config(names, opts)  # a bad data.scorer fails here, before the model is loaded
    baseline = check_reward_inputs(reward_model, reward_baseline)  # before any model, too
    n, available = held_out_count(s, log)
    s["n"] = n
    pairs = data_loading.pairs_available(names, opts)
    log(f"evaluate: {path}: {n} of {available} held-out examples of {names}, max_length {s['max_length']}, "
        f"max_prompt_length {s['max_prompt_length']}, scorer {task.specs()}"
        + (f" (settings from {s['config']})" if s["config"] else ""))
    device, dtype = evaluation_device(rank)
    model, tokenizer = models.load_checkpoint(path, dtype)
    ref = models.load_checkpoint(reference, dtype)[0].to(device) if reference and pairs else None
    model.to(device)
    generator = model_id or model_name(path)
    sums, records = score_held_out(model, ref, tokenizer, s, task, pairs, generator, rank, world)
    del model, ref  # the reward model gets the memory (three 8B models would not fit one GPU together)
    torch.cuda.empty_cache()  # a no-op where CUDA was never used
    if reward_model:
        sums.update(reward_metrics(records, reward_model, baseline, reward_baseline, s["batch_size"], log))
    for path_out, write in ((generations, gen.write_jsonl), (alpaca_eval, gen.write_alpaca_eval),
                            (mt_bench, gen.write_mt_bench)):
        if path_out and rank == 0:
            write(records, path_out)
    result = {k: sum(v) / len(v) if isinstance(v, list) else v for k, v in sums.items()}
    result["n"] = len(records)
    result["settings"] = {k: v for k, v in s.items() if k != "data"} | {"scorers": task.specs(),
                                                                       "generator": generator,
                                                                       "device": device.type, "dtype": str(dtype)}
    return result


def score_held_out(model, ref, tokenizer, s: Dict, task, pairs: bool, generator: str, rank: int,
                   world: int) -> Tuple[Dict, List[Dict]]:
    """(metric sums, one record per prompt) over the first s["n"] held-out examples, in order.
    Under torchrun each process takes every world-th batch: the same batches as one process,
    merged in batch order."""
    stream = data.get_batch_iterator(s["datasets"], tokenizer, split="test", batch_size=s["batch_size"],
                                     shuffle=False, max_length=s["max_length"],
                                     max_prompt_length=s["max_prompt_length"], truncation_mode=s["truncation_mode"],
                                     n_epochs=1, silent=True, sft_mode=not pairs, options=s["data"])
    done, mine = 0, []
    for i, batch in enumerate(stream):
        if done >= s["n"]:
            break
        batch = _take(batch, s["n"] - done)
        if i % world == rank:
            sums, records = {}, []
            score_batch(model, ref, tokenizer, batch, s, task, pairs, sums, records, generator, first_id=done)
            mine.append((i, sums, records))
        done += len(batch["prompt"])
    return merge_batches(mine, world)


def evaluation_device(rank: int = 0):
    """(device, dtype) of an evaluation: this process's GPU (LOCAL_RANK) in bf16, else the CPU in
    fp32. Part of the pipeline's evaluation key: numbers from the two are not mixed in one table."""
    device = models.pick_device(None, rank)
    return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)


def merge_batches(mine: List[Tuple[int, Dict, List]], world: int) -> Tuple[Dict[str, List[float]], List[Dict]]:
    """The per-row metrics and the records of every batch, in batch order: this process's
    (batch index, sums, records), gathered from every process under torchrun."""
    parts = mine
    if world > 1:
        gathered: List = [None] * world
        dist.all_gather_object(gathered, mine)
        parts = sorted((p for g in gathered for p in g), key=lambda p: p[0])
    sums: Dict[str, List[float]] = {}
    records: List[Dict] = []
    for _, part_sums, part_records in parts:
        for k, v in part_sums.items():
            sums.setdefault(k, []).extend(v)
        records += part_records
    return sums, records


def process_group() -> int:
    """evaluate.py under torchrun (WORLD_SIZE > 1): start the process group (nccl on GPUs, gloo on
    the CPU) and return this process's rank; 0 for one process."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank()


def read_jsonl(path: str) -> List[Dict]:
    if not os.path.isfile(path):
        raise ValueError(f"reward_baseline: no file {path} (a generations file of evaluate.py or generate.py)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_reward_inputs(reward_model: Optional[str], baseline_path: Optional[str]) -> Optional[List[Dict]]:
    """The reward model's output count and the baseline's generations (prompts and completions),
    checked before any model loads; returns the baseline's records."""
    if baseline_path and not reward_model:
        raise ValueError("reward_baseline is set but reward_model is not: the win rate needs a reward model")
    if not reward_model:
        return None
    reward_scoring.check(reward_model)
    if not baseline_path:
        return None
    records = read_jsonl(baseline_path)
    reward_scoring.check_records(records, f"reward_baseline {baseline_path}")
    return records


def reward_metrics(records: List[Dict], reward_model: str, baseline: Optional[List[Dict]], baseline_path,
                   batch_size: int, log) -> Dict[str, float]:
    """Each record's reward (written into its scores as `reward`), their mean and standard error,
    and the win rate against the baseline's generations on the same prompts."""
    device = models.pick_device(None, dist.get_rank() if dist.is_initialized() else 0)
    rm, tok = reward_scoring.load(reward_model, device)
    here = reward_scoring.training_format(reward_model)  # a loss=rm run: its training's formatting
    scores = reward_scoring.score_records(rm, tok, records, batch_size, name=f"reward_model={reward_model}",
                                          as_trainer=here)
    for r, v in zip(records, scores):
        r["scores"] = {**(r.get("scores") or {}), "reward": v}
    mean, stderr = reward_scoring.mean_and_stderr(scores)
    out = {"reward": mean, "reward_stderr": stderr}
    if baseline is not None:
        theirs = reward_scoring.score_records(rm, tok, baseline, batch_size, name=f"reward_model={reward_model}",
                                              as_trainer=here)
        out["reward_win_rate"] = reward_scoring.win_rate(scores, records, theirs, baseline, baseline_path)
    log(f"evaluate: reward model {reward_model}: mean {mean:.4f} +- {stderr:.4f}"
        + (f", win rate {out['reward_win_rate']:.3f} against {baseline_path}" if baseline is not None else ""))
    return out


def main(argv=None):
    """python evaluate.py checkpoint=<ckpt> [key=value ...] (config/evaluate.yaml): the metrics as
    one JSON object on stdout; exit 2 on bad input."""
    argv = sys.argv[1:] if argv is None else argv
    rank = process_group()
    try:
        a = config_compose.compose_command("evaluate", argv)
        if a.truncation_mode is not None and a.truncation_mode not in encoding.TRUNCATION_MODES:
            raise ValueError(f"truncation_mode={a.truncation_mode!r}: use one of {list(encoding.TRUNCATION_MODES)}")
        result = evaluate_checkpoint(
            str(a.checkpoint), a.reference, list(a.datasets) if a.datasets else None, a.n, a.batch_size, a.beta,
            a.max_new_tokens, a.max_length, a.max_prompt_length, a.generations,
            OmegaConf.to_container(a.data, resolve=True) if a.data else None, truncation_mode=a.truncation_mode,
            scorer=a.scorer, model_id=a.model_id, alpaca_eval=a.alpaca_eval, mt_bench=a.mt_bench,
            reward_model=a.reward_model, reward_baseline=a.reward_baseline)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    utils.close_process_group()
    if rank != 0:
        return 0  # rank 0 reports (and wrote the files)
    run_dir = tracking.run_of(str(a.checkpoint))
    if a.wandb_summary and run_dir is not None:
        tracking.publish_evaluation(run_dir, result, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
