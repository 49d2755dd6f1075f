"""The main job: the paper's staged protocol in one command, then evaluation and the table.

    python pipeline.py                          # embedded default on the CPU, 1 seed
    python pipeline.py seeds=3                  # the full table (mean and std over 3 seeds)
    python pipeline.py eval.reward_model=train  # + the RM columns: a reward model trained on pref_data
    python pipeline.py methods=[dpo,tvkd] out=runs/small stages.methods.lr=3e-4
    python pipeline.py sft_data.path=task/sft_train.jsonl pref_data.path=task data.scorer=task/score.py:score
    python pipeline.py preset=paper             # Llama-3.1-8B -> Llama-3.2-1B, Deita + DPO-MIX-7K, FSDP
    python pipeline.py preset=paper model=llama3b teacher=llama8b seeds=3

Stages (config/pipeline/<preset>.yaml), each an ordinary train.py run under <out>/:

    teacher_sft  -> teacher_dpo  (model=<teacher>)
    student_sft                  (model=<model>)
    reward_model                 (loss=rm from student_sft; only with eval.reward_model=train)
    generate/<model>...          (generate.py: the frozen answers seqkd / adpa train on)
    precompute/<cache>           (precompute.py: the DPO teacher's features and the SFT
                                  student's reference log-probs, once for every seed; caches.*)
    methods/<loss>_seed<k>       (one Hydra multirun over methods x seeds, from student_sft,
                                  with teacher=<teacher> teacher.archive=<out>/teacher_dpo)

The SFT stages (teacher_sft, student_sft) train on `sft_data`, the preference stages
(teacher_dpo, methods) on `pref_data`; every model is evaluated on the held-out split of
`pref_data`. Before any stage runs, both are loaded and checked: bad rows, a missing file,
a bad data.scorer, or SFT and preference data formatted differently (plain text vs chat
template) stop the pipeline with an error.

Then `evaluate.py` on every checkpoint (held-out task score, preference accuracy and
margin; generations in judge formats) and `report.py` (results.md, results.csv,
results.png). Every stage runs with resume=true: re-running the command skips stages that
are complete and resumes an interrupted one; evaluations are cached next to their checkpoint.

Arguments are Hydra-style key=value. A preset is a Hydra config (config/pipeline/<preset>.yaml,
composed with its defaults list); its keys (out, seeds, methods, model, teacher, preset,
common, stages.*, sft_data.*, pref_data.*, eval.*, caches.*) configure the pipeline; a stage's
settings change one key at a time (stages.teacher_sft.lr=3e-4), or all at once with a list
(stages.teacher_sft=[loss=sft,lr=3e-4]). A key that is neither the preset's nor train.py's is
refused. Any other key=value is passed to every train.py
stage (e.g. trainer=FSDPTrainer, data.scorer=mytask:score, max_length=256); the stage's own
settings, then the pipeline's chaining keys, are applied after it.
"""
import json
import os
import re
import sys
import time
from typing import Dict, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

import utils
from prefkd import checkpoints, stage_process
from prefkd import tokenizer_facts
from prefkd.data import rows as data_rows
from prefkd import loss_spec
import losses  # noqa: F401  (registers every loss: prefkd.loss_spec.LOSSES)
from prefkd.data import loading as data_loading

CACHE_KINDS = ("teacher", "reference")
STAGES = ("teacher_sft", "teacher_dpo", "student_sft", "reward_model", "methods")
DATA_OF_STAGE = {"teacher_sft": "sft_data", "student_sft": "sft_data", "teacher_dpo": "pref_data",
                 "reward_model": "pref_data", "methods": "pref_data"}
DATA_KEYS = {"datasets", "path", "train", "test", "options"}
EMPTY_DATA = {"datasets": None, "path": None, "train": None, "test": None, "options": {}}


# ---------------------------------------------------------------- arguments

def _pairs_to_dict(items, what: str) -> Dict:
    """A list of 'key=value' strings (the older stage form) as a nested dict."""
    out = OmegaConf.create({})
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"{what}: {item!r} is not key=value")
        out.merge_with(OmegaConf.from_dotlist([item.lstrip("+")]))
    return OmegaConf.to_container(out)


