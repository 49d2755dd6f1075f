"""A training run's checkpoints: what a step's checkpoint holds, when one is due, and the
restore of a resumed run's training state. prefkd/checkpoints.py does the file I/O (atomic
directories, LATEST, the manifest); this module decides what goes in and reads it back.

The trainer owns one ``RunCheckpoints`` built from what it needs, passed explicitly: the
policy, its optimizer and scheduler, the tokenizer, the in-run generation (whose cache and
generator state each rank saves), the run's fingerprint and the collective vote ``agree``.
The counters (step, examples seen) stay the trainer's and are passed to ``save`` and returned
by ``restore``. The distributed trainers use the subclasses at the end: FSDP streams a resumed
optimizer state into the ranks' shards, tensor parallelism gathers its shards by name.
"""
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from prefkd import adapters, checkpoints, models, optimizer_state, run_state
from utils import NonFiniteError, broadcast_object, rank0_print

# full (unsharded) state dicts, gathered to the CPU: what a checkpoint file holds
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class RunCheckpoints:
    """Saves <run>/step-N and restores a resumed run's training state (the weights themselves
    are read when the policy is built: models.build(archive=...))."""

    def __init__(self, cfg: DictConfig, run_dir: str, rank: int, world_size: int, *, policy, optimizer, scheduler,
                 tokenizer, generation, fingerprint: Optional[Dict], agree: Callable[[List[bool]], List[bool]]):
        self.cfg, self.run_dir, self.rank, self.world_size = cfg, run_dir, rank, world_size
        self.policy, self.optimizer, self.scheduler, self.tokenizer = policy, optimizer, scheduler, tokenizer
        self.generation, self.fingerprint, self.agree = generation, fingerprint, agree
        self.lora = adapters.enabled(cfg.model)
        self.saved_step: Optional[int] = None  # the step of the newest checkpoint written or resumed from
        self.last_save_time = time.time()

    def time_due(self) -> bool:
        """save_every_minutes has passed since the last save (rank 0's clock; the ranks agree after)."""
        minutes = self.cfg.get("save_every_minutes")
        return bool(minutes) and self.rank == 0 and time.time() - self.last_save_time >= 60.0 * float(minutes)

    def restart_clock(self) -> None:
        self.last_save_time = time.time()

    def save(self, step: int, examples_seen: int, final: bool = False) -> None:
        """Write <run>/step-N; a LoRA run's adapter, and its merged model when `final` (the end of
        the run) or model.lora.save_merged. Refuses non-finite weights, on every rank alike."""
        if self.saved_step == step:
            return  # this step is on disk already: never write (or replace) it twice
        model_sd, optim_sd = self.state_dicts()
        merged = self.merged_state_dict() if self.lora and (final or self.cfg.model.lora.get("save_merged")) else None
        finite = self.rank != 0 or checkpoints.state_is_finite(model_sd, optim_sd)
        if self.agree([not finite])[0]:
            raise NonFiniteError(f"the weights or optimizer state at step {step} are not finite: checkpoint "
                                 f"step-{step:08d} not written (LATEST still names "
                                 f"{checkpoints.latest_name(self.run_dir)})")
        counters = {"step": step, "examples_seen": examples_seen}
        checkpoints.save(self.run_dir, step, self.rank, self.agree,
                         lambda tmp: self.write_files(tmp, model_sd, optim_sd, merged, counters),
                         self.cfg.keep_checkpoints, rank_state={"generation": self.generation.state()})
        self.saved_step = step
        self.restart_clock()

    def write_files(self, tmp: str, model_sd: Dict, optim_sd: Dict, merged: Optional[Dict], counters: Dict) -> None:
        """Rank 0's files of one checkpoint, into the directory `tmp` that becomes step-N."""
        if self.lora:  # the adapter in peft's format; the model files only when merged
            adapters.write_adapter(os.path.join(tmp, adapters.ADAPTER_DIR), model_sd, self.policy,
                                   models.base_location(self.cfg))
            model_sd = merged
        checkpoints.write_files(tmp, model_sd, {"optimizer": optim_sd, "scheduler": self.scheduler.state_dict()},
                                self.policy, self.tokenizer, {
                                    **counters, "world_size": self.world_size, run_state.KEY: self.fingerprint,
                                    "config": OmegaConf.to_container(self.cfg, resolve=True)})

    def restore(self, ckpt: str) -> Tuple[int, int]:
        """Restore the optimizer, scheduler, generation state and RNG from `ckpt`; returns its
        (step, examples seen)."""
        state = checkpoints.load_state(ckpt, self.rank, self.world_size, rank_state=("generation",))
        self.generation.load_state(state["generation"])
        self.scheduler.load_state_dict(self.load_optimizer(ckpt))
        self.saved_step = state["step"]
        rank0_print(f"resumed from {ckpt} at step {state['step']} ({state['examples_seen']} examples)")
        return state["step"], state["examples_seen"]

    # -- what differs between the trainers ----------------------------------------
    def state_dicts(self) -> Tuple[Dict, Dict]:
        """(the weights a checkpoint holds, the optimizer state dict), full and on the CPU, on rank 0.
        The weights are the whole model's, or a LoRA policy's adapter only (peft's names)."""
        model_sd = adapters.trainable_state(self.policy) if self.lora else get_model_state_dict(self.policy, options=FULL)
        return model_sd, get_optimizer_state_dict(self.policy, self.optimizer, options=FULL)

    def merged_state_dict(self) -> Dict:
        """A LoRA policy's merged model (plain transformers names), full, on rank 0 ({} elsewhere)."""
        full = get_model_state_dict(self.policy, options=FULL)
        return adapters.merged_state_dict(full, self.policy) if self.rank == 0 else {}

    def load_optimizer(self, ckpt: str) -> Dict:
        """Fill the optimizer from `ckpt` (its full state, read whole); returns the scheduler's state."""
        blob = optimizer_state.read_full(ckpt)
        set_optimizer_state_dict(self.policy, self.optimizer, blob["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        return blob["scheduler"]


class ShardedRunCheckpoints(RunCheckpoints):
    """FSDP2: a resumed optimizer state is streamed from rank 0 into the ranks' shards."""

    def load_optimizer(self, ckpt: str) -> Dict:
        # Several ranks: rank 0 streams the state into the ranks' shards one tensor at a time, rather
        # than every rank reading a whole copy (prefkd/optimizer_state.py); older checkpoints as before.
        if self.world_size == 1:  # one process reads it whole anyway: optimizer.pt is not read twice
            return super().load_optimizer(ckpt)
        skeleton = optimizer_state.read_skeleton(ckpt) if self.rank == 0 else None
        stream = broadcast_object(optimizer_state.can_stream(ckpt, self.policy, skeleton) if self.rank == 0 else None)
        del skeleton
        if stream:
            rank0_print(f"{ckpt}: optimizer state streamed from rank 0 into the {self.world_size} ranks' shards")
            return optimizer_state.load_streamed(self.policy, self.optimizer, ckpt, self.rank)
        return super().load_optimizer(ckpt)


class TensorParallelRunCheckpoints(RunCheckpoints):
    """The tensor_parallel wrapper: shards gathered under the model's names; the optimizer
    state stays per shard, so such a run resumes on the same number of devices."""

    def state_dicts(self) -> Tuple[Dict, Dict]:
        # The wrapper's own state dict holds per-shard names; this context gathers the shards
        # back under the underlying model's names.
        import tensor_parallel as tp
        with tp.save_tensor_parallel(self.policy):
            model_sd = {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}
        return model_sd, self.optimizer.state_dict()

    def load_optimizer(self, ckpt: str) -> Dict:
        blob = optimizer_state.read_full(ckpt)
        self.optimizer.load_state_dict(blob["optimizer"])
        return blob["scheduler"]
