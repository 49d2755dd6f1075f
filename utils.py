"""Small helpers shared by train.py, trainers.py and the tests.

Nothing here knows about losses or data sets: distributed bookkeeping, seeding,
padding, atomic file writes and the run-directory layout.
"""
import json
import os
import random
import shutil
from typing import Dict, Optional

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

def pad_to_length(t: torch.Tensor, length: int, pad_value, dim: int = -1) -> torch.Tensor:
    if t.size(dim) >= length:
        return t
    pad_size = list(t.shape)
    pad_size[dim] = length - t.size(dim)
    return torch.cat([t, torch.full(pad_size, pad_value, dtype=t.dtype, device=t.device)], dim=dim)


def move_batch(batch: Dict, device) -> Dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state() -> Dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: Dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


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
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_checkpoint(path: str) -> str:
    """Accept a checkpoint directory, a run directory, or a run's LATEST pointer; return the
    checkpoint directory. LATEST is a text file naming the newest complete checkpoint."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path) and os.path.basename(path) == "LATEST":
        with open(path) as f:
            return os.path.join(os.path.dirname(path), f.read().strip())
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "LATEST")):
        return resolve_checkpoint(os.path.join(path, "LATEST"))
    return path


# ---------------------------------------------------------------- checkpoint integrity
#
# A checkpoint is complete when its COMPLETE manifest exists and every file it lists is
# there with the size recorded. The manifest is written last, after every file has been
# flushed to disk, so a crash at any point leaves either no manifest or a true one; a file
# truncated or removed later is caught by its size.

MANIFEST = "COMPLETE"
# What a training checkpoint must hold besides the per-rank RNG files.
REQUIRED_FILES = ("config.json", "model.safetensors", "optimizer.pt", "trainer_state.json")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(ckpt: str) -> None:
    """Flush every file of `ckpt` to disk, then record their sizes in its manifest."""
    sizes = {}
    for name in sorted(os.listdir(ckpt)):
        full = os.path.join(ckpt, name)
        if name == MANIFEST or not os.path.isfile(full):
            continue
        with open(full, "rb") as f:
            os.fsync(f.fileno())
        sizes[name] = os.path.getsize(full)
    atomic_write_json(os.path.join(ckpt, MANIFEST), {"files": sizes})
    fsync_dir(ckpt)


def checkpoint_problem(ckpt: str) -> Optional[str]:
    """None if `ckpt` is a complete training checkpoint, else what is wrong with it."""
    if not os.path.isdir(ckpt):
        return "missing"
    try:
        with open(os.path.join(ckpt, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no valid {MANIFEST} manifest (the save did not finish)"
    for name in REQUIRED_FILES:
        if name not in files:
            return f"its manifest lists no {name}"
    for name, size in files.items():
        full = os.path.join(ckpt, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if os.path.getsize(full) != size:
            return f"{name} has {os.path.getsize(full)} bytes, {size} were written (truncated or replaced)"
    return None


def is_complete_checkpoint(path: str) -> bool:
    return checkpoint_problem(path) is None


def list_checkpoints(run_dir: str):
    """step-* directory names of a run, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(d for d in os.listdir(run_dir) if d.startswith("step-") and os.path.isdir(os.path.join(run_dir, d)))


def latest_name(run_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(run_dir, "LATEST")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def find_resume_checkpoint(run_dir: str, log=print) -> Optional[str]:
    """The checkpoint `resume=true` continues from: the one LATEST names if it is complete,
    else (with a message saying why) the newest complete one; None if there is none."""
    named = latest_name(run_dir)
    if named is not None:
        problem = checkpoint_problem(os.path.join(run_dir, named))
        if problem is None:
            return os.path.join(run_dir, named)
        log(f"warning: {run_dir}/LATEST names {named}, which is damaged ({problem}); "
            "falling back to the newest complete checkpoint")
    for name in reversed(list_checkpoints(run_dir)):
        if name != named and checkpoint_problem(os.path.join(run_dir, name)) is None:
            if named is not None:
                log(f"resuming from {name}")
            return os.path.join(run_dir, name)
    if named is not None:
        log(f"warning: {run_dir} holds no complete checkpoint: starting from the beginning")
    return None


def safetensors_problem(path: str) -> Optional[str]:
    """None if `path` is a readable safetensors file (header parses, data as long as the header
    says), else what is wrong. Reads only the header."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                return f"header length {n} does not fit in the file's {size} bytes (truncated or not safetensors)"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"unreadable safetensors header ({type(e).__name__}: {e})"
    if 8 + n + end != size:
        return f"the header describes {8 + n + end} bytes, the file has {size} (truncated)"
    return None


def model_dir_problem(path: str) -> Optional[str]:
    """None if `path` looks like a loadable model directory, else what is wrong (naming the file)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return f"no config.json at {path}"
    try:
        with open(os.path.join(path, "config.json")) as f:
            json.load(f)
    except ValueError as e:
        return f"{os.path.join(path, 'config.json')} is not valid JSON ({e})"
    tensors = [n for n in os.listdir(path) if n.endswith(".safetensors")]
    for name in sorted(tensors):
        problem = safetensors_problem(os.path.join(path, name))
        if problem:
            return f"{os.path.join(path, name)}: {problem}"
    if not tensors and not any(n.endswith((".bin", ".pt")) for n in os.listdir(path)):
        return f"no weights (*.safetensors) at {path}"
    return None


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
