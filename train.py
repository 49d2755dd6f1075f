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

Every bad config value is reported here, before any model is loaded; in a sweep, every
job is checked before the first one trains, a job that fails later does not stop the
others, and the sweep ends with a summary and a non-zero exit code if any job failed.
Ctrl-C (SIGINT) or SIGTERM saves a checkpoint at the next step boundary: `resume=true`
continues from it.
"""
import hashlib
import json
import math
import os
import re
import sys
import traceback
from typing import Dict

import hydra
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

import losses  # noqa: F401  (registers every loss: prefkd.loss_spec.LOSSES)
import trainers
import utils
from prefkd import (adapters, checkpoints, config_compose, data_checks, hub_access, loss_spec, models, packing,
                    run_plan, run_state, tokenizer_facts, tracking)
from prefkd.data import encoding
from prefkd.data import loading as data_loading

# Overrides that do not change what is computed: they stay out of the derived run name so
# that `resume=true` (or a new wandb mode) lands in the same directory as the original run.
NAME_NEUTRAL = {"resume", "overwrite", "wandb", "progress_bar", "num_threads", "runs_dir", "trainer.port",
                "hydra", "exp_name", "teacher.cache", "reference.cache",  # caches give the live models' numbers
                "padding_free", "max_tokens_per_micro_batch"}  # packed rows and token budgets too


def derive_exp_name(cfg: DictConfig, overrides) -> str:
    """`<loss>_<model>_<overrides>` made file-name safe; hashed when long."""
    kept = [o for o in overrides if o.split("=")[0].lstrip("+~").split(".")[0] not in NAME_NEUTRAL
            and o.split("=")[0].lstrip("+~") not in NAME_NEUTRAL and not o.startswith(("loss=", "model="))]
    tail = re.sub(r"[^A-Za-z0-9_.,=+-]+", "-", "_".join(sorted(kept))).strip("-")
    if len(tail) > 80:
        tail = tail[:40] + "-" + hashlib.sha1(tail.encode()).hexdigest()[:10]
    return "_".join(x for x in (cfg.loss.name, cfg.model.name, tail) if x)


def validate_config(cfg: DictConfig, check_archives: bool = True) -> run_plan.RunPlan:
    """Fail fast, naming the config key, before any model or data is loaded.
    check_archives=False skips reading model.archive / teacher.archive (a pipeline checks its
    later stages before the earlier ones have written them). Returns the run resolved once
    (prefkd/run_plan.py), which the trainer and precompute.py read."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ValueError(f"missing required config values: {sorted(missing)}; pass them as key=value")
    run_plan.check_run_name(cfg)
    check_types(cfg)
    check_ranges(cfg)
    adapters.check(cfg)  # model.lora / teacher.lora settings; the targets once the archives are checked
    packing.check(cfg)  # padding_free, max_tokens_per_micro_batch, attn_implementation
    tracking.check(cfg)  # wandb.tags
    spec = loss_spec.get_loss(cfg.loss.name)
    models.check_head(cfg, spec)  # a reward model's scalar head
    check_loss_settings(cfg, spec)
    hub_access.check_hub_access(cfg)
    check_loss_needs(cfg, spec)
    check_batch_sizes(cfg)
    if not hasattr(torch.optim, str(cfg.optimizer)):
        raise ValueError(f"optimizer={cfg.optimizer!r} is not a torch.optim class")
    if check_archives:
        check_archive_dirs(cfg)
    if cfg.model.name_or_path is None and cfg.model.get("init_config") is None:
        raise ValueError(f"model={cfg.model.name}: set model.name_or_path or model.init_config")
    if adapters.enabled(cfg.model):
        adapters.check(cfg, models.policy_config(cfg, check_archives))
    plan = run_plan.check_models(cfg, check_archives=check_archives)
    if cfg.trainer.name not in trainers.TRAINERS:
        raise ValueError(f"unknown trainer {cfg.trainer.name!r}; choose one of {sorted(trainers.TRAINERS)}")
    if cfg.wandb.mode not in WANDB_MODES:
        raise ValueError(f"wandb.mode={cfg.wandb.mode!r}: use online, offline or disabled")
    return plan


