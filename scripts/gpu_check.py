"""The prepared GPU check (run by scripts/gpu_check.sh): throughput, memory and model FLOPs
utilisation of dpo, tvkd (cached teacher), tdpo and dckd steps, packed (padding_free) and padded,
under BasicTrainer and FSDPTrainer (NCCL, world size 1), bf16; then the tiny model's losses on the
device in bf16 against the CPU in fp32. One table, then PASS or FAIL.

    bash scripts/gpu_check.sh                  # a GPU: Llama-3.2-1B layer shapes; else the CPU, reduced
    python scripts/gpu_check.py --json out.json

Model (GPU): Llama-3.2-1B's layer shapes (hidden 2,048, intermediate 8,192, 32 / 8 heads,
vocabulary 128,256, tied embeddings), --layers blocks, random weights, sdpa attention, the chunked
output layer; BasicTrainer holds the policy in bf16, FSDPTrainer in fp32 with bf16 mixed precision
(fully_shard, prefkd/models.py). Without a GPU: the same steps on the CPU at a reduced size (hidden
128, vocabulary 2,048, 1 layer, lengths 32 and 64 with medians scaled down, one measured step,
gloo), which the table's first line says.
Batches: pairs drawn from scripts/bench_packing.py's log-normal lengths at each max_length.
tokens/s counts the real (non-pad) tokens of the policy's rows, padded or packed alike; MFU is
the step's model FLOPs (6 N per policy token + 2 N per frozen-model token, N the non-embedding
parameters plus the output layer, + the attention's 12 x layers x hidden x sequence per policy
token, 4 x for a frozen model) over the device's peak bf16 dense FLOPs.
Tiny check: the embedded tiny model's losses (random weights, an uneven batch), on the device in
bf16 (padded and packed) against the CPU in fp32 padded: |difference| <= 3e-2 x max(1, |loss|).
"""
import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
import bench_packing as bp  # noqa: E402  (the length distribution, batches and cached teacher features)
from prefkd import tokenizer_facts
from prefkd.batches import concatenated_inputs
from prefkd import loss_spec
import losses  # noqa: F401  (registers every loss: prefkd.loss_spec.LOSSES)

LOSSES = ("dpo", "tvkd", "tdpo", "dckd")
GPU = {"shapes": {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "tie_word_embeddings": True}, "vocab": 128256, "lengths": (1024, 4096), "pairs": 8,
       "medians": (bp.PROMPT_MEDIAN, bp.RESPONSE_MEDIAN), "steps": 3}
CPU = {"shapes": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "tie_word_embeddings": True}, "vocab": 2048, "lengths": (32, 64), "pairs": 2, "medians": (6, 14),
       "steps": 1}
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
TINY_TOLERANCE = 3e-2


def model_cfg(size: dict, layers: int, dtype: str, mp):
    from omegaconf import OmegaConf
    return OmegaConf.create({
        "name": "gpu_check", "name_or_path": None, "tokenizer": None, "archive": None,
        "init_config": {"model_type": "llama", "num_hidden_layers": layers, "max_position_embeddings": 8192,
                        **size["shapes"]},
        "block_name": "LlamaDecoderLayer", "policy_dtype": dtype, "reference_dtype": "bfloat16",
        "fsdp_policy_mp": mp, "attn_implementation": "sdpa", "lora": {"r": None}})


class Vocab:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def init_process_group(device: torch.device) -> None:
    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def make_trainer(kind: str, device, size: dict, layers: int):
    """A trainer of `kind` (BasicTrainer / FSDPTrainer) with its models placed by the trainer's own
    wrap: the policy, a reference and a teacher, built by prefkd/models.py."""
    import trainers
    from prefkd import models
    fsdp = kind == "FSDPTrainer"
    mcfg = model_cfg(size, layers, "float32" if fsdp else "bfloat16", "bfloat16" if fsdp else None)
    t = trainers.TRAINERS[kind].__new__(trainers.TRAINERS[kind])
    t.device = t.collective_device = device
    t.pad_id = Vocab.pad_token_id
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        t.mesh = init_device_mesh(device.type, (1,))
    vocab = Vocab(size["vocab"])
    build = lambda seed, dtype: models.build_model(mcfg, vocab, dtype, seed=seed)  # noqa: E731
    policy_dtype = torch.float32 if fsdp else torch.bfloat16
    t.policy = t.wrap(build(0, policy_dtype), mcfg, trainable=True)
    t.models = {role: t.wrap(models.freeze(build(seed, policy_dtype)), mcfg, trainable=False)
                for role, seed in (("reference", 0), ("teacher", 1))}
    t.mcfg, t.step = mcfg, 0
    return t


