"""Peak CPU memory of one training step (forward + backward through the trainer's compute_loss and
losses.py) as the sequence grows, with the chunked output layer (output_chunking=true) and with
the models' full logits (false).

    python scripts/bench_memory.py                                  # dpo tdpo tvkd dckd, 256..4096
    python scripts/bench_memory.py --losses dpo --lengths 256 1024 --full-max 1024

Models: a Llama of hidden size 64 and 2 layers with tied embeddings and a 128,256-token
vocabulary (Llama 3's) for the policy, the reference and the teacher; 2 pairs (N = 4 rows); a
16-token prompt, the rest of each row is response. Each point runs in a fresh subprocess: the
models are built, the peak RSS is reset (/proc/self/clear_refs), one step runs, and the peak RSS
(VmHWM) is read. `peak` is that peak; `step` is how far it rose above the RSS before the step.
The full-logits path is skipped above --full-max tokens (it needs ~24 GB at 2048): its row then
shows an estimate, linear in L from the largest measured length (the [N, L, V] tensors dominate).
"""
import argparse
import json
import os
import sys
import time
from prefkd import loss_spec
from prefkd import logprobs
import losses  # noqa: F401  (registers every loss: prefkd.loss_spec.LOSSES)
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, HIDDEN, LAYERS, PAIRS, PROMPT = 128256, 64, 2, 2, 16


