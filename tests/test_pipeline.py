"""The main job (pipeline.py) end to end with minimal steps, and report.py on a fixture sweep."""
import csv
import json
import os

import pytest
import torch

import pipeline
import report
from prefkd import checkpoints, pipeline_stages

TINY_STAGES = [
    "stages.teacher_sft.lr=2e-3", "stages.teacher_sft.n_examples=64",          # one key at a time
    "stages.teacher_dpo.n_examples=32",
    "stages.student_sft=[loss=sft,lr=2e-3,n_examples=64]",                     # a whole stage
    "stages.methods.n_examples=32", "stages.methods.eval_every=16", "stages.methods.n_eval_samples=8",
    "eval.n=16", "eval.batch_size=16", "eval.max_new_tokens=4",
]
PASSTHROUGH = ["wandb.mode=disabled", "progress_bar=false", "batch_size=16", "eval_batch_size=16",
               "n_eval_examples=16", "eval_every=32", "num_threads=1"]


def test_pipeline_chains_stages_writes_the_table_and_skips_finished_stages(tmp_path, capfd):
    """Also the RM column: eval.reward_model=train trains a reward model (loss=rm, from the SFT
    student, once), which scores every model's answers, with the win rate against the SFT student's."""
    out = tmp_path / "sweep"
    args = [f"out={out}", "methods=[tvkd]", "seeds=2", "eval.reward_model=train",
            "stages.reward_model.n_examples=64"] + TINY_STAGES + PASSTHROUGH
    assert pipeline.main(args) == 0
    first = capfd.readouterr().out
    assert os.path.exists(out / "reward_model" / "DONE") and "name: rm" in (out / "reward_model/config.yaml").read_text()
    assert f"archive: {out}/student_sft" in (out / "reward_model/config.yaml").read_text()
    assert f"reward model {out}/reward_model: held-out accuracy" in first
    for run in ("teacher_sft", "teacher_dpo", "methods/tvkd_seed0", "student_sft"):
        ev = json.loads((out / run / "eval.json").read_text())
        rows = [json.loads(x) for x in open(out / run / "generations.jsonl")]
        assert ev["reward"] == pytest.approx(sum(r["scores"]["reward"] for r in rows) / len(rows), abs=1e-9)
        assert ("reward_win_rate" in ev) == (run != "student_sft") and 0 <= ev.get("reward_win_rate", 0) <= 1
    runs = ["teacher_sft", "teacher_dpo", "student_sft"] + [f"methods/{m}_seed{s}" for m in ("tvkd",)
                                                               for s in (0, 1)]
    for run in runs:
        assert os.path.exists(out / run / "DONE"), run
        ev = json.loads((out / run / "eval.json").read_text())
        assert ev["n"] == 16 and 0 <= ev["task_exact"] <= ev["task_partial"] <= 1
    # the stages chain: each starts from the previous one's checkpoint
    cfg = lambda run: (out / run / "config.yaml").read_text()  # noqa: E731
    assert f"archive: {out}/teacher_sft" in cfg("teacher_dpo")
    assert f"archive: {out}/student_sft" in cfg("methods/tvkd_seed1")
    assert f"archive: {out}/teacher_dpo" in cfg("methods/tvkd_seed1") and "seed: 1" in cfg("methods/tvkd_seed1")
    # method runs are evaluated against the student SFT reference; SFT rows have no reference
    assert "pref_accuracy" in json.loads((out / "methods/tvkd_seed0/eval.json").read_text())
    assert "pref_accuracy" not in json.loads((out / "student_sft/eval.json").read_text())
    table = (out / "results.md").read_text()
    for row in ("DPO teacher", "SFT teacher", "SFT student", "| tvkd (paper's equation) | 2 |", "RM score",
                "RM win rate vs SFT student"):
        assert row in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the plot's curves: the task score each method run logged at its evaluation points, over both seeds
    assert [(ex, std is not None) for ex, _, std in report.curves(str(out), "task_exact")["tvkd"]] == [
        (0, True), (16, True), (32, True)]
    assert table.strip() in first  # printed at the end

    stamps = {run: (os.path.getmtime(out / run / "DONE"), os.path.getmtime(out / run / "eval.json")) for run in runs}
    assert pipeline.main(args) == 0
    second = capfd.readouterr().out
    assert second.count("is complete (DONE); nothing to resume") == len(runs) + 1  # and the reward model
    assert "evaluated" not in second
    assert stamps == {run: (os.path.getmtime(out / run / "DONE"), os.path.getmtime(out / run / "eval.json"))
                      for run in runs}
    # new answers of the SFT student (the win rate's baseline) re-score every other model, nothing else
    later = max(os.path.getmtime(out / run / "eval.json") for run in runs) + 0.5  # before now, after every eval
    os.utime(out / "student_sft/generations.jsonl", (later, later))
    assert pipeline.main(args) == 0
    third = [line for line in capfd.readouterr().out.splitlines() if line.startswith("evaluated ")]
    assert len(third) == len(runs) - 1 and not any(line.startswith(f"evaluated {out}/student_sft:") for line in third)


