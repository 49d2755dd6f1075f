"""Exact resume, and a resume that says when it cannot be: the run's fingerprint (prefkd/run_state.py)
refuses what changed between the interruption and the resume (a teacher's LATEST, the data, the code,
the CPU kernels); the CUDA generator is saved and never reseeded by building a model; the in-run
generation cache is in the checkpoint (bitwise resume across an epoch boundary with n_examples above
the data size); checkpoints agree across ranks; the smaller defects of a real run."""
import json
import os

import pytest
import torch

from conftest import FAST, compose, interrupt_at, read_metrics, train_run

import trainers
import utils
from prefkd import checkpoints, models, run_state
from prefkd import tokenizer_facts
from prefkd.data import embedded_task

losses_of = lambda recs: [r["loss/train"] for r in recs if "loss/train" in r]  # noqa: E731


def fake_run(root, name: str, seeds) -> str:
    """A run directory of random tiny_teacher checkpoints step-1, step-2... (one per seed), LATEST
    naming the first: a teacher whose LATEST can move."""
    run = root / name
    tok = tokenizer_facts.get_tokenizer("embedded")
    for i, seed in enumerate(seeds, 1):
        path = run / f"step-{i:08d}"
        models.build_model(compose(["model=tiny_teacher"]).model, tok, torch.float32, seed=seed).save_pretrained(path)
        tok.save_pretrained(path)
    (run / "LATEST").write_text("step-00000001\n")
    return str(run)


def local_pairs(root, n: int = 16) -> str:
    """n embedded pairs as a local file (plain text, TRL's columns): a data set smaller than the run."""
    path = root / "pairs.jsonl"
    with open(path, "w") as f:
        for ex in embedded_task.load_embedded("train")[:n]:
            f.write(json.dumps({k: ex[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
    return str(path)


# ------------------------------------------------------------------ random generators

def test_building_a_model_never_reseeds_the_cuda_generators_and_checkpoints_carry_the_cuda_state(monkeypatch):
    seeded, restored = [], []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: seeded.append(s))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: seeded.append(s))
    before = torch.get_rng_state()
    with utils.fork_rng(7):
        drawn = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before) and seeded == []  # the CPU stream restored, CUDA untouched
    with utils.fork_rng(7):
        assert torch.equal(torch.rand(3), drawn)  # seeded: the same draws
    fake = torch.arange(8, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": fake.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    state = utils.get_rng_state()
    assert torch.equal(state["cuda"], fake)
    utils.set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], fake)


# ------------------------------------------------------------------ the fingerprint

