"""Padding-free packed batches (config `padding_free`, prefkd/packing.py, logits.PackedLogits) and
token-budget micro-batches (`max_tokens_per_micro_batch`): every registered loss gives the same
loss, metrics and policy gradients packed as padded, on rows whose lengths differ by 10x; no pad
token enters a forward pass; no packed sequence sees another; the caches, the trainer's steps
and evaluation are unchanged."""
import os

import numpy as np
import pytest
import torch

import prefkd.logits as LG
import trainers
from prefkd import packing
from test_chunked import CASES, SMALL_CHUNKS, V, fake_trainer, loss_config, tiny_llama
from prefkd import tokenizer_facts
from prefkd.batches import concatenated_inputs
from prefkd import loss_spec
from prefkd import logprobs

PROMPT = 3
# (chosen, rejected) lengths of each pair: 4 to 44 tokens, so rows differ in length by 11x
LENGTHS = [(40, 6), (4, 44), (22, 9)]
CAPACITY = 48  # the run's max_length: rows of at most 48 tokens, several sequences each


def uneven_batch(seed=0, lengths=LENGTHS):
    """A right-padded pairwise batch (pad id 0, never a real token) with the given lengths."""
    g = torch.Generator().manual_seed(seed)
    batch = {"prompt": ["p"] * len(lengths)}
    for side, col in (("chosen", 0), ("rejected", 1)):
        width = max(pair[col] for pair in lengths)
        ids = torch.zeros(len(lengths), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, logprobs.IGNORE_INDEX)
        for i, pair in enumerate(lengths):
            n = pair[col]
            ids[i, :n] = torch.randint(1, V, (n,), generator=g)
            mask[i, :n] = 1
            labels[i, PROMPT:n] = ids[i, PROMPT:n]
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


def record_forwards(t):
    """Every forward call's input_ids and whether it had an attention mask, for each model."""
    seen = []
    models = [t.policy] + [m for m in (t.frozen.reference, t.frozen.teacher, t.frozen.teacher_reference) if m is not None]

    def hook(module, args, kwargs):
        seen.append((kwargs["input_ids"].clone(), kwargs.get("attention_mask")))
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in models]
    return seen, handles


def run(loss_cfg, chunking, padding_free, batch, train=True):
    t = fake_trainer(loss_cfg, chunking, padding_free=padding_free, max_length=CAPACITY)
    t.policy.zero_grad(set_to_none=True)
    seen, handles = record_forwards(t)
    try:
        loss, metrics = t.compute_loss(batch, train=train)
    finally:
        for h in handles:
            h.remove()
    if train:
        loss.backward()
    # what the losses read: packed logits (of hidden states, or of the stream's logits), else not
    assert all(issubclass(k, LG.PackedLogits) == padding_free for k in t.kinds), t.kinds
    grads = {n: p.grad.clone() for n, p in t.policy.named_parameters() if p.grad is not None}
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads, seen


def assert_same(a, b):
    (loss0, metrics0, grads0), (loss1, metrics1, grads1) = a, b
    assert torch.isfinite(loss0) and loss0.item() != 0.0
    assert loss1.item() == pytest.approx(loss0.item(), rel=1e-5, abs=1e-6)
    assert sorted(metrics0) == sorted(metrics1)
    for k in metrics0:
        torch.testing.assert_close(metrics1[k], metrics0[k], rtol=1e-5, atol=1e-5, msg=k)
    assert sorted(grads0) == sorted(grads1)
    scale = max((g.abs().max().item() for g in grads0.values()), default=0.0)
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-5, atol=1e-5 * max(1.0, scale), msg=k)


@pytest.mark.parametrize("chunking", [False, True], ids=["full-logits", "chunked"])
@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
                                               for n, kw in CASES])
def test_packed_batches_equal_padded_ones(name, kw, chunking, monkeypatch):
    batch = uneven_batch(seed=len(name) + len(kw))
    cfg = loss_config(name, **kw)
    if chunking:
        monkeypatch.setattr(LG, "CHUNK_ELEMENTS", SMALL_CHUNKS)
    *padded, _ = run(cfg, chunking, False, batch)
    *packed, seen = run(cfg, chunking, True, batch)
    assert_same(padded, packed)
    # no pad token (id 0) and no attention mask in any forward pass; rows of at most max_length
    # tokens, several sequences in some
    assert seen and all(mask is None and ids.shape[0] == 1 and ids.shape[1] <= CAPACITY and bool((ids != 0).all())
                        for ids, mask in seen)
    n_seq = 2 * len(LENGTHS) if loss_spec.get_loss(name).pairwise else len(LENGTHS)
    assert len({ids.shape[1] for ids, _ in seen}) > 1 and len(seen) < 4 * n_seq


