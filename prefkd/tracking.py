"""wandb, the one place that talks to it: a training run's wandb run (its group, job type and
tags), and a model's evaluation written to the summary of the run that trained it.

A run's group and job type come from wandb.group / wandb.job_type; left null, the group is the
sweep for a Hydra --multirun (every job of one command line together) and otherwise the run's
name without its seed (the seeds of one configuration together), and the job type is "train".
pipeline.py sets both: the group is its `out`, the job type the stage (teacher_sft, teacher_dpo,
student_sft, reward_model, method). Tags: loss=<name>, model=<name>, teacher=<name> where the
loss reads a teacher, method=<row> where the pipeline names it (wandb.method), then wandb.tags. The run's identity (id, project, entity, directory,
mode) is written to <run>/wandb.json, so that evaluate.py and the pipeline's evaluation put the
evaluation (eval/<metric>) in that run's summary (offline: in an evaluation run beside it, see
publish_evaluation): a wandb table of a pipeline's group, grouped by the `method` tag, holds
results.md's rows.
"""
import hashlib
import json
import os
from typing import Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

import utils
from prefkd import checkpoints

IDENTITY = "wandb.json"  # in the run directory
GROUP_CHARS = 128  # wandb's limit on a group name


def fit(name: str) -> str:
    """A group name within wandb's limit (shortened with a hash of the whole)."""
    return name if len(name) <= GROUP_CHARS else name[:GROUP_CHARS - 11] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]


def sweep_group(argv: List[str]) -> str:
    """The group of every job of one --multirun command line: its arguments, sorted."""
    return fit("sweep " + " ".join(sorted(a for a in argv if "=" in a and not a.startswith("-"))))


def env_mode() -> Optional[str]:
    """The environment's WANDB_MODE in this framework's words (wandb's older dryrun / run are
    offline / online), or None."""
    env = os.environ.get("WANDB_MODE")
    return {"dryrun": "offline", "run": "online"}.get(env, env) if env else None


def mode_now(stored: Optional[str]) -> str:
    """The wandb mode for writing now: the environment's WANDB_MODE (wandb's convention, as
    train.py applies it) over the mode the run was trained with."""
    return env_mode() or stored or "offline"


def check(cfg: DictConfig) -> None:
    """wandb.tags is a list of short names (wandb refuses a tag over 64 characters)."""
    given = (cfg.get("wandb") or {}).get("tags")
    if given is None:
        return
    if isinstance(given, str) or not OmegaConf.is_list(given) and not isinstance(given, (list, tuple)):
        raise ValueError(f"wandb.tags={given!r}: give a list, e.g. wandb.tags=[ablation,run2]")
    for t in given:
        if not str(t) or len(str(t)) > 64:
            raise ValueError(f"wandb.tags: {str(t)!r} must have 1 to 64 characters (wandb's limit)")


def tags(cfg: DictConfig, teacher: bool) -> List[str]:
    """loss=, model=, teacher= (where the loss reads one), then the config's wandb.tags."""
    out = [f"loss={cfg.loss.name}", f"model={cfg.model.name}"]
    if teacher and cfg.get("teacher") is not None:
        out.append(f"teacher={cfg.teacher.name}")
    if cfg.wandb.get("method"):  # the pipeline's row: a method or variant name, or a fixed stage
        out.append(f"method={cfg.wandb.method}")
    return out + [str(t) for t in (cfg.wandb.get("tags") or [])]


def init(cfg: DictConfig, run_dir: str, teacher: bool, resumed_at: Optional[int] = None):
    """The run's wandb run (None with wandb.mode=disabled), resumed where the run is resumed (its
    id is a hash of the run directory). `teacher`: whether the loss reads a teacher (the tag).
    `resumed_at`: the step a resumed run continues from; offline, that part is a run of its own
    (id <id>-resume<step>, the same group, name and tags): wandb cannot resume an offline run, and
    syncing a second offline directory with the same id replaces the history before the resume
    (wandb/wandb#3841)."""
    if cfg.wandb.mode == "disabled":
        return None
    import wandb
    mode = cfg.wandb.mode
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or os.path.exists(os.path.expanduser("~/.netrc"))):
        print("wandb: no API key configured; logging offline (sync later with `wandb sync`)")
        mode = "offline"
    identity = {"id": hashlib.sha1(run_dir.encode()).hexdigest()[:12], "project": cfg.wandb.project,
                "entity": cfg.wandb.entity, "dir": cfg.wandb.dir or run_dir, "mode": mode,
                "group": None if cfg.wandb.get("group") is None else fit(str(cfg.wandb.group)),
                "job_type": str(cfg.wandb.get("job_type") or "train")}
    if mode == "offline" and resumed_at:
        identity["id"] += f"-resume{resumed_at}"
    run = wandb.init(name=cfg.wandb.name or cfg.exp_name, resume="allow", tags=tags(cfg, teacher),
                     config=OmegaConf.to_container(cfg, resolve=True), **identity)
    utils.atomic_write_json(os.path.join(run_dir, IDENTITY),
                            {**identity, "name": cfg.wandb.name or cfg.exp_name, "tags": tags(cfg, teacher)})
    return run


def evaluation_summary(result: Dict) -> Dict[str, float]:
    """The numbers of an evaluation (evaluate.evaluate_checkpoint's result) as summary keys:
    eval/task_exact, eval/reward, eval/reward_win_rate, eval/logp_accuracy..."""
    return {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_of(checkpoint: str) -> Optional[str]:
    """The run directory of a checkpoint (a run, its LATEST file or a step-* directory) that was
    trained with wandb on (holds wandb.json), else None."""
    path = os.path.abspath(checkpoint)
    for d in (path if os.path.isdir(path) else os.path.dirname(path),
              os.path.dirname(checkpoints.resolve_checkpoint(path))):
        if os.path.isfile(os.path.join(d, IDENTITY)):
            return d
    return None


def publish_evaluation(run_dir: str, result: Dict, log=print) -> Optional[Dict[str, float]]:
    """Write an evaluation to the summary of the wandb run that trained `run_dir`; nothing for a
    run trained without wandb (no wandb.json). Online, that run is resumed by its id. Offline,
    wandb cannot resume a run, and `wandb sync` of a second offline directory with the same id
    replaces the first rather than adding to it (wandb/wandb#3841, #5865), so the evaluation
    goes to its own run beside it: id <id>-eval, job type `evaluation`, the same group, name
    and tags. Returns what was written. A failure to reach wandb is printed, not raised:
    eval.json is already written."""
    path = os.path.join(run_dir, IDENTITY)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        identity = json.load(f)
    summary = evaluation_summary(result)
    args = {k: identity.get(k) for k in ("id", "project", "entity", "dir", "mode", "group", "job_type")}
    args["mode"] = mode_now(args["mode"])
    if args["mode"] == "disabled":
        return None
    if args["mode"] == "offline":
        args.update(id=f"{args['id']}-eval", job_type="evaluation", name=identity.get("name"), tags=identity.get("tags"))
    try:
        import wandb
        run = wandb.init(resume="allow", **args)
        run.summary.update(summary)
        run.finish()
    except Exception as e:  # noqa: BLE001 - wandb's errors are many; the evaluation stands without it
        log(f"wandb: the evaluation of {run_dir} was not written to its run's summary ({type(e).__name__}: {e})")
        return None
    return summary