def configure(t, loss: str, padding_free: bool, max_length: int, features):
    """Point trainer `t` at `loss` (a cached teacher for tvkd), packed or padded."""
    from types import SimpleNamespace
    from omegaconf import OmegaConf
    import utils
    from prefkd import models, packing
    loss_cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "config", "loss", f"{loss}.yaml")))
    t.cfg = OmegaConf.create({"loss": loss_cfg, "output_chunking": True, "model": t.mcfg,
                              "padding_free": padding_free, "max_length": max_length})
    t.spec = loss_spec.get_loss(loss)
    t.pairwise = t.spec.pairwise
    t.generation = SimpleNamespace(apply=lambda batch, train, step, models: (batch, None))
    cached = {"teacher": bp.FeaturesOf(features)} if loss == "tvkd" else {}
    t.frozen = models.FrozenModels.of(
        t.cfg, t.spec, reference=t.models["reference"] if t.spec.reference_need(t.cfg.loss) else None,
        teacher=t.models["teacher"] if t.spec.teacher_need(t.cfg.loss) and not cached else None, caches=cached)
    t.packer = packing.Planner(padding_free, max_length, sync=utils.is_distributed(), device=t.collective_device)


def step_flops(t, batch, n_params: int, size: dict, layers: int) -> float:
    """Model FLOPs of one step on `batch` (see the module docstring)."""
    mask = concatenated_inputs(batch, t.pairwise, t.pad_id)["attention_mask"]
    lengths = mask.sum(-1).double()
    tokens, attn = float(lengths.sum()), float((lengths ** 2).sum())
    hidden = size["shapes"]["hidden_size"]
    frozen = sum(m is not None for m in (t.frozen.reference, t.frozen.teacher))
    dense = (6 + 2 * frozen) * n_params * tokens
    return dense + (12 + 4 * frozen) * layers * hidden * attn / 2  # causal: half the [L, L] block


def measure(t, batches, device, n_params: int, size: dict, layers: int) -> dict:
    """Steps on `batches` (the first a warm-up): tokens/s, peak device memory, MFU, losses."""
    optimizer = torch.optim.AdamW([p for p in t.policy.parameters() if p.requires_grad], lr=1e-6)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    walls, losses_, tokens, flops = [], [], 0.0, 0.0
    t.policy.train()
    for i, batch in enumerate(batches):
        sync()
        w0 = time.perf_counter()
        loss, _ = t.compute_loss(batch, train=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        losses_.append(float(loss))
        if i:
            walls.append(time.perf_counter() - w0)
            tokens += float(concatenated_inputs(batch, t.pairwise, t.pad_id)["attention_mask"].sum())
            flops += step_flops(t, batch, n_params, size, layers)
    wall = sum(walls)
    peak = PEAK_BF16.get(next((k for k in PEAK_BF16 if device.type == "cuda" and k in torch.cuda.get_device_name()), ""))
    return {"tokens_per_s": tokens / wall, "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30
            if device.type == "cuda" else None, "mfu": flops / wall / peak if peak else None, "step_s":
            statistics.median(walls), "losses": losses_}


def flop_params(model, size: dict) -> int:
    """N: the non-embedding parameters plus the output layer (once, tied or not)."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    tied = size["shapes"].get("tie_word_embeddings")
    return n + (size["vocab"] * size["shapes"]["hidden_size"] if tied else 0)


def throughput_rows(device, size: dict, layers: int, steps: int):
    """The table's rows: every trainer x max_length x loss x (padded, packed)."""
    rows = []
    for kind in ("BasicTrainer", "FSDPTrainer"):
        t = make_trainer(kind, device, size, layers)
        n_params = flop_params(t.policy, size)
        for max_length in size["lengths"]:
            batches = [bp.make_batch(bp.draw_lengths(size["pairs"], max_length, seed=1000 * max_length + s,
                                                     medians=size["medians"]), seed=s, vocab=size["vocab"])
                       for s in range(steps + 1)]
            batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
            features = bp.teacher_feature_table(batches, size["vocab"], device)
            padding = statistics.mean(bp.padding_share(b) for b in batches)
            for loss in LOSSES:
                for padding_free in (False, True):
                    configure(t, loss, padding_free, max_length, features)
                    rows.append({"trainer": kind, "max_length": max_length, "loss": loss, "packed": padding_free,
                                 "padding": padding, **measure(t, batches, device, n_params, size, layers)})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del t
    return rows


def tiny_losses(device) -> dict:
    """The embedded tiny model's losses (random weights, one uneven batch) for each check loss:
    {loss: {"cpu_fp32": x, "device_bf16_padded": y, "device_bf16_packed": z}}."""
    from types import SimpleNamespace
    from omegaconf import OmegaConf
    import trainers
    from prefkd import models, packing
    mcfg = OmegaConf.load(os.path.join(REPO, "config", "model", "tiny.yaml"))
    mcfg.lora = {"r": None}
    vocab = Vocab(len(tokenizer_facts.get_tokenizer("embedded")))
    batch = bp.make_batch(bp.draw_lengths(4, 48, seed=3, medians=(8, 12)), seed=3, vocab=len(vocab))
    out = {}
    for loss in LOSSES:
        spec = loss_spec.get_loss(loss)
        loss_cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "config", "loss", f"{loss}.yaml")))
        for name, dev, dtype, packed in (("cpu_fp32", torch.device("cpu"), torch.float32, False),
                                         ("device_bf16_padded", device, torch.bfloat16, False),
                                         ("device_bf16_packed", device, torch.bfloat16, True)):
            build = lambda seed: models.build_model(mcfg, vocab, dtype, seed=seed).to(dev)  # noqa: E731
            t = trainers.BasicTrainer.__new__(trainers.BasicTrainer)
            t.cfg = OmegaConf.create({"loss": loss_cfg, "output_chunking": True, "padding_free": packed,
                                      "max_length": 48})
            t.spec, t.pairwise, t.device, t.step, t.policy = spec, spec.pairwise, dev, 0, build(0)
            t.pad_id = Vocab.pad_token_id
            t.generation = SimpleNamespace(apply=lambda batch, train, step, models: (batch, None))
            t.frozen = models.FrozenModels.of(t.cfg, spec, reference=models.freeze(build(3)),
                                              teacher=models.freeze(build(1)) if spec.teacher_need(t.cfg.loss) else None)
            t.packer = packing.Planner(packed, 48)
            with torch.no_grad():
                out.setdefault(loss, {})[name] = float(t.compute_loss(batch, train=False)[0])
    return out


