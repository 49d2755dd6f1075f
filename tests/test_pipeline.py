"""The main job (pipeline.py) end to end with minimal steps, and report.py on a fixture sweep."""
import csv
import json
import os

import pytest

import pipeline
import report

TINY_STAGES = [
    "stages.teacher_sft=[loss=sft,lr=2e-3,n_examples=64]",
    "stages.teacher_dpo=[loss=dpo,lr=1e-4,n_examples=32]",
    "stages.student_sft=[loss=sft,lr=2e-3,n_examples=64]",
    "stages.methods=[lr=1e-4,n_examples=32,eval_every=16]",
    "eval.n=16", "eval.batch_size=16", "eval.max_new_tokens=4",
]
PASSTHROUGH = ["wandb.enabled=false", "progress_bar=false", "batch_size=16", "eval_batch_size=16",
               "n_eval_examples=16", "eval_every=32"]


def test_pipeline_chains_stages_writes_the_table_and_skips_finished_stages(tmp_path, capfd):
    out = tmp_path / "sweep"
    args = [f"out={out}", "methods=[tvkd]", "seeds=2"] + TINY_STAGES + PASSTHROUGH
    assert pipeline.main(args) == 0
    first = capfd.readouterr().out
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
    for row in ("DPO teacher", "SFT teacher", "SFT student", "| tvkd | 2 |"):
        assert row in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table.strip() in first  # printed at the end

    stamps = {run: (os.path.getmtime(out / run / "DONE"), os.path.getmtime(out / run / "eval.json")) for run in runs}
    assert pipeline.main(args) == 0
    second = capfd.readouterr().out
    assert second.count("is complete (DONE); nothing to resume") == len(runs)
    assert "evaluated" not in second
    assert stamps == {run: (os.path.getmtime(out / run / "DONE"), os.path.getmtime(out / run / "eval.json"))
                      for run in runs}


def test_pipeline_rejects_bad_arguments_before_training(tmp_path, capsys):
    assert pipeline.main([f"out={tmp_path}", "methods=[dpo,nope]"]) == 2
    assert "nope" in capsys.readouterr().err
    assert pipeline.main([f"out={tmp_path}", "seeds=0"]) == 2
    assert pipeline.main(["preset=gpu9000"]) == 2
    assert "known presets" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def write_run(root, name, result, curve=()):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    with open(os.path.join(root, name, "eval.json"), "w") as f:
        json.dump(result, f)
    with open(os.path.join(root, name, "metrics.jsonl"), "w") as f:
        for ex, acc in curve:
            f.write(json.dumps({"examples": ex, "heldout_eval/logp_accuracy": acc}) + "\n")


def test_report_on_a_fixture_sweep(tmp_path):
    root = str(tmp_path)
    write_run(root, "teacher_dpo", {"task_exact": 0.8, "task_partial": 0.9, "logp_accuracy": 0.95,
                                    "pref_accuracy": 0.9, "pref_margin": 1.0})
    write_run(root, "teacher_sft", {"task_exact": 0.6, "task_partial": 0.8, "logp_accuracy": 0.9})
    write_run(root, "student_sft", {"task_exact": 0.4, "task_partial": 0.7, "logp_accuracy": 0.85})
    for seed, (exact, margin) in enumerate([(0.5, 0.2), (0.7, 0.4), (0.6, 0.9)]):
        write_run(root, f"methods/tvkd_seed{seed}", {"task_exact": exact, "task_partial": 0.8, "logp_accuracy": 0.9,
                                                     "pref_accuracy": 0.75, "pref_margin": margin},
                  curve=[(0, 0.5), (100, 0.6 + seed / 10)])
    write_run(root, "methods/dpo_seed0", {"task_exact": 0.45, "task_partial": 0.75, "logp_accuracy": 0.88,
                                          "pref_accuracy": 0.8, "pref_margin": 0.5})
    assert report.main([root]) == 0
    table = open(os.path.join(root, "results.md")).read().splitlines()
    assert table[0].startswith("| method | seeds | task exact | task partial |")
    assert [r.split("|")[1].strip() for r in table[2:]] == ["DPO teacher", "SFT teacher", "SFT student", "dpo", "tvkd"]
    # tvkd: exact mean 0.6, sample std 0.1; margin mean 0.5, std sqrt(((.3)^2 + .1^2 + .4^2) / 2) = 0.361
    assert "| tvkd | 3 | 0.600 ± 0.100 | 0.800 ± 0.000 | 0.900 ± 0.000 | 0.750 ± 0.000 | 0.500 ± 0.361 |" in table
    assert "| SFT student | 1 | 0.400 ± 0.000 | 0.700 ± 0.000 | 0.850 ± 0.000 | - | - |" in table
    with open(os.path.join(root, "results.csv")) as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert float(rows["tvkd"]["task_exact"]) == pytest.approx(0.6) and rows["tvkd"]["seeds"] == "3"
    assert rows["SFT student"]["pref_accuracy"] == ""
    assert report.curves(root)["tvkd"] == [(0, 0.5), (100, pytest.approx(0.7))]
    assert open(os.path.join(root, "results.png"), "rb").read(4) == b"\x89PNG"


def test_report_on_an_empty_directory_is_a_clear_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "no eval.json found" in capsys.readouterr().err
