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
import difflib
import importlib
import itertools
import json
import os
import re
import sys
import time
from typing import Dict, List

from omegaconf import DictConfig, ListConfig, OmegaConf

import evaluate
import losses  # noqa: F401  (registers every loss: prefkd.loss_spec.LOSSES)
import report
import train as train_py
import utils
from prefkd import (checkpoints, config_compose, data_checks, loss_spec, output_cache, pipeline_stages,
                    reward_scoring, stage_process, tokenizer_facts, tracking)
from prefkd.data import loading as data_loading
from prefkd.data import rows as data_rows



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
        return [f"~{key}", f"+{key}={pipeline_stages.hydra_value(_pairs_to_dict(_split_list(value), key))}"]
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
        if top == "stages" and (len(parts) < 2 or parts[1] not in pipeline_stages.STAGES):
            raise ValueError(f"{key}: unknown stage; the stages are {list(pipeline_stages.STAGES)} (e.g. stages.teacher_sft.lr=3e-4)")
        if top in ("sft_data", "pref_data") and len(parts) > 1 and parts[1] not in pipeline_stages.DATA_KEYS:
            raise ValueError(f"{key}: unknown key; {top} has {sorted(pipeline_stages.DATA_KEYS)} (options holds any data.* key)")
        own.append(a)
    return own, passthrough


def parse_args(argv: List[str]):
    """Split key=value arguments into the pipeline's config (the preset composed by Hydra with
    its overrides) and pass-through train.py overrides."""
    preset = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("preset=")), "embedded")
    preset_keys = set(compose_preset(preset, []).keys()) | {"preset"}
    train_keys = set(config_compose.compose([]).keys()) | {"hydra"}
    own, passthrough = split_arguments(argv, preset_keys, train_keys)
    cfg = compose_preset(preset, own)
    for role in ("sft_data", "pref_data"):
        cfg[role] = OmegaConf.merge(pipeline_stages.EMPTY_DATA, cfg.get(role) or {})
    cfg.common = _as_dict(cfg.get("common"), "common")
    cfg.stages = {s: _as_dict((cfg.get("stages") or {}).get(s), f"stages.{s}") for s in pipeline_stages.STAGES}
    if int(cfg.seeds) < 1:
        raise ValueError(f"seeds={cfg.seeds} must be >= 1")
    cfg.caches = OmegaConf.merge({k: True for k in pipeline_stages.CACHE_KINDS}, _as_dict(cfg.get("caches"), "caches"))
    for k, v in cfg.caches.items():
        if k not in pipeline_stages.CACHE_KINDS or not isinstance(v, bool):
            raise ValueError(f"caches.{k}={v}: caches has the keys {list(pipeline_stages.CACHE_KINDS)}, each true or false")
    pipeline_stages.method_overrides(cfg)  # every method resolves to a known loss
    if cfg.get("baseline") and str(cfg.baseline) not in [str(m) for m in cfg.methods]:
        print(f"note: baseline={cfg.baseline} is not one of methods {list(cfg.methods)}: the table has no paired "
              "differences", flush=True)
    cfg.out = os.path.abspath(cfg.out)
    for role in ("sft_data", "pref_data"):
        given = [o for o in passthrough if o.split("=", 1)[0].lstrip("+") in ("datasets", "data.local.path")]
        if given and (cfg[role].datasets or cfg[role].path or cfg[role].train):
            stages = [s for s in pipeline_stages.STAGES if pipeline_stages.DATA_OF_STAGE[s] == role]
            print(f"note: {role} sets the data of {' and '.join(stages)}: {' '.join(given)} is overridden there",
                  flush=True)
    return cfg, passthrough



def compose_stage(overrides: List[str]):
    """The config train.py will see for these arguments (first method / seed of a multirun)."""
    return config_compose.compose([re.sub(r"^(loss|seed)=([^,]*),.*$", r"\1=\2", o) for o in overrides])


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
    configs = {s: compose_stage(ov) for s, ov in overrides.items()}
    for stage, c in list(configs.items()):
        try:  # every stage's and every method's settings, before the first one trains
            train_py.validate_config(c, check_archives=False)
        except ValueError as e:
            if not (cfg.get("skip_refused") and stage.kind == pipeline_stages.METHODS):
                raise ValueError(f"stage {stage}: {e}") from None
            # skip_refused (a study over settings some methods cannot run in): the row says why
            method = stage.method
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
        formats[stage.data_role].update(f)
    sft = configs.get("teacher_sft") or configs.get("student_sft") or next(iter(configs.values()))
    pref = configs.get("teacher_dpo") or next(c for s, c in configs.items() if s.data_role == "pref_data")
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
        print(f"\n$ {script}.py " + " ".join(args), flush=True)
        return importlib.import_module(script).main(args)
    cmd = [sys.executable, os.path.join(utils.REPO_DIR, f"{script}.py")] + args
    print("\n$ " + " ".join(cmd), flush=True)
    return stage_process.run(cmd)


