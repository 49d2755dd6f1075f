"""Lean model loading under FSDP: each rank materialises only its own shards.

Without it every FSDP rank builds the whole model in host memory before ``fully_shard`` cuts
it (8 ranks x 16 GB for an 8B bf16 teacher). With it (``FSDPTrainer``, ``trainer.lean_loading``,
on by default):

1. ``models.build_model`` runs inside :func:`deferred` and returns the model built on the
   meta device (no memory), with a :class:`WeightSource` attached saying where its weights come from.
2. ``FSDPTrainer.wrap`` shards it (``fully_shard``: still meta) and calls :func:`materialize`,
   which allocates each rank's local shards (``to_empty``), recomputes the buffers (rotary
   ``inv_freq`` is a non-persistent buffer: not in any checkpoint; the model's own HF
   ``_init_weights`` computes it, as ``from_pretrained`` does after its own meta init) and fills
   the parameters in one of two ways:

   * ``slices``: the weights are in local safetensors files (our checkpoints'
     ``model.safetensors``, or a hub directory's shards with ``model.safetensors.index.json``)
     whose names and shapes match the model. Each rank reads only the bytes of its own rows
     (FSDP2 shards dim 0: the DTensor's placement gives the local shape and offset) with
     positioned reads straight from the file (no mmap: pages touched through a mapping would
     count in the rank's resident memory), converts them to the model's dtype and copies them
     into its local shard. Summed over the ranks, about one copy of the model is ever resident.
   * ``broadcast``: anything else (random init from ``init_config``, a hub id that is not a
     local directory, a checkpoint whose names differ from the model's or with no safetensors).
     Rank 0 builds the model exactly as the single-process path does (same seed, so the same
     random weights; ``from_pretrained`` for a checkpoint), then scatters each rank its rows one
     tensor at a time, dropping its own reference as it goes: rank 0 peaks at about one model
     (plus its shards), the others at their shards plus one tensor's chunk.

Tied embeddings: ``lm_head.weight`` is the same parameter as ``embed_tokens.weight`` (the meta
model ties them; FSDP keeps them one parameter), so it is read once, under the embedding's name.
The result is bit-for-bit what ``from_pretrained`` / ``from_config`` followed by ``fully_shard``
gives (tests/test_lean_loading.py).
"""
import contextlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

_DEFER = [False]

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


@contextlib.contextmanager
def deferred(enabled: bool = True):
    """While active, models.build_model returns meta-device models for materialize()."""
    previous = _DEFER[0]
    _DEFER[0] = bool(enabled)
    try:
        yield
    finally:
        _DEFER[0] = previous


def active() -> bool:
    return _DEFER[0]


@dataclass
class WeightSource:
    """Where a meta model's weights come from. `path`: a local directory of safetensors (or
    None); `build_full`: builds the whole model the ordinary way (the broadcast path's rank 0)."""
    path: Optional[str]
    build_full: Callable[[], torch.nn.Module]
    strategy: str = field(default="")  # set by materialize: "slices" or "broadcast"
    # A LoRA policy (prefkd/adapters.py): the starting model's name of each parameter, and the
    # values of the parameters it does not have (the adapters: initial, or a resumed run's)
    rename: Callable[[str], str] = field(default=lambda name: name)
    fresh: Dict[str, torch.Tensor] = field(default_factory=dict)