# Peak of the full-logits path measured before this change (GB as quoted, 1e9 bytes), shown for
# points not measured here ("m"); 4096 is then estimated as twice 2048 ("e").
EARLIER_GB = {("dpo", 1024): 8.5, ("tdpo", 1024): 8.7, ("tvkd", 1024): 8.5, ("dckd", 1024): 12.5,
              ("dpo", 2048): 16.6, ("tdpo", 2048): 16.7, ("tvkd", 2048): 16.6, ("dckd", 2048): 23.7}


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def one(loss: str, length: int, chunking: bool, threads: int) -> dict:
    """One training step in this (fresh) process; returns its memory and time."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    import ctypes
    from types import SimpleNamespace
    import torch
    from omegaconf import OmegaConf
    from transformers import LlamaConfig, LlamaForCausalLM
    import trainers
    from prefkd import models as model_lib
    torch.set_num_threads(threads)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max(4096, length),
                         tie_word_embeddings=True, pad_token_id=0)
    models = {}
    for seed, name in enumerate(("policy", "reference", "teacher")):
        torch.manual_seed(seed)
        models[name] = LlamaForCausalLM(config)
    for name in ("reference", "teacher"):
        model_lib.freeze(models[name])
    loss_cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "config", "loss", f"{loss}.yaml")))
    t = trainers.BasicTrainer.__new__(trainers.BasicTrainer)
    t.pad_id = 0  # these batches' tokenizers pad with 0
    t.cfg = OmegaConf.create({"loss": loss_cfg, "output_chunking": chunking})
    t.spec = loss_spec.get_loss(loss)
    t.pairwise, t.device = t.spec.pairwise, torch.device("cpu")
    t.policy = models["policy"]
    t.frozen = model_lib.FrozenModels.of(  # live models (no prefkd/output_cache.py caches)
        t.cfg, t.spec, reference=models["reference"] if t.spec.reference_need(t.cfg.loss) else None,
        teacher=models["teacher"] if t.spec.teacher_need(t.cfg.loss) else None)
    t.step, t.generation = 0, SimpleNamespace(apply=lambda batch, train, step, models: (batch, None))
    g = torch.Generator().manual_seed(0)
    batch = {"prompt": ["p"] * PAIRS}
    for side in ("chosen", "rejected"):
        ids = torch.randint(1, VOCAB, (PAIRS, length), generator=g)
        labels = ids.clone()
        labels[:, :PROMPT] = logprobs.IGNORE_INDEX
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": torch.ones_like(ids),
                      f"{side}_labels": labels})
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = rss_mib("VmRSS")
    start = time.process_time()  # CPU seconds of this process (robust to a loaded machine)
    loss_value, _ = t.compute_loss(batch, train=True)
    loss_value.backward()
    seconds = time.process_time() - start
    peak = rss_mib("VmHWM")
    return {"peak_mib": peak, "step_mib": peak - before, "seconds": seconds, "loss_value": float(loss_value)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--losses", nargs="+", default=["dpo", "tdpo", "tvkd", "dckd"])
    p.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--full-max", type=int, default=1024, help="longest sequence for the full-logits path")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", default=None,
                   help="a JSON-lines file: each point is appended as it finishes, and points already in it "
                        "are not run again (the table is printed from all of them)")
    p.add_argument("--table-only", action="store_true", help="print the table of --results, run nothing")
    p.add_argument("--one", nargs=3, metavar=("LOSS", "LENGTH", "CHUNKING"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print("RESULT" + json.dumps(one(a.one[0], int(a.one[1]), a.one[2] == "1", a.threads)))
        return
    results = {}
    if a.results and os.path.exists(a.results):
        with open(a.results) as f:
            for line in f:
                r = json.loads(line)
                results[(r["loss"], r["length"], r["chunking"])] = r
    for length in a.lengths:          # all losses at one length before the next (longest last)
        for loss in a.losses:
            for chunking in (True, False):
                if (not chunking and length > a.full_max) or (loss, length, chunking) in results or a.table_only:
                    continue
                cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(a.threads),
                       "--one", loss, str(length), "1" if chunking else "0"]
                r, err = utils.case_result(cmd)
                if r is None:
                    print(f"{loss} L={length} chunking={chunking}: failed\n{err}", flush=True)
                    continue
                r.update(loss=loss, length=length, chunking=chunking)
                results[(loss, length, chunking)] = r
                if a.results:
                    with open(a.results, "a") as f:
                        f.write(json.dumps(r) + "\n")
                print(f"  {loss:5s} L={length:5d} {'chunked' if chunking else 'full   '} peak {r['peak_mib'] / 1024:6.2f} GiB"
                      f"  step +{r['step_mib'] / 1024:6.2f} GiB  {r['seconds']:6.1f} cpu-s  loss {r['loss_value']:.6f}", flush=True)
    print("\nPeak RSS of one training step (GiB; N = 4 rows, V = 128,256, hidden 64, 2 layers, tied)")
    print(f"{'loss':6s} {'L':>5s} {'chunked':>9s} {'full':>10s} {'ratio':>7s}   {'chunked step':>12s} {'full step':>10s}")
    for loss in a.losses:
        measured = [(n, results[(loss, n, False)]) for n in sorted(a.lengths) if (loss, n, False) in results]
        for length in sorted(a.lengths):
            c = results.get((loss, length, True))
            f = results.get((loss, length, False))
            if c is None:
                continue
            if f is not None:
                full, ratio, fstep = f"{f['peak_mib'] / 1024:10.2f}", f"{c['peak_mib'] / f['peak_mib']:7.3f}", \
                    f"{f['step_mib'] / 1024:10.2f}"
            elif (loss, length) in EARLIER_GB or (loss, length // 2) in EARLIER_GB:
                earlier = EARLIER_GB.get((loss, length))
                mark = "m" if earlier is not None else "e"
                mib = (earlier if earlier is not None else 2 * EARLIER_GB[(loss, length // 2)]) * 1e9 / 2 ** 20
                full, ratio, fstep = f"{mib / 1024:9.2f}{mark}", f"{c['peak_mib'] / mib:7.3f}", f"{'-':>10s}"
            elif measured:
                n0, r0 = measured[-1]
                est = r0["peak_mib"] * length / n0
                full, ratio, fstep = f"{est / 1024:9.2f}e", f"{c['peak_mib'] / est:7.3f}", f"{'-':>10s}"
            else:
                full, ratio, fstep = f"{'-':>10s}", f"{'-':>7s}", f"{'-':>10s}"
            print(f"{loss:6s} {length:5d} {c['peak_mib'] / 1024:9.2f} {full} {ratio}   {c['step_mib'] / 1024:12.2f} {fstep}")
    print("m: the full-logits path measured before this change (quoted: 8.5 ... 23.7 GB, shown in GiB), not rerun; "
          "e: estimated, not run (4096: twice 2048; else linear in L from the longest measured point)")


if __name__ == "__main__":
    main()
