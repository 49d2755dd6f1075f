"""The pipeline's stages as values: each stage's key, its kind, and its train.py, generate.py or
precompute.py arguments, built from the pipeline's config (pipeline.py composes that config, runs
the stages and evaluates them).

A stage is a `Stage`: a string key, as printed and as the pipeline.yaml record names it
("teacher_sft", "methods/dpo", "generate/<tag>.<split>", "precompute/<name>"), that carries its
kind (`TRAIN`, `METHODS`, `GENERATE`, `PRECOMPUTE`) and what that kind needs (the method; the
cache's kind and the override the methods read it by). The runner dispatches on the kind, never on
the key's spelling. The loss registry must be filled (import losses) before these are built.
"""
import hashlib
import json
import os
import re
from typing import Dict, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

import utils
from prefkd import loss_spec, output_cache

CACHE_KINDS = ("teacher", "reference")
STAGES = ("teacher_sft", "teacher_dpo", "student_sft", "reward_model", "methods")
DATA_OF_STAGE = {"teacher_sft": "sft_data", "student_sft": "sft_data", "teacher_dpo": "pref_data",
                 "reward_model": "pref_data", "methods": "pref_data"}
DATA_KEYS = {"datasets", "path", "train", "test", "options"}
EMPTY_DATA = {"datasets": None, "path": None, "train": None, "test": None, "options": {}}


TRAIN, METHODS, GENERATE, PRECOMPUTE = "train", "methods", "generate", "precompute"


class Stage(str):
    """A stage's key (a str: dict key, printed name) with its kind. `method` names a methods
    stage's method; `cache_kind` (teacher / reference) and `setting` (the methods' override that
    reads the cache, e.g. teacher.cache=<path>) belong to a precompute stage."""

    def __new__(cls, key: str, *args, **kwargs):
        return super().__new__(cls, key)

    def __init__(self, key: str, kind: str, method: Optional[str] = None, cache_kind: Optional[str] = None,
                 setting: Optional[str] = None):
        self.kind, self.method, self.cache_kind, self.setting = kind, method, cache_kind, setting

    @property
    def data_role(self) -> str:
        """sft_data or pref_data: the data a training stage reads."""
        return DATA_OF_STAGE[METHODS if self.kind == METHODS else str(self)]


def training_stage(name: str) -> Stage:
    return Stage(name, TRAIN)


def method_stage(method: str) -> Stage:
    return Stage(f"methods/{method}", METHODS, method=method)


def generation_stage(tag: str, split: str) -> Stage:
    return Stage(f"generate/{tag}.{split}", GENERATE)


def cache_stage(name: str, kind: str, setting: str) -> Stage:
    return Stage(f"precompute/{name}", PRECOMPUTE, cache_kind=kind, setting=setting)


def before_methods(overrides: Dict[str, List[str]], added: Dict[str, List[str]]) -> Dict[str, List[str]]:
    """The stages in running order with `added` inserted just before the methods."""
    first = [k for k in overrides if k.kind != METHODS]
    return {**{k: overrides[k] for k in first}, **added, **{k: v for k, v in overrides.items() if k not in first}}


METHOD_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def variant_overrides(node, what: str) -> List[str]:
    """A variant's train.py overrides, kept as written: a list of key=value strings (a group
    choice such as loss=tvkd and its keys such as loss.potential=margin side by side), or a
    mapping of override keys to values."""
    if isinstance(node, (list, ListConfig)):
        items = [str(x) for x in node]
        bad = [x for x in items if "=" not in x]
        if bad:
            raise ValueError(f"{what}: {bad[0]!r} is not key=value")
        return items
    if isinstance(node, (dict, DictConfig)):
        return [f"{k}={hydra_value(v)}" for k, v in OmegaConf.to_container(node, resolve=True).items()] \
            if isinstance(node, DictConfig) else [f"{k}={hydra_value(v)}" for k, v in node.items()]
    raise ValueError(f"{what} must be a list of key=value overrides, got {node!r}")


