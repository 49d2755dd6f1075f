"""Small helpers shared by train.py, trainers.py and the tests.

Nothing here knows about losses or data sets: distributed bookkeeping, seeding,
padding, atomic file writes and the run-directory layout.
"""
import contextlib
import json
import os
import random
import shutil
import subprocess
from typing import Dict, List, Iterable, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

REPO_DIR = os.path.dirname(os.path.abspath(__file__))


class RunError(Exception):
    """An error a user can act on (its message says what to do): train.py prints it, without a
    traceback, and exits non-zero."""


# ---------------------------------------------------------------- distributed

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def close_process_group(clean: bool = True) -> None:
    """End this process's process group. On a clean exit the ranks first meet at a barrier: a rank
    that tears gloo down while its peer still talks to it aborts the peer at exit ("terminate
    called without an active exception", seen 1 run in 4 on CPU tests). After an error no
    barrier: the other ranks may never arrive."""
    if is_distributed():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank0_print(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier():
    if is_distributed():
        dist.barrier()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor from every rank along dim 0 (same length on every rank)."""
    if not is_distributed():
        return t
    out = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------- tensors

def with_last(items: Iterable) -> Iterator[Tuple[object, bool]]:
    """(item, is it the last one) for each item, reading one item ahead."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    for upcoming in it:
        yield current, False
        current = upcoming
    yield current, True


def pad_to_length(t: torch.Tensor, length: int, pad_value, dim: int = -1) -> torch.Tensor:
    if t.size(dim) >= length:
        return t
    pad_size = list(t.shape)
    pad_size[dim] = length - t.size(dim)
    return torch.cat([t, torch.full(pad_size, pad_value, dtype=t.dtype, device=t.device)], dim=dim)


def pad_sequences(seqs: List[List[int]], value: int, left: bool = False) -> torch.LongTensor:
    """Stack ragged lists into a (batch, longest) LongTensor filled with ``value``."""
    longest = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), longest), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            if left:
                out[i, longest - len(s) :] = torch.tensor(s, dtype=torch.long)
            else:
                out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def dotted(d: Dict, prefix: str = "") -> Dict:
    """{a: 1, data: {local: {path: x}}, b: {}} -> {"a": 1, "data.local.path": x, "b": {}}: a nested
    config as its dotted keys (an empty section kept as {})."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def move_batch(batch: Dict, device) -> Dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def fork_rng(seed: int):
    """Seed torch's CPU generator for the block and restore its state after it: building a
    model (or its adapters) does not move the run's random stream. Models are built on the CPU
    (or the meta device), so the CPU generator is the only one their initialisation draws from."""
    # Not torch.manual_seed: it also reseeds every CUDA device (lazily, if CUDA is not up yet),
    # which this block would then not restore, so dropout and sampling on a GPU would depend on
    # when a model was built or a merged checkpoint saved.
    state = torch.default_generator.get_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.default_generator.set_state(state)


def get_rng_state() -> Dict:
    """Every generator a run draws from: Python's, numpy's, torch's CPU one and, on a GPU, the
    CUDA generator of this process's device (dropout, sampled generation and on-policy sampling
    draw there, not from the CPU generator)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's (models.pick_device set it)
    return state


def set_rng_state(state: Dict):
    """Restore `get_rng_state`'s generators. A checkpoint with a CUDA state resumed without a GPU
    (or one without it, on a GPU) restores what both have; the run's fingerprint (prefkd/run_state.py)
    says that the device changed."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def get_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


# ---------------------------------------------------------------- files

def atomic_write_json(path: str, obj) -> None:
    """Write JSON so that a crash leaves either the old file or the new one, never half of one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file renamed into place: a reader sees
    the old file or the new one, never half of it. Creates the parent directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if torch.is_tensor(t) and t.is_floating_point())


def remove_tree(path: str):
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- one writer per run

class RunLock:
    """An exclusive OS lock on <run>/.lock, held while a run writes there. The kernel drops
    it when the process dies, so a crash never leaves a stale lock behind."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, ".lock")
        self.fd = None

    def acquire(self):
        import fcntl
        import socket
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise RunDirBusy(f"{os.path.dirname(self.path)} is in use by another training process ({holder}): "
                             "wait for it to finish or stop it, or choose another exp_name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            import fcntl
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class TrainingStopped(RunError):
    """SIGINT / SIGTERM: the run saved a checkpoint at a step boundary and stopped."""


class RunDirBusy(RunError):
    pass


def describe_write_error(e: BaseException, where: str) -> Optional[str]:
    """A plain-words message for a failed write when the cause is a full disk (or quota), else None."""
    import errno
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    # torch.save reports a short write as "[enforce fail at inline_container.cc] ... unexpected pos"
    full = full or "unexpected pos" in str(e) or "No space left" in str(e) or "file write failed" in str(e)
    if not full:
        return None
    try:
        free = shutil.disk_usage(where).free / 2 ** 20
        free_s = f"{free:.0f} MiB free"
    except OSError:
        free_s = "free space unknown"
    return f"the disk is full at {where} ({free_s}): free some space (or set runs_dir elsewhere), then resume=true"


class NonFiniteError(RunError):
    """A non-finite loss, gradient norm or weight: the run stops before it can be saved."""


def all_max(values, device=None):
    """Each integer the largest over the ranks (one small all-reduce); one process: as they are."""
    if not is_distributed():
        return [int(v) for v in values]
    t = torch.tensor([float(v) for v in values], device=device or "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(x) for x in t.tolist()]


def agree(flags, device=None):
    """Each flag true on every rank if it is true on any (one small all-reduce; `device`: where the
    process group's tensors live, e.g. the GPU under NCCL), so that all ranks skip, save, stop or
    generate at the same step. One process: the flags as they are."""
    if not is_distributed():
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], device=device or "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


RESULT = "RESULT"  # the prefix of a benchmark case's one result line (scripts/bench_*.py)


def case_result(cmd: List[str], cwd: Optional[str] = None) -> Tuple[Optional[Dict], str]:
    """Run one benchmark case in a fresh process (its memory and threads its own) and return (the
    JSON of its RESULT line, or None if it printed none, the end of its stderr)."""
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    line = next((x for x in out.stdout.splitlines() if x.startswith(RESULT)), None)
    return (None if line is None else json.loads(line[len(RESULT):])), out.stderr[-3000:]
