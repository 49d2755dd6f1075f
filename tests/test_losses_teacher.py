"""tvkd, tdpo, vanillakd, dckd against hand computations and the identities of LOSSES.md.

The hand computations loop over tokens with plain log-softmax, independently of the
vectorised (and chunked) code in losses.py.
"""
import itertools
import math

import pytest
import torch
from omegaconf import OmegaConf

import losses as L

V, LEN, PROMPT = 7, 9, 3


def make_batch(seed=0, B=2, shared_prompt=True):
    """Random logits for policy / reference / teacher and labels with prompts of PROMPT tokens
    and responses of different lengths (right padding). Chosen row i and rejected row B+i
    share their prompt tokens and, when shared_prompt, the teacher's logits on the prompt."""
    g = torch.Generator().manual_seed(seed)
    pol = torch.randn(2 * B, LEN, V, generator=g) * 2
    ref = torch.randn(2 * B, LEN, V, generator=g) * 2
    tea = torch.randn(2 * B, LEN, V, generator=g) * 2
    labels = torch.full((2 * B, LEN), -100)
    for row in range(2 * B):
        n_resp = 2 + (row * 3 + seed) % (LEN - PROMPT - 1)  # 2..LEN-PROMPT
        labels[row, PROMPT:PROMPT + n_resp] = torch.randint(0, V, (n_resp,), generator=g)
    if shared_prompt:
        tea[B:, :PROMPT] = tea[:B, :PROMPT]
    return pol, ref, tea, labels


def cfg_of(name, **kw):
    base = OmegaConf.load(f"{L.__file__.rsplit('/', 1)[0]}/config/loss/{name}.yaml")
    return OmegaConf.merge(base, kw)


def run_spec(name, pol, ref, tea, labels, **kw):
    cfg = cfg_of(name, **kw)
    spec = L.get_loss(name)
    need = spec.reference_need(cfg)
    B = labels.shape[0] // 2
    if not spec.pairwise:
        pol, ref, tea, labels, B = pol[:B], ref[:B], tea[:B], labels[:B], B
    inp = L.LossInputs(policy_logits=pol, labels=labels, n_pairs=B,
                       reference_logps=L.token_logps(ref, labels) if need == "logps" else None,
                       reference_logits=ref if need == "logits" else None,
                       teacher=spec.teacher_features(tea, labels, cfg) if spec.teacher_features else None)
    return spec.compute(inp, cfg)


def response_positions(labels, row):
    """Input positions p of the response tokens of a row (the token y_t sits at p, its state
    s_t is logits position p-1 and s_{t+1} is position p)."""
    return [p for p in range(labels.shape[1]) if labels[row, p] != -100]


def lsm(x):
    return torch.log_softmax(x.double(), -1)


# ------------------------------------------------------------------ potentials

def test_state_potentials_by_hand():
    z = torch.tensor([1.0, -0.5, 2.0, 0.3])
    p = [math.exp(v) / sum(math.exp(u) for u in z.tolist()) for v in z.tolist()]
    tau = 0.3
    assert L.state_potential(z, "logsumexp", tau).item() == pytest.approx(
        tau * math.log(sum(math.exp(v / tau) for v in z.tolist())), rel=1e-6)
    assert L.state_potential(z, "max").item() == pytest.approx(max(p), rel=1e-6)
    top = sorted(p, reverse=True)
    assert L.state_potential(z, "margin").item() == pytest.approx(top[0] - top[1], rel=1e-5)
    assert L.state_potential(z, "expectation").item() == pytest.approx(sum(a * b for a, b in zip(p, z.tolist())), rel=1e-6)
    assert L.action_potential(z, torch.tensor(2), "logit").item() == pytest.approx(2.0)
    assert L.action_potential(z, torch.tensor(2), "logprob").item() == pytest.approx(math.log(p[2]), rel=1e-6)