def check_loss_settings(cfg: DictConfig, spec) -> None:
    """The loss's own validation of its loss.* keys (its spec's `validate`)."""
    if spec.validate is None:
        return
    try:
        spec.validate(cfg.loss)
    except TypeError as e:  # a value of the wrong type reached a comparison
        raise ValueError(f"loss={cfg.loss.name}: a loss.* value has the wrong type ({e}); "
                         f"loss is {OmegaConf.to_container(cfg.loss)}") from None


def check_loss_needs(cfg: DictConfig, spec) -> None:
    """What the loss needs of the rest of the run: a vocabulary its top-K fits, preference pairs
    for label noise to act on, a teacher with weights."""
    if spec.check_vocab is not None:
        spec.check_vocab(cfg.loss, len(tokenizer_facts.get_tokenizer(cfg.model.tokenizer)))
    if spec.sft_targets and float((cfg.get("data") or {}).get("flip_fraction") or 0):
        raise ValueError(f"data.flip_fraction={cfg.data.flip_fraction} swaps chosen and rejected, which loss="
                         f"{cfg.loss.name} never reads (it trains on SFT targets): set data.flip_fraction=0, or use "
                         "a preference loss")
    if spec.teacher_need(cfg.loss) and cfg.teacher.name == "none":
        raise ValueError(f"loss={cfg.loss.name} needs a teacher: pass teacher=<name> (e.g. teacher=tiny_teacher "
                         "teacher.archive=<a DPO-trained run>/LATEST)")
    if spec.teacher_need(cfg.loss) and cfg.teacher.get("name_or_path") is None and not cfg.teacher.get("archive"):
        raise ValueError(f"teacher={cfg.teacher.name} is built with random weights unless teacher.archive is set: "
                         "pass teacher.archive=<a DPO-trained run>/LATEST")


def check_batch_sizes(cfg: DictConfig) -> None:
    """batch_size divides over the processes and accumulation steps; eval_batch_size over the processes."""
    world = world_size_for(cfg)
    for key in ("batch_size", "eval_batch_size"):
        per = world * (cfg.gradient_accumulation_steps if key == "batch_size" else 1)
        if cfg[key] <= 0 or cfg[key] % per:
            raise ValueError(f"{key}={cfg[key]} must be a positive multiple of world size ({world})"
                             + (f" x gradient_accumulation_steps ({cfg.gradient_accumulation_steps})"
                                if key == "batch_size" else ""))


def check_archive_dirs(cfg: DictConfig) -> None:
    """model.archive / teacher.archive, where set, resolve to a complete checkpoint directory."""
    for key in ("model", "teacher"):
        archive = cfg[key].get("archive")
        if not archive:
            continue
        path = checkpoints.resolve_checkpoint(archive)
        problem = checkpoints.model_dir_problem(path) if os.path.isdir(path) else f"no directory {path}"
        if problem:
            raise ValueError(f"{key}.archive={archive!r} is not a usable checkpoint: {problem}; point it at a "
                             "run directory, its LATEST file or a complete step-* directory")


WANDB_MODES = ("online", "offline", "disabled")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _defaults_of(cfg: DictConfig) -> dict:
    """The shipped defaults: config.yaml and the YAML of each chosen group option, so that
    every key is checked against the type it was written with."""
    root = os.path.join(utils.REPO_DIR, "config")
    out = OmegaConf.to_container(OmegaConf.load(os.path.join(root, "config.yaml")))
    out.pop("defaults", None)
    out.pop("hydra", None)
    for group in ("loss", "model", "teacher", "trainer"):
        path = os.path.join(root, group, f"{cfg[group].get('name')}.yaml")
        if os.path.exists(path):
            out[group] = OmegaConf.to_container(OmegaConf.load(path))
    return out


