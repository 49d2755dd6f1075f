"""Reward models (loss=rm, docs/losses.md#rm): Bradley-Terry on a scalar head that the loss spec
declares; a reward model trained on the embedded pairs ranks chosen above rejected on held-out
pairs; its checkpoint loads with plain transformers and gives the logged numbers."""
import os

import pytest
import torch

import losses as L
from conftest import FAST, compose, train_run
from prefkd import tokenizer_facts
import preference_datasets as data
from prefkd.batches import concatenated_inputs
from prefkd import loss_spec


def test_bradley_terry_loss_and_gradient_equal_a_hand_computation():
    rw = torch.tensor([1.0, -0.5, 2.0], requires_grad=True)
    rl = torch.tensor([0.2, 0.5, -1.0], requires_grad=True)
    c = 0.1
    loss = L.bradley_terry_loss(rw, rl, c)
    d, s = [0.8, -1.0, 3.0], [1.2, 0.0, 1.0]
    sig = [1 / (1 + torch.exp(torch.tensor(-x)).item()) for x in d]
    want = [-torch.log(torch.tensor(g)).item() + c * t ** 2 for g, t in zip(sig, s)]
    torch.testing.assert_close(loss, torch.tensor(want), rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    # d/dr_w = -(1 - sigma(d)) + 2 c (r_w + r_l);  d/dr_l = (1 - sigma(d)) + 2 c (r_w + r_l)
    torch.testing.assert_close(rw.grad, torch.tensor([-(1 - g) + 2 * c * t for g, t in zip(sig, s)]))
    torch.testing.assert_close(rl.grad, torch.tensor([(1 - g) + 2 * c * t for g, t in zip(sig, s)]))
    # no centring: the plain Bradley-Terry loss, log 2 at equal rewards
    assert L.bradley_terry_loss(torch.zeros(2), torch.zeros(2)).tolist() == pytest.approx([0.6931472] * 2)


def test_the_spec_declares_a_scalar_head_and_the_model_gets_one():
    from prefkd import models
    spec = loss_spec.get_loss("rm")
    assert spec.head == "scalar" and spec.reference_need(compose(["loss=rm"]).loss) is None
    assert not spec.teacher_need(compose(["loss=rm"]).loss)
    cfg = compose(["loss=rm"])
    tok = tokenizer_facts.get_tokenizer("embedded")
    rm = models.build(cfg, "policy", tok, head="scalar")
    lm = models.build(cfg, "policy", tok)
    assert type(rm).__name__ == "LlamaForSequenceClassification" and rm.config.num_labels == 1
    # the decoder is the starting model's (same seed), the head is new
    for k, v in lm.model.state_dict().items():
        torch.testing.assert_close(rm.model.state_dict()[k], v, rtol=0, atol=0)
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, tok.pad_token_id, tok.pad_token_id]])
    assert rm(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits.shape == (2, 1)


RM_RUN = ["loss=rm", "lr=1e-3", "n_examples=1536", "batch_size=16", "eval_every=null", "n_eval_examples=256",
          "eval_batch_size=64", "exp_name=rm", "warmup_steps=10"]


def test_a_reward_model_trained_on_the_embedded_pairs_ranks_held_out_pairs(tmp_path):
    """Trained from the random tiny model on the embedded task's pairs; its checkpoint, loaded with
    plain transformers, scores the held-out pairs as the run logged them."""
    from transformers import AutoModelForSequenceClassification
    run_dir, records = train_run(tmp_path, RM_RUN)
    final = [r for r in records if "rewards_eval/accuracies" in r][-1]
    assert final["rewards_eval/accuracies"] > 0.85, final  # chance is 0.5
    assert final["rewards_eval/margins"] > 1.0
    ckpt = os.path.join(run_dir, open(os.path.join(run_dir, "LATEST")).read().strip())
    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    cfg = compose(FAST + RM_RUN)
    from prefkd import reward_scoring as rs
    scorer, tok = rs.load(ckpt, torch.device("cpu"))
    acc, margins, scored = [], [], []
    for batch in data.run_batches(cfg, tokenizer_facts.get_tokenizer(ckpt), loss_spec.get_loss("rm"), "test"):
        inp = concatenated_inputs(batch, True, 0)
        with torch.no_grad():
            r = model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).logits[:, 0]
        b = len(batch["prompt"])
        acc += (r[:b] > r[b:]).float().tolist()
        margins += (r[:b] - r[b:]).tolist()
        # evaluate.py's scoring path on the same texts gives the trainer's rewards (same ids, same pooling)
        texts = [{"prompt": p, "completion": c} for p, c in zip(batch["prompt"] * 2, batch["chosen"] + batch["rejected"])]
        got = rs.score_records(scorer, tok, texts, batch_size=16, as_trainer=rs.training_format(run_dir))
        scored += [abs(x - float(y)) for x, y in zip(got, r)]
    assert sum(acc) / len(acc) == pytest.approx(final["rewards_eval/accuracies"], abs=1e-6)
    assert sum(margins) / len(margins) == pytest.approx(final["rewards_eval/margins"], rel=1e-5, abs=1e-5)
    assert len(scored) == 2 * len(acc) and max(scored) < 1e-4


