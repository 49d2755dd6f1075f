"""What the caches and the framework cost per optimizer step, as ratios measured side by side.

    python scripts/bench_scale.py                       # embedded default: tiny student, tiny_teacher
    python scripts/bench_scale.py --steps 10 --rounds 5 --batch-size 32

Prints, from one run (every configuration timed in each round, rounds interleaved, medians):
 (a) each teacher-based loss's seconds per step over dpo's (live reference), with the live
     teacher and with a cached one (teacher.cache; the reference stays live, as in dpo);
 (b) dpo with the reference cache (reference.cache) over dpo with the live reference, and tvkd
     with both caches over dpo with the reference cache;
 (c) the framework's dpo step (BasicTrainer.train_step: compute_loss, backward, clipping, metric
     reduction, optimizer and scheduler step, logging) over a bare step on the same models and
     batch (policy forward + backward on the concatenated batch, reference forward, DPO loss,
     AdamW step);
 and the cache sizes in bytes a token (tvkd's values; top-k with k = 50).
Targets: tvkd cached <= 1.05x dpo, and <= 1.05x dpo when both use caches; dpo cached-ref <= 0.8x
dpo; framework dpo <= 1.10x bare.
The teacher is a randomly initialised tiny_teacher saved to a temporary directory (speed does
not depend on its weights).
"""
import argparse
import os
import statistics
import tempfile
import time
from prefkd import models
from prefkd import tokenizer_facts
from prefkd.batches import concatenated_inputs


TEACHER_LOSSES = {
    "tvkd": ["loss=tvkd"],
    "tvkd_released": ["loss=tvkd", "loss.variant=released", "loss.top_k=50"],
    "vanillakd_top50": ["loss=vanillakd", "loss.top_k=50"],
    "dckd_top50": ["loss=dckd", "loss.top_k=50"],
    "ddpo": ["loss=ddpo", "teacher.reference_archive={teacher}"],
}


