"""LoRA adapters (model.lora, prefkd/adapters.py): the first step equals full fine-tuning's while the
adapters' B matrices are zero, the reference is the base model exactly (and its cache equals it), the
checkpoints (peft's adapter files, the merged model) load with plain transformers and peft, resume is
exact, a LoRA-trained teacher feeds tvkd live and through its cache alike, and bad settings are refused
before any model loads. The 2-process FSDP check is in test_distributed.py."""
import os
import shutil

import pytest
import torch

from conftest import FAST, compose, train_run
from prefkd import adapters, checkpoints, models
from prefkd import tokenizer_facts
from prefkd.batches import concatenated_inputs

SHORT = ["n_eval_examples=16", "eval_every=null", "data.check_lengths=null"]
LORA = ["model.lora.r=8", "model.lora.alpha=16"]


def make_trainer(tmp_path, name, overrides):
    """A BasicTrainer of these overrides (checked by train.prepare, as train.py does)."""
    import train
    import trainers
    cfg = train.prepare(compose(FAST + SHORT + [f"runs_dir={tmp_path}", f"exp_name={name}"] + overrides))
    os.makedirs(train.run_dir_of(cfg), exist_ok=True)
    t = trainers.BasicTrainer(cfg, train.run_dir_of(cfg))
    t.t0 = 0.0
    return t


@pytest.fixture(scope="module")
def lora_teacher(tmp_path_factory):
    """(base directory, run directory) of a tiny_teacher DPO-trained with LoRA (r=8, lr 1e-2, 4 steps,
    a checkpoint at step 2 holding only the adapter) over a random-init base saved as a local model."""
    import train
    root = tmp_path_factory.mktemp("lora_teacher")
    tok = tokenizer_facts.get_tokenizer("embedded")
    base = str(root / "base")
    models.build_model(compose(["model=tiny_teacher"]).model, tok, torch.float32, seed=5).save_pretrained(base)
    tok.save_pretrained(base)
    over = ["model=tiny_teacher", f"model.name_or_path={base}", "loss=dpo", "lr=1e-2", "n_examples=32",
            "save_every=16", "keep_checkpoints=2", "exp_name=t"] + LORA
    run = train.run(compose(FAST + SHORT + [f"runs_dir={root}"] + over), over)
    return base, run


@pytest.mark.parametrize("loss", ["dpo", "tdpo", "tvkd", "dckd"])
def test_first_step_loss_equals_full_fine_tuning_while_b_is_zero(tmp_path, lora_teacher, loss):
    teacher = ["teacher=tiny_teacher", f"teacher.archive={lora_teacher[0]}"]
    over = [f"loss={loss}"] + (teacher if loss in ("tvkd", "dckd") else [])
    full, lora = make_trainer(tmp_path, "full", over), make_trainer(tmp_path, "lora", over + LORA)
    batch = next(iter(full.batch_iterator("train")))
    full_loss, full_m = full.compute_loss(batch, train=True)
    lora_loss, lora_m = lora.compute_loss(batch, train=True)
    assert abs(float(full_loss) - float(lora_loss)) < 1e-6
    for key in full_m:
        assert torch.allclose(full_m[key], lora_m[key], atol=1e-6), key
    # only the adapters train: 2 x r x (in + out) per adapted linear layer of the 3 decoder blocks
    n = sum(p.numel() for p in lora.policy.parameters() if p.requires_grad)
    assert n == 3 * 8 * (4 * (96 + 96) + 3 * (96 + 256))  # 43,776 of the model's 396,384
    assert n == sum(p.numel() for p in lora.optimizer.param_groups[0]["params"])


