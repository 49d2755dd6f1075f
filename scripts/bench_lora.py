"""Full fine-tuning against LoRA (model.lora.r=16) on a model with Llama-3.2-1B's layer shapes: peak
resident memory and time of a training step, and trainable parameters, from one run.

    python scripts/bench_lora.py                       # 2 decoder layers, 2 pairs of 128 tokens
    python scripts/bench_lora.py --layers 4 --steps 4

Model: hidden 2,048, intermediate 8,192, 32 query / 8 key-value heads, vocabulary 128,256, tied
embeddings (Llama-3.2-1B's shapes), --layers decoder blocks, fp32 on the CPU, random weights.
Steps: dpo (the frozen reference: a second copy of the model for full fine-tuning, the policy with
its adapters switched off for LoRA) and tvkd with a cached teacher (its features, computed once
by this script from random teacher logits, are read through the teacher-cache interface: no
teacher model is resident). Each case is a fresh subprocess that builds its models through
prefkd/models.py and prefkd/adapters.py, resets the peak RSS (VmHWM), then runs --steps AdamW steps
(forward, backward, optimizer step) through the trainer's compute_loss and losses.py. `peak` is
VmHWM over the steps (models, gradients, optimizer state and activations); `step` is the median
wall time of the steps after the first (which allocates the optimizer state) and `cpu` its CPU
seconds (robust to a loaded machine).
"""
import argparse
import json
import os
import statistics
import sys
import time
from prefkd.batches import concatenated_inputs
from prefkd import loss_spec
import losses  # noqa: F401  (registers every loss: prefkd.loss_spec.LOSSES)
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
          "vocab_size": 128256, "tie_word_embeddings": True, "max_position_embeddings": 4096, "pad_token_id": 0}
PROMPT = 16


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def make_batch(pairs: int, length: int):
    import torch
    from prefkd.logprobs import IGNORE_INDEX
    g = torch.Generator().manual_seed(0)
    batch = {"prompt": ["p"] * pairs}
    for side in ("chosen", "rejected"):
        ids = torch.randint(1, SHAPES["vocab_size"], (pairs, length), generator=g)
        labels = ids.clone()
        labels[:, :PROMPT] = IGNORE_INDEX
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": torch.ones_like(ids),
                      f"{side}_labels": labels})
    return batch


class FeaturesFromFile:
    """The teacher-cache interface (FeatureCache.lookup) over features computed before the run."""

    def __init__(self, features):
        self.features, self.path = features, "(precomputed features)"

    def lookup(self, input_ids, labels, attention_mask, device=None):
        return self.features


def model_cfg(layers: int, lora_r):
    from omegaconf import OmegaConf
    init = {k: v for k, v in SHAPES.items() if k not in ("vocab_size", "pad_token_id")}
    return OmegaConf.create({
        "name": "llama1b_shapes", "name_or_path": None, "tokenizer": None, "archive": None,
        "init_config": {"model_type": "llama", "num_hidden_layers": layers, **init},
        "block_name": "LlamaDecoderLayer", "policy_dtype": "float32", "reference_dtype": "float32",
        "fsdp_policy_mp": None,
        "lora": {"r": lora_r, "alpha": 2 * (lora_r or 1), "dropout": 0.0, "target_modules": "all-linear"}})


class Vocab:
    """A tokenizer stand-in: a randomly initialised model only asks it for these."""
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self):
        return SHAPES["vocab_size"]