def _as_dict(node, what: str) -> Dict:
    if node is None:
        return {}
    if isinstance(node, (list, ListConfig)):
        return _pairs_to_dict(list(node), what)
    if isinstance(node, (dict, DictConfig)):
        return OmegaConf.to_container(node) if isinstance(node, DictConfig) else dict(node)
    raise ValueError(f"{what} must be key: value settings, got {node!r}")


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


PRESETS = os.path.join(utils.REPO_DIR, "config", "pipeline")
# sections whose keys are the user's own (a stage setting, a method, a data option): a new key
# there needs no `+`, as in train.py's loss.* keys
OPEN_SECTIONS = ("stages", "common", "variants", "start_from", "labels", "groups", "reuse", "sft_data.options",
                 "pref_data.options")


def _split_list(value: str) -> List[str]:
    """The top-level elements of '[a=1,b=[x,y]]': ['a=1', 'b=[x,y]'] (commas inside brackets or
    quotes do not split)."""
    items, depth, quote, cur = [], 0, None, ""
    for ch in value.strip()[1:-1]:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
            continue
        cur += ch
    return items + ([cur.strip()] if cur.strip() else [])


def hydra_overrides(arg: str) -> List[str]:
    """A pipeline argument as Hydra overrides. A list of train.py overrides as a method
    (variants.x=[loss=tvkd,loss.alpha=1.0]) is a list of quoted strings to Hydra; as a whole stage
    or `common` (stages.methods=[lr=1e-4]) it replaces that section. A key in an open section
    may be new (`++`)."""
    key, value = arg.split("=", 1)
    key = key.lstrip("+")
    listed = value.startswith("[") and value.endswith("]") and "=" in value
    if listed and (key == "common" or (key.startswith("stages.") and key.count(".") == 1)):
        return [f"~{key}", f"+{key}={hydra_value(_pairs_to_dict(_split_list(value), key))}"]
    if listed:
        value = "[" + ",".join("'" + x.replace("\\", "\\\\").replace("'", "\\'") + "'"
                               for x in _split_list(value)) + "]"
    open_key = any(key == sec or key.startswith(sec + ".") for sec in OPEN_SECTIONS)
    return [("++" if open_key else "") + f"{key}={value}"]