def test_the_reference_is_the_base_model_exactly_and_its_cache_equals_it(tmp_path):
    import precompute as pc
    from prefkd.logprobs import token_logps
    t = make_trainer(tmp_path, "r", ["loss=dpo", "lr=1e-2"] + LORA)
    assert t.frozen.reference_from_policy and isinstance(t.frozen.reference, adapters.AdaptersOff)
    batches = iter(t.batch_iterator("train"))
    t.train_step(next(batches))
    t.train_step(next(batches))  # the adapters have moved: B is no longer zero
    batch = next(batches)
    inputs = concatenated_inputs(batch, True, 0)
    model_in = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    live = t.frozen.reference_outputs(inputs, t.logits, t.device)["reference_logps"]
    base = models.freeze(models.build_model(t.cfg.model, t.tokenizer, torch.float32, None, t.cfg.seed))
    with torch.no_grad():
        alone = token_logps(base(**model_in).logits, inputs["labels"])
        policy = token_logps(t.policy(**model_in).logits, inputs["labels"])
    assert torch.equal(live, alone)  # bit for bit
    assert (policy - alone).abs().max() > 1e-3  # the policy itself has moved
    assert t.policy.training  # the reference's eval mode was the policy's only for that pass
    # the reference cache of this run (precompute.py builds the base alone) equals the live reference
    cache_dir = str(tmp_path / "ref_cache")
    over = FAST + SHORT + [f"runs_dir={tmp_path}", "exp_name=r", "loss=dpo", "lr=1e-2", f"reference.cache={cache_dir}"] + LORA
    pc.precompute(compose(over), "reference", log=lambda *a: None)
    cached = make_trainer(tmp_path, "rc", ["loss=dpo", "lr=1e-2", f"reference.cache={cache_dir}"] + LORA)
    got = cached.frozen.reference_outputs(inputs, cached.logits, cached.device)["reference_logps"]
    mask = inputs["labels"][:, 1:] != -100
    assert torch.allclose(got[mask], live[mask], atol=1e-6)


def test_merged_checkpoint_equals_the_adapter_model_and_loads_with_plain_transformers(lora_teacher):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base_dir, run = lora_teacher
    final, middle = os.path.join(run, "step-00000004"), os.path.join(run, "step-00000002")
    assert open(os.path.join(run, "LATEST")).read().strip() == "step-00000004"
    # every save holds peft's adapter files; only the last one (save_merged=false) the merged model
    for step in (final, middle):
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(os.path.join(step, "adapter")))
    assert os.path.isfile(os.path.join(final, "model.safetensors"))
    assert not os.path.exists(os.path.join(middle, "model.safetensors"))
    ids = torch.tensor([[1, 5, 9, 12, 7, 3, 20, 4]])
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    adapter_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), os.path.join(final, "adapter")).eval()
    plain_base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        m, a, b = merged(ids).logits, adapter_model(ids).logits, plain_base(ids).logits
    assert (m - a).abs().max() < 1e-5
    assert (m - b).abs().max() > 1e-3  # training changed the model
    tok = AutoTokenizer.from_pretrained(final)
    out = merged.generate(tok("12+34=", return_tensors="pt").input_ids, max_new_tokens=4, do_sample=False,
                          pad_token_id=tok.pad_token_id)
    assert out.shape[1] > 6
    # the adapter-only checkpoint is read as its recorded base with the adapter merged in
    mid_model = models.load_archive(middle, torch.float32).eval()
    mid_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), os.path.join(middle, "adapter"))
    with torch.no_grad():
        assert (mid_model(ids).logits - mid_peft.eval()(ids).logits).abs().max() < 1e-5
    assert set(load_file(os.path.join(final, "adapter", "adapter_model.safetensors"))) == \
        set(load_file(os.path.join(middle, "adapter", "adapter_model.safetensors")))


def test_a_lora_trained_teacher_feeds_tvkd_live_and_through_its_cache_alike(tmp_path, lora_teacher):
    import precompute as pc
    from prefkd import output_cache
    _, run = lora_teacher
    over = ["loss=tvkd", "loss.alpha=0.5", "teacher=tiny_teacher", f"teacher.archive={run}", "n_examples=16"]
    live = make_trainer(tmp_path, "live", over)
    cache_dir = str(tmp_path / "teacher_cache")
    pc.precompute(compose(FAST + SHORT + [f"runs_dir={tmp_path}", f"teacher.cache={cache_dir}"] + over), "teacher",
                  log=lambda *a: None)
    cached = make_trainer(tmp_path, "cached", over + [f"teacher.cache={cache_dir}"])
    assert cached.frozen.teacher is None
    for a, b in zip(live.batch_iterator("train"), cached.batch_iterator("train")):
        assert abs(live.train_step(a)["loss/train"] - cached.train_step(b)["loss/train"]) < 1e-6
    # the cache is keyed by the effective weights: an adapter-only checkpoint's fingerprint follows
    # its adapter file (the same base), and a copy of the same files keeps it
    middle = os.path.join(run, "step-00000002")
    copy, other = str(tmp_path / "copy"), str(tmp_path / "other")
    for d in (copy, other):
        shutil.copytree(middle, d)
    shutil.copy(os.path.join(run, "step-00000004", "adapter", "adapter_model.safetensors"),
                os.path.join(other, "adapter", "adapter_model.safetensors"))
    fp = output_cache.archive_fingerprint
    assert fp(middle) == fp(copy) != fp(other)


