"""The training loop: BasicTrainer (one process), FSDPTrainer (FSDP2, one process per device)
and TensorParallelTrainer (the `tensor_parallel` package's generic wrapper).

The trainer knows nothing about individual losses. It reads the loss's ``LossSpec``
(losses.py): whether the loss trains on pairs or single targets, what it needs of the
frozen reference (per-token log-probs or full logits) and whether it needs a teacher,
whose logits it reduces with the spec's ``teacher_features`` right after the teacher's
forward pass (likewise the teacher's own SFT reference, ``teacher_reference_features``),
and which responses a model must generate for the batch's prompts (``generation``: the
teacher's, the frozen starting student's or the current student's). Everything else (the
loop, evaluation, sampling, checkpoints, resume, logging) is shared.

Jobs kept apart, one module each: the models, frozen ones and their features included
(prefkd/models.py), the chunked output layer (prefkd/logits.py), generated responses
(prefkd/generation.py), what a checkpoint holds (prefkd/run_checkpoints.py) and its file I/O
(prefkd/checkpoints.py); this module is the loop, the step and evaluation.

Stopping. A non-finite loss or gradient norm stops the run naming the step (or, with
``max_nonfinite_steps=N``, skips up to N such steps in a row), so no non-finite weights are
ever saved. SIGINT / SIGTERM stop at the next step boundary with a checkpoint that
``resume=true`` continues; so a long run loses at most ``save_every_minutes`` of work.
"""
import contextlib
import json
import math
import os
import signal
import time
from typing import Dict, Iterator, List, Optional

import torch
from omegaconf import DictConfig

import preference_datasets as data
import utils
from prefkd import (adapters, checkpoints, lean_loading, models, output_cache, packing, run_checkpoints, run_plan,
                    run_state, tokenizer_facts)
from prefkd import batches as batches_lib
from prefkd import logits as logits_lib
from prefkd import generation
from prefkd.generation import InRunGeneration
from prefkd.logprobs import split_pairs
from utils import NonFiniteError, TrainingStopped, rank0_print
from prefkd import loss_spec
import losses  # noqa: F401  (registers every loss: prefkd.loss_spec.LOSSES)
from prefkd.data import loading as data_loading
from prefkd import scorers

# ------------------------------------------------------------------ the basic trainer