def compose_preset(preset: str, overrides: List[str]) -> DictConfig:
    """config/pipeline/<preset>.yaml (its defaults list included) with the pipeline's overrides,
    composed by Hydra; a bad key or value is a ValueError naming it."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    if not os.path.exists(os.path.join(PRESETS, f"{preset}.yaml")):
        known = sorted(f[:-5] for f in os.listdir(PRESETS) if f.endswith(".yaml"))
        raise ValueError(f"preset={preset!r}: no config/pipeline/{preset}.yaml; known presets: {known}")
    try:
        with initialize_config_dir(config_dir=PRESETS, version_base="1.3"):
            cfg = compose(config_name=preset, overrides=[h for o in overrides for h in hydra_overrides(o)])
    except HydraException as e:
        raise ValueError(f"preset={preset}: {e}") from None
    OmegaConf.set_struct(cfg, False)
    return cfg


def split_arguments(argv: List[str], preset_keys, train_keys) -> tuple:
    """(the pipeline's own arguments, the train.py arguments passed to every stage). A key that
    is neither is refused naming both key sets."""
    import difflib
    own, passthrough = [], []
    for a in argv:
        if "=" not in a:
            raise ValueError(f"argument {a!r} is not key=value")
        key = a.split("=", 1)[0].lstrip("+~")
        top, parts = key.split(".")[0], key.split(".")
        if key == "preset":
            continue
        if top not in preset_keys:
            if top not in train_keys and not a.startswith("+"):  # +key=value: a key the user adds on purpose
                near = difflib.get_close_matches(top, sorted(preset_keys | train_keys), n=1)
                raise ValueError(f"{key}: {top!r} is neither a pipeline key {sorted(preset_keys)} nor a train.py "
                                 "key (config/config.yaml)" + (f"; did you mean {near[0]!r}?" if near else ""))
            passthrough.append(a)
            continue
        if top == "stages" and (len(parts) < 2 or parts[1] not in STAGES):
            raise ValueError(f"{key}: unknown stage; the stages are {list(STAGES)} (e.g. stages.teacher_sft.lr=3e-4)")
        if top in ("sft_data", "pref_data") and len(parts) > 1 and parts[1] not in DATA_KEYS:
            raise ValueError(f"{key}: unknown key; {top} has {sorted(DATA_KEYS)} (options holds any data.* key)")
        own.append(a)
    return own, passthrough


def parse_args(argv: List[str]):
    """Split key=value arguments into the pipeline's config (the preset composed by Hydra with
    its overrides) and pass-through train.py overrides."""
    from prefkd import run_plan
    preset = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("preset=")), "embedded")
    preset_keys = set(compose_preset(preset, []).keys()) | {"preset"}
    train_keys = set(run_plan.compose([]).keys()) | {"hydra"}
    own, passthrough = split_arguments(argv, preset_keys, train_keys)
    cfg = compose_preset(preset, own)
    for role in ("sft_data", "pref_data"):
        cfg[role] = OmegaConf.merge(EMPTY_DATA, cfg.get(role) or {})
    cfg.common = _as_dict(cfg.get("common"), "common")
    cfg.stages = {s: _as_dict((cfg.get("stages") or {}).get(s), f"stages.{s}") for s in STAGES}
    if int(cfg.seeds) < 1:
        raise ValueError(f"seeds={cfg.seeds} must be >= 1")
    cfg.caches = OmegaConf.merge({k: True for k in CACHE_KINDS}, _as_dict(cfg.get("caches"), "caches"))
    for k, v in cfg.caches.items():
        if k not in CACHE_KINDS or not isinstance(v, bool):
            raise ValueError(f"caches.{k}={v}: caches has the keys {list(CACHE_KINDS)}, each true or false")
    method_overrides(cfg)  # every method resolves to a known loss
    cfg.out = os.path.abspath(cfg.out)
    for role in ("sft_data", "pref_data"):
        given = [o for o in passthrough if o.split("=", 1)[0].lstrip("+") in ("datasets", "data.local.path")]
        if given and (cfg[role].datasets or cfg[role].path or cfg[role].train):
            stages = [s for s in STAGES if DATA_OF_STAGE[s] == role]
            print(f"note: {role} sets the data of {' and '.join(stages)}: {' '.join(given)} is overridden there",
                  flush=True)
    return cfg, passthrough


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


def method_runs(cfg) -> List[str]:
    return [os.path.join(cfg.out, "methods", f"{m}_seed{s}") for m in cfg.methods for s in range(int(cfg.seeds))]


def stage_of(key: str) -> str:
    """The stage of an overrides key: `methods/<method>` belongs to the methods stage."""
    return key.split("/", 1)[0]


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
    out = {s: merge_overrides(common, passthrough, base, data_overrides(cfg[DATA_OF_STAGE[s]]), settings(s), fixed[s])
           for s in fixed if s not in reused}
    seeds = "seed=" + ",".join(str(k) for k in range(int(cfg.seeds)))
    starts = start_points(cfg)
    for m, own in method_overrides(cfg).items():
        start = os.path.join(cfg.out, "methods", f"{starts[m]}_seed${{seed}}") if m in starts else d["student_sft"]
        chain = [f"model={cfg.model}", f"model.archive={start}", f"teacher={cfg.teacher}",
                 f"teacher.archive={d['teacher_dpo']}", f"teacher.reference_archive={d['teacher_sft']}",
                 f"runs_dir={os.path.join(cfg.out, 'methods')}", seeds,
                 f"exp_name={m}_seed${{seed}}", group, "wandb.job_type=method", f"wandb.method={m}"]
        out[f"methods/{m}"] = merge_overrides(common, passthrough, base, data_overrides(cfg.pref_data),
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
        if stage_of(stage) != "methods" or c.get("generations"):
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
            gens[f"generate/{tag}.{split}"] = (
                [f"checkpoint={source}", f"out={path}", f"split={split}", f"datasets={hydra_value(list(c.datasets))}",
                 f"max_new_tokens={max_new}", f"max_prompt_length={c.max_prompt_length}",
                 f"truncation_mode={c.truncation_mode}"] + decoding
                + flatten(OmegaConf.to_container(c.data, resolve=True), "data."))
        overrides[stage] = overrides[stage] + [f"generations={hydra_value(files)}"]
    if not gens:
        return overrides
    first = [k for k in overrides if stage_of(k) != "methods"]
    return {**{k: overrides[k] for k in first}, **gens, **{k: v for k, v in overrides.items() if k not in first}}


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
    import hashlib
    from prefkd import output_cache
    stages: Dict[str, List[str]] = {}
    for stage, c in configs.items():
        if stage_of(stage) != "methods":
            continue
        spec, named = loss_spec.get_loss(c.loss.name), output_cache.configured(c)
        # what the examples and their rows depend on (the seeds are not: a cache grows to more seeds)
        plan = {k: c.get(k) for k in ("batch_size", "n_examples", "n_epochs", "n_eval_examples", "eval_batch_size",
                                      "datasets", "max_length", "max_prompt_length", "truncation_mode")}
        plan.update(data=OmegaConf.to_container(c.data, resolve=True), rows=[spec.pairwise, spec.sft_targets])
        add = []
        for kind in CACHE_KINDS:
            if not cfg.caches[kind] or kind in named:
                continue
            if kind == output_cache.TEACHER:
                try:
                    if not spec.teacher_need(c.loss) or output_cache.teacher_cache_problem(c):
                        continue
                except ValueError:  # a setting the loss refuses: the run itself says so, the others go on
                    continue
                what = {"loss": c.loss.name, "features": output_cache.feature_settings(c.loss),
                        "teacher": OmegaConf.to_container(c.teacher)}
            else:
                if spec.reference_need(c.loss) != "logps" or output_cache.reference_cache_problem(c):
                    continue
                what = {"model": OmegaConf.to_container(c.model)}
            digest = hashlib.sha256(json.dumps({**plan, **what}, sort_keys=True, default=str).encode()).hexdigest()
            name = (f"teacher_{c.loss.name}_" if kind == output_cache.TEACHER else "reference_") + digest[:8]
            path = os.path.join(cfg.out, "caches", name)
            stages.setdefault(f"precompute/{name}", [kind] + overrides[stage] + [
                f"{output_cache.CONFIG_KEY[kind]}={path}"])
            add.append(f"{output_cache.CONFIG_KEY[kind]}={path}")
        overrides[stage] = overrides[stage] + add
    if not stages:
        return overrides
    first = [k for k in overrides if stage_of(k) != "methods"]
    return {**{k: overrides[k] for k in first}, **stages, **{k: v for k, v in overrides.items() if k not in first}}


# ---------------------------------------------------------------- checks before training

def compose_stage(overrides: List[str]):
    """The config train.py will see for these arguments (first method / seed of a multirun)."""
    from prefkd import run_plan
    return run_plan.compose([re.sub(r"^(loss|seed)=([^,]*),.*$", r"\1=\2", o) for o in overrides])


def describe_role(c) -> str:
    parts = []
    for name in c.datasets:
        src = data_loading.describe_split(name, "train", c.get("data"))["source"]
        parts.append(f"{name} ({src if isinstance(src, str) else ', '.join(os.path.basename(f) for f in src)})")
    return ", ".join(parts)


def preflight(cfg, overrides: Dict[str, List[str]]) -> Dict:
    """Before any stage trains: load and validate every stage's data, refuse SFT and
    preference data formatted differently, and load and probe the scorer. Raises ValueError
    (DataError, ScorerError) naming the file, row or key."""
    from prefkd import data_checks
    import train as train_py
    configs = {s: compose_stage(ov) for s, ov in overrides.items()}
    for stage, c in list(configs.items()):
        try:  # every stage's and every method's settings, before the first one trains
            train_py.validate_config(c, check_archives=False)
        except ValueError as e:
            if not (cfg.get("skip_refused") and stage_of(stage) == "methods"):
                raise ValueError(f"stage {stage}: {e}") from None
            # skip_refused (a study over settings some methods cannot run in): the row says why
            method = stage.split("/", 1)[1]
            print(f"pipeline: {method} is not run here: {e}", flush=True)
            cfg.absent = {**(cfg.get("absent") or {}), method: str(e)}
            cfg.methods = [m for m in cfg.methods if m != method]
            del configs[stage], overrides[stage]
    formats: Dict[str, Dict] = {"sft_data": {}, "pref_data": {}}
    for stage, c in configs.items():
        names, options = list(c.datasets), c.get("data")
        need_pairs = not loss_spec.get_loss(c.loss.name).sft_targets
        data_loading.check_datasets(names, tokenizer_facts.get_tokenizer(c.model.tokenizer), options, need_pairs=need_pairs)
        f = data_checks.dataset_formats(names, options)
        data_checks.check_formats(f, options)
        formats[DATA_OF_STAGE[stage_of(stage)]].update(f)
    sft = configs.get("teacher_sft") or configs.get("student_sft") or next(iter(configs.values()))
    pref = configs.get("teacher_dpo") or next(c for s, c in configs.items() if DATA_OF_STAGE[stage_of(s)] == "pref_data")
    kinds = {role: data_checks.role_format(f) for role, f in formats.items() if f}
    if len(kinds) == 2 and kinds["sft_data"] != kinds["pref_data"]:
        msg = (f"the SFT data ({describe_role(sft)}) is {data_checks.FORMAT_NAMES[kinds['sft_data']]}, but the "
               f"preference data ({describe_role(pref)}) is {data_checks.FORMAT_NAMES[kinds['pref_data']]}: the "
               "models would be fine-tuned on one prompt format, then trained and evaluated on another. Give both "
               "the same format (e.g. SFT rows as {\"prompt\": [{\"role\": \"user\", ...}], \"completion\": "
               "[{\"role\": \"assistant\", ...}]}), or pass data.allow_mixed_formats=true if this is intended")
        if not all(bool(c.data.get("allow_mixed_formats")) for c in configs.values()):
            raise data_rows.DataError(msg)
        print(f"WARNING: {msg}", flush=True)
    lines = []
    for c in configs.values():
        lines += [x for x in data_checks.probe_scorers(list(c.datasets), c.get("data"))[1] if x not in lines]
    for line in lines:
        print(f"pipeline: {line}", flush=True)
    return configs


# ---------------------------------------------------------------- stages

def train(overrides: List[str], multirun: bool = False) -> int:
    cmd = [sys.executable, os.path.join(utils.REPO_DIR, "train.py")] + (["--multirun"] if multirun else []) + overrides
    print("\n$ " + " ".join(cmd), flush=True)
    # the working directory stays the caller's: relative data paths and a scorer module in it resolve as typed
    return stage_process.run(cmd)


def train_in_process(overrides: List[str], multirun: bool = False):
    """The same runs in this process (in_process=true): no interpreter start-up per stage, for
    tiny runs and tests. A multirun's comma lists (loss=a,b seed=0,1) become one run each."""
    import itertools
    import train as train_py
    sweep = {o.split("=", 1)[0]: o.split("=", 1)[1].split(",") for o in overrides
             if multirun and o.split("=", 1)[0] in ("loss", "seed")}
    failures = 0
    for values in itertools.product(*sweep.values()):
        chosen = dict(zip(sweep, values))
        run = [f"{k}={chosen[k]}" if k in chosen else o for o in overrides for k in [o.split("=", 1)[0]]]
        print("\n$ train.py " + " ".join(run), flush=True)
        cfg = compose_stage(run)
        if cfg.exp_name is not None:
            cfg.exp_name = str(cfg.exp_name)  # resolve ${loss.name}_seed${seed} once
        try:
            train_py.run(cfg, run)
        except utils.TrainingStopped as e:  # a signal, not a failed method: the pipeline stops (130)
            raise stage_process.StageInterrupted(f"{e}; run the same command again to continue") from e
        except (ValueError, utils.RunError) as e:
            if not multirun:
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            failures += 1
    return 1 if failures else 0


