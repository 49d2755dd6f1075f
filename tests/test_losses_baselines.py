"""The Table 1 baselines (simpo, wpo, seqkd, ddpo, dpkd, gkd, adpa) against hand computations
and the identities of LOSSES.md, the spec fields the trainer reads, and short end-to-end runs.

The hand computations loop over tokens in float64 with plain log-softmax, independently of
the vectorised (and chunked) code in losses.py.
"""
import math
import os

import pytest
import torch
from omegaconf import OmegaConf

import losses as L
import prefkd.logits as LG
from prefkd import generation
from prefkd import models
from prefkd import token_terms
from prefkd import loss_spec
from prefkd import logprobs

V, LEN, PROMPT = 7, 9, 3


def make_batch(seed=0, B=2):
    """Random logits of four models (policy, reference, teacher, teacher reference) and labels with
    prompts of PROMPT tokens and responses of different lengths (right padding)."""
    g = torch.Generator().manual_seed(seed)
    pol, ref, tea, tref = (torch.randn(2 * B, LEN, V, generator=g) * 2 for _ in range(4))
    labels = torch.full((2 * B, LEN), -100)
    for row in range(2 * B):
        n_resp = 2 + (row * 3 + seed) % (LEN - PROMPT - 1)
        labels[row, PROMPT:PROMPT + n_resp] = torch.randint(0, V, (n_resp,), generator=g)
    return pol, ref, tea, tref, labels


def cfg_of(name, **kw):
    base = OmegaConf.load(os.path.join(os.path.dirname(L.__file__), "config", "loss", f"{name}.yaml"))
    return OmegaConf.merge(base, kw)


def run_spec(name, pol, ref, tea, tref, labels, **kw):
    """What the trainer hands the loss, built from the spec alone (as compute_loss does)."""
    cfg = cfg_of(name, **kw)
    spec = loss_spec.get_loss(name)
    spec.validate(cfg)
    need = spec.reference_need(cfg)
    B = labels.shape[0] // 2
    if not spec.pairwise:
        pol, ref, tea, tref, labels = pol[:B], ref[:B], tea[:B], tref[:B], labels[:B]
    teacher = spec.teacher_features(tea, labels, cfg) if spec.teacher_features else None
    if spec.teacher_reference_need(cfg):
        teacher = spec.teacher_reference_features(tref, labels, cfg, teacher)
    inp = loss_spec.LossInputs(policy_logits=pol, labels=labels, n_pairs=B,
                       reference_logps=logprobs.token_logps(ref, labels) if need == "logps" else None,
                       reference_logits=ref if need == "logits" else None, teacher=teacher)
    return spec.compute(inp, cfg)


def positions(labels, row):
    """Input positions p of a row's response tokens; the state s_t of the token at p is logits position p-1."""
    return [p for p in range(labels.shape[1]) if labels[row, p] != -100]


def lsm(x):
    return torch.log_softmax(x.double(), -1)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > -30 else x - math.log1p(math.exp(x))


def seq_logp(logits, labels, row, average=False):
    vals = [lsm(logits[row, p - 1])[labels[row, p]].item() for p in positions(labels, row)]
    return sum(vals) / len(vals) if average else sum(vals)


def kl(p_log, q_log):
    """KL(p || q) of two float64 log-prob vectors, by a plain loop."""
    return sum(math.exp(a) * (a - b) for a, b in zip(p_log.tolist(), q_log.tolist()))


# ------------------------------------------------------------------ simpo

@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (0.5, 0.3)])
def test_simpo_matches_per_token_averaged_rewards_by_hand(beta, gamma):
    pol, ref, tea, tref, labels = make_batch(seed=1)
    loss, m = run_spec("simpo", pol, ref, tea, tref, labels, beta=beta, gamma=gamma)
    B, want = 2, 0.0
    for i in range(B):
        r_w = beta * seq_logp(pol, labels, i, average=True)
        r_l = beta * seq_logp(pol, labels, B + i, average=True)
        want += -logsig(r_w - r_l - gamma) / B
        assert m["rewards/chosen"][i].item() == pytest.approx(r_w, rel=1e-5)
        assert m["rewards/rejected"][i].item() == pytest.approx(r_l, rel=1e-5)
        assert m["logps/chosen"][i].item() == pytest.approx(seq_logp(pol, labels, i), rel=1e-5)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # the average matters: lengths differ between rows, so the summed log-probs give another loss
    assert len(positions(labels, 0)) != len(positions(labels, 2))
    # no reference model is loaded for it
    assert loss_spec.get_loss("simpo").reference_need(cfg_of("simpo")) is None
    assert not loss_spec.get_loss("simpo").reference_model_need(cfg_of("simpo"))


def test_simpo_pure_function_by_hand():
    loss, cr, rj = L.simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.25]), beta=2.0, gamma=1.0)
    # r_w = -1.0, r_l = -2.5: margin 1.5 - gamma = 0.5
    assert loss.item() == pytest.approx(-logsig(0.5), rel=1e-6)
    assert (cr.item(), rj.item()) == pytest.approx((-1.0, -2.5))


# ------------------------------------------------------------------ wpo

def hand_wpo_weight(pol, labels, row):
    terms = []
    for p in positions(labels, row):
        lp = lsm(pol[row, p - 1])
        terms.append(lp[labels[row, p]].item() - math.log(sum(math.exp(2 * a) for a in lp.tolist())))
    return math.exp(sum(terms) / len(terms))