@pytest.mark.parametrize("overrides,key", [
    (["padding_free=true"], "padding_free"), (["sample_during_eval=true"], "sample_during_eval"),
    (["model.lora.r=4"], "model.lora.r"), (["trainer=TensorParallelTrainer"], "trainer"),
    (["loss.center_coef=-1"], "loss.center_coef must be >= 0"),
])
def test_what_a_scalar_head_cannot_combine_with_is_refused(overrides, key, monkeypatch):
    import train
    from prefkd import models
    monkeypatch.setattr(models, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        train.validate_config(compose(["loss=rm"] + overrides))


# ------------------------------------------------------------------ scoring generations (evaluate.py)

def reward_model_dir(tmp_path, seed=0):
    """A tiny reward model with the second embedded tokenizer (byte-level BPE, its own chat
    template): not the policy's character tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    tok = tokenizer_facts.get_tokenizer("embedded_bpe")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(cfg)
    path = str(tmp_path / f"rm{seed}")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def records_of(prompts, completions):
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]


PROMPTS = ["sort 3 1 2 =", [{"role": "user", "content": "sort 9 4 ="}], "sort 5 5 1 7 ="]


def test_scores_equal_a_direct_forward_on_the_reward_models_own_formatting(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from prefkd import reward_scoring as rs
    path = reward_model_dir(tmp_path)
    model, tok = rs.load(path, torch.device("cpu"))
    assert tok.get_vocab() != tokenizer_facts.get_tokenizer("embedded").get_vocab()  # not the policy's tokenizer
    records = records_of(PROMPTS, ["1 2 3", "4 9", "1 5 5 7 and some more words"])
    got = rs.score_records(model, tok, records, batch_size=2)
    plain, ptok = AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    for r, g in zip(records, got):
        messages = ([{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str) else r["prompt"])
        text = ptok.apply_chat_template(messages + [{"role": "assistant", "content": r["completion"]}], tokenize=False)
        ids = ptok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            want = float(plain(input_ids=ids).logits[0, 0])
        assert g == pytest.approx(want, abs=1e-6)
    mean, se = rs.mean_and_stderr(got)
    assert mean == pytest.approx(sum(got) / 3) and se > 0


def test_the_win_rate_is_on_matched_prompts_and_refuses_different_ones():
    from prefkd import reward_scoring as rs
    mine = records_of(PROMPTS, ["a", "b", "c"])
    theirs = records_of(list(reversed(PROMPTS)), ["x", "y", "z"])  # the same prompts, another order
    # mine: 1.0, 2.0, 0.5 ; theirs (by prompt): PROMPTS[2] 0.5, PROMPTS[1] 3.0, PROMPTS[0] 0.0
    assert rs.win_rate([1.0, 2.0, 0.5], mine, [0.5, 3.0, 0.0], theirs) == pytest.approx((1 + 0 + 0.5) / 3)
    with pytest.raises(ValueError, match="different prompts"):
        rs.win_rate([1.0, 2.0], mine[:2], [0.5, 3.0], theirs[:2])


def test_bad_reward_inputs_are_refused_before_loading(tmp_path):
    import json
    import evaluate
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from prefkd import reward_scoring as rs
    two = str(tmp_path / "two")
    LlamaForSequenceClassification(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2, num_labels=2)).save_pretrained(two)
    with pytest.raises(ValueError, match="it has 2 outputs"):
        evaluate.check_reward_inputs(two, None)
    good = reward_model_dir(tmp_path)
    bad = tmp_path / "gen.jsonl"
    bad.write_text(json.dumps({"completion": "x"}) + "\n")
    with pytest.raises(ValueError, match="row 1 has no prompt"):
        evaluate.check_reward_inputs(good, str(bad))
    with pytest.raises(ValueError, match="reward_model is not"):
        evaluate.check_reward_inputs(None, str(bad))
    # no chat template and conversational prompts: refused (plain-text prompts are scored as text)
    tok = tokenizer_facts.get_tokenizer("embedded_bpe")
    tok.chat_template = None
    assert rs.format_text(tok, "a=", "b") == "a=b"
    with pytest.raises(ValueError, match="no chat template and the prompts are conversations"):
        rs.format_text(tok, [{"role": "user", "content": "a"}], "b")


def test_evaluate_py_scores_a_run_with_a_reward_model_and_a_baseline(tmp_path):
    """evaluate.py reward_model=... reward_baseline=...: per-row rewards in the generations file, the
    mean, its standard error and the win rate (against itself: exactly 0.5)."""
    import json
    import evaluate
    run_dir, _ = train_run(tmp_path, ["loss=sft", "n_examples=16", "eval_every=null", "exp_name=s"])
    rm = reward_model_dir(tmp_path)
    first = evaluate.evaluate_checkpoint(run_dir, n_examples=8, generations=str(tmp_path / "a.jsonl"),
                                         reward_model=rm, log=lambda *a: None)
    rows = [json.loads(x) for x in open(tmp_path / "a.jsonl")]
    rewards = [r["scores"]["reward"] for r in rows]
    assert len(rows) == 8 and first["reward"] == pytest.approx(sum(rewards) / 8, abs=1e-9)
    second = evaluate.evaluate_checkpoint(run_dir, n_examples=8, reward_model=rm,
                                          reward_baseline=str(tmp_path / "a.jsonl"), log=lambda *a: None)
    assert second["reward"] == pytest.approx(first["reward"], abs=1e-6) and second["reward_win_rate"] == 0.5
    # torchrun, 2 processes (gloo): each evaluates and scores every other batch; rank 0 gathers,
    # writes and prints the numbers and the rows of one process
    import subprocess
    import sys
    from conftest import REPO
    args = [f"checkpoint={run_dir}", "n=8", "batch_size=2", f"reward_model={rm}",
            f"reward_baseline={tmp_path / 'a.jsonl'}"]
    single = evaluate.evaluate_checkpoint(run_dir, n_examples=8, batch_size=2, reward_model=rm,
                                          reward_baseline=str(tmp_path / "a.jsonl"),
                                          generations=str(tmp_path / "one.jsonl"), log=lambda *a: None)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(REPO, "evaluate.py"), *args, f"generations={tmp_path / 'two.jsonl'}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("{")]  # rank 0 alone prints
    two = json.loads(line)
    for k in ("reward", "reward_stderr", "reward_win_rate", "logp_accuracy", "task_exact", "n"):
        assert two[k] == pytest.approx(single[k], abs=1e-6), k
    strip = lambda path: [{k: v for k, v in json.loads(x).items() if k != "generator"} for x in open(path)]  # noqa: E731
    assert strip(tmp_path / "two.jsonl") == strip(tmp_path / "one.jsonl")


@pytest.mark.parametrize("head_pad", ["another_id", "none"])
def test_scores_read_the_token_the_head_reads_whatever_pad_id_the_model_was_saved_with(tmp_path, head_pad):
    """A released reward model may carry a pad id other than its tokenizer's (or none): batches are
    padded with the id the head pools by, so a padded row scores as it does alone, unpadded."""
    import json
    from transformers import AutoModelForSequenceClassification
    from prefkd import reward_scoring as rs
    path = reward_model_dir(tmp_path)
    config = json.load(open(os.path.join(path, "config.json")))
    config["pad_token_id"] = 7 if head_pad == "another_id" else None
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    model, tok = rs.load(path, torch.device("cpu"))
    assert tok.pad_token_id != 7
    records = records_of(PROMPTS, ["1 2 3", "4 9", "1 5 5 7 and some more words"])
    got = rs.score_records(model, tok, records, batch_size=3)
    alone = [rs.score_records(model, tok, [r], batch_size=1)[0] for r in records]
    assert got == pytest.approx(alone, abs=1e-5)
    plain = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert plain.config.pad_token_id == config["pad_token_id"]


def test_an_existing_reward_model_is_trained_padding_with_the_id_its_head_reads(tmp_path):
    """The trainer pads pairs with the tokenizer's pad id: a reward model brought to loss=rm with
    another id (or none) gets the tokenizer's, so training reads each row's last real token."""
    from transformers import AutoModelForSequenceClassification
    from prefkd import models, tokenizer_facts
    path = reward_model_dir(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tok = tokenizer_facts.get_tokenizer("embedded_bpe")
    model.config.pad_token_id = None
    assert models.with_scalar_head(model, tok, seed=0) is model
    assert model.config.pad_token_id == tokenizer_facts.pad_id(tok) is not None