def method_overrides(cfg) -> Dict[str, List[str]]:
    """{method: its train.py overrides}, in the order of `methods`. A method is a loss name
    (loss=<name>) or a name in `variants` (its own list of overrides, which names a loss):
    e.g. variants: {tvkd_margin: [loss=tvkd, loss.potential=margin]}."""
    variants = cfg.get("variants") or {}
    out = {}
    for m in cfg.methods:
        m = str(m)
        if not METHOD_NAME.match(m):
            raise ValueError(f"methods: {m!r} is not a valid method name (letters, digits, _ . -)")
        if m in out:
            raise ValueError(f"methods: {m!r} is listed twice")
        if m in variants:
            ov = variant_overrides(variants[m], f"variants.{m}")
            if not any(o.startswith("loss=") for o in ov):
                raise ValueError(f"variants.{m} names no loss: add loss=<name> to its overrides")
        else:
            ov = [f"loss={m}"]
        loss = next(o.split("=", 1)[1] for o in ov if o.startswith("loss="))
        try:
            loss_spec.get_loss(loss)
        except ValueError as e:
            raise ValueError(f"method {m!r}: {e}" + ("" if m in variants else
                             f"; or define it as a variant: 'variants.{m}=[loss=<name>,...]'")) from None
        out[m] = ov
    return out


# ---------------------------------------------------------------- train.py overrides

SAFE_VALUE = re.compile(r"^[A-Za-z0-9_./:+\-~@]+$")


def hydra_value(v) -> str:
    """A config value written as a Hydra override value."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    s = str(v)
    if SAFE_VALUE.match(s) or s.startswith("${"):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def flatten(settings: Dict, prefix: str = "") -> List[str]:
    """{a: 1, data: {local: {path: x}}, b: {}} -> ["a=1", "data.local.path=x"]: Hydra overrides."""
    return [f"{k}={hydra_value(v)}" for k, v in utils.dotted(settings, prefix).items() if v != {}]


def data_overrides(role) -> List[str]:
    """train.py overrides of sft_data / pref_data: datasets, data.local.path/train/test and
    data.<option> for each of `options`. A path or train file means the local files:
    datasets=[local], unless `datasets` already names local (e.g. [dpomix, local] mixes)."""
    r = OmegaConf.to_container(role, resolve=True)
    out = []
    datasets = list(r.get("datasets") or [])
    if (r.get("path") or r.get("train")) and "local" not in datasets:
        datasets = ["local"]
    if datasets:
        out.append(f"datasets={hydra_value(list(datasets))}")
    if r.get("path"):
        out.append(f"data.local.path={hydra_value(os.path.abspath(os.path.expanduser(str(r['path']))))}")
    for k in ("train", "test"):
        if r.get(k):
            out.append(f"data.local.{k}={hydra_value(r[k])}")
    out += flatten(r.get("options") or {}, "data.")
    return out


def merge_overrides(*groups: List[str]) -> List[str]:
    """Later key=value pairs replace earlier ones with the same key (Hydra refuses duplicates)."""
    merged: Dict[str, str] = {}
    for group in groups:
        for o in group:
            merged[o.split("=", 1)[0]] = o
    return list(merged.values())


def stage_dirs(cfg) -> Dict[str, str]:
    """The run directory of each teacher / SFT stage: <out>/<stage>, or the run `reuse` names."""
    reuse = cfg.get("reuse") or {}
    return {name: str(reuse.get(name) or os.path.join(cfg.out, name)) for name in ("teacher_sft", "teacher_dpo",
                                                                                   "student_sft", "reward_model")}


def reward_model_of(cfg) -> Optional[str]:
    """eval.reward_model: None (no RM column), the reward_model stage's run ("train"), or a model."""
    rm = (cfg.get("eval") or {}).get("reward_model")
    return None if rm is None else stage_dirs(cfg)["reward_model"] if rm == "train" else str(rm)


def method_runs(cfg, methods: Optional[List[str]] = None) -> List[str]:
    """The run directory of every seed of each method (all of `methods` by default)."""
    chosen = cfg.methods if methods is None else methods
    return [os.path.join(cfg.out, "methods", f"{m}_seed{s}") for m in chosen for s in range(int(cfg.seeds))]


def start_points(cfg) -> Dict[str, str]:
    """{method: the method whose run of the same seed it starts from} (`start_from`; every other
    method starts from the SFT student). The source must be one of `methods`, listed before it
    (it runs first), and may not itself start from another method's run."""
    starts = {str(k): str(v) for k, v in (cfg.get("start_from") or {}).items()}
    methods = [str(m) for m in cfg.methods]
    for m, src in starts.items():
        if m not in methods:
            continue  # a preset's start point for a method this command does not run
        if src not in methods or methods.index(src) > methods.index(m):
            raise ValueError(f"start_from.{m}={src}: {m} starts from the {src} run of each seed, so {src} must be "
                             f"one of methods, listed before {m} (methods={methods})")
        if src in starts:
            raise ValueError(f"start_from.{m}={src}: {src} itself starts from {starts[src]}; chain one step only")
    return {m: src for m, src in starts.items() if m in methods}