def test_wpo_matches_hand_computation_and_clamps_the_weight():
    pol, ref, tea, tref, labels = make_batch(seed=2)
    # pair 1: a policy that puts most of its mass on y at every state gives w(y) > 1 (pi(y) > sum pi^2)
    for row in (1, 3):
        for p in positions(labels, row):
            pol[row, p - 1, labels[row, p]] += 6.0
    beta = 0.3
    loss, m = run_spec("wpo", pol, ref, tea, tref, labels, beta=beta)
    B, want, weights = 2, 0.0, []
    for i in range(B):
        h = (seq_logp(pol, labels, i) - seq_logp(ref, labels, i)) - (seq_logp(pol, labels, B + i) - seq_logp(ref, labels, B + i))
        w = min(1.0, hand_wpo_weight(pol, labels, i) * hand_wpo_weight(pol, labels, B + i))
        weights.append(w)
        want += w * -logsig(beta * h) / B
    assert weights[0] < 0.5 and weights[1] == 1.0, weights
    assert hand_wpo_weight(pol, labels, 1) * hand_wpo_weight(pol, labels, 3) > 1.0
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert m["wpo/weight"].tolist() == pytest.approx(weights, rel=1e-5)
    assert m["wpo/chosen_weight"][0].item() == pytest.approx(hand_wpo_weight(pol, labels, 0), rel=1e-5)


def test_wpo_with_unit_weights_is_dpo():
    pol, ref, tea, tref, labels = make_batch(seed=3)
    pc, pr = logprobs.split_pairs(logprobs.sequence_logps(logprobs.token_logps(pol, labels), logprobs.response_mask(labels)), 2)
    rc, rr = logprobs.split_pairs(logprobs.sequence_logps(logprobs.token_logps(ref, labels), logprobs.response_mask(labels)), 2)
    ones = torch.ones(2)
    wpo, _, _, weight = L.wpo_loss(pc, pr, rc, rr, ones, ones, beta=0.2)
    dpo, _, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.2)
    assert torch.equal(weight, ones) and torch.allclose(wpo, dpo, atol=0)
    # and the registered loss with a policy that is (numerically) deterministic on every token:
    # pi(y_t) = sum_v pi(v)^2 = 1, so w = 1 and WPO is DPO
    peaked = torch.full_like(pol, -1e4)
    for row in range(4):
        for p in positions(labels, row):
            peaked[row, p - 1, labels[row, p]] = 0.0
    w_loss, m = run_spec("wpo", peaked, ref, tea, tref, labels, beta=0.2)
    d_loss, _ = run_spec_dpo(peaked, ref, labels, beta=0.2)
    assert m["wpo/weight"].tolist() == [1.0, 1.0]
    assert w_loss.item() == pytest.approx(d_loss.item(), rel=1e-6)


def run_spec_dpo(pol, ref, labels, beta):
    cfg = OmegaConf.create({"name": "dpo", "beta": beta, "label_smoothing": 0.0, "reference_free": False})
    inp = loss_spec.LossInputs(policy_logits=pol, labels=labels, n_pairs=labels.shape[0] // 2,
                       reference_logps=logprobs.token_logps(ref, labels))
    return loss_spec.get_loss("dpo").compute(inp, cfg)


def test_wpo_weight_gets_no_gradient():
    """The gradient of WPO is the weight times DPO's gradient (w is computed without grad)."""
    pol, ref, tea, tref, labels = make_batch(seed=4)
    p1 = pol.clone().requires_grad_(True)
    loss, m = run_spec("wpo", p1, ref, tea, tref, labels, beta=0.5)
    loss.backward()
    grads = []
    for i in range(2):  # DPO's gradient of each pair separately, scaled by that pair's weight
        p2 = pol.clone().requires_grad_(True)
        pc, pr = logprobs.split_pairs(logprobs.sequence_logps(logprobs.token_logps(p2, labels), logprobs.response_mask(labels)), 2)
        rc, rr = logprobs.split_pairs(logprobs.sequence_logps(logprobs.token_logps(ref, labels), logprobs.response_mask(labels)), 2)
        per = L.dpo_loss(pc, pr, rc, rr, 0.5)[0]
        (per[i] * m["wpo/weight"][i] / 2).backward()
        grads.append(p2.grad)
    assert torch.allclose(p1.grad, grads[0] + grads[1], atol=1e-6)
    assert m["wpo/weight"].min() < 0.99   # the weights are not trivially 1 here


def test_wpo_chunked_equals_unchunked(monkeypatch):
    pol, ref, tea, tref, labels = make_batch(seed=5)
    whole = run_spec("wpo", pol, ref, tea, tref, labels)
    monkeypatch.setattr(LG, "CHUNK_ELEMENTS", 4 * V)   # one position per chunk
    parts = run_spec("wpo", pol, ref, tea, tref, labels)
    assert whole[0].item() == pytest.approx(parts[0].item(), abs=1e-7)
    assert torch.allclose(whole[1]["wpo/weight"], parts[1]["wpo/weight"], atol=1e-7)


# ------------------------------------------------------------------ seqkd

def test_seqkd_is_the_mean_token_nll_of_the_teacher_responses():
    pol, ref, tea, tref, labels = make_batch(seed=6)
    loss, m = run_spec("seqkd", pol, ref, tea, tref, labels)
    hand = [-seq_logp(pol, labels, r, average=True) for r in range(2)]
    assert loss.item() == pytest.approx(sum(hand) / 2, rel=1e-6)
    assert m["kd/nll"].tolist() == pytest.approx(hand, rel=1e-6)
    assert L.seqkd_loss(torch.tensor([[0.0, -1.0, -3.0]]), torch.tensor([[0.0, 1.0, 1.0]])).item() == 2.0
    spec, cfg = loss_spec.get_loss("seqkd"), cfg_of("seqkd")
    gen = spec.generation_need(cfg)
    # the responses are the teacher's, greedy, generated for the training prompts, replacing the target
    assert (gen.source, gen.replaces, gen.probability, gen.temperature, gen.num_beams, gen.train_only, gen.frozen) == \
        ("teacher", "chosen", 1.0, None, 1, False, True)
    assert spec.teacher_need(cfg) and spec.teacher_features is None and not spec.pairwise and spec.sft_targets