def script_stage(script: str, args: List[str], in_process: bool) -> int:
    """One run of generate.py (a generation stage: an existing complete file is kept) or
    precompute.py (a cache stage, with --if-needed: a cache with the same key and examples is kept)."""
    if in_process:
        import importlib
        print(f"\n$ {script}.py " + " ".join(args), flush=True)
        return importlib.import_module(script).main(args)
    cmd = [sys.executable, os.path.join(utils.REPO_DIR, f"{script}.py")] + args
    print("\n$ " + " ".join(cmd), flush=True)
    return stage_process.run(cmd)


def run_stages(cfg, overrides: Dict[str, List[str]]) -> None:
    """The stages in order. A failed teacher, SFT, generation or cache stage stops the pipeline
    (everything after it needs it); a failed method does not: the others are still evaluated
    and reported."""
    for stage, ov in overrides.items():
        if stage_of(stage) == "generate":
            if script_stage("generate", ov, bool(cfg.get("in_process"))):
                raise utils.RunError(f"stage {stage} failed; fix the cause and run the same command again "
                                     "(a generation resumes where it stopped)")
            continue
        if stage_of(stage) == "precompute":
            readers = [key for key, o in overrides.items()
                       if stage_of(key) == "methods" and ov[-1] in o]
            runs = [os.path.join(cfg.out, "methods", f"{m.split('/', 1)[1]}_seed{k}") for m in readers
                    for k in range(int(cfg.seeds))]
            if all(os.path.exists(os.path.join(run, "DONE")) for run in runs):
                print(f"\nstage {stage}: every run that reads it is complete (DONE); not computed", flush=True)
                for key in readers:  # so they are not checked against a cache that was never written
                    overrides[key] = [o for o in overrides[key] if o != ov[-1]]
                continue
            if script_stage("precompute", ov + ["--if-needed"], bool(cfg.get("in_process"))):
                raise utils.RunError(f"stage {stage} failed; fix the cause and run the same command again, or "
                                     f"pass caches.{ov[0]}=false to run the methods with the live {ov[0]} model")
            continue
        method = stage_of(stage) == "methods"
        rc = (train_in_process if cfg.get("in_process") else train)(ov, multirun=method)
        if rc and not method:
            raise utils.RunError(f"stage {stage} failed (exit code {rc}); fix the cause and run the same command "
                                 "again: complete stages are skipped, an interrupted one resumes")