def test_value_from_normalised_logprobs_is_zero_at_temperature_one():
    """LOSSES.md identity 4: V must come from raw logits; from stored log-probs it is 0."""
    z = torch.randn(3, 5, 11) * 4
    assert L.state_potential(torch.log_softmax(z, -1), "logsumexp", 1.0).abs().max() < 1e-5
    assert L.state_potential(z, "logsumexp", 1.0).abs().min() > 0.1


# ------------------------------------------------------------------ tvkd (paper)

def hand_tvkd(pol, ref, tea, labels, alpha, beta, tau, gamma, terminal, use_reference=True, potential="logsumexp"):
    B = labels.shape[0] // 2
    g = []
    for row in range(2 * B):
        total = 0.0
        pos = response_positions(labels, row)
        for p in pos:
            y = labels[row, p]
            lp = lsm(pol[row, p - 1])[y].item()
            lr = lsm(ref[row, p - 1])[y].item() if use_reference else 0.0
            z_cur, z_next = tea[row, p - 1].double(), tea[row, p].double()
            if potential == "logsumexp":
                v_cur = tau * torch.logsumexp(z_cur / tau, -1).item()
                v_next = tau * torch.logsumexp(z_next / tau, -1).item()
                if p == pos[-1] and terminal == "zero":
                    v_next = 0.0
                psi = gamma * v_next - v_cur
            elif potential == "logit":
                psi = z_cur[y].item()
            else:
                psi = lsm(z_cur)[y].item()
            total += beta * (lp - lr) - alpha * psi
        g.append(total)
    return sum(-math.log(1 / (1 + math.exp(-(g[i] - g[B + i])))) for i in range(B)) / B


@pytest.mark.parametrize("kw", [
    dict(alpha=0.5, beta=0.1, gamma=1.0, terminal_value="teacher"),
    dict(alpha=0.7, beta=0.2, gamma=0.9, terminal_value="teacher", value_temperature=0.5),
    dict(alpha=1.0, beta=0.1, gamma=0.95, terminal_value="zero"),
    dict(alpha=0.3, beta=0.1, gamma=1.0, terminal_value="teacher", use_reference=False),
    dict(alpha=0.4, beta=0.1, potential="logit"),
    dict(alpha=0.4, beta=0.1, potential="logprob"),
])
def test_tvkd_matches_hand_computation(kw):
    pol, ref, tea, labels = make_batch(seed=1)
    loss, metrics = run_spec("tvkd", pol, ref, tea, labels, **kw)
    full = {**dict(cfg_of("tvkd")), **kw}
    tau = full["value_temperature"] if full["value_temperature"] is not None else full["beta"]
    want = hand_tvkd(pol, ref, tea, labels, full["alpha"], full["beta"], tau, full["gamma"], full["terminal_value"],
                     full["use_reference"], full["potential"])
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_tvkd_with_alpha_zero_is_dpo():
    pol, ref, tea, labels = make_batch(seed=2)
    tv, _ = run_spec("tvkd", pol, ref, tea, labels, alpha=0.0, beta=0.2)
    dpo, _ = run_spec("dpo", pol, ref, tea, labels, beta=0.2)
    assert tv.item() == pytest.approx(dpo.item(), abs=1e-6)


@pytest.mark.parametrize("potential", L.STATE_POTENTIALS)
def test_tvkd_with_gamma_one_and_zero_terminal_is_dpo(potential):
    pol, ref, tea, labels = make_batch(seed=3)
    tv, m = run_spec("tvkd", pol, ref, tea, labels, alpha=0.8, gamma=1.0, terminal_value="zero", potential=potential)
    dpo, _ = run_spec("dpo", pol, ref, tea, labels)
    assert tv.item() == pytest.approx(dpo.item(), abs=1e-5)
    # what remains of the shaping is -alpha V(s_1), the same for both responses of a pair
    assert m["shaping/margin"].abs().max() < 1e-4


