"""Distributed trainers against the single-process result on the same global batches.

FSDP runs 2 gloo processes on the CPU through the user-facing launch path
(`python train.py trainer=FSDPTrainer` spawns its own workers); each launch costs ~10 s,
so one launch covers training, evaluation, sampling and the checkpoint.
"""
import os
import socket
import subprocess
import sys

import pytest

from conftest import FAST, REPO, read_metrics, train_run

COMMON = ["loss=dpo", "n_examples=48", "eval_every=24", "lr=1e-3", "gradient_accumulation_steps=2",
          "sample_during_eval=true", "n_eval_samples=8", "exp_name=d"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, overrides):
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *FAST, f"runs_dir={tmp_path}", *overrides]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    launch.stdout = out.stdout
    return os.path.join(tmp_path, "d")


def by_step(records, key):
    return [r[key] for r in records if key in r]


def assert_same(single, other, keys, tol):
    for key in keys:
        a, b = by_step(single, key), by_step(other, key)
        assert len(a) == len(b) > 0, key
        assert max(abs(x - y) for x, y in zip(a, b)) < tol, (key, a, b)


def test_fsdp_two_processes_match_one_process(tmp_path):
    """Also packed (padding_free) with token-budget micro-batches: each rank packs its own rows and
    cuts its own micro-batches, the ranks agreeing on how many forward calls and micro-batches run
    (FSDP's collectives), with the one padded process's numbers (packed = padded: test_packing.py)."""
    _, single = train_run(tmp_path / "single", COMMON)
    run_dir = launch(tmp_path / "fsdp", COMMON + ["trainer=FSDPTrainer", "trainer.cpu_workers=2",
                                                  f"trainer.port={free_port()}", "padding_free=true",
                                                  "max_tokens_per_micro_batch=40"])
    fsdp = read_metrics(run_dir)
    assert_same(single, fsdp, ["loss/train", "rewards_train/margins", "logps_train/chosen", "loss/eval",
                               "rewards_eval/accuracies", "rewards_eval/margins"], tol=1e-5)
    assert by_step(single, "grad_norm") == pytest.approx(by_step(fsdp, "grad_norm"), abs=1e-4)
    # the gathered full checkpoint loads with plain transformers
    from transformers import AutoModelForCausalLM
    ckpt = os.path.join(run_dir, open(os.path.join(run_dir, "LATEST")).read().strip())
    AutoModelForCausalLM.from_pretrained(ckpt)


def test_fsdp_lora_two_processes_match_one_process(tmp_path):
    """LoRA under FSDP2: the frozen base sharded, gradients and AdamW state only for the adapters,
    the reference the adapters switched off; losses and the saved adapter equal one process's."""
    from safetensors.torch import load_file
    common = COMMON + ["model.lora.r=8", "model.lora.alpha=32"]
    single_dir, single = train_run(tmp_path / "single", common)
    run_dir = launch(tmp_path / "fsdp", common + ["trainer=FSDPTrainer", "trainer.cpu_workers=2",
                                                  f"trainer.port={free_port()}"])
    fsdp = read_metrics(run_dir)
    assert_same(single, fsdp, ["loss/train", "rewards_train/margins", "loss/eval", "rewards_eval/margins"], tol=1e-5)
    assert by_step(single, "loss/train")[-1] < by_step(single, "loss/train")[0] - 0.005  # the adapters learn
    name = "step-00000006/adapter/adapter_model.safetensors"
    a, b = load_file(os.path.join(single_dir, name)), load_file(os.path.join(run_dir, name))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    # the merged model each wrote at the end is the same model
    a, b = (load_file(os.path.join(d, "step-00000006/model.safetensors")) for d in (single_dir, run_dir))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_an_fsdp_resume_streams_the_optimizer_state_and_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """2 ranks: rank 0 streams the AdamW state into the ranks' shards (prefkd/optimizer_state.py);
    the resumed run's losses and weights are bitwise the uninterrupted 2-rank run's."""
    from safetensors.torch import load_file
    common = ["loss=dpo", "eval_every=null", "lr=1e-3", "exp_name=d", "trainer=FSDPTrainer", "trainer.cpu_workers=2"]
    full = launch(tmp_path / "a", common + ["n_examples=48", f"trainer.port={free_port()}"])
    launch(tmp_path / "b", common + ["n_examples=24", f"trainer.port={free_port()}"])
    resumed = launch(tmp_path / "b", common + ["n_examples=48", "resume=true", f"trainer.port={free_port()}"])
    assert "optimizer state streamed from rank 0" in launch.stdout
    assert by_step(read_metrics(full), "loss/train") == by_step(read_metrics(resumed), "loss/train")
    a, b = (load_file(os.path.join(d, "step-00000006", "model.safetensors")) for d in (full, resumed))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert os.path.isfile(os.path.join(full, "step-00000006", "optimizer.tensors"))


def test_fsdp_tvkd_with_sharded_teacher_matches_one_process(tmp_path, trained_teacher):
    common = ["loss=tvkd", "loss.alpha=0.5", "n_examples=32", "eval_every=null", "lr=1e-3", "exp_name=d",
              "teacher=tiny_teacher", f"teacher.archive={trained_teacher}"]
    _, single = train_run(tmp_path / "single", common)
    fsdp = read_metrics(launch(tmp_path / "fsdp", common + ["trainer=FSDPTrainer", "trainer.cpu_workers=2",
                                                            f"trainer.port={free_port()}"]))
    assert_same(single, fsdp, ["loss/train", "shaping_train/margin", "value_train/chosen_last", "loss/eval",
                               "shaping_eval/margin"], tol=1e-5)


def test_tensor_parallel_matches_one_process(tmp_path):
    # the tensor-parallel policy keeps its full logits (no chunked output layer): so does the single run
    common = ["loss=dpo", "n_examples=32", "eval_every=null", "lr=1e-3", "exp_name=t", "output_chunking=false"]
    _, single = train_run(tmp_path / "single", common)
    run_dir, tp = train_run(tmp_path / "tp", common + ["trainer=TensorParallelTrainer", "trainer.cpu_workers=2"])
    assert_same(single, tp, ["loss/train", "rewards_train/margins", "loss/eval"], tol=1e-5)
    # the checkpoint holds the underlying model's names and the trained weights
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    ckpts = [os.path.join(d, open(os.path.join(d, "LATEST")).read().strip()) for d in (tmp_path / "single" / "t", run_dir)]
    a, b = (load_file(os.path.join(c, "model.safetensors")) for c in ckpts)
    assert sorted(a) == sorted(b)
    # 4 AdamW steps at lr 1e-3: the sharded matmuls sum in another order, and Adam's normalisation
    # turns a 1e-7 gradient difference on a near-zero gradient into up to a few % of one step (1e-3)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-5
    AutoModelForCausalLM.from_pretrained(ckpts[1])