def failed_methods(cfg) -> List[str]:
    return [run for run in method_runs(cfg) if not os.path.exists(os.path.join(run, "DONE"))]


def evaluate_all(cfg, passthrough=None) -> None:
    """Evaluate every model once on the held-out split of the preference data (pref_data, as
    the teacher_dpo stage resolved it; eval.datasets replaces its data sets), each with its
    own lengths. Cached as <run>/eval.json, redone if the run or the settings changed (the reward
    model's files included). Generations are written beside it: generations.jsonl,
    alpaca_eval.json, mt_bench.jsonl. With eval.reward_model, every model's answers are scored by
    it, with the win rate against the SFT student's answers (evaluated first)."""
    import evaluate
    from prefkd import tracking
    d = stage_dirs(cfg)
    jobs = [(d["student_sft"], None), (d["teacher_sft"], None), (d["teacher_dpo"], d["teacher_sft"])]
    jobs += [(run, d["student_sft"]) for run in method_runs(cfg)]
    pref_cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(d["teacher_dpo"], "config.yaml")), resolve=True)
    names = list(cfg.eval.get("datasets") or pref_cfg["datasets"])
    n = cfg.eval.get("n")
    # the test split is never flipped (data.flip_fraction): a noisy and a clean study share evaluations
    held_out = {k: v for k, v in pref_cfg["data"].items() if k not in ("flip_fraction", "flip_seed")}
    settings = {"datasets": names, "data": held_out, "n": n, "batch_size": int(cfg.eval.batch_size),
                "beta": float(cfg.eval.beta), "max_new_tokens": int(cfg.eval.max_new_tokens)}
    rm = reward_model_of(cfg)
    if rm is not None:
        settings["reward_model"] = reward_model_key(rm)
    device, dtype = evaluate.evaluation_device()
    if device.type != "cpu":  # GPU bf16 numbers are not mixed with CPU fp32 ones (the CPU's key is as it was)
        settings["device"] = f"{device.type} {dtype}"
    wandb_off = (tracking.mode_now(None) == "disabled" or "wandb.mode=disabled" in (passthrough or [])
                 or ((cfg.get("common") or {}).get("wandb") or {}).get("mode") == "disabled")
    key = json.dumps(settings, sort_keys=True)
    for run, reference in jobs:
        out = os.path.join(run, "eval.json")
        done = os.path.join(run, "DONE")
        if not os.path.exists(done):
            print(f"not evaluated: {run} did not finish (see its error above)", flush=True)
            continue
        baseline = os.path.join(d["student_sft"], "generations.jsonl") if rm and run != d["student_sft"] else None
        # redone when the run, the settings or (for the win rate) the SFT student's answers changed
        inputs = [done] + ([baseline] if baseline and os.path.exists(baseline) else [])
        if os.path.exists(out) and os.path.getmtime(out) >= max(map(os.path.getmtime, inputs)):
            with open(out) as f:
                if json.load(f).get("settings_key") == key:
                    continue
        t0 = time.time()
        result = evaluate.evaluate_checkpoint(
            run, reference, names, n_examples=None if n is None else int(n), batch_size=settings["batch_size"],
            beta=settings["beta"], max_new_tokens=settings["max_new_tokens"], options=pref_cfg["data"],
            generations=os.path.join(run, "generations.jsonl"), alpaca_eval=os.path.join(run, "alpaca_eval.json"),
            mt_bench=os.path.join(run, "mt_bench.jsonl"), reward_model=rm,
            reward_baseline=baseline if baseline and os.path.exists(baseline) else None,
            log=lambda msg: print(msg, flush=True))
        result.update({"reference": reference, "seconds": round(time.time() - t0, 1), "settings_key": key})
        utils.atomic_write_json(out, result)
        if not wandb_off:
            tracking.publish_evaluation(run, result)  # into the summary of the run's wandb run, if it has one
        print(f"evaluated {run}: " + json.dumps({k: v for k, v in result.items() if k != "settings_key"}), flush=True)