# Top-level numeric keys whose default is (or may be) null, with the type they take.
NULLABLE_NUMBERS = {"n_epochs": int, "save_every": int, "num_threads": int, "save_every_minutes": float,
                    "max_grad_norm": float, "max_tokens_per_micro_batch": int}


# Keys holding text whose default is null (a bare `nan` or `inf` there is a name, not a number).
TEXT_KEYS = {"exp_name", "wandb.entity", "wandb.name", "wandb.dir", "wandb.group", "wandb.job_type", "wandb.method"}


def check_types(cfg: DictConfig) -> None:
    """Every value has the type of its shipped default (a number stays a number, an integer an
    integer, a flag a flag), and no float anywhere is inf or nan."""
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("hydra", None)

    def walk(value, default, key):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, default.get(k) if isinstance(default, dict) else None, f"{key}.{k}" if key else k)
            return
        if isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, None, f"{key}[{i}]")
            return
        if isinstance(value, float) and not math.isfinite(value) and not isinstance(default, str) \
                and key not in TEXT_KEYS:
            raise ValueError(f"{key}={value} is not a finite number")
        kind = NULLABLE_NUMBERS.get(key) or (None if default is None else type(default))
        if value is None or kind is None or kind is str:
            return
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{key}={value!r} must be true or false")
        elif kind in (int, float):
            if not _is_number(value):
                raise ValueError(f"{key}={value!r} must be a number")
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{key}={value!r} must be a whole number")
    walk(values, _defaults_of(cfg), "")


def check_ranges(cfg: DictConfig) -> None:
    """Ranges of the training loop's own keys (the loss checks its own in its validate)."""
    def need(key, ok, what):
        if not ok(cfg.get(key)):
            raise ValueError(f"{key}={cfg.get(key)!r} {what}")
    positive_or_null = lambda v: v is None or v >= 1
    need("gradient_accumulation_steps", lambda v: v >= 1, "must be >= 1")
    need("n_examples", positive_or_null, "must be >= 1, or null to train for n_epochs")
    need("n_epochs", positive_or_null, "must be >= 1, or null to train for n_examples")
    if cfg.n_epochs is None and cfg.n_examples is None:
        raise ValueError("set n_epochs or n_examples")
    need("eval_every", positive_or_null, "must be >= 1 examples, or null to evaluate only at the end")
    need("save_every", positive_or_null, "must be >= 1 examples, or null to save only at the end "
                                         "(and every save_every_minutes)")
    need("save_every_minutes", lambda v: v is None or v > 0, "must be > 0, or null")
    need("keep_checkpoints", lambda v: v >= 1, "must be >= 1 (the newest checkpoint is always kept)")
    need("max_nonfinite_steps", lambda v: v >= 0, "must be >= 0 (0: stop at the first non-finite step)")
    need("n_eval_examples", lambda v: v >= 1, "must be >= 1")
    need("n_eval_samples", lambda v: v >= 1, "must be >= 1")
    need("max_new_tokens", lambda v: v >= 1, "must be >= 1")
    need("lr", lambda v: v >= 0, "must be >= 0")
    need("weight_decay", lambda v: v >= 0, "must be >= 0")
    need("warmup_steps", lambda v: v >= 0, "must be >= 0")
    need("max_grad_norm", lambda v: v is None or v > 0, "must be > 0 (or null: no clipping)")
    need("max_length", lambda v: v >= 2, "must be >= 2 tokens")
    if not 1 <= cfg.max_prompt_length < cfg.max_length:
        raise ValueError(f"max_prompt_length={cfg.max_prompt_length} must be >= 1 and below "
                         f"max_length={cfg.max_length} (a response needs room)")
    if cfg.truncation_mode not in encoding.TRUNCATION_MODES:
        raise ValueError(f"truncation_mode={cfg.truncation_mode!r}: use one of {list(encoding.TRUNCATION_MODES)}")
    need("num_threads", lambda v: v is None or v >= 1, "must be >= 1 (or null)")


