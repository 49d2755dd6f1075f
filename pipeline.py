"""The main job: the paper's staged protocol in one command, then evaluation and the table.

    python pipeline.py                          # embedded default on the CPU, 1 seed
    python pipeline.py seeds=3                  # the full table (mean and std over 3 seeds)
    python pipeline.py methods=[dpo,tvkd] out=runs/small
    python pipeline.py preset=paper             # Llama-3.1-8B -> Llama-3.2-1B, Deita + DPO-MIX-7K, FSDP
    python pipeline.py preset=paper model=llama3b teacher=llama8b seeds=3

Stages (config/pipeline/<preset>.yaml), each an ordinary train.py run under <out>/:

    teacher_sft  -> teacher_dpo  (model=<teacher>)
    student_sft                  (model=<model>)
    methods/<loss>_seed<k>       (one Hydra multirun over methods x seeds, from student_sft,
                                  with teacher=<teacher> teacher.archive=<out>/teacher_dpo)

then `evaluate.py` on every checkpoint (held-out task score, preference accuracy and
margin) and `report.py` (results.md, results.csv, results.png). Every stage runs with
resume=true: re-running the command skips stages that are complete and resumes an
interrupted one; evaluations are cached next to their checkpoint.

Arguments are key=value. Keys of the preset (out, seeds, methods, model, teacher, preset,
eval.*) configure the pipeline; any other key=value is passed to every train.py stage
(e.g. trainer=FSDPTrainer, datasets=[dpomix], wandb.mode=disabled).
"""
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

from omegaconf import OmegaConf

import utils

PIPELINE_KEYS = {"out", "seeds", "methods", "model", "teacher", "preset", "eval", "stages", "common"}


def parse_args(argv: List[str]):
    """Split key=value arguments into the pipeline's config and pass-through train.py overrides."""
    preset = "embedded"
    for a in argv:
        if a.startswith("preset="):
            preset = a.split("=", 1)[1]
    path = os.path.join(utils.REPO_DIR, "config", "pipeline", f"{preset}.yaml")
    if not os.path.exists(path):
        known = sorted(f[:-5] for f in os.listdir(os.path.dirname(path)))
        raise ValueError(f"preset={preset!r}: no {path}; known presets: {known}")
    cfg = OmegaConf.load(path)
    passthrough = []
    for a in argv:
        if "=" not in a:
            raise ValueError(f"argument {a!r} is not key=value")
        key = a.split("=", 1)[0].lstrip("+")
        if key.split(".")[0] in PIPELINE_KEYS:
            if key != "preset":
                cfg.merge_with(OmegaConf.from_dotlist([a]))
        else:
            passthrough.append(a)
    if int(cfg.seeds) < 1:
        raise ValueError(f"seeds={cfg.seeds} must be >= 1")
    import losses
    for m in cfg.methods:
        losses.get_loss(m)
    cfg.out = os.path.abspath(cfg.out)
    return cfg, passthrough


def merge_overrides(*groups: List[str]) -> List[str]:
    """Later key=value pairs replace earlier ones with the same key (Hydra refuses duplicates)."""
    merged: Dict[str, str] = {}
    for group in groups:
        for o in group:
            merged[o.split("=", 1)[0]] = o
    return list(merged.values())


def train(overrides: List[str], multirun: bool = False):
    cmd = [sys.executable, os.path.join(utils.REPO_DIR, "train.py")] + (["--multirun"] if multirun else []) + overrides
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=utils.REPO_DIR, check=True)


def stage_dirs(cfg) -> Dict[str, str]:
    return {name: os.path.join(cfg.out, name) for name in ("teacher_sft", "teacher_dpo", "student_sft")}


def method_runs(cfg) -> List[str]:
    return [os.path.join(cfg.out, "methods", f"{m}_seed{s}") for m in cfg.methods for s in range(int(cfg.seeds))]


def run_stages(cfg, passthrough: List[str]):
    d = stage_dirs(cfg)
    base = ["resume=true", f"runs_dir={cfg.out}", "seed=0"]
    common = list(cfg.common)
    train(merge_overrides(common, passthrough, base, list(cfg.stages.teacher_sft),
                          [f"model={cfg.teacher}", "exp_name=teacher_sft"]))
    train(merge_overrides(common, passthrough, base, list(cfg.stages.teacher_dpo),
                          [f"model={cfg.teacher}", "exp_name=teacher_dpo", f"model.archive={d['teacher_sft']}"]))
    train(merge_overrides(common, passthrough, base, list(cfg.stages.student_sft),
                          [f"model={cfg.model}", "exp_name=student_sft"]))
    train(merge_overrides(common, passthrough, base, list(cfg.stages.methods), [
        f"model={cfg.model}", f"model.archive={d['student_sft']}", f"teacher={cfg.teacher}",
        f"teacher.archive={d['teacher_dpo']}", f"runs_dir={os.path.join(cfg.out, 'methods')}",
        "loss=" + ",".join(cfg.methods), "seed=" + ",".join(str(s) for s in range(int(cfg.seeds))),
        "exp_name=${loss.name}_seed${seed}"]), multirun=True)


def eval_datasets(cfg, passthrough) -> List[str]:
    if cfg.eval.get("datasets"):
        return list(cfg.eval.datasets)
    for o in passthrough:
        if o.startswith("datasets="):
            return [x.strip() for x in o.split("=", 1)[1].strip("[]").split(",") if x.strip()]
    return ["embedded"]


def evaluate_all(cfg, passthrough) -> None:
    """Evaluate every model once (cached as <run>/eval.json, redone if the run changed)."""
    import evaluate
    d = stage_dirs(cfg)
    jobs = [(d["teacher_sft"], None), (d["teacher_dpo"], d["teacher_sft"]), (d["student_sft"], None)]
    jobs += [(run, d["student_sft"]) for run in method_runs(cfg)]
    names = eval_datasets(cfg, passthrough)
    for run, reference in jobs:
        out = os.path.join(run, "eval.json")
        done = os.path.join(run, "DONE")
        if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(done):
            continue
        run_cfg = OmegaConf.load(os.path.join(run, "config.yaml"))
        t0 = time.time()
        result = evaluate.evaluate_checkpoint(
            run, reference, names, n_examples=int(cfg.eval.n), batch_size=int(cfg.eval.batch_size),
            beta=float(cfg.eval.beta), max_new_tokens=int(cfg.eval.max_new_tokens),
            max_length=int(run_cfg.max_length), max_prompt_length=int(run_cfg.max_prompt_length),
            generations=os.path.join(run, "generations.jsonl"), options=run_cfg.get("data"))
        result.update({"reference": reference, "seconds": round(time.time() - t0, 1)})
        utils.atomic_write_json(out, result)
        print(f"evaluated {run}: " + json.dumps(result), flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, passthrough = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    utils.atomic_write_text(os.path.join(cfg.out, "pipeline.yaml"), OmegaConf.to_yaml(cfg) +
                            f"# passed to train.py: {passthrough}\n")
    run_stages(cfg, passthrough)
    evaluate_all(cfg, passthrough)
    import report
    table = report.write_report(cfg.out)
    print(f"\n{table}\nwall time {time.time() - t0:.0f} s; results in {cfg.out}/results.md, results.csv, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