def reward_model_key(rm: str) -> Dict[str, str]:
    """What the evaluations' cache key holds of the reward model: its name and, for a local one, a
    fingerprint of its weights (a retrained reward model is noticed). Its held-out accuracy, when it
    is a run of this pipeline, is printed."""
    from prefkd import checkpoints, output_cache
    if not os.path.exists(rm):
        return {"name": rm}
    path = checkpoints.resolve_checkpoint(rm)
    metrics = os.path.join(rm, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics) as f:
            evals = [r for r in map(json.loads, f) if "rewards_eval/accuracies" in r]
        if evals:
            print(f"reward model {rm}: held-out accuracy {evals[-1]['rewards_eval/accuracies']:.4f}, mean margin "
                  f"{evals[-1]['rewards_eval/margins']:.4f} ({evals[-1]['examples']} examples)", flush=True)
    return {"name": rm, "fingerprint": output_cache.archive_fingerprint(path)}


def group_configs(cfg) -> List[DictConfig]:
    """The pipelines of a study (`groups`: one column group each, e.g. a teacher-student pair or a
    label-noise fraction): the preset's config with each group's settings merged in, in order;
    a group's `reuse.<stage>` names another group (its run of that stage) or a run directory.
    Without groups, [cfg]."""
    for stage, path in dict(cfg.get("reuse") or {}).items():
        checkpoints.check_finished_run(f"reuse.{stage}", path)  # a reused stage: before anything trains
    if not cfg.get("groups"):
        return [cfg]
    groups = OmegaConf.to_container(cfg.groups, resolve=True)
    base = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "groups"])
    out = []
    for name, settings in groups.items():
        settings = dict(settings or {})
        unknown = sorted(set(settings) - set(base.keys()) - {"reuse"})
        if unknown:
            raise ValueError(f"groups.{name}.{unknown[0]}: not a pipeline key ({sorted(base.keys())})")
        g = OmegaConf.merge(base, settings)
        g.group, g.out = name, os.path.abspath(str(g.out))
        for stage, source in dict(settings.get("reuse") or {}).items():
            if stage not in ("teacher_sft", "teacher_dpo", "student_sft"):
                raise ValueError(f"groups.{name}.reuse.{stage}: reuse names teacher_sft, teacher_dpo or student_sft")
            earlier = {x.group: x for x in out}
            if source not in earlier:
                checkpoints.check_finished_run(f"groups.{name}.reuse.{stage}", source)
            g.reuse[stage] = stage_dirs(earlier[source])[stage] if source in earlier else os.path.abspath(source)
        method_overrides(g)
        out.append(g)
    return out