def check_data(cfg: DictConfig):
    """Load and validate every data set split before any model is loaded (rank 0 / the
    launching process only): a bad row stops the run here, naming its file and row, or with
    data.skip_invalid=true is skipped and counted. Prints and returns data_checks' report
    (files per split, counts, formats, truncation, model length, scorer)."""
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    spec = loss_spec.get_loss(cfg.loss.name)
    tokenizer = tokenizer_facts.get_tokenizer(cfg.model.tokenizer)
    return data_checks.startup_report(cfg, tokenizer, need_pairs=not spec.sft_targets, sft_mode=spec.sft_targets)


def world_size_for(cfg: DictConfig) -> int:
    if cfg.trainer.name == "FSDPTrainer" and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])  # under torchrun
    return processes_for(cfg)


def processes_for(cfg: DictConfig) -> int:
    """How many processes a self-launched trainer=FSDPTrainer job starts: one per GPU, or
    trainer.cpu_workers on the CPU; 1 for the other trainers."""
    if cfg.trainer.name != "FSDPTrainer":
        return 1
    want = cfg.trainer.get("device", "auto")
    if want != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return int(cfg.trainer.cpu_workers)


def prepare_run_dir(cfg: DictConfig) -> str:
    """Create the run directory, refuse one that holds another run (unless resume/overwrite),
    and refuse a resume whose settings differ from its checkpoint's. Called with the run's
    lock held, so nothing is written while another process trains there."""
    run_dir = run_dir_of(cfg)
    check_run_dir(cfg)
    if cfg.resume:
        check_resume_settings(cfg, run_dir)
    if cfg.overwrite and not cfg.resume and os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if name.startswith(("step-", ".step-", "LATEST", "DONE", "metrics.jsonl")):
                utils.remove_tree(os.path.join(run_dir, name)) if os.path.isdir(os.path.join(run_dir, name)) \
                    else os.remove(os.path.join(run_dir, name))
    os.makedirs(run_dir, exist_ok=True)
    utils.atomic_write_text(os.path.join(run_dir, "config.yaml"), OmegaConf.to_yaml(cfg, resolve=True))
    return run_dir


def run_dir_of(cfg: DictConfig) -> str:
    return os.path.abspath(os.path.join(cfg.runs_dir, cfg.exp_name))


def check_run_dir(cfg: DictConfig) -> None:
    run_dir = run_dir_of(cfg)
    if os.path.exists(os.path.join(run_dir, "LATEST")) and not cfg.resume and not cfg.overwrite:
        raise ValueError(f"{run_dir} already holds a run: pass resume=true to continue it, overwrite=true to "
                         "start over in it, or another exp_name")


# Settings a resumed run may change: how long it runs, how often it evaluates, saves and logs,
# and memory savers that leave every number as it was. Everything else changes what is trained,
# or the order its sums are taken in, and must match the checkpoint's. The trainer is not here:
# another trainer (or another process count, environment.processes) reduces in another order, so
# the resume would not be the uninterrupted run; resume_allow_changes=true accepts it.
RESUME_FREE = NAME_NEUTRAL | {"n_examples", "n_epochs", "eval_every", "n_eval_examples", "eval_batch_size",
                              "do_first_eval", "sample_during_eval", "n_eval_samples", "max_new_tokens",
                              "save_every", "save_every_minutes", "keep_checkpoints", "max_nonfinite_steps",
                              "resume_allow_changes", "trainer.lean_loading", "activation_checkpointing", "output_chunking",
                              "data.cache_dir", "generations"}


def added_key_defaults(cfg: DictConfig) -> Dict:
    """{flat key: default value} of this framework's config for the run's config groups (and the
    data options' defaults): a key a checkpoint predates is no change when it is at its default."""
    groups = [f"{g}={cfg[g].name}" for g in ("loss", "model", "teacher", "trainer")]
    from hydra.core.global_hydra import GlobalHydra
    # inside train.py's Hydra app, Hydra is initialised already: compose with it
    compose = (lambda o: hydra.compose(config_name="config", overrides=o)) if GlobalHydra.instance().is_initialized() \
        else config_compose.compose
    try:
        base = compose(groups)
    except Exception:  # a config group of the user's own outside config/: the plain defaults
        base = compose([])
    out = utils.dotted(OmegaConf.to_container(base, resolve=True))
    out.update({f"data.{k}": v for k, v in data_loading.DEFAULT_OPTIONS.items()})
    return out


