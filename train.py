"""Train a language model with a preference or distillation loss.

The embedded default (tiny Llama, built-in digit-sorting task, CPU, no downloads):

    python train.py                                     # SFT of the tiny student
    python train.py loss=dpo model.archive=runs/<sft run>/LATEST

Real models, one GPU node (FSDP over all local GPUs) or several nodes:

    python train.py loss=dpo model=llama1b datasets=[dpomix] trainer=FSDPTrainer
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 \
        train.py loss=dpo model=llama1b trainer=FSDPTrainer

Sweeps are Hydra multiruns:

    python train.py --multirun loss=dpo,ipo loss.beta=0.05,0.1 seed=0,1

Every bad config value is reported here, before any model is loaded.
"""
import hashlib
import os
import re
import sys

import hydra
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

import losses
import utils

# Overrides that do not change what is computed: they stay out of the derived run name so
# that `resume=true` (or a new wandb mode) lands in the same directory as the original run.
NAME_NEUTRAL = {"resume", "overwrite", "wandb", "progress_bar", "num_threads", "runs_dir", "trainer.port",
                "hydra", "exp_name"}


def derive_exp_name(cfg: DictConfig, overrides) -> str:
    """`<loss>_<model>_<overrides>` made file-name safe; hashed when long."""
    kept = [o for o in overrides if o.split("=")[0].lstrip("+~").split(".")[0] not in NAME_NEUTRAL
            and o.split("=")[0].lstrip("+~") not in NAME_NEUTRAL and not o.startswith(("loss=", "model="))]
    tail = re.sub(r"[^A-Za-z0-9_.,=+-]+", "-", "_".join(sorted(kept))).strip("-")
    if len(tail) > 80:
        tail = tail[:40] + "-" + hashlib.sha1(tail.encode()).hexdigest()[:10]
    return "_".join(x for x in (cfg.loss.name, cfg.model.name, tail) if x)


