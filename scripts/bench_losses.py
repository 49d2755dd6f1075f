"""Seconds per optimizer step of each loss on the embedded default, one process, same batch.

    python scripts/bench_losses.py                       # dpo tdpo tvkd dckd vanillakd ipo sft
    python scripts/bench_losses.py --losses dpo tvkd --steps 20 --batch-size 32
    python scripts/bench_losses.py --compare-chunking     # each loss with output_chunking true and false

All losses are timed in one run, interleaved round by round, so that the ratios to dpo are
measured under the same machine load. The teacher is a randomly initialised tiny_teacher
saved to a temporary directory (speed does not depend on its weights).
"""
import argparse
import os
import statistics
import tempfile
import time
from prefkd import models
from prefkd import tokenizer_facts



def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf
    import utils
    with initialize_config_dir(config_dir=os.path.join(utils.REPO_DIR, "config"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    OmegaConf.set_struct(cfg, False)
    return cfg


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--losses", nargs="+", default=["dpo", "tdpo", "tvkd", "dckd", "vanillakd", "ipo", "sft"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cpu-time", action="store_true",
                   help="CPU seconds of this process instead of wall seconds (robust on a loaded machine)")
    p.add_argument("--compare-chunking", action="store_true",
                   help="time each loss with the chunked output layer (name) and with full logits (name:full)")
    a = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch
    import trainers
    tmp = tempfile.mkdtemp()
    teacher_dir = os.path.join(tmp, "teacher")
    tcfg = compose(["model=tiny_teacher"])
    tok = tokenizer_facts.get_tokenizer("embedded")
    models.build_model(tcfg.model, tok, torch.float32).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    runs = {}
    variants = [(n, c) for n in a.losses for c in ((True, False) if a.compare_chunking else (None,))]
    for name, chunking in variants:
        key = name if chunking in (None, True) else f"{name}:full"
        extra = [] if chunking is None else [f"output_chunking={str(chunking).lower()}"]
        cfg = compose([f"loss={name}", "teacher=tiny_teacher", f"teacher.archive={teacher_dir}",
                       f"batch_size={a.batch_size}", "wandb.mode=disabled", "progress_bar=false", *extra])
        t = trainers.BasicTrainer(cfg, os.path.join(tmp, key))
        batch = next(iter(t.batch_iterator("train")))
        runs[key] = (t, batch)
    times = {n: [] for n in runs}
    for _ in range(a.rounds):
        for name, (t, batch) in runs.items():
            t.compute_loss(batch, train=True)[0].backward()  # warm-up
            t.optimizer.zero_grad(set_to_none=True)
            clock = time.process_time if a.cpu_time else time.perf_counter
            start = clock()
            for _ in range(a.steps):
                loss, _ = t.compute_loss(batch, train=True)
                loss.backward()
                t.optimizer.step()
                t.optimizer.zero_grad(set_to_none=True)
            times[name].append((clock() - start) / a.steps)
    base = statistics.median(times[a.losses[0]])
    print(f"embedded default, batch {a.batch_size}, {torch.get_num_threads()} threads; median of {a.rounds} rounds")
    print(f"{'loss':<10} {'cpu-s/step' if a.cpu_time else 's/step':>10} {'x ' + a.losses[0]:>8}")
    for name in runs:
        m = statistics.median(times[name])
        print(f"{name:<10} {m:10.4f} {m / base:8.2f}")


if __name__ == "__main__":
    main()
