"""The optimizer state of a checkpoint, on disk and back: written whole by rank 0, read back whole
(one process) or streamed to the ranks of an FSDP2 run, one tensor at a time.

On disk: `optimizer.tensors` (the safetensors format) holds every tensor of the (full) optimizer state dict, named
`state/<param>/<key>`; `optimizer.pt` holds the rest (the param groups, the non-tensor state
entries and 0-dim tensors such as the step count, the scheduler, and where each tensor went). A checkpoint written before this split has
everything in optimizer.pt, and is read as it was.

Why streamed: AdamW keeps two fp32 tensors per parameter, 16 bytes a parameter with the master
weights' gradient moments: an 8B model's is about 64 GB. Loading it whole on every rank and then
slicing each rank's shard out (torch.distributed.checkpoint's full-state-dict path) holds a whole
copy per rank at once. Here rank 0 reads one tensor at a time with plain reads (not a memory map,
whose touched pages would count against the process until it is closed) and scatters it into the
ranks' shards (DTensor's distribute_tensor), so the ranks hold their shards and one tensor in flight.
"""
import json
import os
from typing import Dict, Optional

import torch
import utils

# not *.safetensors: the model-file globs (fingerprints, lean loading, integrity checks) must not see it
OPTIMIZER, TENSORS = "optimizer.pt", "optimizer.tensors"
_REF = "__tensor__"  # marks an entry of the skeleton whose value is in optimizer.tensors


def write(ckpt: str, blob: Dict) -> None:
    """Write {"optimizer": a full optimizer state dict, "scheduler": ...} as the two files."""
    from safetensors.torch import save_file
    tensors: Dict[str, torch.Tensor] = {}
    state = {}
    for pid, entries in blob["optimizer"].get("state", {}).items():
        state[pid] = {}
        for key, value in entries.items():
            if torch.is_tensor(value) and value.dim() > 0:  # a 0-dim one (AdamW's step) stays in the skeleton
                name = f"state/{pid}/{key}"
                tensors[name] = value.detach().cpu().contiguous()
                state[pid][key] = {_REF: name}
            else:
                state[pid][key] = value
    skeleton = dict(blob, optimizer={**blob["optimizer"], "state": state})
    save_file(tensors, os.path.join(ckpt, TENSORS), metadata={"format": "pt"})
    torch.save(skeleton, os.path.join(ckpt, OPTIMIZER))


def read_skeleton(ckpt: str) -> Dict:
    """optimizer.pt as written: the whole state of an old checkpoint, else the skeleton."""
    return torch.load(os.path.join(ckpt, OPTIMIZER), map_location="cpu", weights_only=False)


def read_full(ckpt: str) -> Dict:
    """{"optimizer": the full optimizer state dict, "scheduler": ...}: for one process."""
    blob = read_skeleton(ckpt)
    if not os.path.isfile(os.path.join(ckpt, TENSORS)):
        return blob  # written before the split: optimizer.pt holds everything
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(ckpt, TENSORS))
    state = {pid: {k: tensors[v[_REF]] if is_ref(v) else v for k, v in entries.items()}
             for pid, entries in blob["optimizer"]["state"].items()}
    return dict(blob, optimizer={**blob["optimizer"], "state": state})


def is_ref(value) -> bool:
    return isinstance(value, dict) and set(value) == {_REF}


class TensorReader:
    """One tensor of a safetensors file at a time, by plain reads into a fresh tensor."""

    DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}

    def __init__(self, path: str):
        self.file = open(path, "rb")
        n = int.from_bytes(self.file.read(8), "little")
        self.header = json.loads(self.file.read(n))
        self.header.pop("__metadata__", None)
        self.start = 8 + n

    def spec(self, name: str):
        """(dtype, shape) of a tensor."""
        h = self.header[name]
        return self.DTYPES[h["dtype"]], tuple(h["shape"])

    def read(self, name: str, rows: Optional[range] = None) -> torch.Tensor:
        """The tensor, or only its `rows` (of dim 0: contiguous on disk)."""
        dtype, shape = self.spec(name)
        begin, end = self.header[name]["data_offsets"]
        if rows is not None:
            row_bytes = (end - begin) // max(1, shape[0])
            begin, end, shape = begin + rows.start * row_bytes, begin + rows.stop * row_bytes, (len(rows),) + shape[1:]
        out = torch.empty(shape, dtype=dtype)
        self.file.seek(self.start + begin)
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        if self.file.readinto(view) != end - begin:
            raise OSError(f"{self.file.name}: {name} is truncated")
        return out

    def close(self):
        self.file.close()


