"""A run resolved once: what its loss needs (models, caches, generations), checked before any model
or data set loads, handed to the trainer and to precompute.py.

`RunPlan.of(cfg)` reads the loss's spec (prefkd/loss_spec.py) once; the checks here are the ones
that do not belong to one key's range (train.py's check_types / check_ranges): the run name and
the models, caches and generation files the loss needs. Composing a config is
prefkd/config_compose.py's job, reaching the hub prefkd/hub_access.py's.
"""
import os
from dataclasses import dataclass
from typing import Dict, Optional

from prefkd import checkpoints, cross_tokenizer, generation, loss_spec, models, output_cache
from prefkd.loss_spec import GENERATION_SOURCES, Generation, LossSpec

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