def check_resume_settings(cfg: DictConfig, run_dir: str) -> None:
    """Refuse a resume whose training-relevant settings differ from its checkpoint's, naming
    each differing key (resume_allow_changes=true accepts them)."""
    ckpt = checkpoints.find_resume_checkpoint(run_dir, log=lambda *a: None)
    if ckpt is None:
        return
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        state = json.load(f)
    # the last step may pass n_examples (whole batches): only more than the run's batches is refused
    if cfg.n_examples is not None and state.get("examples_seen", 0) > -(-cfg.n_examples // cfg.batch_size) * cfg.batch_size:
        raise ValueError(f"resume=true: {os.path.basename(ckpt)} of {run_dir} has trained on {state['examples_seen']} "
                         f"examples, more than n_examples={cfg.n_examples}: it cannot be resumed to a shorter run "
                         "(it would be marked DONE as trained on fewer than it was); raise n_examples, or use an "
                         "earlier checkpoint as model.archive of a new run")
    saved = utils.dotted(state.get("config", {}))
    now = utils.dotted(OmegaConf.to_container(cfg, resolve=True))
    free = lambda k: k in RESUME_FREE or k.split(".")[0] in RESUME_FREE  # noqa: E731
    added = {k for k in set(now) - set(saved) if not free(k)}
    if added:  # a key newer than the checkpoint, at its default, is the behaviour the checkpoint had
        defaults = added_key_defaults(cfg)
        added = {k for k in added if k not in defaults or defaults[k] != now[k]}
    diffs = [f"{k}: {saved.get(k, '<absent>')!r} in the checkpoint, {now.get(k, '<absent>')!r} now"
             for k in sorted(set(saved) | set(now))
             if not free(k) and saved.get(k) != now.get(k) and (k in saved or k in added)]
    # what the settings do not show: the code, the data files, what each model's LATEST resolved to,
    # the machine (prefkd/run_state.py)
    diffs += run_state.changes(state.get(run_state.KEY) or {},
                               run_state.fingerprint(cfg, run_plan.RunPlan.of(cfg), world_size_for(cfg)))
    if diffs and not cfg.get("resume_allow_changes", False):
        raise ValueError(f"resume=true: {os.path.basename(ckpt)} of {run_dir} was trained with other settings "
                         "or on other inputs (a resume is exact only on the same ones):\n  "
                         + "\n  ".join(diffs) + "\nresume with the checkpoint's values, start a new run "
                         "(another exp_name, or overwrite=true), or pass resume_allow_changes=true to continue "
                         "with the new ones")
    if diffs:
        utils.rank0_print("resume_allow_changes=true: continuing with changed settings:\n  " + "\n  ".join(diffs))


def is_done(run_dir: str, cfg: DictConfig) -> bool:
    """A run is done when it reached the end it was asked for; a resumed run with a larger
    n_examples / n_epochs continues training instead."""
    path = os.path.join(run_dir, "DONE")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        done = json.load(f)
    return done.get("n_examples") == cfg.n_examples and done.get("n_epochs") == cfg.n_epochs


def apply_wandb_env(cfg: DictConfig, overrides) -> None:
    """wandb's convention: WANDB_MODE in the environment wins over the config file's default;
    an explicit wandb.mode=... on the command line wins over both."""
    env, mode = os.environ.get("WANDB_MODE"), tracking.env_mode()
    if env and not any(o.lstrip("+").startswith("wandb.mode=") for o in overrides):
        if mode not in WANDB_MODES:
            raise ValueError(f"the environment's WANDB_MODE={env!r}: use online, offline or disabled")
        cfg.wandb.mode = mode


def worker(rank: int, world_size: int, cfg: DictConfig, run_dir: str):
    """One training process. Under torchrun the process group comes from the environment;
    self-launched workers get their rank from mp.spawn. Each worker loads its own models."""
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    cls = trainers.TRAINERS[cfg.trainer.name]
    if cls is trainers.FSDPTrainer and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(cfg.trainer.port))
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
        os.environ.setdefault("LOCAL_RANK", str(rank))
        device = models.pick_device(cfg, rank)  # the one device rule (LOCAL_RANK, set above)
        backend = cfg.trainer.get("backend") or ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        rank, world_size = dist.get_rank(), dist.get_world_size()
    utils.set_seed(cfg.seed)
    trainer, clean = None, False
    try:
        trainer = cls(cfg, run_dir, rank=rank, world_size=world_size)
        if rank == 0:
            trainer.wandb_run = tracking.init(cfg, run_dir, teacher=trainer.plan.teacher,
                                              resumed_at=trainer.step if trainer.resume_ckpt else None)
        trainer.train()
        clean = True
    except utils.TrainingStopped as e:
        # saved and stopped cleanly (every rank together): the launcher sees no DONE and reports it
        utils.rank0_print(str(e))
        clean = True
    finally:
        if trainer is not None and getattr(trainer, "wandb_run", None) is not None:
            trainer.wandb_run.finish()
        utils.close_process_group(clean)