def stage_overrides(cfg, passthrough: List[str]) -> Dict[str, List[str]]:
    """The train.py arguments of every stage, in running order: common, the pass-through
    arguments, the stage's data (sft_data / pref_data), the stage's settings, then (for a
    method) the method's own overrides, then the chaining keys. Each method is its own
    multirun over the seeds, under the key `methods/<method>`."""
    d = stage_dirs(cfg)
    base = ["resume=true", f"runs_dir={cfg.out}", "seed=0"]
    fixed = {
        "teacher_sft": [f"model={cfg.teacher}", "exp_name=teacher_sft"],
        "teacher_dpo": [f"model={cfg.teacher}", "exp_name=teacher_dpo", f"model.archive={d['teacher_sft']}"],
        "student_sft": [f"model={cfg.model}", "exp_name=student_sft"],
    }
    if (cfg.get("eval") or {}).get("reward_model") == "train":  # a Bradley-Terry RM from the SFT student
        fixed["reward_model"] = [f"model={cfg.model}", "exp_name=reward_model", "loss=rm",
                                 f"model.archive={d['student_sft']}", "padding_free=false",  # a scalar head
                                 "sample_during_eval=false"]  # refuses both (a global setting stays the others')
    # wandb: one group per pipeline, the stage as the job type (prefkd/tracking.py)
    group = f"wandb.group={hydra_value(str(cfg.out))}"
    fixed = {s: ov + [group, f"wandb.job_type={s}", f"wandb.method={s}"] for s, ov in fixed.items()}
    common = flatten(OmegaConf.to_container(cfg.common, resolve=True))
    settings = lambda s: flatten(OmegaConf.to_container(cfg.stages[s], resolve=True))  # noqa: E731
    reused = set(cfg.get("reuse") or {})  # trained by another group (or another command): not run here
    out = {training_stage(s): merge_overrides(common, passthrough, base, data_overrides(cfg[DATA_OF_STAGE[s]]),
                                              settings(s), fixed[s]) for s in fixed if s not in reused}
    seeds = "seed=" + ",".join(str(k) for k in range(int(cfg.seeds)))
    starts = start_points(cfg)
    for m, own in method_overrides(cfg).items():
        start = os.path.join(cfg.out, "methods", f"{starts[m]}_seed${{seed}}") if m in starts else d["student_sft"]
        chain = [f"model={cfg.model}", f"model.archive={start}", f"teacher={cfg.teacher}",
                 f"teacher.archive={d['teacher_dpo']}", f"teacher.reference_archive={d['teacher_sft']}",
                 f"runs_dir={os.path.join(cfg.out, 'methods')}", seeds,
                 f"exp_name={m}_seed${{seed}}", group, "wandb.job_type=method", f"wandb.method={m}"]
        out[method_stage(m)] = merge_overrides(common, passthrough, base, data_overrides(cfg.pref_data),
                                              settings("methods"), own, chain)
    return out