def meta_model(config, dtype: Optional[torch.dtype], path: Optional[str], build_full: Callable):
    """The model of `config` on the meta device, with its WeightSource attached (attribute `lean_source`)."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if path:
        if os.path.isfile(os.path.join(path, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(path)
        model.eval()  # as from_pretrained leaves it
    model.lean_source = WeightSource(path=path if path and os.path.isdir(path) else None, build_full=build_full)
    return model


def is_deferred(model) -> bool:
    return getattr(model, "lean_source", None) is not None


# ------------------------------------------------------------------ safetensors, read by byte range

class SafetensorsFile:
    """A safetensors file read with positioned reads (os.pread): only the requested bytes are
    read, and nothing is mapped into the process."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        header = json.loads(os.pread(self.fd, n, 8))
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries = header  # name -> {"dtype", "shape", "data_offsets"}

    def close(self):
        os.close(self.fd)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.entries[name]["dtype"]]

    def read_rows(self, name: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows [start, stop) of dim 0 (the whole tensor for a 0-d one), as a new CPU tensor, or
        into `out` (contiguous, CPU, of the file's dtype and that many elements)."""
        e = self.entries[name]
        shape, dtype = list(e["shape"]), self.dtype(name)
        begin = self.base + e["data_offsets"][0]
        if not shape:
            start, stop, row_shape = 0, 1, []
        else:
            row_shape = shape[1:]
        row_bytes = dtype.itemsize
        for s in row_shape:
            row_bytes *= s
        if out is None:
            out = torch.empty([stop - start] + row_shape, dtype=dtype)
        elif out.dtype != dtype or not out.is_contiguous() or out.numel() * dtype.itemsize != (stop - start) * row_bytes:
            raise ValueError(f"{name}: read_rows(out=) needs a contiguous {dtype} tensor of rows {start}:{stop}")
        nbytes = (stop - start) * row_bytes
        if nbytes:
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            done, offset = 0, begin + start * row_bytes
            while done < nbytes:  # pread may return less than asked for
                got = os.preadv(self.fd, [view[done:]], offset + done)
                if got <= 0:
                    raise OSError(f"{self.path}: unexpected end of file reading {name}")
                done += got
        return out.reshape(shape) if not shape and out.dim() else out


def safetensors_index(path: str) -> Optional[Dict[str, str]]:
    """tensor name -> file, for a directory with model.safetensors or a sharded checkpoint's
    model.safetensors.index.json; None if it has neither."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        f = SafetensorsFile(single)
        try:
            return {k: single for k in f.entries}
        finally:
            f.close()
    return None


# ------------------------------------------------------------------ materialising the shards

def _local_slice(param) -> Tuple[torch.Tensor, List[int], List[int]]:
    """(local tensor, local shape, global offset) of a parameter (a DTensor after fully_shard)."""
    from torch.distributed.tensor import DTensor
    if not isinstance(param, DTensor):
        return param.data, list(param.shape), [0] * param.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), list(shape), list(offset)


def _slices_plan(model, source: WeightSource) -> Optional[Dict[str, str]]:
    """param name -> file when every parameter (but the fresh ones) is in the source's safetensors
    with its shape; else None."""
    if not source.path:
        return None
    index = safetensors_index(source.path)
    if index is None:
        return None
    files: Dict[str, SafetensorsFile] = {}
    try:
        for name, p in model.named_parameters():  # deduplicated: a tied lm_head is not listed
            if name in source.fresh:
                continue
            stored = source.rename(name)
            fname = index.get(stored)
            if fname is None:
                return None
            f = files.get(fname) or files.setdefault(fname, SafetensorsFile(fname))
            if f.shape(stored) != tuple(p.shape) or f.entries[stored]["dtype"] not in SAFETENSORS_DTYPES:
                return None
    finally:
        for f in files.values():
            f.close()
    return {name: index[source.rename(name)] for name, _ in model.named_parameters() if name not in source.fresh}


def _copy_fresh(model, fresh: Dict[str, torch.Tensor]) -> None:
    """Each rank's rows of the parameters whose whole values every rank holds (`fresh`)."""
    for name, p in model.named_parameters():
        if name in fresh:
            local, shape, offset = _local_slice(p)
            start = offset[0] if shape else 0
            if local.numel():
                local.copy_(fresh[name][start:start + shape[0]].to(local.dtype).reshape(local.shape))


def _all_agree(flag: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, flag)
    return all(flags)


@torch.no_grad()
def _init_buffers(model) -> None:
    """Recompute every buffer after to_empty: HF models (re)compute their buffers in
    `_init_weights` (from_pretrained relies on it after its own meta init). Persistent buffers
    found in the checkpoint are loaded afterwards."""
    init = getattr(model, "_init_weights", None)
    for module in model.modules():
        if next(module.buffers(recurse=False), None) is None:
            continue
        if init is None:
            raise ValueError(f"{type(model).__name__} has buffers but no _init_weights to compute them: "
                             "set trainer.lean_loading=false")
        init(module)


@torch.no_grad()
def materialize(model, device: torch.device) -> Optional[str]:
    """Give a sharded meta model (fully_shard already applied) its weights, each rank only its
    own shards. Returns the strategy used ("slices" / "broadcast"), or None if `model` was not
    built deferred."""
    source = getattr(model, "lean_source", None)
    if source is None:
        return None
    del model.lean_source
    model.to_empty(device=device)
    _init_buffers(model)
    plan = _slices_plan(model, source)
    _copy_fresh(model, source.fresh)
    if _all_agree(plan is not None):
        _load_slices(model, plan, source)
        source.strategy = "slices"
    else:
        _load_broadcast(model, source)
        source.strategy = "broadcast"
    return source.strategy


def _load_slices(model, plan: Dict[str, str], source: WeightSource) -> None:
    files: Dict[str, SafetensorsFile] = {}
    try:
        for name, p in model.named_parameters():
            if name not in plan:
                continue  # fresh: filled already
            fname, stored = plan[name], source.rename(name)
            f = files.get(fname) or files.setdefault(fname, SafetensorsFile(fname))
            local, shape, offset = _local_slice(p)
            if local.numel() == 0:
                continue
            if any(o != 0 for o in offset[1:]) or any(s != g for s, g in zip(shape[1:], p.shape[1:])):
                raise ValueError(f"{name}: lean loading handles dim-0 sharding only (placements {p.placements})")
            start = offset[0] if shape else 0
            stop = start + (shape[0] if shape else 1)
            if f.dtype(stored) == local.dtype and local.is_contiguous() and local.device.type == "cpu":
                f.read_rows(stored, start, stop, out=local)  # straight into the shard: no transient copy
            else:
                rows = f.read_rows(stored, start, stop)
                local.copy_(rows.to(local.dtype).reshape(local.shape))
                del rows
        # persistent buffers stored in the checkpoint (Llama has none)
        index = safetensors_index(source.path) or {}
        persistent = set(model.state_dict().keys())
        for name, b in model.named_buffers():
            stored = source.rename(name)
            if name in persistent and stored in index:
                fname = index[stored]
                f = files.get(fname) or files.setdefault(fname, SafetensorsFile(fname))
                t = f.read_rows(stored, 0, f.shape(stored)[0] if f.shape(stored) else 1)
                b.copy_(t.to(b.dtype).reshape(b.shape))
    finally:
        for f in files.values():
            f.close()


def _load_broadcast(model, source: WeightSource) -> None:
    """Rank 0 builds the whole model the ordinary way; then, one tensor at a time, it scatters
    each rank its rows (persistent buffers: broadcast whole) and drops its own reference, so its
    full copy drains as the shards fill: rank 0 peaks at about one model, the others at their
    shards plus one tensor's chunk."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    targets = [(n, p) for n, p in model.named_parameters() if n not in source.fresh]
    persistent = set(model.state_dict().keys())
    targets += [(n, b) for n, b in model.named_buffers() if n in persistent]
    full_sd: Dict[str, torch.Tensor] = {}
    problem = None
    if rank == 0:
        full = source.build_full()
        by_name = dict(full.state_dict())
        full_sd = {n: by_name[source.rename(n)] for n, _ in targets if source.rename(n) in by_name}
        del full, by_name
        for name, t in targets:
            if name not in full_sd or tuple(full_sd[name].shape) != tuple(t.shape):
                problem = f"{name}: {tuple(full_sd[name].shape) if name in full_sd else 'missing'} in the built " \
                          f"model, {tuple(t.shape)} in the sharded one"
                break
    problem = _broadcast_object(problem)
    if problem:
        raise ValueError(f"lean loading: {problem}; set trainer.lean_loading=false")
    for name, target in targets:
        local, shape, offset = _local_slice(target)
        full_t = full_sd.pop(name, None)
        if not distributed:
            local.copy_(full_t.to(local.dtype))
        elif not _is_dim0_sharded(target):  # replicated: broadcast whole
            buf = full_t.to(local.device, local.dtype).contiguous() if rank == 0 else torch.empty_like(local)
            dist.broadcast(buf, src=0)
            local.copy_(buf)
        else:
            if any(o != 0 for o in offset[1:]) or any(s != g for s, g in zip(shape[1:], target.shape[1:])):
                raise ValueError(f"{name}: lean loading handles dim-0 sharding only (placements {target.placements})")
            rows = -(-target.shape[0] // world)  # FSDP2: torch.chunk sizes, padded to the first's
            recv = torch.empty([rows] + list(target.shape[1:]), dtype=local.dtype, device=local.device)
            chunks = None
            if rank == 0:
                full_t = full_t.to(local.device, local.dtype)
                chunks = []
                for r in range(world):
                    piece = full_t[r * rows:(r + 1) * rows]
                    if piece.shape[0] < rows:
                        padded = torch.zeros_like(recv)
                        padded[:piece.shape[0]].copy_(piece)
                        piece = padded
                    chunks.append(piece.contiguous())
            dist.scatter(recv, chunks, src=0)
            if local.numel():
                local.copy_(recv[:shape[0]])
            del chunks, recv
        del full_t
    full_sd.clear()


def _is_dim0_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor, Shard
    return isinstance(t, DTensor) and any(isinstance(p, Shard) and p.dim == 0 for p in t.placements)


def _broadcast_object(obj):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