def test_pipeline_rejects_bad_arguments_before_training(tmp_path, capsys):
    assert pipeline.main([f"out={tmp_path}", "methods=[dpo,nope]"]) == 2
    assert "nope" in capsys.readouterr().err
    assert pipeline.main([f"out={tmp_path}", "seeds=0"]) == 2
    assert pipeline.main(["preset=gpu9000"]) == 2
    assert "known presets" in capsys.readouterr().err
    # a named reward model that cannot be read is refused before anything trains, not after
    assert pipeline.main([f"out={tmp_path}", f"eval.reward_model={tmp_path.parent}/no_such_rm"]) == 2
    assert f"eval.reward_model: reward_model={tmp_path.parent}/no_such_rm: cannot read its config" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def write_run(root, name, result, curve=(), task_curve=()):
    """eval.json, and metrics.jsonl with the held-out logp accuracy (`curve`) and the task's exact
    score (`task_curve`, as sample_during_eval logs it) at each (examples, value)."""
    os.makedirs(os.path.join(root, name), exist_ok=True)
    with open(os.path.join(root, name, "eval.json"), "w") as f:
        json.dump(result, f)
    with open(os.path.join(root, name, "metrics.jsonl"), "w") as f:
        for ex, acc in curve:
            f.write(json.dumps({"examples": ex, "heldout_eval/logp_accuracy": acc}) + "\n")
        for ex, exact in task_curve:
            f.write(json.dumps({"examples": ex, "task_eval/exact": exact}) + "\n")


def test_report_on_a_fixture_sweep(tmp_path):
    root = str(tmp_path)
    write_run(root, "teacher_dpo", {"task_exact": 0.8, "task_partial": 0.9, "logp_accuracy": 0.95,
                                    "pref_accuracy": 0.9, "pref_margin": 1.0})
    write_run(root, "teacher_sft", {"task_exact": 0.6, "task_partial": 0.8, "logp_accuracy": 0.9})
    write_run(root, "student_sft", {"task_exact": 0.4, "task_partial": 0.7, "logp_accuracy": 0.85})
    for seed, (exact, margin) in enumerate([(0.5, 0.2), (0.7, 0.4), (0.6, 0.9)]):
        write_run(root, f"methods/tvkd_seed{seed}", {"task_exact": exact, "task_partial": 0.8, "logp_accuracy": 0.9,
                                                     "pref_accuracy": 0.75, "pref_margin": margin},
                  curve=[(0, 0.5), (100, 0.6 + seed / 10)], task_curve=[(0, 0.1), (100, 0.3 + seed / 10)])
    write_run(root, "methods/dpo_seed0", {"task_exact": 0.45, "task_partial": 0.75, "logp_accuracy": 0.88,
                                          "pref_accuracy": 0.8, "pref_margin": 0.5}, curve=[(100, 0.9)])
    assert report.main([root]) == 0
    table = open(os.path.join(root, "results.md")).read().splitlines()
    assert table[0].startswith("| method | seeds | task exact | task partial |")
    assert [r.split("|")[1].strip() for r in table[2:]] == ["DPO teacher", "SFT teacher", "SFT student", "dpo", "tvkd"]
    # tvkd: exact mean 0.6, sample std 0.1; margin mean 0.5, std sqrt(((.3)^2 + .1^2 + .4^2) / 2) = 0.361
    assert "| tvkd | 3 | 0.600 ± 0.100 | 0.800 ± 0.000 | 0.900 ± 0.000 | 0.750 ± 0.000 | 0.500 ± 0.361 |" in table
    # one seed: the mean alone, no spread
    assert "| SFT student | 1 | 0.400 | 0.700 | 0.850 | - | - |" in table
    assert "| dpo | 1 | 0.450 | 0.750 | 0.880 | 0.800 | 0.500 |" in table
    with open(os.path.join(root, "results.csv")) as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert float(rows["tvkd"]["task_exact"]) == pytest.approx(0.6) and rows["tvkd"]["seeds"] == "3"
    assert rows["SFT student"]["pref_accuracy"] == "" and rows["dpo"]["task_exact_std"] == ""
    # the curves: mean and sample std over seeds at each logged point (None for one seed)
    assert report.curves(root)["tvkd"] == [(0, 0.5, 0.0), (100, pytest.approx(0.7), pytest.approx(0.1))]
    assert report.curves(root)["dpo"] == [(100, 0.9, None)]
    assert report.curves(root, "task_exact") == {"tvkd": [(0, 0.1, 0.0), (100, pytest.approx(0.4), pytest.approx(0.1))]}
    assert open(os.path.join(root, "results.png"), "rb").read(4) == b"\x89PNG"
    # the plot leads with the table's headline (task exact, not partial): bars, then its curves
    summary = report.summarise(report.collect(root))
    cols = report.columns(report.collect(root))
    png = os.path.join(root, "p.png")
    assert report.plot(root, summary, png, cols) == ["task exact per model (mean ± std over seeds)",
                                                     "task exact over training"]
    # a reward model's score gets its own panel; without logged task scores the curves say what they show
    summary[0]["reward"], summary[0]["reward_std"] = 1.5, None
    os.remove(os.path.join(root, "methods/tvkd_seed0/metrics.jsonl"))
    for seed in (1, 2):
        write_run(root, f"methods/tvkd_seed{seed}", {}, curve=[(100, 0.8)])
    assert report.plot(root, summary, png, cols + [("reward", "RM score")]) == [
        "task exact per model (mean ± std over seeds)", "RM score per model (mean ± std over seeds)",
        "held-out logp acc. over training (no task score logged: sample_during_eval=false)"]


