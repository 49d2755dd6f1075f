"""The chunked output layer (config key `output_chunking`, logits_lib.LazyLogits): every loss of the
registry, through the trainer's compute_loss, gives the same loss, metrics and policy gradients
(tied embedding included) from final hidden states projected chunk by chunk as from the models'
full logits; and a 2-process FSDP2 run (gloo, CPU) with chunking equals the unchunked run."""
import os

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import prefkd.logits as LG
import trainers

from conftest import REPO
from prefkd import models as model_lib
from prefkd import packing
from prefkd.batches import concatenated_inputs
from prefkd import loss_spec
from prefkd import logprobs
from prefkd import logits as logits_lib

V, B, LEN = 37, 2, 11          # vocabulary, pairs, sequence length
SMALL_CHUNKS = 3 * 2 * B * V   # three positions per chunk for the 2B pairwise rows (4 chunks of 11)


def tiny_llama(seed, hidden=16, layers=1, tied=True):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, pad_token_id=0)
    with model_lib.fork_rng(seed):
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():  # logits of a useful size (random init gives near-uniform ones)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    return model


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"prompt": ["p"] * B}
    for side in ("chosen", "rejected"):
        ids = torch.randint(1, V, (B, LEN), generator=g)
        mask = torch.ones(B, LEN, dtype=torch.long)
        labels = ids.clone()
        labels[:, :3] = logprobs.IGNORE_INDEX               # the prompt
        mask[1, -2:] = 0                               # right padding of one row
        ids[1, -2:] = 0
        labels[1, -2:] = logprobs.IGNORE_INDEX
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


MODELS = {}


def models():
    if not MODELS:
        MODELS.update(policy=tiny_llama(0), reference=tiny_llama(1), teacher=tiny_llama(2, hidden=24, tied=False),
                      teacher_reference=tiny_llama(3, hidden=24, tied=False))
        for k in ("reference", "teacher", "teacher_reference"):
            model_lib.freeze(MODELS[k])
    return MODELS


def fake_trainer(loss_cfg, chunking, padding_free=False, max_length=LEN):
    """A BasicTrainer with only what compute_loss reads (no data, no optimizer); generations off
    (the generation losses then train on the batch's responses, which is what is compared)."""
    t = trainers.BasicTrainer.__new__(trainers.BasicTrainer)
    t.pad_id = 0  # these batches' tokenizers pad with 0
    t.cfg = OmegaConf.create({"loss": loss_cfg, "output_chunking": chunking, "padding_free": padding_free,
                              "max_length": max_length})
    t.packer = packing.Planner(padding_free, max_length)
    t.spec = loss_spec.get_loss(loss_cfg["name"])
    t.pairwise, t.device = t.spec.pairwise, torch.device("cpu")
    m = models()
    t.policy = m["policy"]
    t.frozen = model_lib.FrozenModels.of(  # live models (prefkd/output_cache.py's caches are not used here)
        t.cfg, t.spec, reference=m["reference"] if t.spec.reference_need(t.cfg.loss) else None,
        teacher=m["teacher"] if t.spec.teacher_need(t.cfg.loss) else None,
        teacher_reference=m["teacher_reference"] if t.spec.teacher_reference_need(t.cfg.loss) else None)
    t.step, t.generation = 0, SimpleNamespace(apply=lambda batch, train, step, models: (batch, None))
    t.kinds = []
    plain = t.logits
    t.logits = lambda model, model_in: t.kinds.append(type(out := plain(model, model_in))) or out
    return t


def loss_config(name, **kw):
    cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "config", "loss", f"{name}.yaml")))
    cfg.update(kw)
    return cfg


CASES = [
    ("sft", {}), ("dpo", {}), ("dpo", {"label_smoothing": 0.2}), ("dpo", {"reference_free": True}), ("ipo", {}),
    ("tdpo", {}), ("tdpo", {"if_tdpo2": False}),
    ("tvkd", {}), ("tvkd", {"potential": "max"}), ("tvkd", {"potential": "margin"}),
    ("tvkd", {"potential": "expectation"}), ("tvkd", {"potential": "logit"}), ("tvkd", {"potential": "logprob"}),
    ("tvkd", {"terminal_value": "zero", "value_temperature": 0.5, "use_reference": False}),
    ("tvkd", {"variant": "released", "top_k": 5}), ("tvkd", {"variant": "released_teacher_value", "top_k": 5}),
    ("vanillakd", {"sft_weight": 0.5}), ("vanillakd", {"top_k": 4}),
    ("dckd", {}), ("dckd", {"top_k": 4}),
    ("simpo", {}), ("wpo", {}), ("seqkd", {}), ("ddpo", {}), ("dpkd", {}),
    ("gkd", {}), ("gkd", {"b": 0.0}), ("gkd", {"b": 1.0, "top_k": 4}),
    ("adpa", {}), ("adpa", {"top_k": 4}),
]


