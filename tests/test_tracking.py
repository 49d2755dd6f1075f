"""What the framework hands to wandb (prefkd/tracking.py): a run's group, job type and tags, the
metrics it logs, and a model's evaluation in the summary of the run that trained it; checked
with a recording stand-in for the wandb module, and once with the real one, offline."""
import glob
import importlib.machinery
import json
import os
import sys
import types

import pytest

import evaluate
import pipeline
import train
from conftest import FAST, compose, read_metrics
from prefkd import pipeline_stages, run_plan, tracking


class Recorder(types.ModuleType):
    """A stand-in for the wandb module: every init's arguments, and each run's logs and summary."""

    class Run:
        def __init__(self, kwargs):
            self.kwargs, self.logged, self.summary, self.finished = kwargs, [], {}, False

        def log(self, payload, step=None):
            self.logged.append((step, dict(payload)))

        def finish(self):
            self.finished = True

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries probe for wandb with find_spec
        self.runs = []

    def init(self, **kwargs):
        self.runs.append(self.Run(kwargs))
        return self.runs[-1]


@pytest.fixture
def recorder(monkeypatch):
    fake = Recorder()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest's `disabled` would win over the run's mode
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # `online` stays online (the stand-in never connects)
    return fake


def test_a_run_hands_wandb_its_group_job_type_tags_metrics_and_later_its_evaluation(tmp_path, recorder, capsys,
                                                                                    monkeypatch):
    overrides = ["loss=sft", "n_examples=32", "eval_every=16", "wandb.mode=online", "wandb.tags=[ablation]", "seed=3",
                 "lr=1e-3", "exp_name=rec"]
    cfg = compose([o for o in FAST if not o.startswith("wandb")] + [f"runs_dir={tmp_path}"] + overrides)
    run_dir = train.run(cfg, overrides)
    (run,) = recorder.runs
    kw = run.kwargs
    # the group: the name the run would derive, without its seed (another seed of this command lands beside it)
    assert kw["name"] == os.path.basename(run_dir) == "rec"
    assert kw["group"] == "sft_tiny_eval_every=16_lr=1e-3_n_examples=32"
    assert kw["job_type"] == "train" and kw["tags"] == ["loss=sft", "model=tiny", "ablation"]
    assert kw["mode"] == "online" and kw["resume"] == "allow" and kw["config"]["lr"] == 1e-3 and run.finished
    # what was logged is what metrics.jsonl holds, at the same example counts
    records = read_metrics(run_dir)
    assert [step for step, _ in run.logged] == [r["examples"] for r in records]
    for (_, payload), rec in zip(run.logged, records):
        assert {k: payload[k] for k in rec if k not in ("step", "examples", "time")} == \
            {k: v for k, v in rec.items() if k not in ("step", "examples", "time")}
    identity = json.load(open(os.path.join(run_dir, tracking.IDENTITY)))
    assert identity["id"] == kw["id"] and identity["group"] == kw["group"]
    # evaluate.py resumes that run (same id) and writes the metrics it prints to its summary
    assert evaluate.main([f"checkpoint={run_dir}/LATEST", "n=8", "max_new_tokens=4", "wandb_summary=true"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ev = recorder.runs[-1]
    assert len(recorder.runs) == 2 and ev.kwargs["id"] == kw["id"] and ev.kwargs["resume"] == "allow" and ev.finished
    assert ev.kwargs["group"] == kw["group"] and ev.kwargs["job_type"] == "train"
    assert ev.summary["eval/task_exact"] == result["task_exact"] and ev.summary["eval/logp_accuracy"] == \
        result["logp_accuracy"] and all(k.startswith("eval/") for k in ev.summary)
    assert ev.summary["eval/n"] == 8 and "eval/settings" not in ev.summary
    # by default (wandb_summary=false) evaluate.py writes nothing; nor to a run trained with wandb off,
    # nor with WANDB_MODE=disabled now
    assert evaluate.main([f"checkpoint={run_dir}", "n=8", "max_new_tokens=4"]) == 0
    assert len(recorder.runs) == 2
    assert tracking.publish_evaluation(str(tmp_path), {"task_exact": 1.0}) is None and len(recorder.runs) == 2
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.publish_evaluation(run_dir, {"task_exact": 1.0}) is None and len(recorder.runs) == 2


def test_tags_name_the_teacher_only_where_the_loss_reads_one_and_bad_tags_are_refused():
    for loss, teacher in (("tvkd", True), ("dpo", False)):
        cfg = compose([f"loss={loss}"])
        tags = tracking.tags(cfg, run_plan.RunPlan.of(cfg).teacher)
        assert tags == [f"loss={loss}", "model=tiny"] + ([f"teacher={cfg.teacher.name}"] if teacher else [])
    with pytest.raises(ValueError, match="wandb.tags"):
        train.validate_config(compose(["wandb.tags=ablation"]))
    with pytest.raises(ValueError, match="64 characters"):
        train.validate_config(compose([f"wandb.tags=[{'x' * 65}]"]))


def test_a_sweep_is_one_group_and_a_pipeline_gives_its_out_and_each_stage_as_job_type():
    argv = ["--multirun", "loss=dpo,tvkd", "seed=0,1,2"]
    assert tracking.sweep_group(argv) == "sweep loss=dpo,tvkd seed=0,1,2"
    long = tracking.sweep_group([f"loss.alpha={'1,' * 80}2"])
    assert len(long) == tracking.GROUP_CHARS and long != tracking.sweep_group([f"loss.alpha={'1,' * 81}2"])
    cfg, _ = pipeline.parse_args(["out=/tmp/study_a", "eval.reward_model=train", "methods=[dpo,tvkd]"])
    ov = pipeline_stages.stage_overrides(cfg, ["padding_free=true"])
    # a global padding_free (which a scalar head refuses) stays the other stages'
    assert "padding_free=false" in ov["reward_model"] and "padding_free=true" in ov["methods/dpo"]
    for stage in ("teacher_sft", "teacher_dpo", "student_sft", "reward_model", "methods/dpo", "methods/tvkd"):
        assert "wandb.group=/tmp/study_a" in ov[stage]
        assert f"wandb.job_type={'method' if stage.startswith('methods') else stage}" in ov[stage]
        assert f"wandb.method={stage.split('/')[-1]}" in ov[stage]  # the row: tagged method=<name>
    cfg, _ = pipeline.parse_args(["out='/tmp/a=b,c'"])  # Hydra's grammar: quoted, one value, not a sweep
    assert "wandb.group='/tmp/a=b,c'" in pipeline_stages.stage_overrides(cfg, [])["student_sft"]
    cfg = compose(["loss=tvkd", "wandb.method=tvkd_released"])
    assert tracking.tags(cfg, True)[-1] == "method=tvkd_released"


def test_a_real_offline_run_and_its_evaluation_complete(tmp_path, monkeypatch):
    """The real wandb module: `online` with no API key falls back to offline; the run's files,
    then the evaluation resumed into its id."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    overrides = [o for o in FAST if not o.startswith("wandb")] + [
        f"runs_dir={tmp_path}", "n_examples=16", "eval_every=null", "exp_name=w", "wandb.mode=online"]
    run_dir = train.run(compose(overrides), overrides)
    first = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    identity = json.load(open(os.path.join(run_dir, tracking.IDENTITY)))
    assert len(first) == 1 and first[0].endswith(identity["id"]) and identity["mode"] == "offline"
    assert tracking.publish_evaluation(run_dir, {"task_exact": 0.25, "n": 8}) == {"eval/task_exact": 0.25, "eval/n": 8}
    # offline, the evaluation is a run of its own beside the training run (wandb cannot resume offline)
    again = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    assert len(again) == 2 and sum(p.endswith(identity["id"] + "-eval") for p in again) == 1