class BasicTrainer:
    """Single process; also the base of the distributed trainers."""
    checkpointing = run_checkpoints.RunCheckpoints  # what its checkpoints hold and how they are read back

    def __init__(self, cfg: DictConfig, run_dir: str, rank: int = 0, world_size: int = 1,
                 plan: Optional[run_plan.RunPlan] = None):
        self.cfg, self.run_dir, self.rank, self.world_size = cfg, run_dir, rank, world_size
        # the run resolved once (train.validate_config); checked here when built without one
        self.plan = plan or run_plan.check_models(cfg)
        self.device = self.pick_device()
        # where collectives' tensors live: the GPU under NCCL, the CPU under gloo
        self.collective_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.spec, self.pairwise = self.plan.spec, self.plan.spec.pairwise
        self.tokenizer = models.load_tokenizer(cfg.model)
        self.pad_id = tokenizer_facts.pad_id(self.tokenizer)
        self.examples_seen, self.step = 0, 0
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb_run = None  # set by train.py on rank 0 when wandb is on
        self.last_samples = []  # the last evaluation's (prompt, completion) pairs, for wandb
        self.t0 = time.time()
        self.nonfinite = NonFiniteSteps(int(cfg.get("max_nonfinite_steps") or 0))
        self.resume_ckpt = checkpoints.agreed_resume_checkpoint(run_dir, log=rank0_print) if cfg.resume else None
        self.lora = adapters.enabled(cfg.model)  # LoRA adapters train, the base is frozen (prefkd/adapters.py)
        # padding-free packed forwards (prefkd/packing.py); under FSDP the ranks agree on the row count
        self.packer = packing.Planner(cfg.get("padding_free", False), cfg.max_length, sync=utils.is_distributed(),
                                      device=self.collective_device)
        self.generation = InRunGeneration(cfg, self.plan.generation, self.tokenizer, self.device,
                                          self.agree, self.generate_kwargs())
        # what a resume must find unchanged (prefkd/run_state.py), as this run resolves it now
        self.fingerprint = run_state.fingerprint(cfg, self.plan, world_size) if rank == 0 else None
        self.setup_models()
        self.optimizer = getattr(torch.optim, cfg.optimizer)(
            [p for p in self.policy.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up over cfg.warmup_steps
            self.optimizer, lambda s, w=cfg.warmup_steps: min(1.0, (s + 1) / (w + 1)))
        self.checkpoints = self.checkpointing(
            cfg, run_dir, rank, world_size, policy=self.policy, optimizer=self.optimizer, scheduler=self.scheduler,
            tokenizer=self.tokenizer, generation=self.generation, fingerprint=self.fingerprint, agree=self.agree)
        if self.resume_ckpt is not None:
            self.step, self.examples_seen = self.checkpoints.restore(self.resume_ckpt)
        if cfg.resume and self.rank == 0:  # no checkpoint: the run starts over, none of its records stay
            checkpoints.trim_metrics(self.metrics_path, self.step if self.resume_ckpt else -1)

    # -- set-up ---------------------------------------------------------------
    def pick_device(self) -> torch.device:
        return models.pick_device(self.cfg, self.rank)

    def setup_models(self):
        """The policy (from the resumed checkpoint, else its start) and the frozen models the
        loss needs (prefkd/models.py), each placed by `wrap`; a frozen model whose outputs are
        cached (prefkd/output_cache.py) is not loaded."""
        cfg = self.cfg
        caches = dict(self.plan.caches)
        note = output_cache.reference_cache_ignored(cfg)
        if note:
            rank0_print(note)
            caches.pop(output_cache.REFERENCE, None)
        opened = {kind: output_cache.open_for_run(cfg, kind, self.tokenizer) for kind in caches}
        self.teacher_cache, self.reference_cache = opened.get(output_cache.TEACHER), opened.get(output_cache.REFERENCE)
        policy = models.build(cfg, "policy", self.tokenizer, archive=self.resume_ckpt, head=self.spec.head)
        self.frozen = models.FrozenModels(cfg, self.spec, self.tokenizer, caches=opened,
                                          reference_from_policy=self.lora)
        if cfg.activation_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.policy = self.wrap(policy, cfg.model, trainable=True)
        self.frozen.wrap(self.wrap)
        self.frozen.use_policy(self.policy)  # a LoRA policy's reference: its adapters off
        if self.packer.enabled:
            self.check_packing()
        report = models.startup_report(cfg, self.spec, self.policy, self.frozen)
        rank0_print(describe_models(cfg, self.frozen, report, self.device))
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            utils.atomic_write_json(os.path.join(self.run_dir, "model_report.json"), report)

    def wrap(self, model, model_cfg, trainable: bool):
        return model.to(self.device)

    def check_packing(self):
        """padding_free: each model the run loads keeps packed sequences apart (prefkd/packing.py)."""
        f = self.frozen
        for what, model, mcfg in (("the policy", self.policy, self.cfg.model), ("the reference", f.reference, self.cfg.model),
                                  ("the teacher", f.teacher, self.cfg.get("teacher")),
                                  ("the teacher's reference", f.teacher_reference, self.cfg.get("teacher"))):
            if isinstance(model, torch.nn.Module):
                packing.check_isolation(model, what, mcfg.get("attn_implementation") or "sdpa")

    # -- forward / loss -------------------------------------------------------
    def compute_loss(self, batch: Dict, train: bool):
        """One (micro-)batch -> (loss, {metric: per-example tensor})."""
        batch, generated = self.generated_batch(batch, train)
        inputs = utils.move_batch(batches_lib.concatenated_inputs(batch, self.pairwise, self.pad_id), self.device)
        model_in = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        extra = self.frozen.reference_outputs(inputs, self.logits, self.device)
        extra.update(self.frozen.teacher_outputs(batch, inputs, self.logits, self.device))
        with contextlib.nullcontext() if train else torch.no_grad():
            logits = self.logits(self.policy, model_in)
            inp = loss_spec.LossInputs(policy_logits=logits, labels=inputs["labels"],
                                        n_pairs=len(batch["prompt"]), **extra)
            loss, metrics = self.spec.compute(inp, self.cfg.loss)
        if generated is not None:
            metrics["generated/fraction"] = torch.full((len(batch["prompt"]),), float(generated))
        return loss, metrics

    def generated_batch(self, batch: Dict, train: bool):
        """(batch, generated): the batch with the responses the loss's Generation asks for
        (prefkd/generation.py), generated before any forward pass."""
        return self.generation.apply(batch, train, self.step, {
            "teacher": self.frozen.teacher, "reference": self.frozen.reference, "policy": self.policy})

    def logits(self, model, model_in: Dict[str, torch.Tensor]):
        """`model`'s logits: [N, L, V], or with output_chunking a LazyLogits (prefkd/logits.py)."""
        return logits_lib.output_logits(model, model_in, chunk=bool(self.cfg.get("output_chunking", False))
                                        and self.chunkable(model), packing=self.packer.of(model_in))

    def chunkable(self, model) -> bool:
        """Whether the chunked output layer applies to this (wrapped) model."""
        return True

    # -- the loop -------------------------------------------------------------
    def batch_iterator(self, split: str, skip_batches: int = 0, pairs: bool = False) -> Iterator[Dict]:
        return data.run_batches(self.cfg, self.tokenizer, self.spec, split, self.rank, self.world_size, skip_batches, pairs)

    def train(self):
        cfg = self.cfg
        batches = self.batch_iterator("train", skip_batches=self.step)
        bar = None
        if cfg.progress_bar and self.rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=cfg.n_examples or None, initial=self.examples_seen, unit="ex", dynamic_ncols=True)
        if cfg.do_first_eval and self.step == 0:
            self.evaluate()
        last_saved, evaluated_last = self.examples_seen, False
        self.t0 = time.time()
        self.checkpoints.restart_clock()
        with StopSignals() as signals:
            for batch, last in utils.with_last(batches):
                logged = self.train_step(batch)
                stop, time_due = self.agree([signals.received is not None, self.checkpoints.time_due()])
                # a skipped non-finite step (logged None) still counts its examples: the evaluation,
                # save or stop due at this boundary happens all the same
                if bar is not None and logged is not None:
                    bar.update(cfg.batch_size)
                    bar.set_postfix(loss=f"{logged['loss/train']:.4f}", ex_s=f"{logged['examples_per_second']:.1f}")
                # evaluation at the first step boundary past each multiple of eval_every
                evaluated_last = bool(cfg.eval_every) and \
                    self.examples_seen // cfg.eval_every > (self.examples_seen - cfg.batch_size) // cfg.eval_every
                if evaluated_last:
                    self.evaluate()
                # the last step is saved after the loop, as the run's final checkpoint (a LoRA run's
                # holds the merged model): a save here would make that one a no-op
                if stop or (not last and (time_due or (cfg.save_every and self.examples_seen - last_saved >= cfg.save_every))):
                    self.checkpoints.save(self.step, self.examples_seen, final=last)
                    last_saved = self.examples_seen
                if stop:
                    raise TrainingStopped(f"stopped by {signals.name or 'a signal on another rank'} at step "
                                          f"{self.step} ({self.examples_seen} examples); checkpoint "
                                          f"{self.run_dir}/step-{self.step:08d} saved: resume=true continues")
        if bar is not None:
            bar.close()
        if not evaluated_last:
            self.evaluate()
        self.checkpoints.save(self.step, self.examples_seen, final=True)
        if self.rank == 0:
            checkpoints.mark_done(self.run_dir, self.step, self.examples_seen, self.cfg.n_examples, self.cfg.n_epochs)

    def train_step(self, batch: Dict) -> Optional[Dict[str, float]]:
        """One optimizer step on a global batch; returns the logged metrics, or None when the
        loss or gradient norm was non-finite and the step was skipped (max_nonfinite_steps)."""
        cfg = self.cfg
        self.policy.train()
        step_metrics: Dict[str, List[torch.Tensor]] = {}
        parts = self.micro_batches(batch)
        for i, mb in enumerate(parts):
            with self.sync_context(last=i == len(parts) - 1):
                loss, metrics = self.compute_loss(mb, train=True)
                # each loss is a mean over its examples: weighted by their share, the sum of the
                # micro-batches' gradients is the local batch's
                (loss * (len(mb["prompt"]) / len(batch["prompt"]))).backward()
            metrics["loss"] = loss.detach().reshape(1).repeat(len(mb["prompt"]))
            for k, v in metrics.items():
                step_metrics.setdefault(k, []).append(v.detach().float().reshape(-1).cpu())
        grad_norm = self.clip_gradients()
        local_loss = float(torch.cat(step_metrics["loss"]).mean())
        (nonfinite,) = self.agree([not (math.isfinite(local_loss) and math.isfinite(grad_norm))])
        self.step += 1
        self.examples_seen += cfg.batch_size
        if nonfinite:
            return self.skip_nonfinite_step(local_loss, grad_norm)
        self.nonfinite.in_a_row = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        logged = self.reduce_metrics(step_metrics, "train")
        logged["grad_norm"] = grad_norm
        logged["lr"] = self.scheduler.get_last_lr()[0]
        logged["examples_per_second"] = cfg.batch_size / max(1e-9, time.time() - self.t0)
        if self.nonfinite.total:
            logged["nonfinite_skipped"] = self.nonfinite.total
        self.t0 = time.time()
        self.log(logged)
        return logged

    def micro_batches(self, batch: Dict) -> List[Dict]:
        """The local batch's micro-batches, in order: gradient_accumulation_steps equal parts,
        each cut further to at most max_tokens_per_micro_batch tokens when that is set."""
        parts = batches_lib.split_batch(batch, self.cfg.gradient_accumulation_steps)
        budget = self.cfg.get("max_tokens_per_micro_batch")
        if not budget:
            return parts
        sync = self.collective_device if utils.is_distributed() else None
        return [p for part in parts for p in batches_lib.split_by_tokens(part, budget, not self.packer.enabled, self.pairwise, sync)]

    def skip_nonfinite_step(self, loss: float, grad_norm: float) -> None:
        """Drop this step's gradients; stop (NonFiniteError) past max_nonfinite_steps in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        what = f"non-finite loss or gradient norm at step {self.step} (loss {loss}, grad_norm {grad_norm} on rank {self.rank})"
        rank0_print(self.nonfinite.skip(what, checkpoints.latest_name(self.run_dir), self.cfg.lr))
        self.log({"nonfinite_skipped": self.nonfinite.total})
        return None

    def agree(self, flags: List[bool]) -> List[bool]:
        """utils.agree on this trainer's device: every rank skips, saves or stops together."""
        return utils.agree(flags, self.collective_device)

    def sync_context(self, last: bool):
        return contextlib.nullcontext()

    def clip_gradients(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def reduce_metrics(self, metrics: Dict[str, List[torch.Tensor]], split: str) -> Dict[str, float]:
        return reduce_metrics(metrics, split, self.collective_device)

    def evaluate(self) -> Dict[str, float]:
        self.policy.eval()
        collected: Dict[str, List[torch.Tensor]] = {}
        samples = []
        for batch in self.batch_iterator("test"):
            loss, metrics = self.compute_loss(batch, train=False)
            metrics["loss"] = loss.detach().reshape(1)
            for k, v in metrics.items():
                collected.setdefault(k, []).append(v.detach().float().reshape(-1).cpu())
        for k, v in self.heldout_preference().items():
            collected.setdefault(k, []).append(v)
        if self.cfg.sample_during_eval:
            task = self.sample_and_score()
            for k, v in task.items():
                collected.setdefault(k, []).append(v)
            samples = self.last_samples
        result = self.reduce_metrics(collected, "eval")
        self.log(result, eval_samples=samples)
        rank0_print(f"eval @ {self.examples_seen} examples: " +
                    ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
        return result

    def heldout_preference(self) -> Dict[str, torch.Tensor]:
        """Loss-independent preference accuracy on held-out pairs (`heldout_logp_accuracy`)."""
        if not data_loading.pairs_available(list(self.cfg.datasets), self.cfg.get("data")) or self.spec.head != "lm":
            return {}  # SFT-only data sets have no pairs to rank; a reward model has no log-probs
        return heldout_logp_accuracy(self.batch_iterator("test", pairs=True), lambda m_in: self.logits(self.policy, m_in),
                                     self.device, self.pad_id)

    def generate(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.policy.generate(input_ids=prompt_ids, attention_mask=attention_mask, do_sample=False,
                                    max_new_tokens=self.cfg.max_new_tokens,
                                    pad_token_id=self.pad_id, **self.generate_kwargs())

    def generate_kwargs(self) -> Dict:
        return {}

    @torch.no_grad()
    def sample_and_score(self) -> Dict[str, torch.Tensor]:
        """Greedy generations for held-out prompts, scored by the data set's scorer (data.scorer;
        prefkd/scorers.py) on the original prompt: logged as task/<name>."""
        scorer = scorers.for_config(self.cfg.datasets, self.cfg.get("data")).common()
        scores, self.last_samples = generation.sample_and_score(
            self.batch_iterator("test"), self.generate, self.tokenizer, scorer, self.device,
            self.cfg.n_eval_samples, self.world_size)
        return scores

    def log(self, metrics: Dict[str, float], eval_samples=None):
        if self.rank == 0:
            write_log(self.metrics_path, self.wandb_run, self.step, self.examples_seen, metrics, eval_samples)


class NonFiniteSteps:
    """The run's count of non-finite steps: with max_nonfinite_steps=N up to N in a row are
    skipped (their gradients dropped), one more stops the run."""

    def __init__(self, allowed: int):
        self.allowed, self.in_a_row, self.total = allowed, 0, 0

    def skip(self, what: str, latest: Optional[str], lr: float) -> str:
        """Count one skipped step; raise NonFiniteError past the allowance, else return the warning."""
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row > self.allowed:
            raise NonFiniteError(
                f"{what}: training stopped, nothing of this step was applied or saved"
                + (f" (the last checkpoint, {latest}, is finite)" if latest else "")
                + f". Lower lr (now {lr}) or check the data; max_nonfinite_steps=N skips up to N such "
                  f"steps in a row" + (f" ({self.allowed} allowed now)" if self.allowed else ""))
        return (f"warning: {what}: step skipped ({self.in_a_row} in a row, {self.total} in all; "
                f"max_nonfinite_steps={self.allowed})")


class StopSignals:
    """While active, SIGINT and SIGTERM only set `received`: the loop saves a checkpoint at the
    next step boundary and stops. A third signal interrupts at once."""

    def __init__(self):
        self.received, self.name, self.count, self.previous = None, None, 0, {}

    def handle(self, signum, frame):
        self.count += 1
        self.received, self.name = signum, signal.Signals(signum).name
        if self.count >= 3:
            raise KeyboardInterrupt(f"{self.name} received 3 times: stopping without a checkpoint")
        rank0_print(f"\n{self.name}: saving a checkpoint at the end of this step, then stopping "
                    "(send it twice more to stop at once)")

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


# ------------------------------------------------------------------ FSDP

class FSDPTrainer(BasicTrainer):
    """FSDP2: ``fully_shard`` on every decoder block, then on the root, for the policy, the
    reference and the teacher alike. bf16 mixed precision with fp32 gradient reduction when
    ``model.fsdp_policy_mp=bfloat16``."""
    checkpointing = run_checkpoints.ShardedRunCheckpoints

    def pick_device(self):
        device = super().pick_device()
        from torch.distributed.device_mesh import init_device_mesh
        self.mesh = init_device_mesh(device.type, (self.world_size,))
        return device

    def setup_models(self):
        # trainer.lean_loading (default on): build_model returns meta-device models that wrap
        # materialises shard by shard, so no rank ever holds a whole model it does not need.
        # (a reward model's scalar head is new: its model is built whole, then sharded)
        with lean_loading.deferred(self.cfg.trainer.get("lean_loading", True) and self.plan.spec.head == "lm"):
            super().setup_models()

    def wrap(self, model, model_cfg, trainable: bool):
        from torch.distributed.fsdp import MixedPrecisionPolicy
        # No model.to(device) first: fully_shard moves each rank's shard to the mesh's device,
        # so a GPU never holds the whole model.
        mp_dtype = utils.get_dtype(model_cfg.fsdp_policy_mp)
        mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else MixedPrecisionPolicy()
        models.shard_fsdp(model, self.mesh, model_cfg.block_name, mp, what=model_cfg.name)
        # A model built deferred (meta device, see setup_models) gets its weights now: each
        # rank only its own shards.
        strategy = lean_loading.materialize(model, self.device)
        if strategy:
            rank0_print(f"{model_cfg.name}: loaded lean ({strategy})")
        return model

    def sync_context(self, last: bool):
        # Accumulate unreduced gradients locally and reduce-scatter once, on the last micro-batch.
        self.policy.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def generate_kwargs(self):
        # Every rank must run the same number of forward passes: sharded blocks all-gather.
        return {"synced_gpus": True}


# ------------------------------------------------------------------ tensor parallel

class TensorParallelTrainer(BasicTrainer):
    """One process; the policy split over several devices by ``tensor_parallel.TensorParallel``.
    Its ``tensor_parallel()`` entry point cannot shard HF Llama on transformers 5 (see README),
    so the generic module wrapper is used. The reference and teacher stay unsharded."""
    checkpointing = run_checkpoints.TensorParallelRunCheckpoints

    def chunkable(self, model) -> bool:
        # the wrapper splits the policy's output layer over devices: its full logits are used
        return model is not self.policy

    def wrap(self, model, model_cfg, trainable: bool):
        model = model.to(self.device)
        if not trainable:
            return model
        import tensor_parallel as tp
        devices = ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if self.device.type == "cuda"
                   else ["cpu"] * self.cfg.trainer.cpu_workers)
        wrapped = tp.TensorParallel(model, devices)
        wrapped.config = model.config
        wrapped.generation_config = getattr(model, "generation_config", None)
        return wrapped


TRAINERS = {"BasicTrainer": BasicTrainer, "FSDPTrainer": FSDPTrainer, "TensorParallelTrainer": TensorParallelTrainer}


# ------------------------------------------------------------------ helpers of the loop

@torch.no_grad()
def heldout_logp_accuracy(batches, policy_logits, device, pad_id: int) -> Dict[str, torch.Tensor]:
    """Does the policy give the chosen response a higher log-probability than the rejected one,
    on held-out pairs? Logged for every loss (KD losses have no implicit reward), so methods
    compare on one curve (evaluate.py reports the same number from batches.pair_logps).
    policy_logits(model_in) -> logits or LazyLogits."""
    acc = []
    for batch in batches:
        chosen, rejected = split_pairs(batches_lib.pair_logps(batch, policy_logits, pad_id, device), len(batch["prompt"]))
        acc.append((chosen > rejected).float().cpu())
    return {"heldout/logp_accuracy": torch.cat(acc)} if acc else {}


def reduce_metrics(metrics: Dict[str, List[torch.Tensor]], split: str, device) -> Dict[str, float]:
    """Concatenate per-example metrics over micro-batches and ranks; return their means,
    keyed as in docs/losses.md (`rewards/chosen` -> `rewards_{split}/chosen`)."""
    out = {}
    for k in sorted(metrics):
        v = utils.all_gather_cat(torch.cat(metrics[k]).to(device))
        head, _, tail = k.partition("/")
        out[f"{head}/{split}" if not tail else f"{head}_{split}/{tail}"] = float(v.float().mean())
    return out


def write_log(path: str, wandb_run, step: int, examples: int, metrics: Dict[str, float], eval_samples=None) -> None:
    """One metrics.jsonl record (and the same metrics to wandb, with the samples as a table)."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "examples": examples, **metrics}) + "\n")
    if wandb_run is not None:
        payload = dict(metrics)
        if eval_samples:
            import wandb
            payload["samples"] = wandb.Table(columns=["prompt", "completion"], data=[list(s) for s in eval_samples])
        wandb_run.log(payload, step=examples)


def describe_models(cfg, frozen, report: Dict, device) -> str:
    """The start-up line: the policy's size (and adapters), the reference mode, the teacher."""
    ref_cache, t_cache = frozen.reference_cache, frozen.teacher_cache
    n = report["parameters"]
    lora = report["lora"]
    return (f"policy: {n['total'] / 1e6:.2f} M parameters, {n['trainable'] / 1e6:.3f} M trainable"
            + (f" (LoRA r={lora['r']} alpha={lora['alpha']} on {len(lora['target_modules'])} modules: "
               f"{', '.join(lora['target_module_names'])})" if lora else "")
            + f"; reference: {report['reference']}"
            f"{' (cached: ' + ref_cache.path + ')' if ref_cache else ''}; "
            f"teacher: {cfg.teacher.name if frozen.teacher is not None or t_cache else 'none'}"
            f"{' (cached: ' + t_cache.path + ')' if t_cache else ''}"
            f"{' and its reference' if frozen.teacher_reference is not None else ''}; device {device}")