def bare_dpo_step(policy, reference, optimizer, inputs, n_pairs: int, beta: float = 0.1):
    """The least a DPO step can do: policy forward + backward, reference forward, AdamW step."""
    import torch
    import torch.nn.functional as F

    def seq_logps(logits, labels):
        logits, targets = logits[:, :-1].float(), labels[:, 1:].clone()
        mask = targets != -100
        targets[~mask] = 0
        picked = torch.gather(logits, 2, targets.unsqueeze(2)).squeeze(2) - torch.logsumexp(logits, -1)
        return (picked * mask).sum(-1)

    model_in = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}
    with torch.no_grad():
        ref = seq_logps(reference(**model_in).logits, inputs["labels"])
    pol = seq_logps(policy(**model_in).logits, inputs["labels"])
    h = (pol[:n_pairs] - ref[:n_pairs]) - (pol[n_pairs:] - ref[n_pairs:])
    loss = -F.logsigmoid(beta * h).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8, help="steps per configuration per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--losses", nargs="+", default=list(TEACHER_LOSSES))
    a = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("PREFERENCE_DATA_CACHE", os.path.join(tempfile.gettempdir(), "bench_scale_tokens"))
    import torch
    import precompute
    import trainers
    import utils

    tmp = tempfile.mkdtemp(prefix="bench_scale_")
    teacher_dir = os.path.join(tmp, "teacher")
    tok = tokenizer_facts.get_tokenizer("embedded")
    models.build_model(precompute.compose(["model=tiny_teacher"]).model, tok, torch.float32, seed=1) \
        .save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    base = ["wandb.mode=disabled", "progress_bar=false", f"batch_size={a.batch_size}",
            f"n_examples={a.batch_size}", f"eval_batch_size={a.batch_size}", f"n_eval_examples={a.batch_size}",
            f"runs_dir={tmp}", "teacher=tiny_teacher", f"teacher.archive={teacher_dir}", "max_grad_norm=10.0"]

    def trainer(name, overrides):
        cfg = precompute.compose(base + [o.format(teacher=teacher_dir) for o in overrides] + [f"exp_name={name}"])
        run_dir = os.path.join(tmp, name)
        os.makedirs(run_dir, exist_ok=True)
        return trainers.BasicTrainer(cfg, run_dir)

    def cache(kind, overrides, name):
        path = os.path.join(tmp, "caches", name)
        key = "teacher.cache" if kind == "teacher" else "reference.cache"
        manifest = precompute.precompute(precompute.compose(base + [o.format(teacher=teacher_dir) for o in overrides]
                                                            + [f"{key}={path}"]), kind, log=lambda *x: None)
        return f"{key}={path}", manifest

    runs, sizes = {}, {}
    runs["dpo live"] = trainer("dpo_live", ["loss=dpo"])
    ref_cache, _ = cache("reference", ["loss=dpo"], "reference")
    runs["dpo cached-ref"] = trainer("dpo_cached", ["loss=dpo", ref_cache])
    for name in a.losses:
        overrides = TEACHER_LOSSES[name]
        runs[f"{name} live"] = trainer(f"{name}_live", overrides)
        teacher_cache, manifest = cache("teacher", overrides, name)
        sizes[name] = manifest["bytes_per_token"]
        runs[f"{name} cached"] = trainer(f"{name}_cached", overrides + [teacher_cache])
        if name == "tvkd":
            runs["tvkd both-cached"] = trainer("tvkd_both", overrides + [teacher_cache, ref_cache])
    if "vanillakd_top50" not in sizes:
        sizes["vanillakd_top50"] = cache("teacher", TEACHER_LOSSES["vanillakd_top50"], "topk")[1]["bytes_per_token"]
    if "tvkd" not in sizes:
        sizes["tvkd"] = cache("teacher", TEACHER_LOSSES["tvkd"], "tvkd")[1]["bytes_per_token"]

    # the bare step: the dpo run's own starting weights, a fresh AdamW, the same batch
    ref_run = runs["dpo live"]
    bare_policy = models.build_model(ref_run.cfg.model, tok, torch.float32, None, ref_run.cfg.seed)
    bare_reference = models.freeze(models.build_model(ref_run.cfg.model, tok, torch.float32, None,
                                                          ref_run.cfg.seed))
    bare_opt = torch.optim.AdamW(bare_policy.parameters(), lr=ref_run.cfg.lr, weight_decay=0.0)
    batches = {name: next(iter(t.batch_iterator("train"))) for name, t in runs.items()}
    bare_batch = batches["dpo live"]
    bare_inputs = concatenated_inputs(bare_batch, True, 0)

    def time_config(name):
        if name == "bare dpo":
            bare_policy.train()
            start = time.perf_counter()
            for _ in range(a.steps):
                bare_dpo_step(bare_policy, bare_reference, bare_opt, bare_inputs, len(bare_batch["prompt"]))
            return (time.perf_counter() - start) / a.steps
        t = runs[name]
        t.t0 = time.time()  # what BasicTrainer.train sets up
        start = time.perf_counter()
        for _ in range(a.steps):
            t.train_step(batches[name])
        return (time.perf_counter() - start) / a.steps

    names = list(runs) + ["bare dpo"]
    for name in names:  # warm-up
        time_config(name)
    times = {n: [] for n in names}
    for r in range(a.rounds):
        order = names if r % 2 == 0 else names[::-1]  # interleaved, alternating order
        for name in order:
            times[name].append(time_config(name))
    med = {n: statistics.median(v) for n, v in times.items()}
    dpo = med["dpo live"]
    print(f"embedded default (student tiny, teacher tiny_teacher), batch {a.batch_size} pairs, "
          f"{torch.get_num_threads()} threads; medians of {a.rounds} interleaved rounds of {a.steps} steps")
    print(f"\n(a) step time over dpo (live reference): {dpo * 1e3:.1f} ms a step")
    print(f"{'loss':<18} {'live teacher':>13} {'cached teacher':>15}")
    for name in a.losses:
        print(f"{name:<18} {med[name + ' live'] / dpo:12.2f}x {med[name + ' cached'] / dpo:14.2f}x")
    print(f"\n(b) dpo cached reference / dpo live reference: {med['dpo cached-ref'] / dpo:.2f}x "
          f"({med['dpo cached-ref'] * 1e3:.1f} vs {dpo * 1e3:.1f} ms)")
    if "tvkd both-cached" in med:
        print(f"    tvkd cached teacher and reference / dpo cached reference: "
              f"{med['tvkd both-cached'] / med['dpo cached-ref']:.2f}x "
              f"({med['tvkd both-cached'] * 1e3:.1f} vs {med['dpo cached-ref'] * 1e3:.1f} ms)")
    print(f"(c) framework dpo step / bare dpo step: {dpo / med['bare dpo']:.2f}x "
          f"({dpo * 1e3:.1f} vs {med['bare dpo'] * 1e3:.1f} ms)")
    print("\ncache size, bytes a token: " + ", ".join(f"{n} {v:.1f}" for n, v in sizes.items()))
    both = f"{med['tvkd both-cached'] / med['dpo cached-ref']:.2f}x" if "tvkd" in a.losses else "n/a"
    print("targets: tvkd cached <= 1.05x dpo: " + (f"{med['tvkd cached'] / dpo:.2f}x" if "tvkd" in a.losses else "n/a")
          + f"; both cached <= 1.05x: {both}; dpo cached-ref <= 0.8x: {med['dpo cached-ref'] / dpo:.2f}x; framework <= 1.10x bare: "
          f"{dpo / med['bare dpo']:.2f}x")
    utils.remove_tree(tmp)


if __name__ == "__main__":
    main()