def test_resume_gives_the_uninterrupted_runs_losses_and_adapter(tmp_path):
    from safetensors.torch import load_file
    common = ["loss=dpo", "n_examples=48", "exp_name=r", "lr=1e-3", "model.lora.dropout=0.1"] + LORA
    full_dir, full = train_run(tmp_path / "a", common + SHORT)
    train_run(tmp_path / "b", ["loss=dpo", "n_examples=24"] + common[2:] + SHORT)
    run_dir, both = train_run(tmp_path / "b", common + SHORT + ["resume=true"])
    losses = lambda recs: [r["loss/train"] for r in recs if "loss/train" in r]  # noqa: E731
    assert len(losses(full)) == len(losses(both)) == 6
    assert losses(both) == losses(full)  # bitwise: base, adapter, optimizer, data position, dropout's RNG
    a = load_file(os.path.join(full_dir, "step-00000006", "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(run_dir, "step-00000006", "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pipeline_end_to_end_with_lora_on_every_stage(tmp_path):
    import json
    import pipeline
    out = tmp_path / "p"
    stages = ["stages.teacher_sft.n_examples=32", "stages.teacher_dpo.n_examples=16", "stages.student_sft.n_examples=32",
              "stages.methods.n_examples=16", "stages.methods.n_eval_samples=4", "eval.n=8", "eval.batch_size=8", "eval.max_new_tokens=2",
              "common.model.lora.r=8", "common.lr=3e-3"]
    args = [f"out={out}", "methods=[dpo]", "seeds=1", "wandb.mode=disabled", "progress_bar=false", "batch_size=8",
            "eval_batch_size=8", "n_eval_examples=8", "eval_every=null", "num_threads=1"] + stages
    assert pipeline.main(args) == 0
    for run in ("teacher_sft", "teacher_dpo", "student_sft", "methods/dpo_seed0"):
        report = json.loads((out / run / "model_report.json").read_text())
        assert report["lora"]["r"] == 8 and report["parameters"]["trainable"] < report["parameters"]["total"] / 5, run
        assert os.path.exists(out / run / "eval.json")
    # the DPO stages start from a LoRA run: their reference is that run's merged model, said so
    report = json.loads((out / "teacher_dpo" / "model_report.json").read_text())
    assert report["reference_mode"] == "adapters off" and "a LoRA run" in report["reference"]
    report = json.loads((out / "methods" / "dpo_seed0" / "model_report.json").read_text())
    # the methods read the student's reference from the pipeline's reference cache (equal to adapters off)
    assert report["reference_mode"] == "cache"
    # every later stage read its predecessor's final checkpoint: the merged model, loadable alone
    final = checkpoints.resolve_checkpoint(str(out / "student_sft"))
    assert os.path.isfile(os.path.join(final, "model.safetensors")) and adapters.location(final)


@pytest.mark.parametrize("overrides, message", [
    (["model.lora.r=0"], "model.lora.r=0 must be a whole number >= 1"),
    (["model.lora.r=8", "model.lora.target_modules=[q_proj,qkv_proj]"], "no module of model=tiny is called ['qkv_proj']"),
    (["model.lora.r=8", "model.lora.target_modules=[norm]"], "peft cannot adapt model=tiny"),
    (["model.lora.r=8", "model.lora.target_modules=[q_proj]", "+model.lora.layers_to_transform=[7]"],
     "peft cannot adapt model=tiny"),
    (["model.lora.r=8", "+model.lora.rank=4"], "model.lora: "),
    (["model.lora.r=8", "trainer=TensorParallelTrainer"], "trainer=TensorParallelTrainer"),
    (["loss=tvkd", "teacher=tiny_teacher", "teacher.archive=x", "teacher.lora.r=8"], "teacher.lora.r=8: the teacher is frozen"),
])
def test_bad_lora_settings_are_refused_before_any_model_loads(tmp_path, monkeypatch, overrides, message):
    import train
    monkeypatch.setattr(models, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    cfg = compose(FAST + [f"runs_dir={tmp_path}"] + overrides)
    with pytest.raises(ValueError) as e:
        train.validate_config(cfg)
    assert message in str(e.value)