# ------------------------------------------------------------------ ddpo

def hand_ddpo(pol, ref, tea, tref, labels, beta, beta_t):
    B, out = 2, 0.0
    for i in range(B):
        s = lambda x, r: seq_logp(x, labels, r)
        h = (s(pol, i) - s(ref, i)) - (s(pol, B + i) - s(ref, B + i))
        r_w = beta_t * (s(tea, i) - s(tref, i))
        r_l = beta_t * (s(tea, B + i) - s(tref, B + i))
        out += (beta * h - (r_w - r_l)) ** 2 / B
    return out


def test_ddpo_matches_hand_computation():
    pol, ref, tea, tref, labels = make_batch(seed=7)
    loss, m = run_spec("ddpo", pol, ref, tea, tref, labels, beta=0.2, teacher_beta=0.5)
    assert loss.item() == pytest.approx(hand_ddpo(pol, ref, tea, tref, labels, 0.2, 0.5), rel=1e-5)
    r_w = 0.5 * (seq_logp(tea, labels, 0) - seq_logp(tref, labels, 0))
    assert m["teacher_rewards/chosen"][0].item() == pytest.approx(r_w, rel=1e-5)
    spec = loss_spec.get_loss("ddpo")
    assert spec.reference_need(cfg_of("ddpo")) == "logps" and spec.teacher_reference_need(cfg_of("ddpo"))


def test_ddpo_is_zero_where_the_student_margin_equals_the_teachers():
    """Student = teacher and reference = teacher's reference with beta = beta_T: the implicit reward
    margins coincide, the loss and its gradient vanish; move the student and they do not."""
    pol, ref, tea, tref, labels = make_batch(seed=8)
    p = tea.clone().requires_grad_(True)
    loss, m = run_spec("ddpo", p, tref, tea, tref, labels, beta=0.3, teacher_beta=0.3)
    loss.backward()
    assert abs(loss.item()) < 1e-10 and p.grad.abs().max() < 1e-6
    assert torch.allclose(m["rewards/margins"], m["teacher_rewards/margins"], atol=1e-5)
    assert m["teacher_rewards/margins"].abs().min() > 0.05   # the margin itself is not 0
    # pure function: zero exactly at equal margins, the squared difference elsewhere
    z, _, _ = L.ddpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]),
                          torch.tensor([0.4]), torch.tensor([0.25]), beta=0.1)   # beta h = 0.15 = 0.4 - 0.25
    assert z.item() == pytest.approx(0.0, abs=1e-7)
    nz, _, _ = L.ddpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]),
                           torch.tensor([0.0]), torch.tensor([0.25]), beta=0.1)
    assert nz.item() == pytest.approx((0.15 + 0.25) ** 2, rel=1e-6)
    other, _ = run_spec("ddpo", pol, tref, tea, tref, labels, beta=0.3, teacher_beta=0.3)
    assert other.item() > 1e-3


# ------------------------------------------------------------------ dpkd

def hand_dpkd(pol, tea, labels, beta, kd_ratio, B=2):
    out = 0.0
    for row in range(B):
        nll, pref, pos = 0.0, 0.0, positions(labels, row)
        for p in pos:
            S, T = lsm(pol[row, p - 1]), lsm(tea[row, p - 1])
            a_t = max(range(V), key=lambda a: T[a].item())
            a_s = max(range(V), key=lambda a: S[a].item())
            h = (S[a_t] - S[a_s]).item() - (T[a_t] - T[a_s]).item()
            pref += -logsig(beta * h)
            nll += -S[labels[row, p]].item()
        out += ((1 - kd_ratio) * nll / len(pos) + kd_ratio * pref / len(pos)) / B
    return out


@pytest.mark.parametrize("beta,kd_ratio", [(0.1, 0.5), (1.0, 0.8)])
def test_dpkd_matches_hand_computation(beta, kd_ratio):
    pol, ref, tea, tref, labels = make_batch(seed=9)
    loss, m = run_spec("dpkd", pol, ref, tea, tref, labels, beta=beta, kd_ratio=kd_ratio)
    assert loss.item() == pytest.approx(hand_dpkd(pol, tea, labels, beta, kd_ratio), rel=1e-5)
    # the argmaxes disagree somewhere (else every h_t would be 0 and the test would be weak)
    assert 0.0 < m["kd/argmax_agreement"].mean().item() < 1.0 or m["kd/margin"].abs().max() > 0.1


def test_dpkd_with_kd_ratio_zero_is_sft_and_h_is_zero_where_argmaxes_agree():
    pol, ref, tea, tref, labels = make_batch(seed=10)
    d, _ = run_spec("dpkd", pol, ref, tea, tref, labels, kd_ratio=0.0)
    cfg = OmegaConf.create({"name": "sft"})
    s, _ = loss_spec.get_loss("sft").compute(loss_spec.LossInputs(policy_logits=pol[:2], labels=labels[:2], n_pairs=2), cfg)
    assert d.item() == pytest.approx(s.item(), abs=1e-7)
    # a student whose argmax is the teacher's at every state: h_t = 0, the term is log 2 and has no gradient
    same = tea.clone().requires_grad_(True)
    h = L.dpkd_margins(torch.log_softmax(same, -1), torch.log_softmax(tea, -1))
    assert h.abs().max() == 0
    p = tea.clone().requires_grad_(True)
    loss, m = run_spec("dpkd", p, ref, tea, tref, labels, kd_ratio=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6) and p.grad.abs().max() < 1e-7