def test_report_on_an_empty_directory_is_a_clear_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "no eval.json found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A task of one's own: separate SFT and preference files, a scorer, the table (tests/fixtures/reverse)
# ---------------------------------------------------------------------------------------------

REVERSE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "reverse")
SCORER = f"{REVERSE}/reverse_scorer.py:score"
REVERSE_ARGS = [
    "methods=[dpo]", "seeds=1", "in_process=true",
    f"sft_data.path={REVERSE}/sft_train.jsonl", "sft_data.options.test_fraction=0.25",  # SFT: one file, hash split
    f"pref_data.path={REVERSE}",                                                       # preferences: train/test.jsonl
    "stages.teacher_sft.n_examples=16", "stages.teacher_sft.lr=3e-3", "stages.teacher_dpo.n_examples=8",
    "stages.student_sft.n_examples=16", "stages.methods.n_examples=8", "stages.methods.eval_every=null", "stages.methods.n_eval_samples=4",
    "eval.batch_size=16", "eval.max_new_tokens=8",
    f"data.scorer={SCORER}", "max_length=80", "max_prompt_length=64", "wandb.mode=disabled", "progress_bar=false",
    "batch_size=8", "eval_batch_size=16", "n_eval_examples=8", "do_first_eval=false", "warmup_steps=1", "num_threads=1",
]