def validate_config(cfg: DictConfig) -> None:
    """Fail fast, naming the config key, before any model or data is loaded."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ValueError(f"missing required config values: {sorted(missing)}; pass them as key=value")
    spec = losses.get_loss(cfg.loss.name)
    if spec.validate is not None:
        spec.validate(cfg.loss)
    if spec.teacher_need(cfg.loss) and cfg.teacher.name == "none":
        raise ValueError(f"loss={cfg.loss.name} needs a teacher: pass teacher=<name> (e.g. teacher=tiny_teacher "
                         "teacher.archive=<a DPO-trained run>/LATEST)")
    if spec.teacher_need(cfg.loss) and cfg.teacher.get("name_or_path") is None and not cfg.teacher.get("archive"):
        raise ValueError(f"teacher={cfg.teacher.name} is built with random weights unless teacher.archive is set: "
                         "pass teacher.archive=<a DPO-trained run>/LATEST")
    world = world_size_for(cfg)
    for key in ("batch_size", "eval_batch_size"):
        per = world * (cfg.gradient_accumulation_steps if key == "batch_size" else 1)
        if cfg[key] <= 0 or cfg[key] % per:
            raise ValueError(f"{key}={cfg[key]} must be a positive multiple of world size ({world})"
                             + (f" x gradient_accumulation_steps ({cfg.gradient_accumulation_steps})"
                                if key == "batch_size" else ""))
    if cfg.n_epochs is None and cfg.n_examples is None:
        raise ValueError("set n_epochs or n_examples")
    if not hasattr(torch.optim, str(cfg.optimizer)):
        raise ValueError(f"optimizer={cfg.optimizer!r} is not a torch.optim class")
    for key in ("model", "teacher"):
        archive = cfg[key].get("archive")
        if archive:
            path = utils.resolve_checkpoint(archive)
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise ValueError(f"{key}.archive={archive!r} is not a checkpoint (no config.json at {path}); "
                                 "point it at a run directory, its LATEST file or a step-* directory")
    if cfg.model.name_or_path is None and cfg.model.get("init_config") is None:
        raise ValueError(f"model={cfg.model.name}: set model.name_or_path or model.init_config")
    import trainers
    trainers.validate_loss_models(cfg)
    if cfg.trainer.name not in trainers.TRAINERS:
        raise ValueError(f"unknown trainer {cfg.trainer.name!r}; choose one of {sorted(trainers.TRAINERS)}")
    if cfg.wandb.mode not in ("online", "offline", "disabled"):
        raise ValueError(f"wandb.mode={cfg.wandb.mode!r}: use online, offline or disabled")


def check_data(cfg: DictConfig):
    """Load and validate every data set split before any model is loaded (rank 0 / the
    launching process only): a bad row stops the run here, naming its file and row, or with
    data.skip_invalid=true is skipped and counted. Returns {name/split: {examples, skipped}}."""
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    import preference_datasets as data
    spec = losses.get_loss(cfg.loss.name)
    tokenizer = data.get_tokenizer(cfg.model.tokenizer)
    report = data.check_datasets(list(cfg.datasets), tokenizer, cfg.get("data"), need_pairs=not spec.sft_targets)
    for key, r in report.items():
        if r["skipped"]:
            utils.rank0_print(f"data: {key}: {r['examples']} examples, {r['skipped']} invalid rows skipped "
                              "(data.skip_invalid=true)")
    return report


def world_size_for(cfg: DictConfig) -> int:
    if cfg.trainer.name != "FSDPTrainer":
        return 1
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    want = cfg.trainer.get("device", "auto")
    if want != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return int(cfg.trainer.cpu_workers)


def prepare_run_dir(cfg: DictConfig) -> str:
    run_dir = os.path.abspath(os.path.join(cfg.runs_dir, cfg.exp_name))
    has_ckpt = os.path.exists(os.path.join(run_dir, "LATEST"))
    if has_ckpt and not cfg.resume and not cfg.overwrite:
        raise ValueError(f"{run_dir} already holds a run: pass resume=true to continue it, overwrite=true to "
                         "start over in it, or another exp_name")
    if cfg.overwrite and not cfg.resume and os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if name.startswith(("step-", ".step-", "LATEST", "DONE", "metrics.jsonl")):
                utils.remove_tree(os.path.join(run_dir, name)) if os.path.isdir(os.path.join(run_dir, name)) \
                    else os.remove(os.path.join(run_dir, name))
    os.makedirs(run_dir, exist_ok=True)
    utils.atomic_write_text(os.path.join(run_dir, "config.yaml"), OmegaConf.to_yaml(cfg, resolve=True))
    return run_dir


def is_done(run_dir: str, cfg: DictConfig) -> bool:
    """A run is done when it reached the end it was asked for; a resumed run with a larger
    n_examples / n_epochs continues training instead."""
    path = os.path.join(run_dir, "DONE")
    if not os.path.exists(path):
        return False
    import json
    with open(path) as f:
        done = json.load(f)
    return done.get("n_examples") == cfg.n_examples and done.get("n_epochs") == cfg.n_epochs


def init_wandb(cfg: DictConfig, run_dir: str):
    if not cfg.wandb.enabled or cfg.wandb.mode == "disabled":
        return None
    import wandb
    mode = cfg.wandb.mode
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or os.path.exists(os.path.expanduser("~/.netrc"))):
        print("wandb: no API key configured; logging offline (sync later with `wandb sync`)")
        mode = "offline"
    run_id = hashlib.sha1(run_dir.encode()).hexdigest()[:12]
    return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name or cfg.exp_name,
                      dir=cfg.wandb.dir or run_dir, mode=mode, id=run_id, resume="allow",
                      config=OmegaConf.to_container(cfg, resolve=True))


def worker(rank: int, world_size: int, cfg: DictConfig, run_dir: str):
    """One training process. Under torchrun the process group comes from the environment;
    self-launched workers get their rank from mp.spawn. Each worker loads its own models."""
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    import trainers
    cls = trainers.TRAINERS[cfg.trainer.name]
    if cls is trainers.FSDPTrainer and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(cfg.trainer.port))
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
        os.environ.setdefault("LOCAL_RANK", str(rank))
        use_cuda = cfg.trainer.get("device", "auto") != "cpu" and torch.cuda.is_available()
        backend = cfg.trainer.get("backend") or ("nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        rank, world_size = dist.get_rank(), dist.get_world_size()
    utils.set_seed(cfg.seed)
    try:
        trainer = cls(cfg, run_dir, rank=rank, world_size=world_size)
        if rank == 0:
            trainer.wandb_run = init_wandb(cfg, run_dir)
        trainer.train()
        if rank == 0 and getattr(trainer, "wandb_run", None) is not None:
            trainer.wandb_run.finish()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawned_worker(rank, world_size, cfg_container, run_dir):
    if cfg_container.get("num_threads") is None:
        # torchrun sets one thread per process; self-launched CPU workers share the cores likewise.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    worker(rank, world_size, OmegaConf.create(cfg_container), run_dir)


def run(cfg: DictConfig, overrides=()) -> str:
    """Validate, prepare the run directory and train; returns the run directory."""
    if cfg.exp_name is None:
        cfg.exp_name = derive_exp_name(cfg, overrides)
    validate_config(cfg)
    data_report = check_data(cfg)
    run_dir = prepare_run_dir(cfg) if int(os.environ.get("RANK", 0)) == 0 else \
        os.path.abspath(os.path.join(cfg.runs_dir, cfg.exp_name))
    if data_report is not None:
        utils.atomic_write_json(os.path.join(run_dir, "data_summary.json"), data_report)
    if cfg.resume and is_done(run_dir, cfg):
        utils.rank0_print(f"{run_dir} is complete (DONE); nothing to resume")
        return run_dir
    world = world_size_for(cfg)
    if cfg.trainer.name == "FSDPTrainer" and "WORLD_SIZE" not in os.environ:
        # Pass only the config: each worker loads its own models (passing loaded models
        # through mp.spawn is what broke the DPO repo's launch).
        mp.spawn(spawned_worker, args=(world, OmegaConf.to_container(cfg, resolve=True), run_dir), nprocs=world,
                 join=True)
    else:
        worker(int(os.environ.get("RANK", 0)), world, cfg, run_dir)
    return run_dir


@hydra.main(version_base="1.3", config_path="config", config_name="config")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    overrides = list(HydraConfig.get().overrides.task)
    OmegaConf.set_struct(cfg, False)
    try:
        run(cfg, overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
