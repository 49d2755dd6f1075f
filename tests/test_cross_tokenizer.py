"""A teacher with another tokenizer (prefkd/cross_tokenizer.py): per-sequence teacher signals
computed on the teacher's own tokens of the same text, live and cached; per-token losses refused."""
import copy

import pytest
import torch

from conftest import compose
import preference_datasets as data
import precompute
from prefkd import models, output_cache
from prefkd import tokenizer_facts
from prefkd.batches import concatenated_inputs
from prefkd import loss_spec
from prefkd import logprobs
from prefkd.data import encoding


def saved_model(root, name: str, model: str, seed: int) -> str:
    """A randomly initialised `model` (config/model/) saved as a checkpoint directory."""
    cfg = compose([f"model={model}"])
    tok = tokenizer_facts.get_tokenizer(cfg.model.tokenizer)
    net = models.build_model(cfg.model, tok, torch.float32, seed=seed)
    path = root / name
    net.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {"char": saved_model(root, "char", "tiny_teacher", 1), "char_ref": saved_model(root, "char_ref", "tiny_teacher", 2),
            "bpe": saved_model(root, "bpe", "tiny_teacher_bpe", 3), "bpe_ref": saved_model(root, "bpe_ref", "tiny_teacher_bpe", 4)}


def run_cfg(teachers, kind: str, overrides=()):
    teacher = "tiny_teacher" if kind == "char" else "tiny_teacher_bpe"
    return compose(["batch_size=4", "n_examples=8", "n_eval_examples=4", "eval_batch_size=4", f"teacher={teacher}",
                    f"teacher.archive={teachers[kind]}", f"teacher.reference_archive={teachers[kind + '_ref']}"]
                   + list(overrides))


def logits_of(model, model_in):
    return model(**model_in, use_cache=False).logits


def loss_of(cfg, frozen, batch, policy):
    """The loss and metrics a trainer computes for one batch (compute_loss, without the trainer)."""
    spec = loss_spec.get_loss(cfg.loss.name)
    inputs = concatenated_inputs(batch, spec.pairwise, 0)
    model_in = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        ref = {"reference_logps": logprobs.token_logps(logits_of(policy[1], model_in), inputs["labels"])} \
            if spec.reference_need(cfg.loss) == "logps" else {}
        extra = {**ref, **frozen.teacher_outputs(batch, inputs, logits_of, torch.device("cpu"))}
        inp = loss_spec.LossInputs(policy_logits=logits_of(policy[0], model_in), labels=inputs["labels"],
                           n_pairs=len(batch["prompt"]), **extra)
        return spec.compute(inp, cfg.loss), extra


@pytest.fixture(scope="module")
def students():
    cfg = compose([])
    tok = tokenizer_facts.get_tokenizer("embedded")
    return (models.build_model(cfg.model, tok, torch.float32, seed=5).eval(),
            models.build_model(cfg.model, tok, torch.float32, seed=6).eval())


def first_batch(cfg):
    tok = tokenizer_facts.get_tokenizer(cfg.model.tokenizer)
    return next(iter(data.run_batches(cfg, tok, loss_spec.get_loss(cfg.loss.name), "train")))


LOSS_CASES = [["loss=tvkd"], ["loss=tvkd", "loss.gamma=0.9", "loss.terminal_value=zero"],
              ["loss=tvkd", "loss.potential=logit", "loss.gamma=0.8"], ["loss=tvkd", "loss.potential=margin"],
              ["loss=ddpo"]]