def generation_stages(cfg, overrides: Dict[str, List[str]], configs: Dict) -> Dict[str, List[str]]:
    """The stages in running order with a generation stage before the methods for every model a
    method's loss generates with (seqkd: the DPO teacher; adpa: the SFT student). generate.py
    runs once per generating model and decoding, over the train and test splits of the
    preference data, and is shared by every seed and method that needs it; those methods read
    the files (`generations=`). A generation stage's key is `generate/<name>.<split>`."""
    d = stage_dirs(cfg)
    gens: Dict[str, List[str]] = {}
    for stage, c in configs.items():
        if stage.kind != METHODS or c.get("generations"):
            continue
        gen = loss_spec.get_loss(c.loss.name).generation_need(c.loss)
        if gen is None or not gen.frozen or gen.num_beams != 1:
            continue  # on-policy sampling (gkd) or beam search stays in the run
        source = d["teacher_dpo"] if gen.source == "teacher" else d["student_sft"]
        max_new = int(gen.max_new_tokens or (c.max_length - c.max_prompt_length))
        decoding = (["do_sample=false"] if gen.temperature is None else
                    ["do_sample=true", f"temperature={float(gen.temperature)}", "top_p=1.0"])
        tag = os.path.basename(source) + ("_greedy" if gen.temperature is None else f"_t{float(gen.temperature):g}") \
            + f"_n{max_new}"
        files = []
        for split in ("train", "test"):
            path = os.path.join(cfg.out, "generations", f"{tag}.{split}.jsonl")
            files.append(path)
            gens[generation_stage(tag, split)] = (
                [f"checkpoint={source}", f"out={path}", f"split={split}", f"datasets={hydra_value(list(c.datasets))}",
                 f"max_new_tokens={max_new}", f"max_prompt_length={c.max_prompt_length}",
                 f"truncation_mode={c.truncation_mode}"] + decoding
                + flatten(OmegaConf.to_container(c.data, resolve=True), "data."))
        overrides[stage] = overrides[stage] + [f"generations={hydra_value(files)}"]
    return before_methods(overrides, gens)


def cache_stages(cfg, overrides: Dict[str, List[str]], configs: Dict) -> Dict[str, List[str]]:
    """The stages in running order with a precompute stage before the methods for every teacher
    and reference cache the methods can read (prefkd/output_cache.py): the DPO teacher's features for
    a teacher-based loss that can read them from a cache (tvkd, ddpo, top-K KD; not full-vocabulary
    KD or losses that generate), the SFT student's log-probs for the losses that read only the
    reference's log-probs (dpo, wpo, tvkd...; not tdpo). A cache covers every seed's examples,
    so it is computed once for all seeds (more seeds later: it is recomputed); methods whose
    cache would hold the same content share it (one reference cache for all of them, one
    teacher cache per loss and feature setting). caches.teacher / caches.reference = false
    keep the live models. A stage's key is `precompute/<name>`; the methods read the caches
    through teacher.cache / reference.cache."""
    stages: Dict[str, List[str]] = {}
    for stage, c in configs.items():
        if stage.kind != METHODS:
            continue
        spec = loss_spec.get_loss(c.loss.name)
        # what the examples and their rows depend on (the seeds are not: a cache grows to more seeds)
        plan = {k: c.get(k) for k in ("batch_size", "n_examples", "n_epochs", "n_eval_examples", "eval_batch_size",
                                      "datasets", "max_length", "max_prompt_length", "truncation_mode")}
        plan.update(data=OmegaConf.to_container(c.data, resolve=True), rows=[spec.pairwise, spec.sft_targets])
        add = []
        for kind in CACHE_KINDS:
            what = cache_content(cfg, c, kind)
            if what is None:
                continue
            digest = hashlib.sha256(json.dumps({**plan, **what}, sort_keys=True, default=str).encode()).hexdigest()
            name = (f"teacher_{c.loss.name}_" if kind == output_cache.TEACHER else "reference_") + digest[:8]
            setting = f"{output_cache.CONFIG_KEY[kind]}={os.path.join(cfg.out, 'caches', name)}"
            stages.setdefault(cache_stage(name, kind, setting), [kind] + overrides[stage] + [setting])
            add.append(setting)
        overrides[stage] = overrides[stage] + add
    return before_methods(overrides, stages)


def cache_content(cfg, c, kind: str) -> Optional[Dict]:
    """What a `kind` cache for the method run configured by `c` holds besides its examples (the
    loss and feature settings and the teacher, or the reference model), or None where that run
    reads no such cache (caches.<kind>=false, a cache it names itself, a loss or setting that
    needs the live model)."""
    if not cfg.caches[kind] or kind in output_cache.configured(c):
        return None
    spec = loss_spec.get_loss(c.loss.name)
    if kind == output_cache.TEACHER:
        try:
            if not spec.teacher_need(c.loss) or output_cache.teacher_cache_problem(c):
                return None
        except ValueError:  # a setting the loss refuses: the run itself says so, the others go on
            return None
        return {"loss": c.loss.name, "features": output_cache.feature_settings(c.loss),
                "teacher": OmegaConf.to_container(c.teacher)}
    if spec.reference_need(c.loss) != "logps" or output_cache.reference_cache_problem(c):
        return None
    return {"model": OmegaConf.to_container(c.model)}