def spawned_worker(rank, world_size, cfg_container, run_dir):
    if cfg_container.get("num_threads") is None:
        # torchrun sets one thread per process; self-launched CPU workers share the cores likewise.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    worker(rank, world_size, OmegaConf.create(cfg_container), run_dir)


def prepare(cfg: DictConfig, overrides=()) -> DictConfig:
    """Everything that can be checked without a model: derive the run name, apply the
    environment's wandb mode, validate the config. Raises ValueError naming the key."""
    if cfg.exp_name is None:
        cfg.exp_name = derive_exp_name(cfg, overrides)
    if cfg.wandb.get("group") is None:  # the seeds of one configuration together (a sweep's: main)
        cfg.wandb.group = derive_exp_name(cfg, [o for o in overrides if o.split("=")[0].lstrip("+~") != "seed"])
    apply_wandb_env(cfg, overrides)
    validate_config(cfg)
    return cfg


def run(cfg: DictConfig, overrides=()) -> str:
    """Validate, prepare the run directory and train; returns the run directory."""
    prepare(cfg, overrides)
    data_report = check_data(cfg)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    lock = None
    if rank0:
        os.makedirs(run_dir_of(cfg), exist_ok=True)
        lock = utils.RunLock(run_dir_of(cfg)).acquire()  # one writer per run directory
    try:
        run_dir = prepare_run_dir(cfg) if rank0 else run_dir_of(cfg)
        if data_report is not None:
            utils.atomic_write_json(os.path.join(run_dir, "data_summary.json"), data_report)
        if cfg.resume and is_done(run_dir, cfg):
            utils.rank0_print(f"{run_dir} is complete (DONE); nothing to resume")
            return run_dir
        launch(cfg, run_dir)
        if rank0 and not os.path.exists(os.path.join(run_dir, "DONE")):
            # a worker stopped on a signal after saving (the spawn path returns normally)
            raise utils.TrainingStopped(f"{run_dir} stopped before its end; resume=true continues it")
    finally:
        if lock is not None:
            lock.release()
    return run_dir


def launch(cfg: DictConfig, run_dir: str) -> None:
    world = world_size_for(cfg)
    if cfg.trainer.name == "FSDPTrainer" and "WORLD_SIZE" not in os.environ:
        # Pass only the config: each worker loads its own models (passing loaded models
        # through mp.spawn is what broke the DPO repo's launch).
        ctx = mp.start_processes(spawned_worker, args=(world, OmegaConf.to_container(cfg, resolve=True), run_dir),
                                 nprocs=world, join=False, start_method="spawn")
        import signal

        def forward(signum, frame):  # the workers save and stop; this process waits for them
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, signum)
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not ctx.join():
                pass
        except mp.ProcessRaisedException as e:
            # a worker's own message (its last traceback line) is what the user needs
            last = [line for line in str(e).strip().splitlines() if line.strip()][-1]
            raise utils.RunError(f"a training process failed: {last}") from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    else:
        worker(int(os.environ.get("RANK", 0)), world, cfg, run_dir)