def test_dpkd_gradient_matches_plain_autograd(monkeypatch):
    pol, ref, tea, tref, labels = make_batch(seed=11)
    monkeypatch.setattr(LG, "CHUNK_ELEMENTS", 2 * V)
    p = pol.clone().requires_grad_(True)
    run_spec("dpkd", p, ref, tea, tref, labels, beta=0.7, kd_ratio=0.6)[0].backward()
    q = pol[:2].double().clone().requires_grad_(True)
    S, T = torch.log_softmax(q[:, :-1], -1), torch.log_softmax(tea[:2, :-1].double(), -1)
    a_t, a_s = T.argmax(-1, keepdim=True), S.detach().argmax(-1, keepdim=True)
    h = (S.gather(-1, a_t) - S.gather(-1, a_s) - T.gather(-1, a_t) + T.gather(-1, a_s)).squeeze(-1)
    m = (labels[:2, 1:] != -100).double()
    nll = -(S.gather(-1, labels[:2, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1) * m).sum(-1) / m.sum(-1)
    pref = (-torch.nn.functional.logsigmoid(0.7 * h) * m).sum(-1) / m.sum(-1)
    (0.4 * nll + 0.6 * pref).mean().backward()
    assert torch.allclose(p.grad[:2].double(), q.grad, atol=1e-6)
    assert p.grad[2:].abs().max() == 0   # single-target loss: only the chosen rows are used


# ------------------------------------------------------------------ gkd

def hand_jsd(T, S, b):
    if b == 0:
        return kl(T, S)
    if b == 1:
        return kl(S, T)
    M = [math.log(b * math.exp(t) + (1 - b) * math.exp(s)) for t, s in zip(T.tolist(), S.tolist())]
    M = torch.tensor(M, dtype=torch.float64)
    return b * kl(T, M) + (1 - b) * kl(S, M)


def hand_gkd(pol, tea, labels, b, k=None, B=2):
    out = 0.0
    for row in range(B):
        vals = []
        for p in positions(labels, row):
            T, S = lsm(tea[row, p - 1]), lsm(pol[row, p - 1])
            if k is not None:
                ids = tea[row, p - 1].topk(k).indices
                T = torch.cat([T[ids], torch.log(1 - T[ids].exp().sum()).reshape(1)])
                S = torch.cat([S[ids], torch.log(1 - S[ids].exp().sum()).reshape(1)])
            vals.append(hand_jsd(T, S, b))
        out += sum(vals) / len(vals) / B
    return out


@pytest.mark.parametrize("b,k", [(0.5, None), (0.1, None), (0.9, 3), (0.0, None), (1.0, None), (1.0, 3)])
def test_gkd_matches_hand_computation(b, k):
    pol, ref, tea, tref, labels = make_batch(seed=12)
    loss, m = run_spec("gkd", pol, ref, tea, tref, labels, b=b, lam=0.0, top_k=k)
    assert loss.item() == pytest.approx(hand_gkd(pol, tea, labels, b, k), rel=1e-5)


def test_gkd_with_b_zero_and_lambda_zero_is_forward_kl_distillation():
    pol, ref, tea, tref, labels = make_batch(seed=13)
    g, _ = run_spec("gkd", pol, ref, tea, tref, labels, b=0.0, lam=0.0)
    cfg = OmegaConf.merge(OmegaConf.load(os.path.join(os.path.dirname(L.__file__), "config/loss/vanillakd.yaml")),
                          {"sft_weight": 0.0, "kd_weight": 1.0})
    spec = loss_spec.get_loss("vanillakd")
    inp = loss_spec.LossInputs(policy_logits=pol[:2], labels=labels[:2], n_pairs=2,
                       teacher=spec.teacher_features(tea[:2], labels[:2], cfg))
    v, _ = spec.compute(inp, cfg)
    assert g.item() == pytest.approx(v.item(), abs=1e-7)
    assert loss_spec.get_loss("gkd").generation_need(cfg_of("gkd", lam=0.0)) is None   # lambda = 0: the data only


def test_generalized_jsd_symmetry_and_limits():
    """JSD_b(P, Q) = JSD_{1-b}(Q, P); JSD_b / b -> KL(P || Q) as b -> 0 (the forward-KL end point)."""
    g = torch.Generator().manual_seed(0)
    P, Q = (torch.log_softmax(torch.randn(5, V, generator=g, dtype=torch.float64), -1) for _ in range(2))
    assert torch.allclose(token_terms.generalized_jsd(P, Q, 0.3), token_terms.generalized_jsd(Q, P, 0.7), atol=1e-12)
    b = 1e-5
    assert torch.allclose(token_terms.generalized_jsd(P, Q, b) / b, token_terms.generalized_jsd(P, Q, 0.0), rtol=1e-3)
    assert torch.allclose(token_terms.generalized_jsd(P, Q, 1 - b) / b, token_terms.generalized_jsd(P, Q, 1.0), rtol=1e-3)
    assert token_terms.generalized_jsd(P, P, 0.5).abs().max() < 1e-12


def test_gkd_on_policy_generation_is_declared():
    spec = loss_spec.get_loss("gkd")
    gen = spec.generation_need(cfg_of("gkd"))
    assert (gen.source, gen.replaces, gen.probability, gen.temperature, gen.train_only, gen.frozen) == \
        ("policy", "chosen", 0.5, 0.9, True, False)
    assert not spec.reference_model_need(cfg_of("gkd")) and spec.teacher_need(cfg_of("gkd"))
    with pytest.raises(ValueError, match=r"loss\.lam"):
        spec.validate(cfg_of("gkd", lam=1.5))
    with pytest.raises(ValueError, match=r"loss\.temperature"):
        spec.validate(cfg_of("gkd", temperature=0.0))
    with pytest.raises(ValueError, match=r"loss\.b"):
        spec.validate(cfg_of("gkd", b=-0.1))


def test_gkd_and_adpa_chunked_equal_unchunked(monkeypatch):
    pol, ref, tea, tref, labels = make_batch(seed=14)
    cases = [("gkd", {"lam": 0.0}), ("gkd", {"lam": 0.0, "top_k": 3}), ("adpa", {}),
             ("adpa", {"top_k": 2}), ("dpkd", {}), ("ddpo", {})]
    whole = [run_spec(n, pol, ref, tea, tref, labels, **kw)[0] for n, kw in cases]
    monkeypatch.setattr(LG, "CHUNK_ELEMENTS", 2 * V)
    parts = [run_spec(n, pol, ref, tea, tref, labels, **kw)[0] for n, kw in cases]
    for (n, kw), a, b in zip(cases, whole, parts):
        assert a.item() == pytest.approx(b.item(), abs=1e-6), (n, kw)


# ------------------------------------------------------------------ adpa

def hand_adpa(pol, tea, tref, labels, w, k=None, B=2):
    """Rows [0, B) hold y_w, rows [B, 2B) the student's generated y_s for the same prompts."""
    out = 0.0
    for i in range(B):
        nll = -seq_logp(pol, labels, i, average=True)
        vals = []
        for p in positions(labels, B + i):
            S, T, R = lsm(pol[B + i, p - 1]), lsm(tea[B + i, p - 1]), lsm(tref[B + i, p - 1])
            if k is not None:
                ids = tea[B + i, p - 1].topk(k).indices
                col = lambda X: torch.cat([X[ids], torch.log(1 - X[ids].exp().sum()).reshape(1)])
                S, T, R = col(S), col(T), col(R)
            vals.append(sum(math.exp(s) * (t - r) for s, t, r in zip(S.tolist(), T.tolist(), R.tolist())))
        out += (nll - w * sum(vals) / len(vals)) / B
    return out


@pytest.mark.parametrize("w,k", [(1.6, None), (0.5, 3)])
def test_adpa_matches_hand_computation(w, k):
    pol, ref, tea, tref, labels = make_batch(seed=15)
    loss, m = run_spec("adpa", pol, ref, tea, tref, labels, w=w, top_k=k)
    assert loss.item() == pytest.approx(hand_adpa(pol, tea, tref, labels, w, k), rel=1e-5)
    assert m["kd/nll"][0].item() == pytest.approx(-seq_logp(pol, labels, 0, average=True), rel=1e-6)


def test_adpa_with_equal_teachers_is_sft_on_y_w_and_spec_needs():
    pol, ref, tea, tref, labels = make_batch(seed=16)
    loss, m = run_spec("adpa", pol, ref, tea, tea, labels, w=5.0)   # A = 0 everywhere
    want = sum(-seq_logp(pol, labels, i, average=True) for i in range(2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6) and m["kd/advantage"].abs().max() < 1e-6
    spec, cfg = loss_spec.get_loss("adpa"), cfg_of("adpa")
    gen = spec.generation_need(cfg)
    assert (gen.source, gen.replaces, gen.probability, gen.temperature, gen.frozen) == \
        ("reference", "rejected", 1.0, None, True)
    assert spec.reference_need(cfg) is None and spec.reference_model_need(cfg)   # loaded only to generate
    assert spec.teacher_need(cfg) and spec.teacher_reference_need(cfg) and spec.pairwise and not spec.sft_targets
    # the teacher features cover the generated rows only
    f = spec.teacher_features(tea, labels, cfg)
    assert f["teacher_logp"].shape == (2, LEN, V)
    assert torch.allclose(f["teacher_logp"], torch.log_softmax(tea[2:], -1), atol=1e-6)


def test_adpa_gradient_raises_mass_on_positive_advantage():
    """One state, A = +1 on token 0 and 0 elsewhere: the advantage term's gradient is
    -w * d pi(0) / d logits, which raises the logit of token 0 under gradient descent."""
    labels = torch.tensor([[-100, 1, 2], [-100, 3, 2]])
    pol = torch.zeros(2, 3, V, requires_grad=True)
    adv = torch.zeros(1, 3, V)
    adv[0, :, 0] = 1.0
    per = L.expected_advantage(torch.log_softmax(pol[1:, :-1], -1), adv[:, :-1])
    m = logprobs.response_mask(labels)
    L.adpa_loss(logprobs.token_logps(pol, labels)[:1], m[:1], per * m[1:], m[1:], w=1.0).sum().backward()
    g = pol.grad[1, 0]
    assert g[0] < 0 and (g[1:] > 0).all()
    assert per[0, 0].item() == pytest.approx(1.0 / V, rel=1e-6)


# ------------------------------------------------------------------ validation: yaml defaults and bad values

def test_yaml_defaults_are_the_spec_defaults_and_validate():
    expect = {"simpo": dict(beta=2.0, gamma=1.0), "wpo": dict(beta=0.1), "ddpo": dict(beta=0.1, teacher_beta=0.1),
              "dpkd": dict(beta=0.1, kd_ratio=0.5),
              "gkd": dict(b=0.5, lam=0.5, temperature=0.9, max_new_tokens=None, top_k=None),
              "adpa": dict(w=1.6, temperature=None, max_new_tokens=None, top_k=None),
              "seqkd": dict(temperature=None, num_beams=1, max_new_tokens=None)}
    for name, fields in expect.items():
        cfg = cfg_of(name)
        assert cfg.name == name
        assert {k: cfg[k] for k in cfg if k != "name"} == fields, name
        loss_spec.get_loss(name).validate(cfg)


@pytest.mark.parametrize("name,kw,key", [
    ("simpo", dict(beta=0.0), "loss.beta"), ("simpo", dict(gamma=None), "loss.gamma"),
    ("wpo", dict(beta=-1.0), "loss.beta"), ("ddpo", dict(teacher_beta=0.0), "loss.teacher_beta"),
    ("dpkd", dict(kd_ratio=1.5), "loss.kd_ratio"), ("adpa", dict(w=-1.0), "loss.w"),
    ("adpa", dict(top_k=0), "loss.top_k"), ("seqkd", dict(num_beams=0), "loss.num_beams"),
    ("seqkd", dict(max_new_tokens=0), "loss.max_new_tokens"), ("adpa", dict(temperature=-1.0), "loss.temperature"),
])
def test_bad_values_name_the_key(name, kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        loss_spec.get_loss(name).validate(cfg_of(name, **kw))


# ------------------------------------------------------------------ the trainer: what the specs declare

@pytest.fixture(scope="module")
def teacher_runs(trained_teacher):
    """(DPO teacher run, its SFT reference run): the conftest fixture trains sft then dpo from it."""
    sft = os.path.join(os.path.dirname(trained_teacher), "sft")
    assert os.path.exists(os.path.join(sft, "LATEST"))
    return trained_teacher, sft


def test_teacher_reference_is_required_before_any_model_is_loaded(tmp_path, teacher_runs, monkeypatch):
    import train
    import trainers
    from conftest import compose
    dpo, sft = teacher_runs
    loaded = []
    monkeypatch.setattr(models, "build_model", lambda *a, **k: loaded.append(a) or pytest.fail("model loaded"))
    for name in ("ddpo", "adpa"):
        cfg = compose([f"loss={name}", "teacher=tiny_teacher", f"teacher.archive={dpo}"])
        assert cfg.teacher.reference_archive is None
        with pytest.raises(ValueError, match=r"teacher\.reference_archive="):
            train.validate_config(cfg)
        with pytest.raises(ValueError, match=r"teacher\.reference_archive"):   # the trainer checks it too
            trainers.BasicTrainer(cfg, str(tmp_path))
        cfg.teacher.reference_archive = str(tmp_path / "nothing")
        with pytest.raises(ValueError, match=r"teacher\.reference_archive=.*not a checkpoint"):
            train.validate_config(cfg)
        cfg.teacher.reference_archive = f"{sft}/LATEST"
        train.validate_config(cfg)
    assert loaded == []


def test_replace_responses_layout():
    batch = {"prompt": ["a", "b"], "chosen_input_ids": torch.zeros(2, 3, dtype=torch.long)}
    out = generation.replace_responses(batch, "chosen", [[1, 5, 6], [1, 7]], [[8, 2], [9, 9, 9, 2]], pad_token_id=0,
                                     max_length=5)
    assert out["chosen_input_ids"].tolist() == [[1, 5, 6, 8, 2], [1, 7, 9, 9, 9]]   # cut to max_length
    assert out["chosen_labels"].tolist() == [[-100, -100, -100, 8, 2], [-100, -100, 9, 9, 9]]
    assert out["chosen_attention_mask"].tolist() == [[1] * 5, [1] * 5]
    out = generation.replace_responses(batch, "rejected", [[1, 5, 6], [1]], [[2], [4, 2]], 0, 48)
    assert out["rejected_input_ids"].tolist() == [[1, 5, 6, 2], [1, 4, 2, 0]]
    assert out["rejected_labels"].tolist() == [[-100, -100, -100, 2], [-100, 4, 2, -100]]
    assert out["rejected_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert out["chosen_input_ids"] is batch["chosen_input_ids"]   # the other responses are untouched


def make_trainer(tmp_path, overrides):
    import trainers
    from conftest import FAST, compose
    cfg = compose(list(FAST) + [f"runs_dir={tmp_path}"] + list(overrides))
    return trainers.BasicTrainer(cfg, str(tmp_path))


def test_teacher_generations_equal_unbatched_greedy_decoding_and_are_generated_once(tmp_path, teacher_runs):
    """seqkd's batch: the teacher's greedy responses to the left-padded prompts, rebuilt right-padded
    after the unpadded prompt, equal to decoding each prompt alone; a second pass over the same
    prompts generates nothing (the cache)."""
    dpo, _ = teacher_runs
    tr = make_trainer(tmp_path, ["loss=seqkd", "teacher=tiny_teacher", f"teacher.archive={dpo}"])
    batch = next(iter(tr.batch_iterator("train")))
    assert batch["prompt_attention_mask"].min() == 0   # prompts of different lengths: left padding is exercised
    calls = []
    real = tr.generation.responses
    tr.generation.responses = lambda *a: calls.append(1) or real(*a)
    out, generated = tr.generated_batch(batch, train=True)
    assert generated is True and len(calls) == 1
    eos = tr.tokenizer.eos_token_id
    for row in range(len(batch["prompt"])):
        prompt = batch["prompt_input_ids"][row][batch["prompt_attention_mask"][row].bool()]
        alone = tr.frozen.teacher.generate(input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    do_sample=False, max_new_tokens=tr.cfg.max_length - batch["prompt_input_ids"].shape[1],
                                    pad_token_id=tr.tokenizer.pad_token_id, eos_token_id=eos)[0, len(prompt):].tolist()
        if eos in alone:
            alone = alone[:alone.index(eos) + 1]
        n = int(out["chosen_attention_mask"][row].sum())
        assert out["chosen_input_ids"][row, :n].tolist() == prompt.tolist() + alone
        assert out["chosen_labels"][row, :n].tolist() == [-100] * len(prompt) + alone
        assert (out["chosen_labels"][row, n:] == -100).all()
        assert out["chosen"][row] == tr.tokenizer.decode(alone, skip_special_tokens=True)
    # a response is cut after its EOS, or fills the budget max_length - prompt width without one
    budget = tr.cfg.max_length - batch["prompt_input_ids"].shape[1]
    ends = [out["chosen_labels"][r][out["chosen_labels"][r] != -100].tolist() for r in range(len(batch["prompt"]))]
    assert all(e[-1] == eos and eos not in e[:-1] or len(e) == budget and eos not in e for e in ends)
    assert any(e[-1] == eos for e in ends)
    again, _ = tr.generated_batch(batch, train=False)
    assert len(calls) == 1 and torch.equal(again["chosen_input_ids"], out["chosen_input_ids"])


def test_on_policy_draws_are_seeded_by_step_and_micro_batch(tmp_path, teacher_runs):
    dpo, _ = teacher_runs
    a = make_trainer(tmp_path / "a", ["loss=gkd", "teacher=tiny_teacher", f"teacher.archive={dpo}"])
    b = make_trainer(tmp_path / "b", ["loss=gkd", "teacher=tiny_teacher", f"teacher.archive={dpo}"])
    draws = {}
    for tr in (a, b):
        seq = []
        for step in range(400):
            tr.step = step
            seq += [tr.generation.draw(0.5, True, step), tr.generation.draw(0.5, True, step)]  # two micro-batches a step
        draws[id(tr)] = seq
    assert draws[id(a)] == draws[id(b)]                  # every rank (and a resumed run) decides the same
    frac = sum(draws[id(a)]) / len(draws[id(a)])
    assert 0.45 < frac < 0.55, frac
    assert draws[id(a)][0::2] != draws[id(a)][1::2]      # micro-batches of a step draw separately
    # eval batches keep the data's responses (train_only), train batches are generated when drawn
    batch = next(iter(a.batch_iterator("train")))
    assert a.generated_batch(batch, train=False) == (batch, None)
    a.step = next(s for s in range(400) if draws[id(b)][2 * s])
    a.generation.draw_key = None
    out, generated = a.generated_batch(batch, train=True)
    assert generated is True and not torch.equal(out["chosen_labels"], batch["chosen_labels"])
    assert out["rejected_input_ids"] is batch["rejected_input_ids"]
    assert a.policy.training   # generation switched to eval mode and back


# ------------------------------------------------------------------ end to end on the embedded task

def smoke(tmp_path, name, overrides, n_examples=192, n_eval=48):
    """A short run from a random student: an evaluation before and after n_examples / 16 steps."""
    from conftest import train_run
    _, records = train_run(tmp_path, [
        f"loss={name}", f"exp_name={name}", f"n_examples={n_examples}", "batch_size=16", f"eval_every={n_examples}",
        "do_first_eval=true", f"n_eval_examples={n_eval}", f"eval_batch_size={n_eval}", "lr=3e-3"] + list(overrides))
    e = [r for r in records if "loss/eval" in r]
    assert len(e) == 2, records
    train_losses = [r["loss/train"] for r in records if "loss/train" in r]
    assert len(train_losses) == n_examples // 16 and all(math.isfinite(x) for x in train_losses)
    return e[0], e[-1], records


def test_simpo_trains(tmp_path):
    first, last, _ = smoke(tmp_path, "simpo", [])
    assert last["loss/eval"] < first["loss/eval"] - 0.1, (first, last)
    assert last["rewards_eval/accuracies"] > max(0.75, first["rewards_eval/accuracies"]), (first, last)


def test_wpo_trains(tmp_path):
    first, last, records = smoke(tmp_path, "wpo", ["loss.beta=0.5"])
    assert first["rewards_eval/accuracies"] == 0.0 and last["rewards_eval/accuracies"] > 0.75, (first, last)
    assert last["loss/eval"] < first["loss/eval"]
    weights = [r["wpo_train/weight"] for r in records if "wpo_train/weight" in r]
    assert all(0 < w <= 1 for w in weights) and len(set(weights)) > 1


def test_ddpo_trains(tmp_path, teacher_runs):
    dpo, sft = teacher_runs
    first, last, _ = smoke(tmp_path, "ddpo", ["teacher=tiny_teacher", f"teacher.archive={dpo}",
                                              f"teacher.reference_archive={sft}/LATEST"], 96, 32)
    # the student starts at its reference (margin 0) and moves towards the teacher's margins
    assert first["rewards_eval/margins"] == 0.0 and first["teacher_rewards_eval/margins"] > 0.1
    assert last["loss/eval"] < 0.97 * first["loss/eval"], (first, last)
    assert 0.01 < last["rewards_eval/margins"] < last["teacher_rewards_eval/margins"], last
    assert last["rewards_eval/accuracies"] > 0.6, last
    assert last["teacher_rewards_eval/margins"] == pytest.approx(first["teacher_rewards_eval/margins"], rel=1e-5)


def test_dpkd_trains(tmp_path, teacher_runs):
    dpo, _ = teacher_runs
    first, last, _ = smoke(tmp_path, "dpkd", ["teacher=tiny_teacher", f"teacher.archive={dpo}"], 96, 32)
    assert last["loss/eval"] < first["loss/eval"] - 0.5, (first, last)
    assert last["kd_eval/argmax_agreement"] > first["kd_eval/argmax_agreement"] + 0.1, (first, last)


def test_gkd_trains_on_and_off_policy(tmp_path, teacher_runs):
    dpo, _ = teacher_runs
    first, last, records = smoke(tmp_path, "gkd", ["teacher=tiny_teacher", f"teacher.archive={dpo}",
                                                 "loss.max_new_tokens=14"], 96, 32)
    assert last["loss/eval"] < 0.9 * first["loss/eval"], (first, last)
    fractions = [r["generated_train/fraction"] for r in records if "generated_train/fraction" in r]
    assert len(fractions) == 6 and 0 < sum(fractions) < 6, fractions   # some steps on-policy, some on data
    assert "generated_eval/fraction" not in last                          # evaluation on the data's y_w


def test_seqkd_trains_on_teacher_generations(tmp_path, teacher_runs, monkeypatch):
    from prefkd import generation as generation_lib
    dpo, _ = teacher_runs
    rows = []
    real = generation_lib.InRunGeneration.responses
    monkeypatch.setattr(generation_lib.InRunGeneration, "responses",
                        lambda self, *a: rows.append(a[1].shape[0]) or real(self, *a))
    first, last, _ = smoke(tmp_path, "seqkd", ["teacher=tiny_teacher", f"teacher.archive={dpo}",
                                               "loss.max_new_tokens=14"], 96, 32)
    assert last["loss/eval"] < first["loss/eval"] - 0.5, (first, last)
    # 96 training prompts and 32 test prompts, each generated once (the final eval reuses them)
    assert sum(rows) == 96 + 32, rows


def test_adpa_trains(tmp_path, teacher_runs):
    dpo, sft = teacher_runs
    first, last, _ = smoke(tmp_path, "adpa", ["teacher=tiny_teacher", f"teacher.archive={dpo}",
                                              f"teacher.reference_archive={sft}/LATEST", "loss.max_new_tokens=14"],
                           64, 32)
    assert last["loss/eval"] < first["loss/eval"] - 0.5, (first, last)
    assert last["kd_eval/advantage"] > first["kd_eval/advantage"], (first, last)
    assert first["kd_eval/generated_length"] == last["kd_eval/generated_length"]   # y_s generated once, by the frozen start




def test_gkd_resume_gives_the_losses_and_draws_of_an_uninterrupted_run(tmp_path, teacher_runs):
    """On-policy draws are seeded by (seed, step, micro-batch) and the sampling RNG is restored from
    the checkpoint: a resumed gkd run continues with the same draws, samples and losses."""
    from conftest import train_run
    dpo, _ = teacher_runs
    common = ["loss=gkd", "n_examples=48", "eval_every=null", "exp_name=r", "lr=1e-3", "teacher=tiny_teacher",
              f"teacher.archive={dpo}", "loss.max_new_tokens=8"]
    _, full = train_run(tmp_path / "a", common)
    train_run(tmp_path / "b", common[:1] + ["n_examples=24"] + common[2:])
    _, both = train_run(tmp_path / "b", common + ["resume=true"])
    for key in ("loss/train", "generated_train/fraction"):
        a, b = [r[key] for r in full if key in r], [r[key] for r in both if key in r]
        assert len(a) == len(b) == 6 and a[3:] == b[3:], (key, a, b)
    fractions = [r["generated_train/fraction"] for r in full if "generated_train/fraction" in r]
    assert 0 < sum(fractions[3:]) < 3, fractions   # the resumed half has both kinds of step

# ------------------------------------------------------------------ FSDP: sharded teacher reference, generation

def launch_fsdp(tmp_path, overrides):
    """`python train.py trainer=FSDPTrainer` with 2 gloo CPU workers (the user-facing launch path)."""
    import socket
    import subprocess
    import sys
    from conftest import FAST, REPO, read_metrics
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *FAST, f"runs_dir={tmp_path}", *overrides,
           "trainer=FSDPTrainer", "trainer.cpu_workers=2", f"trainer.port={port}"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return read_metrics(os.path.join(tmp_path, "d"))


def test_fsdp_adpa_and_gkd_match_one_process(tmp_path, teacher_runs):
    """adpa under FSDP (2 ranks): the DPO teacher, its SFT reference and the generating reference are
    sharded, the ranks generate y_s together (synced_gpus; the cache decision is all-reduced) and
    the losses equal the single-process ones. gkd: every rank draws the same on-policy micro-batches
    as the single process (gradient accumulation: two draws a step)."""
    from conftest import train_run
    dpo, sft = teacher_runs
    common = ["loss=adpa", "n_examples=32", "eval_every=null", "lr=1e-3", "exp_name=d", "teacher=tiny_teacher",
              f"teacher.archive={dpo}", f"teacher.reference_archive={sft}/LATEST", "loss.max_new_tokens=12"]
    _, single = train_run(tmp_path / "single", common)
    fsdp = launch_fsdp(tmp_path / "fsdp", common)
    for key in ("loss/train", "kd_train/advantage", "kd_train/generated_length", "loss/eval", "kd_eval/advantage"):
        a, b = [r[key] for r in single if key in r], [r[key] for r in fsdp if key in r]
        assert len(a) == len(b) > 0 and a == pytest.approx(b, abs=1e-4), (key, a, b)
    common = ["loss=gkd", "n_examples=32", "eval_every=null", "lr=1e-3", "exp_name=d", "teacher=tiny_teacher",
              f"teacher.archive={dpo}", "gradient_accumulation_steps=2", "loss.max_new_tokens=8"]
    _, single = train_run(tmp_path / "single_gkd", common)
    fsdp = launch_fsdp(tmp_path / "fsdp_gkd", common)
    key = "generated_train/fraction"
    a, b = [r[key] for r in single if key in r], [r[key] for r in fsdp if key in r]
    assert len(a) == len(b) == 4 and a == b and set(a) & {0.5}, a   # per step: 0, 0.5 or 1 of its 2 micro-batches
    assert all(math.isfinite(r["loss/train"]) for r in fsdp if "loss/train" in r)
