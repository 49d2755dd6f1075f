"""Peak resident host memory of loading a model under FSDP: the old path (every rank builds the
whole model, then fully_shard) against lean loading (prefkd/lean_loading.py), and one process for scale.

    python scripts/bench_loading.py                # a ~134 M-parameter Llama checkpoint (fp32, 537 MB)
    python scripts/bench_loading.py --random       # also random init from init_config (broadcast path)

The checkpoint (hidden 768, 12 layers, intermediate 2048, vocab 32000, untied lm_head) is
written once to --ckpt (default /tmp/bench_lean_ckpt) in our checkpoint format. Every
measurement is a fresh process (spawned ranks: 2 gloo processes on the CPU); ru_maxrss is the
process's peak resident set, `base` its value after the imports and process-group set-up,
and the Llama modelling imports, before any model exists.
"""
import argparse
import os
import resource
import socket
import time

import torch
import torch.multiprocessing as mp
from prefkd import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INIT = {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
        "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 512,
        "vocab_size": 32000, "tie_word_embeddings": False}


def model_cfg(random_init: bool):
    from omegaconf import OmegaConf
    return OmegaConf.create({"name": "bench", "name_or_path": None, "tokenizer": "embedded",
                             "init_config": {k: v for k, v in INIT.items() if k != "vocab_size"},
                             "archive": None, "block_name": "LlamaDecoderLayer", "policy_dtype": "float32",
                             "reference_dtype": "float32", "fsdp_policy_mp": None})


class Vocab32k:
    """A tokenizer stand-in: build_model only asks a random-init model for these."""
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self):
        return INIT["vocab_size"]


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_checkpoint(path):
    from transformers import AutoConfig, AutoModelForCausalLM
    from safetensors.torch import save_file
    init = dict(INIT)
    config = AutoConfig.for_model(init.pop("model_type"), **init)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, ".model.tmp"),
              metadata={"format": "pt"})
    config.save_pretrained(path)
    os.replace(os.path.join(path, ".model.tmp"), os.path.join(path, "model.safetensors"))


def load(rank, world, port, archive, lean, random_init, out):
    torch.set_num_threads(1)
    import torch.distributed as dist
    from prefkd import lean_loading
    import trainers
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = model_cfg(random_init)
    import transformers.models.llama.modeling_llama  # noqa: F401  (the imports are overhead, not the model)
    from transformers import AutoConfig
    AutoConfig.for_model("llama")
    base = maxrss_mb()
    t0 = time.time()
    with lean_loading.deferred(lean):
        model = models.build_model(cfg, Vocab32k(), torch.float32, None if random_init else archive, seed=0)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        class Shell:
            mesh = init_device_mesh("cpu", (world,))
            device = torch.device("cpu")
        model = trainers.FSDPTrainer.wrap(Shell(), model, cfg, trainable=True)
        dist.barrier()
    n = sum(p.numel() for p in model.parameters())
    out[rank] = (base, maxrss_mb(), time.time() - t0, n)
    if world > 1:
        dist.destroy_process_group()


def measure(world, archive, lean, random_init):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.start_processes(load, args=(world, port, archive, lean, random_init, out), nprocs=world, start_method="spawn")
    return [out[r] for r in range(world)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/bench_lean_ckpt")
    ap.add_argument("--random", action="store_true", help="also measure random init from init_config")
    ap.add_argument("--random-only", action="store_true", help="measure random init only")
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.ckpt, "model.safetensors")):
        p = mp.get_context("spawn").Process(target=make_checkpoint, args=(args.ckpt,))
        p.start()
        p.join()
    size = os.path.getsize(os.path.join(args.ckpt, "model.safetensors")) / 2 ** 20
    print(f"checkpoint {args.ckpt}: model.safetensors {size:.0f} MiB (fp32)")
    runs = ([] if args.random_only else [("checkpoint", False)]) + \
        ([("random init", True)] if args.random or args.random_only else [])
    for what, random_init in runs:
        single = "1 process (from_config)" if random_init else "1 process (from_pretrained)"
        for label, world, lean in ((single, 1, False), ("FSDP 2 ranks, old path", 2, False),
                                   ("FSDP 2 ranks, lean path", 2, True)):
            res = measure(world, args.ckpt, lean, random_init)
            n = res[0][3]
            peaks = " + ".join(f"{peak:.0f}" for _, peak, _, _ in res)
            above = sum(peak - base for base, peak, _, _ in res)
            print(f"{what:11s} | {label:28s} | {n / 1e6:.1f} M params | peak RSS MiB {peaks} = "
                  f"{sum(r[1] for r in res):.0f} (above base: {above:.0f}) | {max(r[2] for r in res):.1f} s",
                  flush=True)


if __name__ == "__main__":
    main()
