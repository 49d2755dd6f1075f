"""A run resolved once: what its loss needs (models, caches, generations), checked before any model
or data set loads, handed to the trainer and to precompute.py.

`RunPlan.of(cfg)` reads the loss's spec (prefkd/loss_spec.py) once; the checks here are the ones
that do not belong to one key's range (train.py's check_types / check_ranges): renamed keys, the
run name, hub models and data sets that cannot be reached offline.
"""
import os
import socket
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

from prefkd.loss_spec import GENERATION_SOURCES, Generation, LossSpec
from prefkd import tokenizer_facts
from prefkd import loss_spec
import utils
from prefkd import checkpoints
from prefkd import cross_tokenizer
from prefkd import generation
from prefkd import models
from prefkd import output_cache
from prefkd.data.sources import SOURCES

# Keys that were renamed: an old name on a command line is refused with the new one.
RENAMED = {"reference_cache": "reference.cache", "trainer.cpu_devices": "trainer.cpu_workers",
           "wandb.enabled": "wandb.mode (wandb.mode=disabled turns wandb off)"}


@dataclass(frozen=True)
class RunPlan:
    """What a run's loss needs, from its spec: resolved once (train.validate_config) and read by
    the trainer (prefkd/models.py builds what it names) and precompute.py."""
    spec: LossSpec
    reference: Optional[str]       # None, "logps" or "logits": what the loss reads of the reference
    reference_model: bool          # the frozen reference is loaded (for its outputs, or to generate)
    teacher: bool                  # the teacher is loaded (features or generations)
    teacher_reference: bool        # the teacher's own SFT reference is loaded
    generation: Optional[Generation]
    caches: Dict[str, str]         # {"teacher" / "reference": directory} of the caches the config names

    @classmethod
    def of(cls, cfg) -> "RunPlan":
        spec = loss_spec.get_loss(cfg.loss.name)
        return cls(spec=spec, reference=spec.reference_need(cfg.loss), reference_model=spec.reference_model_need(cfg.loss),
                   teacher=spec.teacher_need(cfg.loss), teacher_reference=spec.teacher_reference_need(cfg.loss),
                   generation=spec.generation_need(cfg.loss), caches=output_cache.configured(cfg))