def load_scorer():
    import importlib.util
    spec = importlib.util.spec_from_file_location("reverse_scorer_test", f"{REVERSE}/reverse_scorer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.score


@pytest.fixture
def restore_threads():
    import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # num_threads=1 of an in-process run is process-wide


def test_pipeline_on_a_task_of_ones_own(tmp_path, capfd, restore_threads):
    out = tmp_path / "task"
    assert pipeline.main([f"out={out}"] + REVERSE_ARGS) == 0
    printed = capfd.readouterr().out
    score = load_scorer()
    runs = ["teacher_sft", "teacher_dpo", "student_sft", "methods/dpo_seed0"]
    for run in runs:
        cfg = (out / run / "config.yaml").read_text()
        summary = json.loads((out / run / "data_summary.json").read_text())["splits"]
        if run.endswith("_sft"):  # SFT stages: the SFT file, 25% of its prompts held out
            assert f"path: {REVERSE}/sft_train.jsonl" in cfg
            assert summary["local/train"]["source"] == [f"{REVERSE}/sft_train.jsonl"]
            assert (summary["local/train"]["examples"], summary["local/test"]["examples"]) == (48, 16)
            assert summary["local/test"]["holdout"] == 0.25 and summary["local/train"]["rows"] == 64
        else:  # preference stages: train.jsonl / test.jsonl of the directory
            assert f"path: {REVERSE}\n" in cfg
            assert summary["local/train"]["source"] == [f"{REVERSE}/train.jsonl"]
            assert (summary["local/train"]["examples"], summary["local/test"]["examples"]) == (48, 16)
            assert summary["local/train"]["unread"] == ["sft_train.jsonl"]
        assert {s["format"] for s in summary.values()} == {"chat"}
        assert {s["truncation"]["truncated"] for s in summary.values()} == {0}  # max_length=80 fits every example
        # every model is evaluated on the preference test split, scored by the task's scorer
        ev = json.loads((out / run / "eval.json").read_text())
        assert ev["n"] == 16 and ev["settings"]["datasets"] == ["local"] and ev["settings"]["max_length"] == 80
        gens = [json.loads(line) for line in (out / run / "generations.jsonl").read_text().splitlines()]
        assert len(gens) == 16 and gens[0]["prompt"][0]["role"] == "user"
        assert gens[0]["prompt_text"].startswith("Write the letters of this word in reverse order: ")
        assert gens[0]["model_input"].startswith("<|user|>Write the letters") and gens[0]["generator"] == run.split("/")[-1]
        rescored = [score(g["prompt"], g["completion"]) for g in gens]
        assert [g["scores"] for g in gens] == rescored
        for name in ("correct", "letters"):
            assert ev[f"task_{name}"] == pytest.approx(sum(r[name] for r in rescored) / 16)
        alpaca = json.loads((out / run / "alpaca_eval.json").read_text())
        assert [(a["instruction"], a["output"]) for a in alpaca] == [(g["prompt_text"], g["completion"]) for g in gens]
        mt = [json.loads(line) for line in (out / run / "mt_bench.jsonl").read_text().splitlines()]
        assert [m["question_id"] for m in mt] == list(range(1, 17))
        assert mt[3]["choices"] == [{"index": 0, "turns": [gens[3]["completion"]]}]
    assert "lr: 0.003" in (out / "teacher_sft" / "config.yaml").read_text()      # the one key changed ...
    assert "n_examples: 16" in (out / "teacher_sft" / "config.yaml").read_text()  # ... the others kept
    table = (out / "results.md").read_text().split("\n\n")[0].splitlines()  # the table, not the notes under it
    assert table[0] == ("| method | seeds | task correct | task letters | held-out logp acc. | pref. acc. (vs ref) "
                        "| pref. margin (common β = 0.1) | KL to ref. (per token, own answers) |")
    assert [r.split("|")[1].strip() for r in table[2:]] == ["DPO teacher", "SFT teacher", "SFT student", "dpo"]
    for row, run in zip(table[2:], ["teacher_dpo", "teacher_sft", "student_sft", "methods/dpo_seed0"]):
        ev = json.loads((out / run / "eval.json").read_text())
        cells = [c.strip() for c in row.split("|")[3:5]]
        assert cells == [f"{ev['task_correct']:.3f}", f"{ev['task_letters']:.3f}"] and "±" not in row
        # the KL to the reference: the DPO teacher against its SFT model, the methods against the SFT
        # student; an SFT row has no reference
        kl = row.split("|")[-2].strip()
        assert kl == (f"{ev['kl_ref']:.3f}" if run in ("teacher_dpo", "methods/dpo_seed0") else "-")
        assert run not in ("teacher_dpo", "methods/dpo_seed0") or ev["kl_ref"] > 0
    assert "scorer of local: " + SCORER in printed
    assert "WARNING" not in printed


def test_pipeline_refuses_sft_and_preference_data_of_different_formats(tmp_path, capsys):
    # the case: SFT rows as plain strings, preference rows as message lists
    rows = [json.loads(line) for line in open(f"{REVERSE}/sft_train.jsonl")]
    plain = tmp_path / "sft_train.jsonl"
    plain.write_text("".join(json.dumps({"prompt": r["prompt"][0]["content"], "completion": r["completion"][0]["content"]})
                             + "\n" for r in rows))
    args = [f"out={tmp_path}/out", f"sft_data.path={plain}", f"pref_data.path={REVERSE}", "in_process=true"]
    assert pipeline.main(args) == 2
    err = capsys.readouterr().err
    assert "the SFT data (local (sft_train.jsonl)) is plain text" in err
    assert "the preference data (local (train.jsonl)) is conversational" in err and "allow_mixed_formats" in err
    assert not os.path.exists(tmp_path / "out")
    # a scorer that cannot be imported is named before anything runs
    assert pipeline.main(args[:1] + [f"sft_data.path={REVERSE}/sft_train.jsonl", f"pref_data.path={REVERSE}",
                                     "data.scorer=no_such_module:score"]) == 2
    assert "data.scorer='no_such_module:score': cannot import module 'no_such_module'" in capsys.readouterr().err
    assert pipeline.main(args[:1] + ["stages.teacher_sfd.lr=1"]) == 2
    assert "unknown stage" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_method_variants_run_in_row_order_and_a_failed_method_does_not_stop_the_others(tmp_path, capfd,
                                                                                       restore_threads,
                                                                                       monkeypatch):
    out = tmp_path / "variants"
    base = [a for a in REVERSE_ARGS if not a.startswith("methods=")] + [f"out={out}"]
    # a variant with a bad value is refused before anything trains
    assert pipeline.main(base + ["methods=[dpo,bad]", "variants.bad=[loss=dpo,loss.beta=-1]"]) == 2
    assert "stage methods/bad: loss.beta must be > 0" in capfd.readouterr().err
    assert not (out / "teacher_sft").exists()
    # so is a top-k beyond the tokenizer's vocabulary
    assert pipeline.main(base + ["methods=[dpo,kd_bad]", "variants.kd_bad=[loss=vanillakd,loss.top_k=100000]"]) == 2
    assert "stage methods/kd_bad: loss.top_k=100000 exceeds the vocabulary size" in capfd.readouterr().err
    assert not (out / "teacher_sft").exists()
    # dpo_b is dpo with another beta; broken fails at run time (here: its run raises as a diverged one does)
    import train as train_py
    import utils
    live_run = train_py.run

    def run(cfg, overrides):
        if cfg.exp_name == "broken_seed0":
            raise utils.RunError("broken_seed0: the loss turned non-finite")
        return live_run(cfg, overrides)
    monkeypatch.setattr(train_py, "run", run)
    args = base + ["methods=[dpo_b,broken,dpo]", "variants.dpo_b=[loss=dpo,loss.beta=0.5]",
                   "variants.broken=[loss=dpo]"]
    assert pipeline.main(args) == 1
    err = capfd.readouterr().err
    assert "1 method run(s) failed" in err and "broken_seed0" in err
    assert "beta: 0.5" in (out / "methods/dpo_b_seed0/config.yaml").read_text()
    assert (out / "methods/dpo_seed0/DONE").exists() and not (out / "methods/broken_seed0/DONE").exists()
    rows = lambda: [r.split("|")[1].strip()  # noqa: E731
                    for r in (out / "results.md").read_text().split("\n\n")[0].splitlines()[2:]]
    assert rows() == ["DPO teacher", "SFT teacher", "SFT student", "dpo_b", "dpo"]  # the order of `methods`
    # another command in the same directory reuses the finished runs; its table shows what it asked for
    assert pipeline.main(base + ["methods=[dpo]"]) == 0
    assert rows() == ["DPO teacher", "SFT teacher", "SFT student", "dpo"]
    # a method can start from another method's run of the same seed (start_from), listed before it;
    # a row shows its label
    chained = base + ["variants.dpo_more=[loss=dpo,lr=1e-5]", "start_from.dpo_more=dpo", "labels.dpo='DPO (plain)'"]
    assert pipeline.main(chained + ["methods=[dpo_more,dpo]"]) == 2
    assert "start_from.dpo_more=dpo: dpo_more starts from the dpo run of each seed" in capfd.readouterr().err
    assert pipeline.main(chained + ["methods=[dpo,dpo_more]"]) == 0
    assert f"archive: {out}/methods/dpo_seed0" in (out / "methods/dpo_more_seed0/config.yaml").read_text()
    assert rows() == ["DPO teacher", "SFT teacher", "SFT student", "DPO (plain)", "dpo_more"]


def test_a_misspelt_pipeline_key_is_refused_naming_it(capsys):
    """A key that is neither the pipeline's nor train.py's, or a preset key that does not exist,
    exits 2 with a message naming it (no traceback), before anything runs."""
    assert pipeline.main(["stagez.methods.lr=1"]) == 2
    err = capsys.readouterr().err
    assert "stagez.methods.lr: 'stagez' is neither a pipeline key" in err and "did you mean 'stages'?" in err
    assert "Traceback" not in err
    assert pipeline.main(["eval.nn=3"]) == 2
    assert "Could not override 'eval.nn'" in capsys.readouterr().err
    # a whole stage given as a list replaces it; a new key in a stage needs no +
    cfg, passthrough = pipeline.parse_args(["stages.teacher_sft=[loss=sft,lr=3e-4]", "stages.methods.beta=0.2",
                                            "loss.alpha=1.0"])
    assert dict(cfg.stages.teacher_sft) == {"loss": "sft", "lr": 3e-4} and cfg.stages.methods.beta == 0.2
    assert passthrough == ["loss.alpha=1.0"]


def test_table1_has_both_tvkd_rows_and_the_paper_preset_the_authors_recipe():
    for preset in ("embedded", "paper"):
        cfg, _ = pipeline.parse_args([f"preset={preset}"])
        methods = list(pipeline_stages.method_overrides(cfg))
        assert methods[:12] == ["dpo", "simpo", "wpo", "tdpo", "vanillakd", "seqkd", "ddpo", "dpkd", "gkd", "dckd",
                                "adpa", "tvkd"] and methods[12] == "tvkd_released"
        assert pipeline_stages.method_overrides(cfg)["tvkd_released"] == ["loss=tvkd", "loss.variant=released"]
        ov = pipeline_stages.stage_overrides(cfg, [])
        assert f"model.archive={cfg.out}/student_sft" in ov["methods/tvkd_released"]  # the same start as every row
        assert "paper's equation" in cfg.labels.tvkd and "authors'" in cfg.labels.tvkd_released
    authors = ov["methods/tvkd_authors"]  # the paper preset's: the authors' whole recipe
    for o in ("loss.variant=released", "lr=5e-7", "n_epochs=5", "batch_size=64", "max_length=2048",
              "max_prompt_length=1800", f"model.archive={cfg.out}/methods/dpo_seed${{seed}}"):
        assert o in authors, o


def test_the_paper_table2_preset_has_the_papers_three_pairs():
    cfg, _ = pipeline.parse_args(["preset=paper_table2"])
    groups = pipeline.group_configs(cfg)
    assert [(g.teacher, g.model) for g in groups] == [("mistral7b", "danube500m"), ("mistral7b", "llama1b"),
                                                      ("llama8b", "llama3b")]
    assert groups[1].reuse.teacher_dpo == pipeline_stages.stage_dirs(groups[0])["teacher_dpo"]  # one Mistral teacher
    assert list(pipeline_stages.method_overrides(groups[2])) == ["dpo", "simpo", "dckd", "tvkd", "tvkd_released"]


def test_the_clean_teacher_noise_study_flips_only_the_students_pairs():
    cfg, _ = pipeline.parse_args(["preset=noise_clean_teacher"])
    groups = pipeline.group_configs(cfg)
    assert [g.pref_data.options.flip_fraction for g in groups] == [0.0, 0.2, 0.4] and int(cfg.seeds) == 5
    clean = pipeline_stages.stage_dirs(groups[0])
    for g in groups[1:]:
        assert g.out.endswith("_clean_teacher") and dict(g.reuse) == {s: clean[s] for s in (
            "teacher_sft", "teacher_dpo", "student_sft")}
        ov = pipeline_stages.stage_overrides(g, [])
        assert not {"teacher_sft", "teacher_dpo", "student_sft"} & set(ov)  # trained once, clean, in flip0
        assert f"teacher.archive={clean['teacher_dpo']}" in ov["methods/tvkd"]
        assert f"data.flip_fraction={g.pref_data.options.flip_fraction}" in ov["methods/tvkd"]
    noisy = pipeline.group_configs(pipeline.parse_args(["preset=noise"])[0])
    assert "teacher_dpo" in pipeline_stages.stage_overrides(noisy[1], [])  # preset=noise retrains it on flipped pairs


def test_the_table5_preset_is_the_paper_ablation_over_the_embedded_preset():
    cfg, _ = pipeline.parse_args(["preset=table5"])
    methods = pipeline_stages.method_overrides(cfg)
    assert list(methods) == ["tvkd_logit", "tvkd_logprob", "tvkd_max", "tvkd_margin", "tvkd_expectation", "tvkd_implicit",
                            "tvkd_tau1", "tvkd"]
    assert methods["tvkd_margin"] == ["loss=tvkd", "loss.potential=margin"] and methods["tvkd"] == ["loss=tvkd"]
    embedded, _ = pipeline.parse_args([])
    assert cfg.stages == embedded.stages and cfg.out == embedded.out and int(cfg.seeds) == 5 and cfg.baseline == "tvkd"


def test_every_stage_carries_its_kind_and_a_cache_stage_the_setting_its_readers_get(tmp_path):
    """The runner dispatches on Stage.kind, never on the key's spelling: each key of the plan is a
    Stage whose kind, method and (a cache) the override its readers get agree with its arguments."""
    cfg, passthrough = pipeline.parse_args(REVERSE_ARGS + [f"out={tmp_path}", "methods=[dpo,tvkd,seqkd]"])
    plan = pipeline.prepare(cfg, passthrough)
    kinds = {str(k): k.kind for k in plan}
    assert [k for k, kind in kinds.items() if kind == pipeline_stages.TRAIN] == ["teacher_sft", "teacher_dpo",
                                                                              "student_sft"]
    methods = [k for k in plan if k.kind == pipeline_stages.METHODS]
    assert [m.method for m in methods] == ["dpo", "tvkd", "seqkd"] and [m.data_role for m in methods] == ["pref_data"] * 3
    assert [k for k in plan if k.kind == pipeline_stages.GENERATE] == ["generate/teacher_dpo_greedy_n16.train",
                                                                     "generate/teacher_dpo_greedy_n16.test"]
    caches = [k for k in plan if k.kind == pipeline_stages.PRECOMPUTE]
    assert sorted(c.cache_kind for c in caches) == ["reference", "teacher"]  # seqkd reads neither: it generates
    for c in caches:
        assert plan[c][0] == c.cache_kind and plan[c][-1] == c.setting
        assert c.setting.startswith(f"{c.cache_kind}.cache={tmp_path}/caches/")
        readers = [m.method for m in methods if c.setting in plan[m]]
        assert readers == (["dpo", "tvkd"] if c.cache_kind == "reference" else ["tvkd"])  # one reference cache
    order = [k.kind for k in plan]  # every generation and cache stage before the first method
    assert order.index(pipeline_stages.METHODS) > max(i for i, k in enumerate(order) if k != pipeline_stages.METHODS)


def test_generation_stages_run_once_per_generating_model_and_are_shared_by_seeds(tmp_path, capfd,
                                                                               restore_threads):
    out = tmp_path / "gen"
    args = [a for a in REVERSE_ARGS if not a.startswith(("methods=", "seeds="))] + [
        f"out={out}", "methods=[seqkd,adpa]", "seeds=2"]
    assert pipeline.main(args) == 0
    stages = [line.split(":")[0].strip("# ") for line in (out / "pipeline.yaml").read_text().splitlines()
              if line.startswith("#   ")]
    # the teacher's and the SFT student's greedy answers, each split once, after the models exist
    gen = ["generate/teacher_dpo_greedy_n16.train", "generate/teacher_dpo_greedy_n16.test",
           "generate/student_sft_greedy_n16.train", "generate/student_sft_greedy_n16.test"]
    assert stages == ["teacher_sft", "teacher_dpo", "student_sft"] + gen + ["methods/seqkd", "methods/adpa"]
    for name, source in (("teacher_dpo", "teacher_dpo"), ("student_sft", "student_sft")):
        meta = json.loads((out / f"generations/{name}_greedy_n16.train.jsonl.meta.json").read_text())
        assert meta["checkpoint"] == checkpoints.resolve_checkpoint(str(out / source)) and meta["rows"] == 48
        assert meta["max_new_tokens"] == 16 and meta["do_sample"] is False
    for method, name in (("seqkd", "teacher_dpo"), ("adpa", "student_sft")):
        for seed in (0, 1):
            cfg = (out / f"methods/{method}_seed{seed}/config.yaml").read_text()
            assert f"generations/{name}_greedy_n16.train.jsonl" in cfg
            assert (out / f"methods/{method}_seed{seed}/DONE").exists()
    # every prompt was in the files: nothing was generated in the runs
    assert "not in the generations files" not in capfd.readouterr().out


def test_cache_stages_run_once_for_all_seeds_and_the_methods_match_live_runs(tmp_path, capfd, restore_threads):
    import train as train_py
    from conftest import compose, read_metrics
    out = tmp_path / "cached"
    args = [a for a in REVERSE_ARGS if not a.startswith(("methods=", "seeds=", "stages.methods.n_examples="))] + [
        f"out={out}", "methods=[dpo,tvkd,tdpo]", "seeds=2", "stages.methods.n_examples=16"]
    assert pipeline.main(args) == 0
    printed = capfd.readouterr().out
    plan = {line.split(":")[0].strip("# "): line.split(": ", 1)[1].split()
            for line in (out / "pipeline.yaml").read_text().splitlines() if line.startswith("#   ")}
    caches = [k for k in plan if k.startswith("precompute/")]
    # one reference cache (the SFT student's log-probs) shared by dpo and tvkd, one teacher cache for tvkd;
    # tdpo reads the reference's full distribution and keeps the live reference
    assert [k.split("_")[0] for k in caches] == ["precompute/reference", "precompute/teacher"]
    assert list(plan) == ["teacher_sft", "teacher_dpo", "student_sft"] + caches + [
        "methods/dpo", "methods/tvkd", "methods/tdpo"]
    ref, teacher = (str(out / "caches" / k.split("/")[1]) for k in caches)
    assert f"reference.cache={ref}" in plan["methods/dpo"] and f"reference.cache={ref}" in plan["methods/tvkd"]
    assert f"teacher.cache={teacher}" in plan["methods/tvkd"]
    assert not [a for a in plan["methods/tdpo"] if a.startswith(("reference.cache=", "teacher.cache="))]
    for cache in (ref, teacher):  # computed once, for both seeds
        manifest = json.loads(open(os.path.join(cache, "manifest.json")).read())
        assert [p["seed"] for p in manifest["coverage"]["plans"]] == [0, 1] and manifest["rows"] > 0
    # the runs loaded no cached model: dpo's reference (2 seeds), tvkd's reference and teacher (2 seeds)
    assert printed.count(f"(cached: {ref})") == 4 and printed.count(f"(cached: {teacher})") == 2
    # a method run from the caches has the losses of the same run with the live teacher and reference
    run = out / "methods" / "tvkd_seed1"
    live_args = [a for a in plan["methods/tvkd"] if not a.startswith(("reference.cache=", "teacher.cache=", "seed=",
                                                                      "exp_name=", "runs_dir="))]
    cfg = compose(live_args + ["seed=1", "exp_name=live", f"runs_dir={tmp_path}"])
    live = read_metrics(train_py.run(cfg, live_args))
    cached = read_metrics(str(run))
    for key in ("loss/train", "loss/eval"):
        a, b = [r[key] for r in cached if key in r], [r[key] for r in live if key in r]
        assert len(a) == len(b) > 0 and a == pytest.approx(b, abs=1e-5, rel=0)
    # run again: every method run is complete, so the caches are not recomputed
    assert pipeline.main(args) == 0
    assert capfd.readouterr().out.count("every run that reads it is complete (DONE); not computed") == 2
    # a third seed with caches.teacher=false: the reference cache is extended to seed 2, the teacher is live
    assert pipeline.main(args + ["seeds=3", "caches.teacher=false", "methods=[tvkd]"]) == 0
    assert "; seeds 0, 1, 2)" in capfd.readouterr().out
    assert [p["seed"] for p in json.loads(open(os.path.join(ref, "manifest.json")).read())["coverage"]["plans"]
            ] == [0, 1, 2]
    config = (out / "methods/tvkd_seed2/config.yaml").read_text()
    assert f"reference:\n  cache: {ref}" in config and "cache: null" in config


STUDY = ["in_process=true", "seeds=1"] + TINY_STAGES + PASSTHROUGH


def test_the_table2_study_runs_three_pairs_one_across_tokenizers(tmp_path, capfd, restore_threads):
    out = tmp_path / "t2"
    assert pipeline.main(["preset=table2", f"out={out}", "methods=[dckd,tvkd]"] + STUDY) == 0
    printed = capfd.readouterr().out
    table = (out / "table2" / "results.md").read_text()
    assert table.strip() in printed
    assert "bpe (tiny_teacher_bpe → tiny): task exact" in table and "small (tiny_teacher → tiny_small): task exact" in table
    dckd = next(line for line in table.splitlines() if line.startswith("| dckd |")).split("|")[2:-1]
    assert [c.strip() for c in dckd].count("refused") == 3  # the bpe group's three columns
    assert "- dckd in bpe: teacher=tiny_teacher_bpe: its tokenizer" in table and "loss=dckd reads the teacher per token" in table
    tvkd = next(line for line in table.splitlines() if line.startswith("| tvkd (paper's equation) |")).split("|")[2:-1]
    assert all(c.strip() not in ("-", "refused") for c in tvkd)  # every pair, with its shaping margin
    cfg = lambda run: (out / run / "config.yaml").read_text()  # noqa: E731
    assert "tokenizer: embedded_bpe" in cfg("table2_bpe/methods/tvkd_seed0")  # the teacher reads its own tokens
    assert f"archive: {out}/student_sft" in cfg("table2_bpe/methods/tvkd_seed0")  # the shared SFT student
    assert f"archive: {out}/teacher_dpo" in cfg("table2_small/methods/dckd_seed0")  # the shared teacher
    assert not (out / "table2_small" / "teacher_sft").exists() and not (out / "table2_bpe" / "student_sft").exists()
    assert (out / "table2_bpe" / "methods/tvkd_seed0/DONE").exists()
    assert not (out / "table2_bpe" / "methods/dckd_seed0").exists()
    assert (out / "table2" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_noise_study_flips_the_preference_labels_of_teacher_and_students(tmp_path, capfd, restore_threads):
    out = tmp_path / "noise"
    assert pipeline.main(["preset=noise", f"out={out}", "methods=[tvkd_a8]"] + STUDY) == 0
    table = (out / "noise" / "results.md").read_text()
    assert "flip40 (tiny_teacher → tiny): shaping margin" in table and "| tvkd_a8 |" in table
    summary = lambda run: json.loads((out / run / "data_summary.json").read_text())["splits"]  # noqa: E731
    assert "flipped" not in summary("methods/tvkd_a8_seed0")["embedded/train"]
    for run, share in (("noise20/teacher_dpo", 0.2), ("noise40/methods/tvkd_a8_seed0", 0.4)):
        split = summary(run)["embedded/train"]
        assert split["flipped"] == round(share * split["examples"]) and summary(run)["embedded/test"]["flipped"] == 0
    assert not (out / "noise20" / "teacher_sft").exists()  # the clean SFT stages are shared
    rows = list(csv.DictReader(open(out / "noise" / "results.csv")))
    assert {(r["group"], r["method"]) for r in rows} >= {(g, m) for g in ("flip0", "flip20", "flip40")
                                                          for m in ("tvkd_a8",)}
    assert all(float(r["shaping_margin"]) != 0 for r in rows if r["method"] == "tvkd_a8")
    assert (out / "noise" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigint_to_the_pipeline_during_a_stage_then_a_rerun_gives_the_uninterrupted_weights(tmp_path, restore_threads):
    """Ctrl-C (SIGINT to pipeline.py) reaches the running stage, which saves at its next step boundary;
    the pipeline waits for it and stops (exit 130); the same command again resumes that stage and
    finishes, with every stage's final weights bitwise those of an uninterrupted pipeline."""
    import signal
    import subprocess
    import sys
    import time
    from safetensors.torch import load_file
    from conftest import REPO
    stages = [o for o in TINY_STAGES if not o.startswith("stages.teacher_sft.n_examples")]
    args = lambda out: [f"out={out}", "methods=[dpo]", "seeds=1", "stages.teacher_sft.n_examples=1600",  # noqa: E731
                        "stages.teacher_sft.eval_every=null"] + stages + PASSTHROUGH
    # the uninterrupted pipeline in this process (in_process: the same runs, no interpreter start-up per stage)
    assert pipeline.main(args(tmp_path / "a") + ["in_process=true"]) == 0
    cmd = [sys.executable, os.path.join(REPO, "pipeline.py")] + args(tmp_path / "b")
    env = dict(os.environ, PREFERENCE_DATA_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics, deadline = tmp_path / "b" / "teacher_sft" / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "stopped: SIGINT: the stage saved a checkpoint" in err
    stage = tmp_path / "b" / "teacher_sft"
    assert not (stage / "DONE").exists() and checkpoints.is_complete_checkpoint(str(checkpoints.resolve_checkpoint(str(stage))))
    assert not (tmp_path / "b" / "teacher_dpo").exists()  # nothing after the interrupted stage ran
    assert pipeline.main(args(tmp_path / "b") + ["in_process=true"]) == 0
    for run in ("teacher_sft", "teacher_dpo", "student_sft", "methods/dpo_seed0"):
        a = load_file(os.path.join(checkpoints.resolve_checkpoint(str(tmp_path / "a" / run)), "model.safetensors"))
        b = load_file(os.path.join(checkpoints.resolve_checkpoint(str(tmp_path / "b" / run)), "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run


def test_a_hangup_reaches_the_stage_as_sigterm_and_stops_the_pipeline(tmp_path):
    """The stage runs in its own process group, so a closed terminal's SIGHUP reaches only the
    pipeline: it is passed on as SIGTERM (which the trainer saves on) and the pipeline stops."""
    import signal
    import sys
    import threading
    import time
    from prefkd import stage_process
    ready, got = tmp_path / "ready", tmp_path / "got"
    child = ("import signal, sys, time\n"
             f"signal.signal(signal.SIGTERM, lambda *a: (open({str(got)!r}, 'w').write('SIGTERM'), sys.exit(0)))\n"
             f"open({str(ready)!r}, 'w').close()\ntime.sleep(60)\n")

    def hang_up():
        deadline = time.time() + 30
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGHUP)
    threading.Thread(target=hang_up, daemon=True).start()
    with pytest.raises(stage_process.StageInterrupted, match="SIGHUP") as e:
        stage_process.run([sys.executable, "-c", child])
    assert got.read_text() == "SIGTERM" and e.value.exit_code == 130


def test_a_signal_during_an_in_process_method_stops_the_pipeline_not_only_that_method(monkeypatch):
    """in_process=true: train.py's TrainingStopped (a signal) is StageInterrupted (exit 130), not a
    failed method that the sweep counts and moves past."""
    import train as train_py
    import utils
    from prefkd import stage_process
    ran = []

    def stopped(cfg, run):
        ran.append(run)
        raise utils.TrainingStopped("stopped by SIGINT at step 3")
    monkeypatch.setattr(train_py, "run", stopped)
    with pytest.raises(stage_process.StageInterrupted, match="SIGINT") as e:
        pipeline.train_in_process(["loss=dpo,sft", "exp_name=m"], multirun=True)
    assert len(ran) == 1 and e.value.exit_code == 130