def run(loss_cfg, chunking, batch, train=True):
    t = fake_trainer(loss_cfg, chunking)
    t.policy.zero_grad(set_to_none=True)
    loss, metrics = t.compute_loss(batch, train=train)
    assert t.kinds and set(t.kinds) == {logits_lib.LazyLogits if chunking else torch.Tensor}, t.kinds
    if train:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in t.policy.named_parameters() if p.grad is not None}
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads


def test_every_registered_loss_has_a_case():
    # every loss of a language-model head (rm's scalar head has no logits to chunk: test_reward_model.py)
    assert {name for name, _ in CASES} == {n for n, spec in loss_spec.LOSSES.items() if spec.head == "lm"}
    assert {n for n, spec in loss_spec.LOSSES.items() if spec.head != "lm"} == {"rm"}


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
                                               for n, kw in CASES])
def test_chunked_output_layer_equals_full_logits(name, kw, monkeypatch):
    batch = make_batch(seed=len(name) + len(kw))
    cfg = loss_config(name, **kw)
    loss0, metrics0, grads0 = run(cfg, False, batch)
    monkeypatch.setattr(LG, "CHUNK_ELEMENTS", SMALL_CHUNKS)
    loss1, metrics1, grads1 = run(cfg, True, batch)
    assert torch.isfinite(loss0) and loss0.item() != 0.0
    assert loss1.item() == pytest.approx(loss0.item(), rel=1e-6, abs=1e-6)
    assert sorted(metrics0) == sorted(metrics1)
    for k in metrics0:
        torch.testing.assert_close(metrics1[k], metrics0[k], rtol=1e-5, atol=1e-6, msg=k)
    # every policy parameter gets the same gradient, the tied embedding / output layer included
    assert sorted(grads0) == sorted(grads1) and "model.embed_tokens.weight" in grads0
    scale = max(g.abs().max().item() for g in grads0.values())
    assert scale > 0
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-5, atol=1e-6 * max(1.0, scale), msg=k)


def test_evaluation_without_grad_is_equal_too(monkeypatch):
    batch = make_batch(seed=3)
    for name in ("tdpo", "dckd"):
        loss0, metrics0, _ = run(loss_config(name), False, batch, train=False)
        monkeypatch.setattr(LG, "CHUNK_ELEMENTS", SMALL_CHUNKS)
        loss1, metrics1, _ = run(loss_config(name), True, batch, train=False)
        monkeypatch.undo()
        assert loss1.item() == pytest.approx(loss0.item(), rel=1e-6, abs=1e-6)
        for k in metrics0:
            torch.testing.assert_close(metrics1[k], metrics0[k], rtol=1e-5, atol=1e-6, msg=k)


def test_lazy_logits_slices_and_materializes_like_the_logits():
    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(4, 9, 5, generator=g), torch.randn(V, 5, generator=g), torch.randn(V, generator=g)
    lazy = logits_lib.LazyLogits(h, w, b)
    full = h @ w.T + b
    assert lazy.shape == full.shape == (4, 9, V)
    torch.testing.assert_close(lazy[2:, :-1].materialize(), full[2:, :-1])
    torch.testing.assert_close(lazy.map(logits_lib.log_softmax_f32)[:, 3:5].materialize(), torch.log_softmax(full[:, 3:5], -1))
    diff = logits_lib.LazyLogits.combine(lambda a, c: a - c, lazy, lazy.map(torch.exp))
    torch.testing.assert_close(diff[:1].materialize(), full[:1] - full[:1].exp())
    with pytest.raises(IndexError):
        lazy[:, :, :3]
    # token_logps: chunked, from hidden states, equal to the full computation (value and gradient)
    labels = torch.randint(0, V, (4, 9), generator=g)
    labels[:, :2] = logprobs.IGNORE_INDEX
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logprobs.token_logps(hh @ ww.T + b, labels).sum().backward()
    want = (hh.grad.clone(), ww.grad.clone())
    hh.grad = ww.grad = None
    old = LG.CHUNK_ELEMENTS
    try:
        LG.CHUNK_ELEMENTS = 4 * V  # one position per chunk
        got = logprobs.token_logps(logits_lib.LazyLogits(hh, ww, b), labels)
    finally:
        LG.CHUNK_ELEMENTS = old
    torch.testing.assert_close(got, logprobs.token_logps(full, labels), rtol=1e-6, atol=1e-6)
    got.sum().backward()
    torch.testing.assert_close(hh.grad, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ww.grad, want[1], rtol=1e-5, atol=1e-6)


def test_evaluate_sequence_logps_through_the_chunked_output_layer(monkeypatch):
    import evaluate
    m, batch = tiny_llama(0), make_batch(seed=4)
    inp = concatenated_inputs(batch, True, 0)
    with torch.no_grad():
        logits = m(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).logits
    want = logprobs.sequence_logps(logprobs.token_logps(logits, inp["labels"]), logprobs.response_mask(inp["labels"]))
    monkeypatch.setattr(LG, "CHUNK_ELEMENTS", SMALL_CHUNKS)
    torch.testing.assert_close(evaluate.sequence_logps(m, batch, 0), want, rtol=1e-6, atol=1e-5)