def compose(overrides: Iterable[str]):
    """The config train.py would see for these command-line overrides (Hydra's compose API, on
    config/; struct mode off, as train.py runs): the one place outside a Hydra app that composes."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf
    refuse_renamed(overrides)
    with initialize_config_dir(config_dir=os.path.join(utils.REPO_DIR, "config"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    OmegaConf.set_struct(cfg, False)
    return cfg


def compose_command(config_name: str, argv: Iterable[str], open_keys: Iterable[str] = ("data",)):
    """The config of a command other than train.py (config/<config_name>.yaml) for its
    key=value arguments, with Hydra's override grammar (datasets=[a,b], x=null). Keys under
    `open_keys` (free-form sections such as data.*) may be new. A bare argument, an unknown key or
    a required key left unset is a ValueError naming it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    argv = [str(a) for a in argv]
    bare = [a for a in argv if "=" not in a]
    if bare:
        raise ValueError(f"argument {bare[0]!r} is not key=value: {config_name}.py takes Hydra-style key=value "
                         f"arguments, e.g. checkpoint={bare[0]}")
    path = os.path.join(utils.REPO_DIR, "config", f"{config_name}.yaml")
    known = sorted(OmegaConf.load(path).keys())
    tops = [a.lstrip("+~").split("=", 1)[0].split(".")[0] for a in argv]
    unknown = [t for t in tops if t not in known]
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r}: the keys of {config_name}.py are {known} "
                         f"(config/{config_name}.yaml)")
    overrides = [("++" + a.lstrip("+")) if t in tuple(open_keys) else a for a, t in zip(argv, tops)]
    try:
        with initialize_config_dir(config_dir=os.path.dirname(path), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except HydraException as e:
        raise ValueError(f"{config_name}.py: {e}".rstrip(".") + f". The keys of {config_name}.py are {known} "
                         f"(config/{config_name}.yaml)") from None
    missing = [k for k in cfg if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise ValueError(f"{config_name}.py: {missing[0]}=<...> is required (config/{config_name}.yaml says what it is)")
    OmegaConf.set_struct(cfg, False)
    return cfg


def renamed_keys() -> Dict[str, str]:
    """{old key: new key} of every renamed key, the losses' own (LossSpec.renamed) included."""
    out = dict(RENAMED)
    for name, spec in loss_spec.LOSSES.items():
        for old, new in spec.renamed.items():
            out.setdefault(f"loss.{old}", f"loss.{new}")
    return out


def refuse_renamed(overrides: Iterable[str]) -> None:
    """A command-line override naming a renamed key gets a message naming the new key."""
    renamed = renamed_keys()
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in renamed:
            new = renamed[key]
            example = "" if " " in new else f" (e.g. {new}={o.split('=', 1)[1] if '=' in o else '...'})"
            raise ValueError(f"{key} was renamed: use {new}{example}")


def check_run_name(cfg) -> None:
    """exp_name names a directory directly inside runs_dir: text, no path separators, not . or .."""
    name = cfg.get("exp_name")
    if name is None:
        return  # derived from the overrides (train.derive_exp_name)
    if not isinstance(name, str):
        raise ValueError(f"exp_name={name!r} is read as a number: quote it (exp_name=\"'{name}'\") or use a "
                         "name that starts with a letter")
    if not name or name in (".", "..") or "/" in name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"exp_name={name!r} must name a directory inside runs_dir ({cfg.runs_dir}): no path "
                         "separators, not '.' or '..'; to write elsewhere, set runs_dir")


def check_models(cfg, check_archives: bool = True) -> RunPlan:
    """What the loss's spec needs of the models that the config must provide, checked before any
    model is loaded (train.validate_config calls it). check_archives=False: the
    key must be set, but its checkpoint may not exist yet (a pipeline's later stage)."""
    plan = RunPlan.of(cfg)
    spec = plan.spec
    if plan.teacher and cfg.teacher.get("name") != "none":  # a teacher of another tokenizer: can this loss read it?
        cross_tokenizer.check(cfg, spec, models.load_tokenizer(cfg.model), models.load_tokenizer(cfg.teacher))
    if plan.teacher_reference:
        archive = cfg.teacher.get("reference_archive")
        if not archive:
            raise ValueError(f"loss={cfg.loss.name} needs the teacher's own SFT reference as a second frozen model: "
                             "pass teacher.reference_archive=<the SFT run the teacher was DPO-trained from>/LATEST")
        path = checkpoints.resolve_checkpoint(archive)
        problem = (checkpoints.model_dir_problem(path) if os.path.isdir(path) else f"no directory {path}") \
            if check_archives else None
        if problem:
            raise ValueError(f"teacher.reference_archive={archive!r} is not a checkpoint ({problem}); point it at a "
                             "run directory, its LATEST file, a step-* directory or an adapter directory")
    gen = plan.generation
    if gen is not None:
        if gen.source not in GENERATION_SOURCES:
            raise ValueError(f"loss={cfg.loss.name}: unknown generation source {gen.source!r}")
        if gen.replaces not in (("chosen", "rejected") if spec.pairwise else ("chosen",)):
            raise ValueError(f"loss={cfg.loss.name}: generations cannot replace {gen.replaces!r} responses")
        if not 0.0 <= gen.probability <= 1.0:
            raise ValueError(f"loss={cfg.loss.name}: generation probability {gen.probability} is not in [0, 1]")
    if cfg.get("generations"):
        generation.check_files(cfg, gen, check_archives)
    if output_cache.configured(cfg):  # teacher.cache / reference.cache: usable by this loss, and up to date
        output_cache.check_config(cfg, models.load_tokenizer(cfg.model), check_exists=check_archives)
    return plan


# ------------------------------------------------------------------ hub access

def _is_local(path) -> bool:
    """A local path, or a shipped tokenizer ("embedded", "embedded_bpe": tokenizer_facts.get_tokenizer)."""
    return path is None or path in tokenizer_facts.EMBEDDED_TOKENIZERS or os.path.exists(os.path.expanduser(str(path)))


def _hub_cached(repo: str, filename: str, repo_type: str = "model") -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo, filename, repo_type=repo_type), str)
    except Exception:
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def missing_local_paths(cfg) -> List[str]:
    """`key=path` of every model or tokenizer the run names by a filesystem path (absolute, or
    starting with ~ or .) that does not exist: never a hub id, so refused whether or not the hub is up."""
    out = []
    groups = [("model", cfg.model)] + ([("teacher", cfg.teacher)] if RunPlan.of(cfg).teacher else [])
    for group, mcfg in groups:
        for key in ("name_or_path", "tokenizer"):
            value = None if key == "name_or_path" and mcfg.get("archive") else mcfg.get(key)
            if value and str(value).startswith(("/", "~", ".")) and not _is_local(value):
                out.append(f"{group}.{key}={value}")
    return out


def hub_needs(cfg, data_names: List[str]) -> List[str]:
    """`key=hub id` of every model, tokenizer and data set this run would download (not a local path,
    not in the local hub cache)."""
    needs = []
    groups = [("model", cfg.model)] + ([("teacher", cfg.teacher)] if RunPlan.of(cfg).teacher else [])
    for group, mcfg in groups:
        if mcfg.get("archive"):
            continue  # a checkpoint of ours: loaded from disk
        for key, file in (("name_or_path", "config.json"), ("tokenizer", "tokenizer_config.json")):
            value = mcfg.get(key)
            if value and not _is_local(value) and not _hub_cached(str(value), file):
                needs.append(f"{group}.{key}={value}")
    paths = (cfg.get("data") or {}).get("paths") or {}
    for name in data_names:
        src = SOURCES.get(name)
        if src is not None and src.hub and not paths.get(name) and not _hub_cached(src.hub, "README.md", "dataset"):
            needs.append(f"data.paths.{name} (hub data set {src.hub})")
    return needs


def check_hub_access(cfg) -> None:
    """Offline (no route to the hub, or HF_HUB_OFFLINE=1), a run that would download a model or data
    set is refused naming the keys that point at a local copy, before anything loads."""
    missing = missing_local_paths(cfg)
    if missing:
        raise ValueError("no such local directory: " + "; ".join(missing) + ". A model converted from a GGUF "
                         "file (config/model/smollm2_135m.yaml) is written by `python scripts/import_gguf.py` "
                         "(docs/configuration.md#quantised-community-models)")
    needs = hub_needs(cfg, list(cfg.get("datasets") or []))
    if needs and not _hub_reachable():
        raise ValueError("the Hugging Face hub cannot be reached from here, and this run would download: "
                         + "; ".join(needs) + ". Point each key at a local copy (a directory or file), "
                         "e.g. model.name_or_path=/models/Llama-3.2-1B model.tokenizer=/models/Llama-3.2-1B "
                         "data.paths.dpomix=/data/dpo-mix-7k")
