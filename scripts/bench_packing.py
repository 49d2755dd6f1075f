"""Padded against padding-free packed batches (config `padding_free`): the share of padding in a
padded batch, and the step time and peak memory packed / padded, for dpo, tvkd (cached teacher),
tdpo and dckd, from one run.

    python scripts/bench_packing.py                    # max_length 1,024 and 2,048, 4 pairs a batch
    python scripts/bench_packing.py --lengths 1024 --steps 2 --pairs 4

Lengths. Prompt and response lengths (in tokens) are drawn log-normal, the way published
statistics of UltraFeedback and DPO-MIX-7K describe them (a median of about a hundred tokens for
prompts and two to three hundred for responses, long right tails past a thousand; the exact
figures below are this script's assumption, not measured on the data sets here, which are not on
this machine): prompt median 100 tokens (sigma 0.9), chosen and rejected responses drawn
independently with median 240 tokens (sigma 0.8). Then truncated as the data module does: the
prompt to max_length / 2 (keep_end), the response to what is left of max_length. A batch is
padded to its longest sequence, chosen and rejected stacked, as the trainer runs it.

Model: a Llama with hidden size 256, intermediate 1,024, 4 heads, --layers blocks and a
vocabulary of 32,000, fp32, random weights, sdpa attention, the chunked output layer. Each case is
a fresh subprocess (BasicTrainer.compute_loss, losses.py, AdamW steps on the same batches packed
and padded); `peak` is its VmHWM over the steps (reset after the models are built: activations,
gradients, optimizer state), `step` the median wall time of the steps after the first. dpo and
tdpo read a live reference (a second model), dckd a live teacher (another), tvkd its teacher's
features through the teacher-cache interface (computed once by this script from a random teacher).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from prefkd.batches import concatenated_inputs
from prefkd import loss_spec
from prefkd import logits as logits_lib
import losses  # noqa: F401  (registers every loss: prefkd.loss_spec.LOSSES)
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 32000
LOSSES = ("dpo", "tvkd", "tdpo", "dckd")
PROMPT_MEDIAN, PROMPT_SIGMA, RESPONSE_MEDIAN, RESPONSE_SIGMA = 100, 0.9, 240, 0.8


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def draw_lengths(n_pairs: int, max_length: int, seed: int, medians=(PROMPT_MEDIAN, RESPONSE_MEDIAN)):
    """[(prompt, chosen response, rejected response)] token counts, truncated like the data module."""
    import random
    rnd = random.Random(seed)
    draw = lambda median, sigma: max(1, int(round(math.exp(rnd.gauss(math.log(median), sigma)))))  # noqa: E731
    out = []
    for _ in range(n_pairs):
        prompt = min(draw(medians[0], PROMPT_SIGMA), max_length // 2)
        out.append((prompt, min(draw(medians[1], RESPONSE_SIGMA), max_length - prompt),
                    min(draw(medians[1], RESPONSE_SIGMA), max_length - prompt)))
    return out


def make_batch(lengths, seed: int, vocab: int = VOCAB):
    """A right-padded pairwise batch (pad id 0) with these (prompt, chosen, rejected) lengths."""
    import torch
    from prefkd.logprobs import IGNORE_INDEX
    g = torch.Generator().manual_seed(seed)
    batch = {"prompt": ["p"] * len(lengths)}
    for side, col in (("chosen", 1), ("rejected", 2)):
        width = max(x[0] + x[col] for x in lengths)
        ids = torch.zeros(len(lengths), width, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(lengths):
            n = row[0] + row[col]
            ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
            labels[i, row[0]:n] = ids[i, row[0]:n]
            mask[i, :n] = 1
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


def padding_share(batch) -> float:
    mask = concatenated_inputs(batch, True, 0)["attention_mask"]
    return 1.0 - float(mask.sum()) / mask.numel()


def model_cfg(layers: int):
    from omegaconf import OmegaConf
    return OmegaConf.create({
        "name": "bench", "name_or_path": None, "tokenizer": None, "archive": None,
        "init_config": {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": 256,
                        "intermediate_size": 1024, "num_attention_heads": 4, "num_key_value_heads": 4,
                        "max_position_embeddings": 4096, "tie_word_embeddings": False},
        "block_name": "LlamaDecoderLayer", "policy_dtype": "float32", "reference_dtype": "float32",
        "fsdp_policy_mp": None, "attn_implementation": "sdpa", "lora": {"r": None}})


class Vocab:
    """A tokenizer stand-in: a randomly initialised model only asks it for these."""
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self):
        return VOCAB


def key_of(input_ids):
    return (*input_ids.shape, int(input_ids.sum()))


class FeaturesOf:
    """The teacher-cache interface (FeatureCache.lookup) over features computed before the run."""

    def __init__(self, features):
        self.features, self.path = features, "(precomputed)"

    def lookup(self, input_ids, labels, attention_mask, device=None):
        return self.features[key_of(input_ids)]


def batches_of(a, max_length: int):
    return [make_batch(draw_lengths(a.pairs, max_length, seed=1000 * max_length + s), seed=s) for s in range(a.steps)]


def teacher_feature_table(batches, vocab: int = VOCAB, device=None) -> dict:
    """tvkd's teacher features for these batches from a random teacher, chunked (no [N, L, V]
    tensor), keyed by the batch (the cached teacher of the tvkd steps)."""
    import torch
    from omegaconf import OmegaConf
    spec, cfg = loss_spec.get_loss("tvkd"), OmegaConf.load(os.path.join(REPO, "config", "loss", "tvkd.yaml"))
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(vocab, 64, generator=g) * 0.2).to(device)
    out = {}
    for batch in batches:
        inputs = concatenated_inputs(batch, True, 0)
        hidden = torch.randn(*inputs["input_ids"].shape, 64, generator=g).to(device)
        with torch.no_grad():
            out[key_of(inputs["input_ids"])] = spec.teacher_features(logits_lib.LazyLogits(hidden, weight), inputs["labels"], cfg)
    return out


def teacher_features(a, max_length: int, path: str) -> None:
    import torch
    torch.save(teacher_feature_table(batches_of(a, max_length)), path)


def one(loss: str, padding_free: bool, max_length: int, a) -> dict:
    """--steps training steps of `loss` in this (fresh) process."""
    import ctypes
    from types import SimpleNamespace
    import torch
    from omegaconf import OmegaConf
    import trainers
    from prefkd import models, packing
    torch.set_num_threads(a.threads)
    mcfg = model_cfg(a.layers)
    loss_cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "config", "loss", f"{loss}.yaml")))
    cfg = OmegaConf.create({"loss": loss_cfg, "output_chunking": True, "model": mcfg, "padding_free": padding_free,
                            "max_length": max_length})
    spec = loss_spec.get_loss(loss)
    policy = models.build_model(mcfg, Vocab(), torch.float32, seed=0)
    frozen = lambda seed: models.freeze(models.build_model(mcfg, Vocab(), torch.float32, seed=seed))  # noqa: E731
    reference = frozen(0) if spec.reference_need(cfg.loss) else None
    caches, teacher = {}, None
    if loss == "tvkd":
        caches["teacher"] = FeaturesOf(torch.load(a.features, weights_only=False))
    elif spec.teacher_need(cfg.loss):
        teacher = frozen(1)
    t = trainers.BasicTrainer.__new__(trainers.BasicTrainer)
    t.pad_id = 0  # these batches' tokenizers pad with 0
    t.cfg, t.spec, t.pairwise, t.device, t.step = cfg, spec, spec.pairwise, torch.device("cpu"), 0
    t.policy, t.generation = policy, SimpleNamespace(apply=lambda batch, train, step, models: (batch, None))
    t.frozen = models.FrozenModels.of(cfg, spec, reference=reference, teacher=teacher, caches=caches)
    t.packer = packing.Planner(padding_free, max_length)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    batches = batches_of(a, max_length)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the peak of the steps from here
    walls, values = [], []
    policy.train()
    for batch in batches:
        w0 = time.perf_counter()
        value, _ = t.compute_loss(batch, train=True)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        walls.append(time.perf_counter() - w0)
        values.append(float(value))
    return {"peak_mib": rss_mib("VmHWM"), "step_s": statistics.median(walls[1:] or walls), "losses": values,
            "padding": statistics.mean(padding_share(b) for b in batches)}


def run_case(loss: str, padding_free: bool, max_length: int, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", loss, str(int(padding_free)), str(max_length),
           "--layers", str(a.layers), "--pairs", str(a.pairs), "--steps", str(a.steps), "--threads", str(a.threads),
           "--features", a.features]
    result, err = utils.case_result(cmd, cwd=REPO)
    if result is None:
        raise SystemExit(f"{loss} padding_free={padding_free} max_length={max_length}: failed\n{err}")
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--features", default="/tmp/bench_packing_tvkd_features.pt")
    p.add_argument("--one", nargs=3, metavar=("LOSS", "PACKED", "MAX_LENGTH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print("RESULT" + json.dumps(one(a.one[0], bool(int(a.one[1])), int(a.one[2]), a)))
        return
    rows = []
    for max_length in a.lengths:
        a.features = f"/tmp/bench_packing_tvkd_features_{max_length}.pt"
        teacher_features(a, max_length, a.features)
        for loss in LOSSES:
            padded, packed = run_case(loss, False, max_length, a), run_case(loss, True, max_length, a)
            same = max(abs(x - y) for x, y in zip(padded["losses"], packed["losses"]))
            rows.append((max_length, loss, padded, packed, same))
            print(f"  {max_length} {loss:5s} padded {padded['step_s']:6.2f} s {padded['peak_mib'] / 1024:5.2f} GiB | "
                  f"packed {packed['step_s']:6.2f} s {packed['peak_mib'] / 1024:5.2f} GiB | losses differ by {same:.1e}",
                  flush=True)
    print(f"\nPadded vs packed (padding_free=true): {a.pairs} pairs a batch, log-normal lengths (prompt median "
          f"{PROMPT_MEDIAN}, responses {RESPONSE_MEDIAN}), hidden 256 x {a.layers} layers, vocabulary {VOCAB}, fp32, "
          f"{a.threads} threads, {a.steps} AdamW steps each")
    print(f"{'max_length':>10s} {'loss':6s} {'padding':>8s} {'step padded':>12s} {'packed':>7s} {'ratio':>6s} "
          f"{'peak padded':>12s} {'packed':>7s} {'ratio':>6s} {'max |loss diff|':>16s}")
    for max_length, loss, padded, packed, same in rows:
        print(f"{max_length:10d} {loss:6s} {100 * padded['padding']:7.1f}% {padded['step_s']:10.2f} s "
              f"{packed['step_s']:5.2f} s {packed['step_s'] / padded['step_s']:6.3f} "
              f"{padded['peak_mib'] / 1024:8.2f} GiB {packed['peak_mib'] / 1024:5.2f} "
              f"{packed['peak_mib'] / padded['peak_mib']:6.3f} {same:16.1e}")


if __name__ == "__main__":
    main()