def can_stream(ckpt: str, policy, skeleton: Optional[Dict]) -> bool:
    """Whether this checkpoint's optimizer state can be streamed into this FSDP2 policy: the split
    format, every state key naming a parameter of the policy, every tensor it refers to present,
    of a known dtype and wholly inside the file (checked on rank 0).

    Why check the file first: once streaming starts the other ranks wait in recv / scatter for
    rank 0, so a read that fails on rank 0 halfway (a truncated file) would hang them rather than
    raise; anything that can fail there is found here, before the first send."""
    path = os.path.join(ckpt, TENSORS)
    if skeleton is None or not os.path.isfile(path):
        return False
    names = {n for n, _ in policy.named_parameters()}
    if not all(isinstance(pid, str) and pid in names for pid in skeleton["optimizer"]["state"]):
        return False
    reader = TensorReader(path)
    try:
        size = os.path.getsize(path)
        refs = [v[_REF] for entries in skeleton["optimizer"]["state"].values() for v in entries.values() if is_ref(v)]
        return all(r in reader.header and reader.header[r]["dtype"] in TensorReader.DTYPES
                   and reader.start + reader.header[r]["data_offsets"][1] <= size for r in refs)
    finally:
        reader.close()


def row_shards(param) -> Optional[list]:
    """Each rank's rows of an FSDP2 parameter sharded on dim 0 over a 1-D mesh (torch.chunk's
    split, as FSDP2 shards), or None for any other sharding."""
    from torch.distributed.tensor import Shard
    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        return None
    n, world = param.shape[0], param.device_mesh.size()
    per = -(-n // world)
    return [range(min(r * per, n), min((r + 1) * per, n)) for r in range(world)]


def sent_rows(reader, name: str, param, dtype, rank: int):
    """A moment tensor as a DTensor sharded like `param`: rank 0 reads each rank's rows in turn and
    sends them, so no rank ever holds more than its own shard and one other rank's rows."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    shards, group = row_shards(param), param.device_mesh.get_group()
    if rank == 0:
        for r in range(1, len(shards)):
            piece = reader.read(name, shards[r]).to(param.device)
            dist.send(piece, dst=dist.get_global_rank(group, r), group=group)
            del piece
        local = reader.read(name, shards[0]).to(param.device)
    else:
        local = torch.empty((len(shards[param.device_mesh.get_local_rank()]),) + tuple(param.shape[1:]), dtype=dtype,
                            device=param.device)
        dist.recv(local, src=dist.get_global_rank(group, 0), group=group)
    if local.shape != param.to_local().shape:
        raise RuntimeError(f"optimizer state of {tuple(param.shape)}: rows {tuple(local.shape)} on this rank, "
                           f"its parameter's shard is {tuple(param.to_local().shape)}")
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def load_streamed(policy, optimizer, ckpt: str, rank: int) -> Dict:
    """Fill `optimizer` (over the FSDP2-sharded `policy`) from the checkpoint, rank 0 reading and
    scattering one tensor at a time (see the module docstring). Returns the scheduler's state."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    skeleton = utils.broadcast_object(read_skeleton(ckpt) if rank == 0 else None)
    reader = TensorReader(os.path.join(ckpt, TENSORS)) if rank == 0 else None
    specs = utils.broadcast_object(
        {n: reader.spec(n) for n in reader.header} if reader is not None else None)
    params = dict(policy.named_parameters())
    try:
        for pid, entries in skeleton["optimizer"]["state"].items():
            param, state = params[pid], {}
            for key, value in entries.items():
                if not is_ref(value):
                    state[key] = value
                    continue
                dtype, shape = specs[value[_REF]]
                if isinstance(param, DTensor) and shape == tuple(param.shape) and row_shards(param):
                    state[key] = sent_rows(reader, value[_REF], param, dtype, rank)
                elif isinstance(param, DTensor) and shape == tuple(param.shape):  # another sharding: scattered
                    full = reader.read(value[_REF]).to(param.device) if reader is not None else \
                        torch.empty(shape, dtype=dtype, device=param.device)  # only the scatter's shape: never filled
                    state[key] = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=0)
                    del full
                else:  # any other tensor entry: whole on every rank
                    # broadcast_object hands back a CPU tensor: moved to where the parameter lives
                    state[key] = utils.broadcast_object(
                        reader.read(value[_REF]) if reader is not None else None).to(param.device)
            optimizer.state[param] = state
    finally:
        if reader is not None:
            reader.close()
    for group, saved in zip(optimizer.param_groups, skeleton["optimizer"]["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})
    return skeleton["scheduler"]
