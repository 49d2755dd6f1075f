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


def is_complete_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "COMPLETE"))


def remove_tree(path: str):
    shutil.rmtree(path, ignore_errors=True)