def test_evaluation_without_grad_is_equal_too():
    batch = uneven_batch(seed=5)
    for name in ("tdpo", "dckd", "tvkd"):
        loss0, metrics0, *_ = run(loss_config(name), True, False, batch, train=False)
        loss1, metrics1, *_ = run(loss_config(name), True, True, batch, train=False)
        assert loss1.item() == pytest.approx(loss0.item(), rel=1e-5, abs=1e-6)
        for k in metrics0:
            torch.testing.assert_close(metrics1[k], metrics0[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("train_mode", [True, False], ids=["train", "eval"])
def test_no_packed_sequence_sees_another(train_mode):
    """Changing the tokens of one packed sequence leaves every other sequence's logits unchanged."""
    model = tiny_llama(0, layers=2).train(train_mode)
    lengths = [(20, 7), (5, 30), (12, 3)]
    batch = uneven_batch(seed=1, lengths=lengths)
    inputs = concatenated_inputs(batch, True, 0)
    plan = packing.plan(inputs["attention_mask"], CAPACITY)
    assert any(len(row) > 1 for row in plan.rows)
    changed = inputs["input_ids"].clone()
    victim = plan.rows[0][0]  # a sequence that shares its row with others
    n = plan.lengths[victim]
    changed[victim, :n] = (changed[victim, :n] % (V - 1)) + 1
    with torch.no_grad():
        before = LG.output_logits(model, inputs, chunk=False, packing=plan).materialize()
        after = LG.output_logits(model, {**inputs, "input_ids": changed}, chunk=False, packing=plan).materialize()
        alone = model(input_ids=inputs["input_ids"][1:2, :plan.lengths[1]]).logits[0]
    assert not torch.allclose(before[victim, :n], after[victim, :n])
    for i, length in enumerate(plan.lengths):
        if i != victim:
            torch.testing.assert_close(after[i, :length], before[i, :length], rtol=0, atol=1e-7)
    # and a packed sequence's logits are its own forward pass's
    torch.testing.assert_close(before[1, :plan.lengths[1]], alone, rtol=1e-5, atol=1e-5)


def test_plan_packs_every_sequence_once_within_the_capacity():
    mask = torch.zeros(6, 30, dtype=torch.long)
    for i, n in enumerate([30, 3, 17, 12, 1, 9]):
        mask[i, :n] = 1
    plan = packing.plan(mask, 32)
    assert sorted(i for row in plan.rows for i in row) == list(range(6))
    assert all(sum(plan.lengths[i] for i in row) <= 32 for row in plan.rows)
    assert len(plan.rows) == 3 and plan.tokens == 72
    # the index enumerates the stream: each row's positions, the packed rows in order
    assert sorted(plan.index[plan.index >= 0].tolist()) == list(range(72))
    assert (plan.index[mask == 0] == -1).all()
    # agreed on a larger row count (FSDP): rows split, every sequence still once
    more = packing.plan(mask, 32, rows=5)
    assert len(more.rows) == 5 and sorted(i for row in more.rows for i in row) == list(range(6))
    with pytest.raises(ValueError, match="right-padded"):
        packing.plan(torch.tensor([[0, 1, 1], [1, 1, 0]]), 8)


def test_token_budget_cuts_in_order_within_the_budget():
    pairs = [[10, 4], [3, 3], [20, 2], [5, 5], [1, 30]]
    sizes = packing.token_budget_split(pairs, 26, padded=False)
    assert sum(sizes) == 5 and sizes == [2, 1, 1, 1]
    start = 0
    for s in sizes:
        assert s == 1 or packing.batch_tokens(pairs[start:start + s], padded=False) <= 26
        start += s
    # padded: rows times the longest
    assert packing.token_budget_split(pairs, 40, padded=True) == [2, 1, 1, 1]
    # every rank runs as many micro-batches (FSDP): the largest is halved
    assert packing.split_sizes_to([2, 1, 1, 1], 5) == [1, 1, 1, 1, 1]
    with pytest.raises(ValueError):
        packing.split_sizes_to([2, 1, 1, 1], 6)


# ------------------------------------------------------------------ the trainer and the caches

from conftest import compose, train_run  # noqa: E402
from test_cache import TINY, cache_rows, teachers, trainer_losses  # noqa: E402,F401  (a fixture)

RUN = ["loss=dpo", "n_examples=48", "eval_every=24", "lr=1e-3", "exp_name=p", "gradient_accumulation_steps=2"]
KEYS = ["loss/train", "rewards_train/margins", "logps_train/chosen", "loss/eval", "rewards_eval/margins",
        "heldout_eval/logp_accuracy"]


def by_key(records, key):
    return [r[key] for r in records if key in r]


def test_packed_and_token_budget_runs_have_the_padded_runs_numbers(tmp_path, monkeypatch):
    """train.py's path (steps, gradient accumulation, evaluation): padded row micro-batches,
    packed rows, and token-budget micro-batches (unequal, in order), over 6 steps."""
    sizes = []
    real = trainers.BasicTrainer.micro_batches

    def micro_batches(self, batch):
        parts = real(self, batch)
        sizes.append([len(p["prompt"]) for p in parts])
        return parts
    monkeypatch.setattr(trainers.BasicTrainer, "micro_batches", micro_batches)
    _, padded = train_run(tmp_path / "padded", RUN)
    _, packed = train_run(tmp_path / "packed", RUN + ["padding_free=true"])
    _, budget = train_run(tmp_path / "budget", RUN + ["padding_free=true", "max_tokens_per_micro_batch=60"])
    _, budget_padded = train_run(tmp_path / "budget_padded", RUN + ["max_tokens_per_micro_batch=90"])
    for other in (packed, budget, budget_padded):
        for key in KEYS:
            a, b = by_key(padded, key), by_key(other, key)
            assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (key, a, b)
        assert by_key(other, "grad_norm") == pytest.approx(by_key(padded, "grad_norm"), abs=1e-4)
    # row micro-batches: 2 of 4 examples; token budgets: more, of unequal sizes, all 8 examples in order
    assert sizes[0] == [4, 4] and all(sum(s) == 8 for s in sizes)
    cut = sizes[12:]
    assert all(len(s) > 2 for s in cut) and any(len(set(s)) > 1 for s in cut)


def test_lora_packed_equals_padded(tmp_path):
    """A LoRA policy and its reference (the adapters switched off) on packed rows."""
    lora = RUN[:1] + ["n_examples=24", "eval_every=null"] + RUN[3:] + ["model.lora.r=4"]
    _, padded = train_run(tmp_path / "padded", lora)
    _, packed = train_run(tmp_path / "packed", lora + ["padding_free=true"])
    for key in ("loss/train", "rewards_train/margins", "loss/eval", "rewards_eval/margins"):
        a, b = by_key(padded, key), by_key(packed, key)
        assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (key, a, b)
    assert max(abs(x) for x in by_key(padded, "rewards_train/margins")[1:]) > 0  # the adapters moved


def test_resume_with_packing_is_exact(tmp_path):
    common = ["loss=dpo", "n_examples=48", "eval_every=null", "exp_name=r", "lr=1e-3", "padding_free=true",
              "max_tokens_per_micro_batch=80"]
    _, full = train_run(tmp_path / "a", common)
    train_run(tmp_path / "b", common[:1] + ["n_examples=24"] + common[2:])
    _, both = train_run(tmp_path / "b", common + ["resume=true"])
    losses = lambda recs: by_key(recs, "loss/train")  # noqa: E731
    assert len(losses(full)) == len(losses(both)) == 6
    assert losses(both)[3:] == losses(full)[3:]  # bitwise


@pytest.mark.parametrize("kind,overrides", [
    ("teacher", ["loss=tvkd", "loss.variant=released_teacher_value", "loss.top_k=5"]),
    ("teacher", ["loss=tvkd"]),
    ("reference", ["loss=dpo"]),
], ids=["tvkd-released-topk", "tvkd-values", "reference-logps"])
def test_a_cache_written_packed_equals_one_written_padded(tmp_path, teachers, kind, overrides):  # noqa: F811
    import precompute as pc
    from prefkd import output_cache
    common = overrides + ["teacher=tiny_teacher", f"teacher.archive={teachers[0]}", "n_examples=24"]
    key = output_cache.CONFIG_KEY[kind]
    run = lambda extra: pc.run(kind, TINY + [f"runs_dir={tmp_path}"] + common + extra, log=lambda *a: None)  # noqa
    padded = run([f"{key}={tmp_path}/padded"])
    packed = run([f"{key}={tmp_path}/packed", "padding_free=true"])
    assert packed["rows"] == padded["rows"] > 0 and packed["key"] == padded["key"]
    a, b = cache_rows(f"{tmp_path}/padded", kind), cache_rows(f"{tmp_path}/packed", kind)
    assert set(a) == set(b)
    for k in a:
        for name in a[k]:
            np.testing.assert_allclose(b[k][name], a[k][name], atol=1e-6, rtol=0)
    # and a packed run reads it, with the live packed run's losses
    live = trainer_losses(tmp_path, "live", common + ["padding_free=true"])
    cached = trainer_losses(tmp_path, "cached", common + ["padding_free=true", f"{key}={tmp_path}/padded"])
    assert cached[0] == pytest.approx(live[0], abs=1e-5, rel=0)


@pytest.mark.parametrize("overrides,message", [
    (["padding_free=true", "model.attn_implementation=flex_attention"], "model.attn_implementation=flex_attention"),
    (["model.attn_implementation=flash_attention_2"], "needs the flash_attn package"),
    (["max_tokens_per_micro_batch=0"], "max_tokens_per_micro_batch=0 must be >= 1"),
    (["max_tokens_per_micro_batch=1.5"], "must be a whole number"),
    (["padding_free=yes"], "padding_free='yes' must be true or false"),
])
def test_bad_packing_settings_are_refused_before_any_model_loads(overrides, message, monkeypatch):
    import importlib.util
    import train
    from prefkd import models
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    monkeypatch.setattr(models, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        train.validate_config(compose(overrides))


def test_attn_implementation_reaches_the_models():
    from prefkd import models
    tok = tokenizer_facts.get_tokenizer("embedded")
    for impl in ("eager", "sdpa"):
        cfg = compose([f"model.attn_implementation={impl}"])
        assert models.build_model(cfg.model, tok, torch.float32).config._attn_implementation == impl


def test_a_model_that_lets_packed_sequences_mix_is_refused():
    class Leaky(torch.nn.Module):  # an attention mask of ones: transformers' packed detection is off
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def forward(self, input_ids, position_ids, use_cache):
            return self.m(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), position_ids=position_ids,
                          use_cache=use_cache)
    model = tiny_llama(0)
    packing.check_isolation(model, "the policy", "sdpa")
    eager = tiny_llama(0)
    eager.set_attn_implementation("eager")
    packing.check_isolation(eager, "the policy", "eager")
    with pytest.raises(ValueError, match="the policy .*lets packed sequences attend to each other"):
        packing.check_isolation(Leaky(model), "the policy", "sdpa")


def test_evaluate_py_log_probs_packed_equal_padded():
    import evaluate
    model, batch = tiny_llama(0), uneven_batch(seed=7)
    torch.testing.assert_close(evaluate.sequence_logps(model, batch, 0, padding_free=True),
                               evaluate.sequence_logps(model, batch, 0), rtol=1e-5, atol=1e-5)


def test_the_gpu_check_runs_on_the_cpu_at_a_reduced_size_and_says_so(tmp_path):
    """scripts/gpu_check.sh without a GPU: every row of the table, and the tiny model's bf16 losses
    (padded and packed) within the stated tolerance of the fp32 ones."""
    import json
    import subprocess
    from conftest import REPO
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "wheels", "--json",
                          str(tmp_path / "check.json")], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "no GPU: the CPU at a reduced size" in out.stdout and out.stdout.strip().endswith("PASS")
    result = json.load(open(tmp_path / "check.json"))
    rows = result["rows"]
    assert {(r["trainer"], r["max_length"], r["loss"], r["packed"]) for r in rows} == {
        (t, n, loss, p) for t in ("BasicTrainer", "FSDPTrainer") for n in (32, 64)
        for loss in ("dpo", "tvkd", "tdpo", "dckd") for p in (False, True)}
    assert all(r["tokens_per_s"] > 0 and all(np.isfinite(r["losses"])) for r in rows)
    assert all(r["padding"] > 0.2 for r in rows)  # the drawn lengths leave the padded batches a real share
    for loss, v in result["tiny"].items():
        for k in ("device_bf16_padded", "device_bf16_packed"):
            assert abs(v[k] - v["cpu_fp32"]) <= 3e-2 * max(1.0, abs(v["cpu_fp32"])), (loss, v)