def one(loss: str, lora_r, a) -> dict:
    """--steps training steps of `loss` in this (fresh) process."""
    import ctypes
    from types import SimpleNamespace
    import torch
    from omegaconf import OmegaConf
    import trainers
    from prefkd import adapters, models
    torch.set_num_threads(a.threads)
    mcfg = model_cfg(a.layers, lora_r)
    loss_cfg = OmegaConf.load(os.path.join(REPO, "config", "loss", f"{loss}.yaml"))
    cfg = OmegaConf.create({"loss": OmegaConf.to_container(loss_cfg), "output_chunking": True, "model": mcfg})
    spec = loss_spec.get_loss(loss)
    policy = models.build_model(mcfg, Vocab(), torch.float32, seed=0)
    if lora_r:
        policy = adapters.attach(policy, mcfg, seed=0)
        reference = adapters.AdaptersOff(policy)
    else:
        reference = models.freeze(models.build_model(mcfg, Vocab(), torch.float32, seed=0))
    caches = {}
    if spec.teacher_need(cfg.loss):
        caches["teacher"] = FeaturesFromFile(torch.load(a.features, weights_only=True))
    t = trainers.BasicTrainer.__new__(trainers.BasicTrainer)
    t.pad_id = 0  # these batches' tokenizers pad with 0
    t.cfg, t.spec, t.pairwise, t.device, t.step = cfg, spec, spec.pairwise, torch.device("cpu"), 0
    t.policy, t.generation = policy, SimpleNamespace(apply=lambda batch, train, step, models: (batch, None))
    t.frozen = models.FrozenModels.of(cfg, spec, reference=reference, caches=caches)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    batch = make_batch(a.pairs, a.length)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the peak of the steps from here
    walls, cpus, values = [], [], []
    policy.train()
    for _ in range(a.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        value, _ = t.compute_loss(batch, train=True)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        values.append(float(value))
    n = adapters.count_parameters(policy)
    return {"peak_mib": rss_mib("VmHWM"), "step_s": statistics.median(walls[1:] or walls),
            "cpu_s": statistics.median(cpus[1:] or cpus), "losses": values, **n}


def write_features(a) -> None:
    """tvkd's teacher features for the benchmark batch, from random teacher logits (computed here,
    so that no teacher is resident in the measured processes)."""
    import torch
    from omegaconf import OmegaConf
    spec = loss_spec.get_loss("tvkd")
    loss_cfg = OmegaConf.load(os.path.join(REPO, "config", "loss", "tvkd.yaml"))
    inputs = concatenated_inputs(make_batch(a.pairs, a.length), True, 0)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(*inputs["input_ids"].shape, SHAPES["vocab_size"], generator=g)
    torch.save(spec.teacher_features(logits, inputs["labels"], loss_cfg), a.features)


def run_case(loss: str, lora_r, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", loss, str(lora_r or 0), "--layers", str(a.layers),
           "--pairs", str(a.pairs), "--length", str(a.length), "--steps", str(a.steps), "--threads", str(a.threads),
           "--features", a.features]
    result, err = utils.case_result(cmd)
    if result is None:
        raise SystemExit(f"{loss} r={lora_r}: failed\n{err}")
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--features", default="/tmp/bench_lora_tvkd_features.pt")
    p.add_argument("--one", nargs=2, metavar=("LOSS", "R"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print("RESULT" + json.dumps(one(a.one[0], int(a.one[1]) or None, a)))
        return
    write_features(a)
    rows = {}
    for loss in ("dpo", "tvkd"):
        for r in (None, a.rank):
            rows[(loss, r)] = res = run_case(loss, r, a)
            print(f"  {loss:4s} {'LoRA r=' + str(r) if r else 'full':10s} peak {res['peak_mib'] / 1024:6.2f} GiB  "
                  f"step {res['step_s']:6.2f} s ({res['cpu_s']:6.2f} cpu-s)  trainable {res['trainable']:,} of "
                  f"{res['total']:,}  losses {[round(v, 5) for v in res['losses']]}", flush=True)
    print(f"\nFull fine-tuning vs LoRA r={a.rank} (all-linear), Llama-3.2-1B shapes with {a.layers} layers, "
          f"{a.pairs} pairs x {a.length} tokens, fp32, {a.threads} threads, AdamW")
    print(f"{'step':22s} {'peak GiB':>9s} {'LoRA':>7s} {'ratio':>6s} {'step s':>7s} {'LoRA':>6s} {'ratio':>6s} "
          f"{'cpu ratio':>9s}")
    for loss, what in (("dpo", "dpo (live reference)"), ("tvkd", "tvkd (cached teacher)")):
        f, lo = rows[(loss, None)], rows[(loss, a.rank)]
        print(f"{what:22s} {f['peak_mib'] / 1024:9.2f} {lo['peak_mib'] / 1024:7.2f} {lo['peak_mib'] / f['peak_mib']:6.3f} "
              f"{f['step_s']:7.2f} {lo['step_s']:6.2f} {lo['step_s'] / f['step_s']:6.3f} {lo['cpu_s'] / f['cpu_s']:9.3f}")
    f, lo = rows[("dpo", None)], rows[("dpo", a.rank)]
    print(f"trainable parameters: full {f['trainable']:,}; LoRA {lo['trainable']:,} of {lo['total']:,} "
          f"({100 * lo['trainable'] / lo['total']:.2f}%)")


if __name__ == "__main__":
    main()