@pytest.mark.parametrize("loss", LOSS_CASES, ids=lambda c: "-".join(x.split("=")[-1] for x in c))
def test_own_tokens_of_the_same_tokenizer_give_exactly_the_per_token_losses(teachers, students, loss):
    tok = tokenizer_facts.get_tokenizer("embedded")
    per_token, own = run_cfg(teachers, "char", loss), run_cfg(teachers, "char", loss + ["teacher.tokenization=own"])
    batch = first_batch(per_token)
    spec = loss_spec.get_loss(per_token.loss.name)
    a, b = models.FrozenModels(per_token, spec, tok), models.FrozenModels(own, spec, tok)
    assert (a.teacher_tokens, b.teacher_tokens) == ("student", "own")
    (la, ma), ea = loss_of(per_token, a, batch, students)
    (lb, mb), eb = loss_of(own, b, batch, students)
    assert "teacher" in ea and "teacher_sequence" in eb and eb.get("teacher") is None
    assert abs(float(la) - float(lb)) < 1e-6
    for k in ma:
        assert torch.allclose(ma[k].float(), mb[k].float(), atol=1e-6), k


def test_cached_own_tokens_equal_the_live_teacher_and_are_keyed_by_its_tokenizer(teachers, students, tmp_path):
    tok = tokenizer_facts.get_tokenizer("embedded")
    cfg = run_cfg(teachers, "bpe", ["loss=tvkd", "loss.gamma=0.9", f"teacher.cache={tmp_path}/c"])
    manifest = precompute.precompute(cfg, "teacher", log=lambda *a: None)
    assert manifest["key"]["teacher.tokenization"] == "own"
    assert manifest["key"]["tokenizer"] == encoding.tokenizer_fingerprint(tokenizer_facts.get_tokenizer("embedded_bpe"))
    spec = loss_spec.get_loss("tvkd")
    live_cfg = copy.deepcopy(cfg)
    live_cfg.teacher.cache = None
    live = models.FrozenModels(live_cfg, spec, tok)
    cached = models.FrozenModels(cfg, spec, tok, caches={"teacher": output_cache.open_for_run(cfg, "teacher", tok)})
    assert cached.teacher is None  # not loaded: its features come from the cache
    batch = first_batch(cfg)
    (l1, _), e1 = loss_of(live_cfg, live, batch, students)
    (l2, _), e2 = loss_of(cfg, cached, batch, students)
    assert abs(float(l1) - float(l2)) < 1e-6
    assert torch.allclose(e1["teacher_sequence"]["psi_sum"], e2["teacher_sequence"]["psi_sum"], atol=1e-6)
    # the cache's rows are the teacher's tokens of the text: another template is another cache
    other = copy.deepcopy(cfg)
    other.teacher.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(output_cache.CacheMismatch, match="teacher.chat_template"):
        output_cache.open_for_run(other, "teacher", tok)
    # and a teacher of the student's tokenizer cannot read it
    char = run_cfg(teachers, "char", ["loss=tvkd", "loss.gamma=0.9", f"teacher.cache={tmp_path}/c"])
    with pytest.raises(output_cache.CacheMismatch, match="teacher.tokenization"):
        output_cache.open_for_run(char, "teacher", tok)


