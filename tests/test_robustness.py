"""Crashes, damaged checkpoints, NaNs, concurrent launches, full disks, bad values, sweeps,
resume and signals: each case fails loudly and early, and nothing already written is lost."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import FAST, REPO, compose, read_metrics, train_run

import trainers
import utils
from prefkd import checkpoints, run_checkpoints
from prefkd import models

losses_of = lambda recs: [r["loss/train"] for r in recs if "loss/train" in r]
SAVING = ["loss=sft", "n_examples=48", "save_every=16", "eval_every=null", "exp_name=c", "lr=1e-3",
          "keep_checkpoints=3"]


def latest(run_dir):
    return open(os.path.join(run_dir, "LATEST")).read().strip()


def count_writes(monkeypatch):
    written = []
    real = run_checkpoints.RunCheckpoints.write_files

    def counting(self, tmp, model_sd, optim_sd, merged, counters):
        written.append(counters["step"])
        return real(self, tmp, model_sd, optim_sd, merged, counters)
    monkeypatch.setattr(run_checkpoints.RunCheckpoints, "write_files", counting)
    return written


# ------------------------------------------------------------------ 1. checkpoints

def test_a_step_is_saved_once_when_save_every_divides_the_run(tmp_path, monkeypatch):
    written = count_writes(monkeypatch)
    run_dir, _ = train_run(tmp_path, SAVING)
    # steps 2, 4, 6; the end of the run (step 6) is not written a second time
    assert written == [2, 4, 6]
    assert latest(run_dir) == "step-00000006"
    assert checkpoints.checkpoint_problem(os.path.join(run_dir, "step-00000006")) is None


def test_completeness_is_judged_by_the_files_not_by_a_marker(tmp_path):
    run_dir, _ = train_run(tmp_path, SAVING)
    ckpt = os.path.join(run_dir, "step-00000006")
    assert checkpoints.is_complete_checkpoint(ckpt)
    # what a SIGKILL in the old save left: the marker and two small files, no weights
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("COMPLETE", "config.json", "generation_config.json"):
        (partial / name).write_text("{}")
    assert "manifest" in checkpoints.checkpoint_problem(str(partial))
    with open(os.path.join(ckpt, "optimizer.pt"), "r+b") as f:
        f.truncate(100)
    assert "optimizer.pt has 100 bytes" in checkpoints.checkpoint_problem(ckpt)


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt"])
def test_resume_falls_back_when_the_latest_checkpoint_is_damaged(tmp_path, damaged, capsys):
    _, full = train_run(tmp_path / "a", SAVING)
    run_dir, _ = train_run(tmp_path / "b", SAVING)
    # a crash before DONE, and the newest checkpoint's file cut short afterwards
    os.remove(os.path.join(run_dir, "DONE"))
    path = os.path.join(run_dir, "step-00000006", damaged)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    _, resumed = train_run(tmp_path / "b", SAVING + ["resume=true"])
    out = capsys.readouterr().out
    assert "damaged" in out and damaged in out and "resuming from step-00000004" in out
    # steps 5 and 6 are redone from step 4: the same losses as the uninterrupted run, and the
    # records of the redone steps replace the old ones
    assert losses_of(resumed) == losses_of(full)
    assert latest(run_dir) == "step-00000006" and checkpoints.is_complete_checkpoint(os.path.join(run_dir, "step-00000006"))
    assert not [d for d in os.listdir(run_dir) if d.startswith(".step-")]


# ------------------------------------------------------------------ 2. non-finite values

def test_nan_stops_the_run_naming_the_step_and_no_checkpoint_is_non_finite(tmp_path):
    from safetensors.torch import load_file
    with pytest.raises(utils.NonFiniteError, match=r"non-finite loss or gradient norm at step \d+") as err:
        train_run(tmp_path, ["loss=sft", "lr=30", "warmup_steps=4", "save_every=8", "n_examples=128",
                             "keep_checkpoints=2", "eval_every=null", "exp_name=diverge"])
    bad_step = int(str(err.value).split("at step ")[1].split()[0])
    run_dir = tmp_path / "diverge"
    assert not (run_dir / "DONE").exists()
    ckpts = checkpoints.list_checkpoints(str(run_dir))
    assert ckpts and all(int(c[5:]) < bad_step for c in ckpts)
    for c in ckpts:
        assert utils.all_finite(load_file(str(run_dir / c / "model.safetensors")).values())
    # every logged loss is finite: the bad step was never applied
    assert all(torch.isfinite(torch.tensor(losses_of(read_metrics(run_dir)))))


def inject_nan(monkeypatch, steps):
    real = trainers.BasicTrainer.compute_loss

    def compute_loss(self, batch, train):
        loss, metrics = real(self, batch, train)
        if train and self.step + 1 in steps:
            loss = loss * float("nan")
        return loss, metrics
    monkeypatch.setattr(trainers.BasicTrainer, "compute_loss", compute_loss)


def test_max_nonfinite_steps_skips_and_counts_then_stops_after_too_many_in_a_row(tmp_path, monkeypatch):
    inject_nan(monkeypatch, {3})
    run_dir, records = train_run(tmp_path, ["loss=sft", "n_examples=48", "eval_every=null", "exp_name=skip",
                                            "max_nonfinite_steps=1"])
    assert len(losses_of(records)) == 5  # 6 steps, one skipped
    assert records[-2 if "loss/eval" in records[-1] else -1]["nonfinite_skipped"] == 1
    assert os.path.exists(os.path.join(run_dir, "DONE"))
    inject_nan(monkeypatch, {2, 3})
    with pytest.raises(utils.NonFiniteError, match="step 3.*max_nonfinite_steps"):
        train_run(tmp_path, ["loss=sft", "n_examples=48", "eval_every=null", "exp_name=skip2",
                             "max_nonfinite_steps=1"])


# ------------------------------------------------------------------ 3. one writer per run

HOLD_LOCK = "import sys, time, utils; utils.RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)"


def test_a_second_launch_into_a_busy_run_directory_is_refused_and_a_crash_frees_it(tmp_path):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(utils.RunDirBusy, match=f"{run_dir}.*pid {holder.pid}"):
            train_run(tmp_path, ["loss=sft", "n_examples=16", "eval_every=null", "exp_name=busy"])
        assert not (run_dir / "metrics.jsonl").exists()
    finally:
        holder.kill()  # a crash: the kernel drops the lock
        holder.wait()
    run_dir, records = train_run(tmp_path, ["loss=sft", "n_examples=16", "eval_every=null", "exp_name=busy"])
    assert len(losses_of(records)) == 2


# ------------------------------------------------------------------ 4. disk full

@pytest.mark.parametrize("failure", ["torch", "oserror"])
def test_a_full_disk_is_a_clear_error_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch, failure):
    import errno
    real_save = torch.save

    def full_disk_save(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt") and "step-00000004" in str(path):
            with open(path, "wb") as f:
                f.write(b"\0" * 64)  # what got written before the disk filled up
            if failure == "torch":
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 960 vs 832")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(trainers.torch, "save", full_disk_save)
    with pytest.raises(checkpoints.CheckpointWriteError, match="disk is full") as err:
        train_run(tmp_path, SAVING)
    run_dir = str(tmp_path / "c")
    assert run_dir in str(err.value) and "LATEST still names step-00000002" in str(err.value)
    assert sorted(os.listdir(run_dir)).count(".step-00000004.tmp") == 0
    assert latest(run_dir) == "step-00000002" and checkpoints.is_complete_checkpoint(os.path.join(run_dir, "step-00000002"))
    monkeypatch.setattr(trainers.torch, "save", real_save)
    _, resumed = train_run(tmp_path, SAVING + ["resume=true"])
    assert latest(run_dir) == "step-00000006" and len(losses_of(resumed)) == 6


class _TwoRanks:
    """`agree` for two ranks run as threads: each call waits for the other rank's flags (a bare
    barrier that one rank never reaches would hang here, and the join timeout below catches it)."""

    def __init__(self):
        import threading
        self.meet, self.flags = threading.Barrier(2, timeout=20), [None, None]

    def for_rank(self, rank):
        def agree(flags):
            self.flags[rank] = list(flags)
            self.meet.wait()
            both = [a or b for a, b in zip(*self.flags)]
            self.meet.wait()
            return both
        return agree


@pytest.mark.parametrize("where", ["mkdir", "rank0_files"])
def test_a_failed_write_on_rank_0_is_an_error_on_every_rank_not_a_hang(tmp_path, monkeypatch, where):
    """safetensors raises its own SafetensorError (not an OSError): any exception on rank 0 is
    agreed across ranks, so rank 1 raises CheckpointWriteError instead of waiting forever."""
    import threading

    class SafetensorLikeError(Exception):
        pass
    real_makedirs, ranks, raised = os.makedirs, _TwoRanks(), {}

    def failing_makedirs(path, *a, **k):
        if where == "mkdir" and path.endswith(".step-00000004.tmp"):
            raise PermissionError(13, "Permission denied", path)
        return real_makedirs(path, *a, **k)

    def write_rank0(tmp):
        if where == "rank0_files":
            raise SafetensorLikeError("Error while serializing: IoError")
    monkeypatch.setattr(checkpoints.os, "makedirs", failing_makedirs)

    def rank(r):
        try:
            checkpoints.save(str(tmp_path), 4, r, ranks.for_rank(r), write_rank0, keep=2)
        except Exception as e:  # noqa: BLE001 - the test inspects what each rank raised
            raised[r] = e
    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(timeout=30) for t in threads]
    assert not any(t.is_alive() for t in threads)
    assert {r: type(e) for r, e in raised.items()} == {0: checkpoints.CheckpointWriteError,
                                                      1: checkpoints.CheckpointWriteError}
    assert ("Permission denied" if where == "mkdir" else "SafetensorLikeError") in str(raised[0])
    assert not os.path.exists(tmp_path / ".step-00000004.tmp") and not os.path.exists(tmp_path / "LATEST")


# ------------------------------------------------------------------ 5. bad values, before any model

@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was built before the bad value was reported")
    monkeypatch.setattr(models, "build_model", refuse)


def corrupt_archive(tmp_path, how):
    run_dir, _ = train_run(tmp_path / "src", ["loss=sft", "n_examples=8", "eval_every=null", "exp_name=src"])
    path = os.path.join(run_dir, latest(run_dir), "model.safetensors")
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 100)
    else:
        with open(path, "r+b") as f:
            f.write(b"\xff" * 16)
    return f"model.archive={run_dir}"


@pytest.mark.parametrize("overrides,match", [
    (["gradient_accumulation_steps=0"], "gradient_accumulation_steps=0"),
    (["loss=dpo", "loss.beta=abc"], "loss.beta='abc' must be a number"),
    (["lr=abc"], "lr='abc' must be a number"),
    (["n_examples=0"], "n_examples=0"),
    (["n_examples=-8"], "n_examples=-8"),
    (["n_examples=null", "n_epochs=0"], "n_epochs=0"),
    (["eval_every=0"], "eval_every=0.*null"),
    (["save_every=-16"], "save_every=-16"),
    (["keep_checkpoints=0"], "keep_checkpoints=0"),
    (["loss=dpo", "loss.beta=inf"], "loss.beta=inf is not a finite number"),
    (["loss=dpo", "loss.beta=nan"], "loss.beta=nan is not a finite number"),
    (["lr=-1e-3"], "lr=-0.001 must be >= 0"),
    (["max_prompt_length=48"], "max_prompt_length=48 must be >= 1 and below max_length=48"),
    (["truncation_mode=middle"], "truncation_mode='middle'"),
    (["batch_size=8.5"], "batch_size=8.5 must be a whole number"),
    (["do_first_eval=maybe"], "do_first_eval='maybe' must be true or false"),
    (["max_nonfinite_steps=-1"], "max_nonfinite_steps=-1"),
    (["truncated"], r"model\.archive=.*model\.safetensors.*truncated"),
    (["bad_header"], r"model\.archive=.*model\.safetensors.*(header|not safetensors)"),
])
def test_bad_values_are_refused_naming_the_key_before_any_model_loads(tmp_path, monkeypatch, overrides, match):
    if overrides[0] in ("truncated", "bad_header"):
        overrides = [corrupt_archive(tmp_path, overrides[0]), "loss=dpo"]
    def refuse(*a, **k):
        raise AssertionError("a model was built before the bad value was reported")
    monkeypatch.setattr(models, "build_model", refuse)
    with pytest.raises(ValueError, match=match):
        train_run(tmp_path, ["exp_name=bad", "n_examples=16"] + overrides)
    assert not (tmp_path / "bad" / "config.yaml").exists()


# ------------------------------------------------------------------ 6. sweeps

def run_sweep(tmp_path, *args):
    cmd = [sys.executable, "train.py", "--multirun"] + [o for o in FAST] + [
        f"runs_dir={tmp_path}", "hydra.sweep.dir=" + str(tmp_path / "_multirun"), "eval_every=null",
        "n_examples=16", "loss=dpo"] + list(args)
    env = dict(os.environ, PREFERENCE_DATA_CACHE=str(tmp_path / "cache"))
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


def test_a_sweep_checks_every_job_first_and_survives_a_job_that_fails_later(tmp_path):
    bad = run_sweep(tmp_path / "bad", "loss.beta=0.1,-1,0.2")
    assert bad.returncode != 0
    assert "1 of 3 sweep jobs are invalid" in bad.stderr and "job 1 (" in bad.stderr and "loss.beta" in bad.stderr
    assert not os.path.exists(tmp_path / "bad" / "dpo_tiny_loss.beta=0.1")  # job 0 never trained
    # job 1 diverges at run time: jobs 0 and 2 still run, the sweep reports it and fails
    late = run_sweep(tmp_path / "late", "lr=1e-3,1e4,2e-3", "warmup_steps=0", "loss.beta=5.0")
    assert late.returncode == 1, late.stderr[-2000:]
    assert "sweep: 1 of 3 jobs failed" in late.stderr and "job 1 (" in late.stderr and "non-finite" in late.stderr
    runs = {}
    for d in os.listdir(tmp_path / "late"):
        if os.path.exists(tmp_path / "late" / d / "config.yaml"):
            lr = open(tmp_path / "late" / d / "config.yaml").read().split("\nlr: ")[1].split()[0]
            runs[float(lr)] = os.path.exists(tmp_path / "late" / d / "DONE")
    assert runs == {1e-3: True, 1e4: False, 2e-3: True}


# ------------------------------------------------------------------ 7. resume

def test_resume_trims_redone_records_and_refuses_changed_settings(tmp_path):
    _, full = train_run(tmp_path / "a", SAVING)
    run_dir, _ = train_run(tmp_path / "b", SAVING)
    # a crash after step 6 was logged but before its checkpoint
    os.remove(os.path.join(run_dir, "DONE"))
    utils.remove_tree(os.path.join(run_dir, "step-00000006"))
    utils.atomic_write_text(os.path.join(run_dir, "LATEST"), "step-00000004\n")
    config_before = open(os.path.join(run_dir, "config.yaml")).read()
    with pytest.raises(ValueError, match=r"lr: 0.001 in the checkpoint, 1000.0 now") as err:
        train_run(tmp_path / "b", SAVING + ["resume=true", "lr=1e3"])
    assert "resume_allow_changes=true" in str(err.value)
    assert open(os.path.join(run_dir, "config.yaml")).read() == config_before
    # length, evaluation and saving may change; the redone steps' old records are dropped
    _, resumed = train_run(tmp_path / "b", SAVING + ["resume=true", "keep_checkpoints=5"])
    assert len(losses_of(resumed)) == 6 and losses_of(resumed) == losses_of(full)
    assert [r["step"] for r in resumed if "loss/train" in r] == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_older_than_a_key_resumes_when_the_key_is_at_its_default(tmp_path):
    import json
    import train
    from prefkd import checkpoints
    run_dir, _ = train_run(tmp_path, SAVING)
    os.remove(os.path.join(run_dir, "DONE"))
    for step in [d for d in os.listdir(run_dir) if d.startswith("step-")]:
        path = os.path.join(run_dir, step, "trainer_state.json")
        with open(path) as f:
            state = json.load(f)
        for k in ("flip_fraction", "flip_seed"):  # written before the option existed
            state["config"]["data"].pop(k)
        utils.atomic_write_json(path, state)
        checkpoints.write_manifest(os.path.join(run_dir, step))  # still a complete checkpoint
    cfg = compose(FAST + SAVING + ["resume=true", f"runs_dir={tmp_path}"])
    train.check_resume_settings(cfg, run_dir)  # at the default: the behaviour the checkpoint had
    cfg.trainer = compose(["trainer=TensorParallelTrainer"]).trainer  # sums in another order: refused
    with pytest.raises(ValueError, match=r"trainer.name: 'BasicTrainer' in the checkpoint, 'TensorParallelTrainer' now"):
        train.check_resume_settings(cfg, run_dir)
    cfg.trainer = compose([]).trainer
    cfg.data.flip_fraction = 0.2
    with pytest.raises(ValueError, match=r"data.flip_fraction: '<absent>' in the checkpoint, 0.2 now"):
        train.check_resume_settings(cfg, run_dir)


def test_resume_allow_changes_continues_with_the_new_settings(tmp_path, capsys):
    run_dir, _ = train_run(tmp_path, SAVING)
    os.remove(os.path.join(run_dir, "DONE"))
    _, records = train_run(tmp_path, SAVING[:1] + ["n_examples=64"] + SAVING[2:] +
                           ["resume=true", "lr=2e-3", "resume_allow_changes=true"])
    assert "lr: 0.001 in the checkpoint, 0.002 now" in capsys.readouterr().out
    assert len(losses_of(records)) == 8


# ------------------------------------------------------------------ 8. wandb mode from the environment

def test_wandb_mode_from_the_environment_unless_the_command_line_sets_it(monkeypatch):
    import train
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose([])
    train.apply_wandb_env(cfg, [])
    assert cfg.wandb.mode == "disabled"
    cfg = compose(["wandb.mode=offline"])
    train.apply_wandb_env(cfg, ["wandb.mode=offline"])
    assert cfg.wandb.mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # wandb's older name for offline
    cfg = compose([])
    train.apply_wandb_env(cfg, [])
    assert cfg.wandb.mode == "offline"


def test_wandb_disabled_by_the_environment_writes_no_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    overrides = [o for o in FAST if not o.startswith("wandb")]
    run_dir, _ = train_run(tmp_path, [o for o in overrides] + ["n_examples=8",
                                                                "eval_every=null", "exp_name=w"])
    assert not os.path.exists(os.path.join(run_dir, "wandb"))


# ------------------------------------------------------------------ signals and time-based saves

def test_sigint_saves_at_the_step_boundary_and_resume_continues_exactly(tmp_path, monkeypatch):
    common = ["loss=sft", "n_examples=48", "eval_every=null", "exp_name=s", "lr=1e-3"]
    _, full = train_run(tmp_path / "a", common)
    real_log = trainers.BasicTrainer.log

    def log_then_interrupt(self, metrics, eval_samples=None):
        real_log(self, metrics, eval_samples)
        if self.step == 3 and "loss/train" in metrics:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(trainers.BasicTrainer, "log", log_then_interrupt)
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(utils.TrainingStopped, match="stopped before its end"):
        train_run(tmp_path / "b", common)
    run_dir = str(tmp_path / "b" / "s")
    assert latest(run_dir) == "step-00000003" and not os.path.exists(os.path.join(run_dir, "DONE"))
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler is restored
    monkeypatch.setattr(trainers.BasicTrainer, "log", real_log)
    _, resumed = train_run(tmp_path / "b", common + ["resume=true"])
    assert losses_of(resumed) == losses_of(full)


def test_sigterm_to_a_training_process_saves_and_exits_nonzero(tmp_path):
    cmd = [sys.executable, "train.py"] + FAST + [f"runs_dir={tmp_path}", "loss=sft", "n_examples=1000000",
                                                 "eval_every=null", "exp_name=t", "save_every_minutes=null"]
    env = dict(os.environ, PREFERENCE_DATA_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    name = latest(tmp_path / "t")
    assert checkpoints.is_complete_checkpoint(str(tmp_path / "t" / name)) and int(name[5:]) >= 2
    assert "resume=true" in err


def test_save_every_minutes_bounds_the_work_lost(tmp_path, monkeypatch):
    written = count_writes(monkeypatch)
    train_run(tmp_path, ["loss=sft", "n_examples=32", "eval_every=null", "exp_name=m", "save_every_minutes=1e-9",
                         "keep_checkpoints=10"])
    assert written == [1, 2, 3, 4]
