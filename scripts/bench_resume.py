"""Peak host memory of loading the optimizer state on an FSDP2 resume, 2 ranks, summed over the ranks
and counted in copies of the optimizer state: the earlier path (every rank reads the whole state,
then torch.distributed.checkpoint's set_optimizer_state_dict slices its shard out) against the
streamed one (prefkd/optimizer_state.py: rank 0 reads one tensor at a time and scatters it).

    python scripts/bench_resume.py                 # a ~134 M-parameter Llama: 1.07 GB of AdamW state
    python scripts/bench_resume.py --layers 4      # smaller and faster

Each path runs in 2 fresh spawned gloo processes on the CPU, which build and shard the model and
its AdamW exactly as FSDPTrainer does (prefkd/models.py), then reset their peak resident set
(/proc/self/clear_refs) and load. A rank's figure is its peak resident set during the load (VmHWM)
less its resident set when the load began: what the load itself added, the shard it keeps included.
"""
import argparse
import os
import socket
import time


import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

INIT = {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
        "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 512,
        "vocab_size": 32000, "tie_word_embeddings": False}


def build(layers: int):
    """The benchmark's model (random weights; the values do not matter here)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(**dict(INIT, num_hidden_layers=layers))
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def write_state(where: str, layers: int) -> int:
    """A full AdamW state after one step, in both formats: <where>/streamed (optimizer.pt and
    optimizer.tensors, as checkpoints write it now) and <where>/whole (one optimizer.pt). Returns
    the state's tensor bytes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from prefkd import optimizer_state
    model = build(layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    for kind in ("streamed", "whole"):
        os.makedirs(os.path.join(where, kind), exist_ok=True)
    optimizer_state.write(os.path.join(where, "streamed"), {"optimizer": sd, "scheduler": {}})
    torch.save({"optimizer": sd, "scheduler": {}}, os.path.join(where, "whole", "optimizer.pt"))
    return sum(v.numel() * v.element_size() for st in sd["state"].values() for v in st.values()
               if torch.is_tensor(v) and v.dim() > 0)


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(rank: int, world: int, port: int, where: str, kind: str, layers: int, results):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from prefkd import models, optimizer_state
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build(layers)
    models.shard_fsdp(model, init_device_mesh("cpu", (world,)), "LlamaDecoderLayer", MixedPrecisionPolicy(), what="bench")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    start, t0 = status_kb("VmRSS"), time.time()
    ckpt = os.path.join(where, kind)
    if kind == "whole":  # the earlier path: every rank loads the whole state, then slices its shard
        blob = torch.load(os.path.join(ckpt, "optimizer.pt"), map_location="cpu", weights_only=False)
        set_optimizer_state_dict(model, opt, blob["optimizer"], options=StateDictOptions(full_state_dict=True))
        del blob
    else:
        optimizer_state.load_streamed(model, opt, ckpt, rank)
    dist.barrier()
    seconds = time.time() - t0
    shard = sum(v.to_local().numel() * v.element_size() for st in opt.state.values() for v in st.values()
                if hasattr(v, "to_local"))
    results.put((kind, rank, (status_kb("VmHWM") - start) * 1024, shard, seconds))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12, help="decoder layers (12: ~134 M parameters)")
    p.add_argument("--dir", default="/tmp/bench_resume", help="where the optimizer states are written")
    a = p.parse_args()
    state_bytes = write_state(a.dir, a.layers)
    ctx = mp.get_context("spawn")
    rows = {}
    for kind in ("whole", "streamed"):
        results = ctx.Queue()
        mp.start_processes(worker, args=(2, free_port(), a.dir, kind, a.layers, results), nprocs=2,
                           start_method="spawn", join=True)
        rows[kind] = sorted(results.get() for _ in range(2))
    gb = lambda b: f"{b / 1e9:.3f}"  # noqa: E731
    print(f"optimizer state: {gb(state_bytes)} GB ({a.layers} layers); 2 ranks, gloo, CPU\n")
    print("| load | rank 0 added (GB) | rank 1 added (GB) | sum (GB) | copies of the state | kept shards (GB) | s |")
    print("|---|---|---|---|---|---|---|")
    for kind, label in (("whole", "every rank reads the whole state (before)"), ("streamed", "streamed from rank 0")):
        r = rows[kind]
        total = sum(x[2] for x in r)
        print(f"| {label} | {gb(r[0][2])} | {gb(r[1][2])} | {gb(total)} | {total / state_bytes:.2f} | "
              f"{gb(sum(x[3] for x in r))} | {max(x[4] for x in r):.1f} |")
    ratio = sum(x[2] for x in rows["whole"]) / max(1, sum(x[2] for x in rows["streamed"]))
    print(f"\nstreamed / before: {1 / ratio:.2f} of the memory (measured in this run)")


if __name__ == "__main__":
    main()