def test_a_moved_teacher_latest_changed_data_code_or_kernels_are_refused_on_resume(tmp_path, monkeypatch):
    teacher = fake_run(tmp_path, "teacher", seeds=(11, 12))
    pairs = local_pairs(tmp_path)
    common = ["loss=tvkd", "teacher=tiny_teacher", f"teacher.archive={teacher}", "datasets=[local]",
              f"data.local.path={pairs}", "data.test_fraction=0.25", "eval_every=null", "exp_name=t", "lr=1e-3"]
    run_dir, _ = train_run(tmp_path, common + ["n_examples=16"])
    state = json.load(open(os.path.join(checkpoints.resolve_checkpoint(run_dir), "trainer_state.json")))
    fp = state[run_state.KEY]
    assert fp["models.teacher"]["source"] == os.path.join(teacher, "step-00000001")
    assert fp["environment.cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert {"data.local.train", "data.local.test", "models.policy"} <= set(fp)
    more = common + ["n_examples=32", "resume=true"]
    (tmp_path / "teacher" / "LATEST").write_text("step-00000002\n")  # the teacher was retrained meanwhile
    with pytest.raises(ValueError, match=r"fingerprint\.models\.teacher: .*step-00000001.* in the checkpoint, "
                                         r".*step-00000002.* now"):
        train_run(tmp_path, more)
    (tmp_path / "teacher" / "LATEST").write_text("step-00000001\n")
    monkeypatch.setattr(run_state, "code_version", lambda: "0" * 40)
    if fp.get("code"):  # a git checkout: its commit is recorded
        with pytest.raises(ValueError, match=r"fingerprint\.code: "):
            train_run(tmp_path, more)
    monkeypatch.setattr(run_state, "code_version", lambda: fp.get("code"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "OTHER")
    with pytest.raises(ValueError, match=r"fingerprint\.environment\.cpu_kernels: .* 'OTHER' now"):
        train_run(tmp_path, more)
    monkeypatch.undo()
    with open(pairs, "a") as f:  # a data file edited meanwhile
        f.write(json.dumps({"prompt": "sort 21=", "chosen": "12", "rejected": "123"}) + "\n")
    with pytest.raises(ValueError, match=r"fingerprint\.data\.local\.train"):
        train_run(tmp_path, more)
    _, recs = train_run(tmp_path, more + ["resume_allow_changes=true"])  # accepted when asked, and said
    assert max(r["examples"] for r in recs) == 32


def test_a_resume_to_fewer_examples_than_trained_is_refused(tmp_path):
    common = ["loss=sft", "eval_every=null", "exp_name=s", "lr=1e-3"]
    train_run(tmp_path, common + ["n_examples=32"])
    with pytest.raises(ValueError, match="has trained on 32 examples, more than n_examples=16"):
        train_run(tmp_path, common + ["n_examples=16", "resume=true"])


# ------------------------------------------------------------------ in-run generation

def test_sampled_generations_past_the_data_size_resume_bitwise(tmp_path, monkeypatch):
    """seqkd samples the teacher's responses (temperature 1) once per prompt; 16 pairs, 48 examples:
    epochs 2 and 3 reuse epoch 1's responses. Interrupted in epoch 2, the resumed run must reuse them
    too (from its checkpoint), not draw them again."""
    teacher = fake_run(tmp_path, "teacher", seeds=(11,))
    common = ["loss=seqkd", "loss.temperature=1.0", "teacher=tiny_teacher", f"teacher.archive={teacher}",
              "datasets=[local]", f"data.local.path={local_pairs(tmp_path)}", "data.test_fraction=0.25",
              "n_examples=48", "eval_every=null", "exp_name=g", "lr=1e-3", "max_new_tokens=8"]
    _, full = train_run(tmp_path / "a", common)
    restore = interrupt_at(monkeypatch, 3)
    with pytest.raises(utils.TrainingStopped):
        train_run(tmp_path / "b", common)
    restore()
    ckpt = os.path.join(tmp_path / "b" / "g", "step-00000003")
    assert os.path.isfile(os.path.join(ckpt, "generation_rank0.pt"))
    run_dir, _ = train_run(tmp_path / "b", common + ["resume=true"])
    assert len(losses_of(full)) == 6 and losses_of(read_metrics(run_dir)) == losses_of(full)


# ------------------------------------------------------------------ smaller defects

def test_a_resume_that_finds_no_checkpoint_keeps_none_of_the_earlier_records(tmp_path):
    common = ["loss=sft", "n_examples=16", "eval_every=null", "exp_name=m", "do_first_eval=true"]
    run_dir, _ = train_run(tmp_path, common)
    for name in os.listdir(run_dir):  # an attempt that logged but never saved
        if name.startswith(("step-", "LATEST", "DONE")):
            utils.remove_tree(os.path.join(run_dir, name)) if os.path.isdir(os.path.join(run_dir, name)) \
                else os.remove(os.path.join(run_dir, name))
    _, recs = train_run(tmp_path, common + ["resume=true"])
    assert [r["step"] for r in recs if "loss/eval" in r] == [0, 2]  # step 0 logged once


def test_an_evaluation_due_at_a_skipped_nonfinite_step_still_happens(tmp_path, monkeypatch):
    real = trainers.BasicTrainer.clip_gradients

    def nan_at_step_1(self):
        norm = real(self)
        return float("nan") if self.step == 1 else norm  # self.step is still the finished steps' count
    monkeypatch.setattr(trainers.BasicTrainer, "clip_gradients", nan_at_step_1)
    _, recs = train_run(tmp_path, ["loss=sft", "n_examples=32", "eval_every=16", "exp_name=n",
                                   "max_nonfinite_steps=1"])
    assert [r["examples"] for r in recs if "loss/eval" in r] == [16, 32]  # step 2 (16 examples) was skipped


def test_the_chunked_reference_of_a_lora_policy_with_a_trained_output_layer_is_the_base_model(monkeypatch):
    from prefkd import logits as logits_lib
    monkeypatch.setattr(logits_lib, "CHUNK_ELEMENTS", 1000)  # chunk even these small logits
    cfg = compose(["loss=dpo", "model.lora.r=4", "+model.lora.modules_to_save=[lm_head]", "output_chunking=true"])
    tok = tokenizer_facts.get_tokenizer("embedded")
    base = models.build_model(cfg.model, tok, torch.float32, seed=0)
    policy = models.build(cfg, "policy", tok)
    from prefkd import adapters
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "modules_to_save" in name:
                p.add_(1.0)  # the trained copy of the output layer differs from the base's
    ids = torch.randint(3, len(tok), (2, 40))
    model_in = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ref = adapters.AdaptersOff(policy)
    with torch.no_grad():
        got = logits_lib.output_logits(ref, model_in, chunk=True)
        got = got.materialize() if hasattr(got, "materialize") else got
        torch.testing.assert_close(got, base(**model_in).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides, match", [
    (["loss=sft", "data.flip_fraction=0.3"], "data.flip_fraction=0.3 swaps chosen and rejected, which loss=sft"),
    (["loss=dpo", "max_tokens_per_micro_batch=3"], "max_tokens_per_micro_batch=3 is below one sequence"),
])
def test_settings_that_would_be_silently_ignored_are_refused(overrides, match):
    import train
    with pytest.raises(ValueError, match=match):
        train.prepare(compose(FAST + overrides))


def test_a_reused_pipeline_stage_that_does_not_exist_is_refused_naming_its_key(tmp_path, capsys):
    import pipeline
    assert pipeline.main([f"out={tmp_path}/p", f"reuse.teacher_sft={tmp_path}/missing"]) == 2
    assert f"reuse.teacher_sft={tmp_path}/missing: no such run directory" in capsys.readouterr().err


def test_the_optimizer_state_round_trips_and_an_older_single_file_checkpoint_still_reads(tmp_path):
    from prefkd import optimizer_state
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    blob = {"optimizer": opt.state_dict(), "scheduler": {"last_epoch": 3}}
    optimizer_state.write(str(tmp_path), blob)
    back = optimizer_state.read_full(str(tmp_path))
    assert back["scheduler"] == {"last_epoch": 3}
    for pid, st in blob["optimizer"]["state"].items():
        assert set(back["optimizer"]["state"][pid]) == set(st)
        assert all(torch.equal(back["optimizer"]["state"][pid][k], v) for k, v in st.items())
    skeleton = optimizer_state.read_skeleton(str(tmp_path))  # the moments are in optimizer.tensors only
    assert optimizer_state.is_ref(skeleton["optimizer"]["state"][0]["exp_avg"])
    reader = optimizer_state.TensorReader(str(tmp_path / optimizer_state.TENSORS))
    assert torch.equal(reader.read("state/0/exp_avg", range(1, 3)), blob["optimizer"]["state"][0]["exp_avg"][1:3])
    reader.close()
    old = tmp_path / "old"
    old.mkdir()
    torch.save(blob, old / "optimizer.pt")  # written before the split
    assert torch.equal(optimizer_state.read_full(str(old))["optimizer"]["state"][1]["exp_avg_sq"],
                       blob["optimizer"]["state"][1]["exp_avg_sq"])


def test_a_truncated_optimizer_file_is_found_before_streaming_starts(tmp_path):
    """Streaming makes the other ranks wait on rank 0's reads: a file that would fail halfway is
    refused up front (read whole instead, which raises on every rank) rather than hanging them."""
    from prefkd import optimizer_state
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    names = [n for n, _ in model.named_parameters()]
    sd = opt.state_dict()
    blob = {"optimizer": {**sd, "state": {names[i]: st for i, st in sd["state"].items()}}, "scheduler": {}}
    optimizer_state.write(str(tmp_path), blob)
    skeleton = optimizer_state.read_skeleton(str(tmp_path))
    assert optimizer_state.can_stream(str(tmp_path), model, skeleton)
    path = tmp_path / optimizer_state.TENSORS
    path.write_bytes(path.read_bytes()[:-8])
    assert not optimizer_state.can_stream(str(tmp_path), model, skeleton)
    assert not optimizer_state.can_stream(str(tmp_path), torch.nn.Linear(4, 2, bias=False), skeleton)