def prepare(cfg, passthrough: List[str]) -> Dict[str, List[str]]:
    """Every stage's train.py arguments, checked (config and data) before anything trains."""
    overrides = stage_overrides(cfg, passthrough)
    rm = reward_model_of(cfg)
    if rm is not None and cfg.eval.reward_model != "train":  # a named reward model: readable before anything trains
        from prefkd import reward_scoring
        try:
            reward_scoring.check(rm)
        except ValueError as e:
            raise ValueError(f"eval.reward_model: {e}") from None
    configs = preflight(cfg, overrides)
    return cache_stages(cfg, generation_stages(cfg, overrides, configs), configs)


def execute(cfg, overrides: Dict[str, List[str]], argv: List[str]) -> int:
    """Run, evaluate and report one pipeline; 0, or 1 if a stage or a method failed."""
    if os.environ.get("WANDB_MODE") and not any("wandb.mode" in a for a in argv):
        # wandb's convention: the environment's mode wins over a preset's
        cfg.common.get("wandb", {}).pop("mode", None)
    t0 = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    utils.atomic_write_text(os.path.join(cfg.out, "pipeline.yaml"), OmegaConf.to_yaml(cfg) +
                            "# train.py arguments of each stage:\n" +
                            "".join(f"#   {s}: {' '.join(o)}\n" for s, o in overrides.items()))
    try:
        run_stages(cfg, overrides)
    except utils.RunError as e:  # a failed stage: 1; an interrupted one (stage_process.StageInterrupted): 130
        print(f"{getattr(e, 'kind', 'error')}: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    evaluate_all(cfg, argv)
    import report
    table = report.write_report(cfg.out, dict(cfg.get("reuse") or {}))
    print(f"\n{table}\nwall time {time.time() - t0:.0f} s; results in {cfg.out}/results.md, results.csv, results.png")
    failed = failed_methods(cfg)
    if failed:
        print(f"{len(failed)} method run(s) failed and are not in the table: " + ", ".join(map(os.path.basename, failed))
              + "; fix the cause and run the same command again (finished runs are skipped)", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, passthrough = parse_args(argv)
        plans = [(g, prepare(g, passthrough)) for g in group_configs(cfg)]  # every group checked first
    except ValueError as e:  # DataError and ScorerError are ValueErrors: nothing has been trained
        print(f"error: {e}", file=sys.stderr)
        return 2
    rc = 0
    for g, overrides in plans:
        rc = max(rc, execute(g, overrides, argv))
        if rc == 130:  # interrupted: no further group, no study table
            return rc
    if len(plans) > 1:
        import report
        where = os.path.abspath(str(cfg.get("report") or os.path.join(cfg.out, "study")))
        table = report.write_group_report(where, [g for g, _ in plans], cfg.get("plot_x"))
        print(f"\n{table}\nthe study's table and plot: {where}/results.md, results.csv, results.png")
    return rc


if __name__ == "__main__":
    sys.exit(main())