def test_tvkd_gamma_one_shaping_margin_telescopes_to_final_values():
    pol, ref, tea, labels = make_batch(seed=4)
    loss, m = run_spec("tvkd", pol, ref, tea, labels, alpha=0.6, gamma=1.0, terminal_value="teacher")
    B, tau = 2, 0.1
    final = []
    for row in range(2 * B):
        last = response_positions(labels, row)[-1]
        final.append(tau * torch.logsumexp(tea[row, last].double() / tau, -1).item())
    for i in range(B):
        assert m["value/chosen_last"][i].item() == pytest.approx(final[i], rel=1e-5)
        assert m["shaping/margin"][i].item() == pytest.approx(0.6 * (final[i] - final[B + i]), rel=1e-4, abs=1e-4)
    # and the loss is DPO's with that margin subtracted (identity 1)
    dpo_h = (m["rewards/chosen"] - m["rewards/rejected"]) / 0.1
    want = -torch.nn.functional.logsigmoid(0.1 * dpo_h - m["shaping/margin"]).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_chunked_equals_unchunked(monkeypatch):
    pol, ref, tea, labels = make_batch(seed=5)
    whole = [run_spec(n, pol, ref, tea, labels, **kw)[0] for n, kw in
             [("tvkd", {}), ("tdpo", {}), ("dckd", {}), ("tvkd", {"variant": "released", "top_k": 3})]]
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 2 * V)  # one position per chunk
    assert L.chunk_positions(4, V) == 1
    parts = [run_spec(n, pol, ref, tea, labels, **kw)[0] for n, kw in
             [("tvkd", {}), ("tdpo", {}), ("dckd", {}), ("tvkd", {"variant": "released", "top_k": 3})]]
    for a, b in zip(whole, parts):
        assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_chunked_policy_gradient_matches(monkeypatch):
    pol, ref, tea, labels = make_batch(seed=6)
    grads = []
    for elements in (1 << 25, V):
        monkeypatch.setattr(L, "CHUNK_ELEMENTS", elements)
        p = pol.clone().requires_grad_(True)
        run_spec("tdpo", p, ref, tea, labels)[0].backward()
        grads.append(p.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ------------------------------------------------------------------ tvkd (released recipe)

def hand_released(pol, tea, labels, k, gamma, branch, a0=0.7, a1=0.0, at=1.0):
    B = labels.shape[0] // 2

    def collapse(logits, ids):
        lp = lsm(logits)
        top = lp[ids]
        rest = math.log(max(1e-300, 1 - top.exp().sum().item()))
        return torch.cat([top, torch.tensor([rest], dtype=torch.float64)])

    R = []
    for row in range(2 * B):
        pos = response_positions(labels, row)
        total = 0.0
        for p in pos:
            y = int(labels[row, p])
            ids = tea[row, p - 1].topk(k).indices
            s = collapse(pol[row, p - 1], ids)
            slot = ids.tolist().index(y) if y in ids.tolist() else k
            x = 0.0
            if p != pos[-1]:
                ids_n = tea[row, p].topk(k).indices
                s_n = collapse(pol[row, p], ids_n)
                if branch == "entropy":
                    x = -(s_n.exp() * s_n).sum().item()
                else:
                    t_n = collapse(tea[row, p], ids_n)
                    x = at * torch.logsumexp((a1 * s_n + a0 * t_n) / at, -1).item()
            total += s[slot].item() - gamma * x
        R.append(total)
    return sum(-math.log(1 / (1 + math.exp(-(R[i] - R[B + i])))) for i in range(B)) / B


@pytest.mark.parametrize("variant,branch", [("released", "entropy"), ("released_teacher_value", "value")])
def test_released_variants_match_hand_computation(variant, branch):
    pol, ref, tea, labels = make_batch(seed=7)
    loss, _ = run_spec("tvkd", pol, ref, tea, labels, variant=variant, top_k=3, gamma=0.9)
    assert loss.item() == pytest.approx(hand_released(pol, tea, labels, 3, 0.9, branch), rel=1e-5)
    assert L.get_loss("tvkd").reference_need(cfg_of("tvkd", variant=variant)) is None


def test_released_teacher_value_with_authors_defaults_is_log_sum_p_to_the_07():
    z = torch.randn(2, 4, V)
    ids = z.topk(3, -1).indices
    t = L.collapse_topk(z, ids)
    v = torch.logsumexp(0.0 * t + 0.7 * t, -1)
    assert torch.allclose(v, torch.log((t.exp() ** 0.7).sum(-1)), atol=1e-6)


# ------------------------------------------------------------------ tdpo

def hand_tdpo(pol, ref, labels, alpha, beta, tdpo2):
    B = labels.shape[0] // 2
    lp, lr, kl = [], [], []
    for row in range(2 * B):
        a = b = c = 0.0
        for p in response_positions(labels, row):
            y = labels[row, p]
            P, R = lsm(pol[row, p - 1]), lsm(ref[row, p - 1])
            a += P[y].item()
            b += R[y].item()
            c += (R.exp() * (R - P)).sum().item()
        lp.append(a), lr.append(b), kl.append(c)
    out = 0.0
    for i in range(B):
        h = (lp[i] - lr[i]) - (lp[B + i] - lr[B + i])
        u = h - (alpha if tdpo2 else 1.0) * (kl[B + i] - kl[i])
        out += -math.log(1 / (1 + math.exp(-beta * u)))
    return out / B, kl


@pytest.mark.parametrize("tdpo2", [True, False])
def test_tdpo_matches_hand_computation(tdpo2):
    pol, ref, tea, labels = make_batch(seed=8)
    loss, m = run_spec("tdpo", pol, ref, tea, labels, alpha=0.5, beta=0.1, if_tdpo2=tdpo2)
    want, kl = hand_tdpo(pol, ref, labels, 0.5, 0.1, tdpo2)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert m["kl/chosen"].tolist() == pytest.approx(kl[:2], rel=1e-5)
    assert m["kl/margin"].tolist() == pytest.approx([kl[2] - kl[0], kl[3] - kl[1]], rel=1e-4)


def test_tdpo2_stop_gradient_changes_gradient_not_value_at_alpha_one():
    pol, ref, tea, labels = make_batch(seed=9)
    out = []
    for tdpo2 in (True, False):
        p = pol.clone().requires_grad_(True)
        loss, _ = run_spec("tdpo", p, ref, tea, labels, alpha=1.0, if_tdpo2=tdpo2)
        loss.backward()
        out.append((loss.item(), p.grad[:2].clone(), p.grad[2:].clone()))
    (v2, gw2, gl2), (v1, gw1, gl1) = out
    assert v1 == pytest.approx(v2, rel=1e-6)
    assert (gw1 - gw2).abs().max() > 1e-4          # SeqKL(y_w) gets no gradient in TDPO2
    assert torch.allclose(gl1, gl2, atol=1e-7)     # the rejected side is treated alike


# ------------------------------------------------------------------ vanillakd / dckd

def hand_fkl(pol, tea, labels, row, k=None):
    vals = []
    for p in response_positions(labels, row):
        T, S = lsm(tea[row, p - 1]), lsm(pol[row, p - 1])
        if k is not None:
            ids = tea[row, p - 1].topk(k).indices
            T = torch.cat([T[ids], torch.log(1 - T[ids].exp().sum()).reshape(1)])
            S = torch.cat([S[ids], torch.log(1 - S[ids].exp().sum()).reshape(1)])
        vals.append((T.exp() * (T - S)).sum().item())
    return sum(vals) / len(vals)


def hand_nll(pol, labels, row):
    vals = [-lsm(pol[row, p - 1])[labels[row, p]].item() for p in response_positions(labels, row)]
    return sum(vals) / len(vals)


@pytest.mark.parametrize("k", [None, 3])
def test_vanillakd_and_dckd_match_hand_computation(k):
    pol, ref, tea, labels = make_batch(seed=10)
    loss, m = run_spec("vanillakd", pol, ref, tea, labels, kd_weight=1.0, sft_weight=0.5, teacher_top_k=k)
    want = sum(0.5 * hand_nll(pol, labels, r) + hand_fkl(pol, tea, labels, r, k) for r in range(2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss, m = run_spec("dckd", pol, ref, tea, labels, lam=0.1, teacher_top_k=k)
    want = sum(hand_nll(pol, labels, i) + 0.1 * (hand_fkl(pol, tea, labels, i, k) + hand_fkl(pol, tea, labels, 2 + i, k))
               for i in range(2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_topk_collapse_with_all_but_one_token_equals_full_vocabulary():
    pol, ref, tea, labels = make_batch(seed=11)
    full, _ = run_spec("dckd", pol, ref, tea, labels, teacher_top_k=None)
    collapsed, _ = run_spec("dckd", pol, ref, tea, labels, teacher_top_k=V - 1)
    assert collapsed.item() == pytest.approx(full.item(), rel=1e-5)


# ------------------------------------------------------------------ policy invariance (identity 5)

def optimal_trajectory_policy(reward, ref_logp, beta):
    """argmax_pi E_pi[R] - beta KL(pi || ref) over trajectories: pi*(tau) ∝ ref(tau) exp(R(tau)/beta)."""
    return torch.softmax(ref_logp + reward / beta, dim=0)


def test_state_potentials_keep_the_optimum_action_potentials_move_it():
    """A two-step tabular problem: from the root s1 pick a in A, reach s2(a), pick b in A, end.
    Shaping with a state-only teacher potential (gamma = 1, terminal potential 0) leaves the
    optimal policy unchanged; the action-dependent logit / logprob shaping moves it
    (the paper's Corollary 2.1). The potentials are the functions the loss uses."""
    torch.manual_seed(0)
    A, beta, alpha = 3, 0.5, 1.0
    trajs = list(itertools.product(range(A), range(A)))
    reward = torch.randn(len(trajs), dtype=torch.float64)
    ref_logp = torch.log_softmax(torch.randn(len(trajs), dtype=torch.float64), 0)
    z_root = torch.randn(A, dtype=torch.float64) * 2          # teacher logits at s1
    z_mid = torch.randn(A, A, dtype=torch.float64) * 2        # teacher logits at s2(a)
    base = optimal_trajectory_policy(reward, ref_logp, beta)

    def shaped(psi_of):
        return optimal_trajectory_policy(reward + alpha * torch.stack([psi_of(a, b) for a, b in trajs]), ref_logp, beta)

    for kind in L.STATE_POTENTIALS:
        phi = lambda z: L.state_potential(z, kind, 0.7).double()
        # psi_1 = gamma phi(s2) - phi(s1); psi_2 = gamma * 0 - phi(s2) (terminal potential 0)
        moved = shaped(lambda a, b: (phi(z_mid[a]) - phi(z_root)) + (0.0 - phi(z_mid[a])))
        assert (moved - base).abs().max() < 1e-9, kind
    for kind in L.ACTION_POTENTIALS:
        moved = shaped(lambda a, b: L.action_potential(z_root, torch.tensor(a), kind).double()
                       + L.action_potential(z_mid[a], torch.tensor(b), kind).double())
        assert (moved - base).abs().max() > 1e-2, kind


# ------------------------------------------------------------------ validation

@pytest.mark.parametrize("kw,match", [
    (dict(potential="softmax"), "loss.potential"),
    (dict(variant="mine"), "loss.variant"),
    (dict(terminal_value="none"), "loss.terminal_value"),
    (dict(alpha=-0.1), "loss.alpha"),
    (dict(alpha=None), "loss.alpha"),
    (dict(value_temperature=0.0), "loss.value_temperature"),
])
def test_tvkd_bad_config_names_the_key(kw, match):
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        L.get_loss("tvkd").validate(cfg_of("tvkd", **kw))


def test_kd_bad_config_names_the_key():
    with pytest.raises(ValueError, match=r"loss\.teacher_top_k"):
        L.get_loss("dckd").validate(cfg_of("dckd", teacher_top_k=0))
    with pytest.raises(ValueError, match=r"loss\.alpha"):
        L.get_loss("tdpo").validate(cfg_of("tdpo", alpha=-1))