def print_table(rows, tiny, device, size, layers) -> bool:
    where = (f"GPU {torch.cuda.get_device_name()}" if device.type == "cuda" else
             "no GPU: the CPU at a reduced size (hidden 128, vocabulary 2,048, 1 layer, lengths 32 / 64)")
    print(f"gpu_check on {where}; {size['pairs']} pairs a batch, {layers} layer(s), bf16, torch {torch.__version__}")
    print(f"{'trainer':12s} {'len':>5s} {'loss':5s} {'pad %':>6s} {'tok/s padded':>13s} {'packed':>10s} {'x':>5s} "
          f"{'GiB padded':>10s} {'packed':>7s} {'MFU padded':>10s} {'packed':>7s}")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for a, b in zip(rows[0::2], rows[1::2]):
        print(f"{a['trainer']:12s} {a['max_length']:5d} {a['loss']:5s} {100 * a['padding']:6.1f} "
              f"{a['tokens_per_s']:13.0f} {b['tokens_per_s']:10.0f} {b['tokens_per_s'] / a['tokens_per_s']:5.2f} "
              f"{fmt(a['peak_gib'], '10.2f')} {fmt(b['peak_gib'], '7.2f')} {fmt(a['mfu'], '10.3f')} {fmt(b['mfu'], '7.3f')}")
    ok = True
    print(f"tiny model, losses on {device.type} bf16 vs CPU fp32 (tolerance {TINY_TOLERANCE} x max(1, |loss|)):")
    for loss, v in tiny.items():
        diff = max(abs(v[k] - v["cpu_fp32"]) for k in ("device_bf16_padded", "device_bf16_packed"))
        good = diff <= TINY_TOLERANCE * max(1.0, abs(v["cpu_fp32"]))
        ok &= good
        print(f"  {loss:5s} cpu fp32 {v['cpu_fp32']:.6f}  bf16 padded {v['device_bf16_padded']:.6f}  packed "
              f"{v['device_bf16_packed']:.6f}  |diff| {diff:.2e}  {'ok' if good else 'OUT OF TOLERANCE'}")
    print("PASS" if ok else "FAIL")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=None, help="decoder blocks (default 2 on a GPU, 1 on the CPU)")
    p.add_argument("--steps", type=int, default=None, help="measured steps after a warm-up one (3 GPU, 1 CPU)")
    p.add_argument("--json", default=None, help="also write the rows and the tiny check here")
    a = p.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    size = GPU if device.type == "cuda" else CPU
    layers = a.layers or (2 if device.type == "cuda" else 1)
    init_process_group(device)
    rows = throughput_rows(device, size, layers, a.steps or size["steps"])
    tiny = tiny_losses(device)
    ok = print_table(rows, tiny, device, size, layers)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device.type, "rows": rows, "tiny": tiny, "pass": ok}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