def test_models_with_scaled_logits_keep_their_full_logits():
    m = tiny_llama(5)
    assert LG.output_head(m) == (m, "lm_head", m.lm_head)
    m.config.final_logit_softcapping = 30.0
    assert LG.output_head(m) is None
    ids = torch.randint(1, V, (2, 6))
    out = LG.output_logits(m, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, chunk=True)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 6, V)


# ------------------------------------------------------------------ FSDP2, 2 gloo processes

FSDP_WORKER = r"""
import copy, json, os, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
import torch, torch.distributed as dist
from omegaconf import OmegaConf
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
import trainers
import prefkd.logits as LG
import test_chunked as T

fresh = dict(T.models())
plain_output_logits, weights_seen = LG.output_logits, []
def spy(model, model_in, chunk, packing=None):
    out = plain_output_logits(model, model_in, chunk, packing)
    if isinstance(out, LG.LazyLogits):  # the output layer the chunks read: full, not a sharded DTensor
        weights_seen.append((isinstance(out.weight, DTensor), tuple(out.weight.shape), out.weight.requires_grad))
    return out
LG.output_logits = spy
T.MODELS.clear()
batches = [T.make_batch(seed=10 * step + rank) for step in range(3)]   # each rank its own data
out = {}
for name, kw in [("tdpo", {}), ("dckd", {}), ("tvkd", {"variant": "released_teacher_value", "top_k": 5})]:
    for chunking in (False, True):
        LG.CHUNK_ELEMENTS = T.SMALL_CHUNKS if chunking else 1 << 25
        wrapper = trainers.FSDPTrainer.__new__(trainers.FSDPTrainer)
        wrapper.mesh, wrapper.device = init_device_mesh("cpu", (2,)), torch.device("cpu")
        mcfg = OmegaConf.create({"fsdp_policy_mp": None, "block_name": "LlamaDecoderLayer", "name": "tiny"})
        T.MODELS.update({k: wrapper.wrap(copy.deepcopy(m), mcfg, trainable=k == "policy") for k, m in fresh.items()})
        t = T.fake_trainer(T.loss_config(name, **kw), chunking)
        opt = torch.optim.AdamW(t.policy.parameters(), lr=1e-2)
        losses, norms, grads = [], [], None
        for step, batch in enumerate(batches):
            loss, _ = t.compute_loss(batch, train=True)
            loss.backward()
            assert set(t.kinds) == {LG.LazyLogits if chunking else torch.Tensor}
            norm = torch.nn.utils.clip_grad_norm_(t.policy.parameters(), 1e9)
            norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
            if step == 0:
                grads = {n: p.grad.full_tensor().tolist() for n, p in t.policy.named_parameters()}
                assert isinstance(t.policy.lm_head.weight, DTensor)   # resharded after backward
            opt.step(); opt.zero_grad(set_to_none=True)
            l = loss.detach().clone(); dist.all_reduce(l)
            losses.append(float(l) / 2)
        out[f"{name}/{chunking}"] = {"losses": losses, "norms": norms, "grads": grads}
        T.MODELS.clear()
assert weights_seen and all(not d and shape[0] == T.V for d, shape, _ in weights_seen), weights_seen
assert {g for _, _, g in weights_seen} == {True, False}  # the policy's (with grad) and the frozen models'
if rank == 0:
    print("RESULT" + json.dumps(out))
from conftest import leave_process_group  # a barrier, then out without gloo's teardown (it crashed now and then)
leave_process_group()
"""


def test_fsdp_two_processes_chunked_equals_unchunked(tmp_path):
    """2 gloo processes, FSDP2 on every decoder block and the root (FSDPTrainer.wrap), tied
    policy embedding: tdpo (the reference's lazy logits), dckd (the teacher's lazy log-probs)
    and released TVKD (top-k) give the same losses, gradient norms and full gradients, three
    AdamW steps long, with and without the chunked output layer."""
    import json
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), REPO], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, o[-2000:] + e[-4000:]
    res = json.loads(next(line for line in outs[0][0].splitlines() if line.startswith("RESULT"))[len("RESULT"):])
    for name in ("tdpo", "dckd", "tvkd"):
        a, b = res[f"{name}/False"], res[f"{name}/True"]
        assert a["losses"][0] != a["losses"][-1]  # the steps changed the policy
        assert b["losses"] == pytest.approx(a["losses"], rel=1e-5, abs=1e-6), name
        assert b["norms"] == pytest.approx(a["norms"], rel=1e-5), name
        assert sorted(a["grads"]) == sorted(b["grads"]) and "model.embed_tokens.weight" in a["grads"]
        for k in a["grads"]:
            torch.testing.assert_close(torch.tensor(b["grads"][k]), torch.tensor(a["grads"][k]),
                                       rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
