"""Shared fixtures: every test runs offline, on the CPU, with runs written under tmp_path."""
import os
import sys

import pytest
import losses  # noqa: F401  (registers every loss: prefkd.loss_spec.LOSSES)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def compose(overrides=()):
    """The config train.py would see for these command-line overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf
    with initialize_config_dir(config_dir=os.path.join(REPO, "config"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    OmegaConf.set_struct(cfg, False)
    return cfg


# Small, fast settings shared by the training tests.
FAST = ["wandb.mode=disabled", "progress_bar=false", "do_first_eval=false", "n_eval_examples=32",
        "eval_batch_size=16", "batch_size=8", "warmup_steps=2"]


def leave_process_group() -> None:
    """The end of a test's worker process after its work: meet the other ranks at a barrier, then
    exit at once. Skipping the interpreter's teardown skips gloo's: on this CPU build it aborted
    or crashed a worker at exit now and then ("terminate called without an active exception",
    SIGSEGV) after every result was in."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train_run(tmp_path, overrides):
    """Run train.run() in-process; returns (run_dir, list of metric records)."""
    import train
    cfg = compose(list(FAST) + [f"runs_dir={tmp_path}"] + list(overrides))
    run_dir = train.run(cfg, overrides)
    return run_dir, read_metrics(run_dir)


def interrupt_at(monkeypatch, step: int):
    """SIGINT to this process right after step `step` is logged (a Ctrl-C at that step boundary);
    returns the function that puts the trainer's logging back."""
    import signal
    import trainers
    real_log = trainers.BasicTrainer.log

    def log_then_interrupt(self, metrics, eval_samples=None):
        real_log(self, metrics, eval_samples)
        if self.step == step and "loss/train" in metrics:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(trainers.BasicTrainer, "log", log_then_interrupt)
    return lambda: monkeypatch.setattr(trainers.BasicTrainer, "log", real_log)


def read_metrics(run_dir):
    import json
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    # the tokenisation cache of train.py runs stays inside the test's directory
    monkeypatch.setenv("PREFERENCE_DATA_CACHE", str(tmp_path / "preference_data_cache"))


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory):
    """A DPO-trained tiny_teacher (SFT then DPO on the embedded task, ~30 s), shared by the
    tests that need a teacher with knowledge in it."""
    import train
    root = tmp_path_factory.mktemp("teacher")
    common = list(FAST) + [f"runs_dir={root}", "model=tiny_teacher", "eval_every=null"]
    sft = ["loss=sft", "lr=1e-3", "n_examples=3200", "exp_name=sft"]
    train.run(compose(common + sft), sft)
    dpo = ["loss=dpo", "lr=1e-4", "n_examples=800", "exp_name=dpo", f"model.archive={root}/sft"]
    return train.run(compose(common + dpo), dpo)