# ------------------------------------------------------------------ sweeps

class Sweep:
    """A Hydra multirun in this process (the basic launcher runs jobs one after another):
    job 0 checks every job before any trains; failures are collected, not raised, and the
    last job prints the summary and sets the exit code."""
    jobs = None       # every job's overrides, from job 0
    failures = []     # (job number, overrides, error)

    @classmethod
    def job_overrides(cls, argv):
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
        args = [a for a in argv if not a.startswith("-") and "=" in a and not a.lstrip("+~").startswith("hydra")]
        parsed = OverridesParser.create().parse_overrides(overrides=args)
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]

    @classmethod
    def check_all(cls, argv) -> None:
        from hydra import compose
        cls.jobs, cls.failures = cls.job_overrides(argv), []
        problems, checked_data, names = [], set(), {}
        for i, job in enumerate(cls.jobs):
            try:
                cfg = compose(config_name="config", overrides=job)
                OmegaConf.set_struct(cfg, False)
                prepare(cfg, job)
                if cfg.exp_name in names:
                    raise ValueError(f"same run directory as job {names[cfg.exp_name]} ({cfg.exp_name}): "
                                     "give each job its own exp_name")
                names[cfg.exp_name] = i
                check_run_dir(cfg)
                key = OmegaConf.to_yaml(OmegaConf.create({"d": cfg.datasets, "o": cfg.get("data"),
                                                          "l": cfg.loss.name, "t": cfg.model.tokenizer}))
                if key not in checked_data:
                    check_data(cfg)
                    checked_data.add(key)
            except Exception as e:  # every problem of every job, reported together
                problems.append(f"job {i} ({' '.join(job)}): {e}")
        if problems:
            raise ValueError(f"{len(problems)} of {len(cls.jobs)} sweep jobs are invalid; nothing was trained:\n  "
                             + "\n  ".join(problems))
        print(f"sweep: all {len(cls.jobs)} jobs checked", flush=True)

    @classmethod
    def finish(cls) -> None:
        n = len(cls.jobs or [])
        if not cls.failures:
            print(f"sweep: all {n} jobs finished", flush=True)
            return
        lines = [f"job {i} ({' '.join(o)}): {e}" for i, o, e in cls.failures]
        print(f"sweep: {len(cls.failures)} of {n} jobs failed:\n  " + "\n  ".join(lines), file=sys.stderr, flush=True)
        sys.exit(1)


@hydra.main(version_base="1.3", config_path="config", config_name="config")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    OmegaConf.set_struct(cfg, False)
    multirun = hc.mode == RunMode.MULTIRUN
    job = int(hc.job.num) if multirun else 0
    if multirun and cfg.wandb.get("group") is None:
        cfg.wandb.group = tracking.sweep_group(sys.argv[1:])  # every job of this command line together
    try:
        if multirun and job == 0:
            Sweep.check_all(sys.argv[1:])
        run(cfg, overrides)
    except (ValueError, utils.RunError) as e:
        if not multirun or Sweep.jobs is None:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(130 if isinstance(e, utils.TrainingStopped) else 2)
        print(f"error in sweep job {job}: {e}", file=sys.stderr, flush=True)
        Sweep.failures.append((job, overrides, e))
    except Exception as e:
        if not multirun or Sweep.jobs is None:
            raise
        traceback.print_exc()
        Sweep.failures.append((job, overrides, f"{type(e).__name__}: {e}"))
    if multirun and Sweep.jobs is not None and job == len(Sweep.jobs) - 1:
        Sweep.finish()


if __name__ == "__main__":
    try:  # before Hydra composes: an old key name would otherwise be a "not in struct" error
        config_compose.refuse_renamed(a for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