def test_the_bpe_teacher_signal_equals_a_hand_computation_on_its_own_tokens(teachers):
    tok, ttok = tokenizer_facts.get_tokenizer("embedded"), tokenizer_facts.get_tokenizer("embedded_bpe")
    cfg = run_cfg(teachers, "bpe", ["loss=tvkd", "loss.gamma=0.9", "loss.value_temperature=0.5"])
    ddpo_cfg = run_cfg(teachers, "bpe", ["loss=ddpo", "loss.teacher_beta=0.3"])
    batch = first_batch(cfg)
    inputs = concatenated_inputs(batch, True, 0)
    got = models.FrozenModels(cfg, loss_spec.get_loss("tvkd"), tok).teacher_outputs(batch, inputs, logits_of, "cpu")
    rewards = models.FrozenModels(ddpo_cfg, loss_spec.get_loss("ddpo"), tok).teacher_outputs(batch, inputs, logits_of, "cpu")
    from transformers import AutoModelForCausalLM  # the checkpoints read by plain transformers, not our loader
    teacher, reference = (AutoModelForCausalLM.from_pretrained(teachers[k]).eval() for k in ("bpe", "bpe_ref"))
    n = len(batch["prompt"])
    for row in range(2 * n):
        i, kind = row % n, ("chosen" if row < n else "rejected")
        prompt = [ttok.bos_token_id] + ttok(batch["original_prompt"][i], add_special_tokens=False).input_ids
        response = ttok(batch[kind][i], add_special_tokens=False).input_ids + [ttok.eos_token_id]
        assert len(response) < len(tok(batch[kind][i], add_special_tokens=False).input_ids) + 1  # fewer tokens
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            z, z_ref = teacher(ids).logits[0].double(), reference(ids).logits[0].double()
        v = 0.5 * torch.logsumexp(z / 0.5, -1)  # V(s) at every position
        p = len(prompt)
        psi = sum(0.9 * v[p + j] - v[p + j - 1] for j in range(len(response)))
        assert abs(float(got["teacher_sequence"]["psi_sum"][row]) - float(psi)) < 1e-4
        assert abs(float(got["teacher_sequence"]["final_value"][row]) - float(v[p + len(response) - 1])) < 1e-4
        lp = lambda logits: sum(float(torch.log_softmax(logits[p + j - 1], -1)[t])  # noqa: E731
                                for j, t in enumerate(response))
        hand = 0.3 * (lp(z) - lp(z_ref))
        assert abs(float(rewards["teacher_sequence"]["teacher_rewards"][row]) - hand) < 1e-4


@pytest.mark.parametrize("loss,why", [("dckd", "loss=dckd reads the teacher per token"),
                                      ("vanillakd", "loss=vanillakd reads the teacher per token"),
                                      ("tvkd loss.variant=released", "loss.variant=released collapses"),
                                      ("seqkd", "write the teacher's answers with")])
def test_per_token_losses_are_refused_before_any_model_loads(teachers, loss, why, monkeypatch):
    import train

    def no_models(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(models, "build_model", no_models)
    cfg = run_cfg(teachers, "bpe", [f"loss={loss.split()[0]}"] + loss.split()[1:])
    with pytest.raises(ValueError, match=why) as err:
        train.validate_config(cfg)
    assert "embedded_bpe" in str(err.value) or "tokenizer" in str(err.value)


def test_student_tokenization_is_refused_for_another_vocabulary(teachers):
    import train
    cfg = run_cfg(teachers, "bpe", ["loss=tvkd", "teacher.tokenization=student"])
    with pytest.raises(ValueError, match="teacher.tokenization=student"):
        train.validate_config(cfg)


def test_a_response_cut_for_the_student_is_cut_at_the_same_text_for_the_teacher(teachers):
    """max_length cuts long responses in the student's tokens; the teacher's rows end after the
    same characters (no eos, no further cut in its own tokens), so its per-sequence features
    describe the response the student trains on."""
    from prefkd import cross_tokenizer
    from prefkd.logprobs import IGNORE_INDEX
    cfg = run_cfg(teachers, "bpe", ["loss=tvkd", "max_length=24", "max_prompt_length=16", "batch_size=16"])
    student, teacher = tokenizer_facts.get_tokenizer("embedded"), tokenizer_facts.get_tokenizer("embedded_bpe")
    batch = first_batch(cfg)
    rows = cross_tokenizer.teacher_rows(batch, teacher, cfg, True, student)
    b, cut = len(batch["prompt"]), 0
    for j in range(2 * b):
        kind, i = ("chosen", j) if j < b else ("rejected", j - b)
        mine = batch[f"{kind}_input_ids"][i][batch[f"{kind}_labels"][i] != IGNORE_INDEX].tolist()
        theirs = rows["input_ids"][j][rows["labels"][j] != IGNORE_INDEX].tolist()
        if mine[-1] == student.eos_token_id:
            assert theirs[-1] == teacher.eos_token_id
            continue
        cut += 1
        assert theirs[-1] != teacher.eos_token_id
        assert teacher.decode(theirs) == student.decode(mine) == batch[kind][i][:len(student.decode(mine))]
    assert cut >= 4  # the check saw cut responses