def run_stages(cfg, overrides: Dict[str, List[str]]) -> None:
    """The stages in order, each run by its kind. A failed teacher, SFT, generation or cache stage
    stops the pipeline (everything after it needs it); a failed method does not: the others are
    still evaluated and reported."""
    in_process = bool(cfg.get("in_process"))
    for stage, ov in overrides.items():
        if stage.kind == pipeline_stages.GENERATE:
            if script_stage("generate", ov, in_process):
                raise utils.RunError(f"stage {stage} failed; fix the cause and run the same command again "
                                     "(a generation resumes where it stopped)")
        elif stage.kind == pipeline_stages.PRECOMPUTE:
            run_cache_stage(cfg, stage, overrides)
        else:
            method = stage.kind == pipeline_stages.METHODS
            rc = (train_in_process if in_process else train)(ov, multirun=method)
            if rc and not method:
                raise utils.RunError(f"stage {stage} failed (exit code {rc}); fix the cause and run the same "
                                     "command again: complete stages are skipped, an interrupted one resumes")


def run_cache_stage(cfg, stage, overrides: Dict[str, List[str]]) -> None:
    """precompute.py for one cache, unless every run that reads it is already complete: then the
    readers drop the cache setting (so they are not checked against a cache never written)."""
    readers = [key for key, o in overrides.items() if key.kind == pipeline_stages.METHODS and stage.setting in o]
    runs = pipeline_stages.method_runs(cfg, [key.method for key in readers])
    if all(os.path.exists(os.path.join(run, "DONE")) for run in runs):
        print(f"\nstage {stage}: every run that reads it is complete (DONE); not computed", flush=True)
        for key in readers:
            overrides[key] = [o for o in overrides[key] if o != stage.setting]
        return
    if script_stage("precompute", overrides[stage] + ["--if-needed"], bool(cfg.get("in_process"))):
        raise utils.RunError(f"stage {stage} failed; fix the cause and run the same command again, or pass "
                             f"caches.{stage.cache_kind}=false to run the methods with the live {stage.cache_kind} model")


def failed_methods(cfg) -> List[str]:
    return [run for run in pipeline_stages.method_runs(cfg) if not os.path.exists(os.path.join(run, "DONE"))]


def evaluate_all(cfg, passthrough=None) -> None:
    """Evaluate every model once on the held-out split of the preference data (pref_data, as
    the teacher_dpo stage resolved it; eval.datasets replaces its data sets), each with its
    own lengths. Cached as <run>/eval.json, redone if the run or the settings changed (the reward
    model's files included). Generations are written beside it: generations.jsonl,
    alpaca_eval.json, mt_bench.jsonl. With eval.reward_model, every model's answers are scored by
    it, with the win rate against the SFT student's answers (evaluated first)."""
    d = pipeline_stages.stage_dirs(cfg)
    jobs = [(d["student_sft"], None), (d["teacher_sft"], None), (d["teacher_dpo"], d["teacher_sft"])]
    jobs += [(run, d["student_sft"]) for run in pipeline_stages.method_runs(cfg)]
    pref_cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(d["teacher_dpo"], "config.yaml")), resolve=True)
    names = list(cfg.eval.get("datasets") or pref_cfg["datasets"])
    n = cfg.eval.get("n")
    # the test split is never flipped (data.flip_fraction): a noisy and a clean study share evaluations
    held_out = {k: v for k, v in pref_cfg["data"].items() if k not in ("flip_fraction", "flip_seed")}
    settings = {"datasets": names, "data": held_out, "n": n, "batch_size": int(cfg.eval.batch_size),
                "beta": float(cfg.eval.beta), "max_new_tokens": int(cfg.eval.max_new_tokens),
                "kl_ref": "per token, on the model's own greedy answers"}  # a new measure: evaluations redone
    rm = pipeline_stages.reward_model_of(cfg)
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
            g.reuse[stage] = pipeline_stages.stage_dirs(earlier[source])[stage] if source in earlier else os.path.abspath(source)
        pipeline_stages.method_overrides(g)
        out.append(g)
    return out


def prepare(cfg, passthrough: List[str]) -> Dict[str, List[str]]:
    """Every stage's train.py arguments, checked (config and data) before anything trains."""
    overrides = pipeline_stages.stage_overrides(cfg, passthrough)
    rm = pipeline_stages.reward_model_of(cfg)
    if rm is not None and cfg.eval.reward_model != "train":  # a named reward model: readable before anything trains
        try:
            reward_scoring.check(rm)
        except ValueError as e:
            raise ValueError(f"eval.reward_model: {e}") from None
    configs = preflight(cfg, overrides)
    return pipeline_stages.cache_stages(cfg, pipeline_stages.generation_stages(cfg, overrides, configs), configs)


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
        where = os.path.abspath(str(cfg.get("report") or os.path.join(cfg.out, "study")))
        table = report.write_group_report(where, [g for g, _ in plans], cfg.get("plot_x"))
        print(f"\n{table}\nthe study's table and plot: {where}/results.md, results.csv, results.png")
    return rc


if __name__ == "__main__":
    sys.exit(main())
