"""End-to-end runs of the single-process trainer on the embedded task."""
import os

import torch

from conftest import train_run
from prefkd import tokenizer_facts


def test_dpo_raises_heldout_preference_accuracy(tmp_path):
    run_dir, records = train_run(tmp_path, [
        "loss=dpo", "loss.beta=0.5", "lr=3e-3", "n_examples=1024", "batch_size=16", "eval_every=1024",
        "do_first_eval=true", "n_eval_examples=256", "eval_batch_size=64", "exp_name=dpo"])
    evals = [r for r in records if "rewards_eval/accuracies" in r]
    before, after = evals[0]["rewards_eval/accuracies"], evals[-1]["rewards_eval/accuracies"]
    # at the start policy == reference: every reward is 0, so accuracy is 0
    assert before == 0.0
    assert after > 0.75, (before, after)
    assert evals[-1]["rewards_eval/margins"] > 0.5


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    common = ["loss=dpo", "n_examples=96", "eval_every=null", "exp_name=r", "lr=1e-3"]
    _, full = train_run(tmp_path / "a", common)
    # interrupted: stop after 48 examples (a checkpoint), then resume to 96
    _, first = train_run(tmp_path / "b", common[:1] + ["n_examples=48"] + common[2:])
    run_dir, both = train_run(tmp_path / "b", common + ["resume=true"])
    losses = lambda recs: [r["loss/train"] for r in recs if "loss/train" in r]
    assert len(losses(full)) == 12 and len(losses(both)) == 12
    assert losses(both)[6:] == losses(full)[6:]  # bitwise: same batches, weights, optimizer state
    # resuming a run that is complete trains nothing and leaves its files as they were
    before = open(os.path.join(run_dir, "metrics.jsonl")).read()
    train_run(tmp_path / "b", common + ["resume=true"])
    assert open(os.path.join(run_dir, "metrics.jsonl")).read() == before


def test_checkpoint_loads_with_plain_transformers_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run_dir, _ = train_run(tmp_path, ["loss=sft", "n_examples=64", "eval_every=null", "exp_name=s"])
    with open(os.path.join(run_dir, "LATEST")) as f:
        ckpt = os.path.join(run_dir, f.read().strip())
    assert os.path.exists(os.path.join(ckpt, "COMPLETE"))
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("12+34=", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    # the saved weights are the trained ones: logits equal those of the trainer's model state
    from safetensors.torch import load_file
    sd = load_file(os.path.join(ckpt, "model.safetensors"))
    assert torch.equal(sd["lm_head.weight"], model.lm_head.weight)


def test_archive_chains_sft_into_dpo_and_existing_run_is_protected(tmp_path):
    import pytest
    sft_dir, _ = train_run(tmp_path, ["loss=sft", "n_examples=256", "eval_every=null", "exp_name=sft", "lr=2e-3"])
    first = lambda recs: [r for r in recs if "logps_eval/chosen" in r][0]["logps_eval/chosen"]
    _, from_sft = train_run(tmp_path, ["loss=dpo", "n_examples=8", "eval_every=null", "exp_name=dpo",
                                       "do_first_eval=true", f"model.archive={sft_dir}/LATEST"])
    _, scratch = train_run(tmp_path, ["loss=dpo", "n_examples=8", "eval_every=null", "exp_name=dpo0",
                                      "do_first_eval=true"])
    # before any DPO step the policy is the SFT model: its held-out log-probs are far above a random model's
    assert first(from_sft) > first(scratch) + 5.0, (first(from_sft), first(scratch))
    # re-running a finished command neither trains nor overwrites: it asks for resume/overwrite
    with pytest.raises(ValueError, match="resume=true"):
        train_run(tmp_path, ["loss=sft", "n_examples=256", "eval_every=null", "exp_name=sft", "lr=2e-3"])


def test_crash_in_the_middle_of_a_save_keeps_latest_and_resume_recovers(tmp_path, monkeypatch):
    import pytest
    import safetensors.torch
    common = ["loss=sft", "n_examples=48", "save_every=16", "eval_every=null", "exp_name=c", "lr=1e-3"]
    _, full = train_run(tmp_path / "a", common)
    real_save, calls = safetensors.torch.save_file, []

    def crashing_save(tensors, path, *args, **kwargs):
        calls.append(1) if str(path).endswith("model.safetensors") else None
        if len(calls) == 2 and str(path).endswith("model.safetensors"):  # the second checkpoint dies half-way
            raise KeyboardInterrupt("simulated crash during save")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        train_run(tmp_path / "b", common)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    run_dir = tmp_path / "b" / "c"
    assert open(run_dir / "LATEST").read().strip() == "step-00000002"
    assert (run_dir / "step-00000002" / "COMPLETE").exists()
    _, resumed = train_run(tmp_path / "b", common + ["resume=true"])
    losses = lambda recs: [r["loss/train"] for r in recs if "loss/train" in r]
    assert losses(resumed)[-4:] == losses(full)[-4:]


def test_tvkd_with_a_trained_teacher_raises_heldout_preference_accuracy(tmp_path, trained_teacher):
    _, records = train_run(tmp_path, [
        "loss=tvkd", "loss.alpha=0.5", "loss.beta=0.5", "lr=3e-3", "n_examples=1024", "batch_size=16",
        "eval_every=1024", "do_first_eval=true", "n_eval_examples=256", "eval_batch_size=64", "exp_name=tvkd",
        "teacher=tiny_teacher", f"teacher.archive={trained_teacher}"])
    evals = [r for r in records if "rewards_eval/accuracies" in r]
    assert evals[0]["rewards_eval/accuracies"] == 0.0 and evals[-1]["rewards_eval/accuracies"] > 0.75
    # the teacher's values are logged, and with gamma = 1 the shaping margin is their difference
    last = evals[-1]
    assert abs(last["shaping_eval/margin"] - 0.5 * (last["value_eval/chosen_last"] - last["value_eval/rejected_last"])) < 1e-3


def test_teacher_with_another_tokenizer_is_refused_before_training_by_a_per_token_loss(tmp_path, trained_teacher):
    import pytest
    tok = tokenizer_facts.get_tokenizer("embedded")
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(tmp_path / "other_tok")
    with pytest.raises(ValueError, match="loss=dckd reads the teacher per token"):
        train_run(tmp_path, ["loss=dckd", "n_examples=16", "exp_name=x", "teacher=tiny_teacher",
                             f"teacher.archive={trained_teacher}", f"teacher.tokenizer={tmp_path}/other_tok"])
    assert not os.path.exists(tmp_path / "x" / "metrics.jsonl")  # nothing trained
