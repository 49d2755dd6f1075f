"""tvkd, tdpo, vanillakd, dckd against hand computations and the identities of docs/losses.md.

The hand computations loop over tokens with plain log-softmax, independently of the
vectorised (and chunked) code in losses.py.
"""
import itertools
import math
import os

import pytest
import torch
from omegaconf import OmegaConf

import losses as L
import prefkd.logits as LG
from prefkd import token_terms
from prefkd import loss_spec
from prefkd import logprobs
from prefkd import logits as logits_lib

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
    spec = loss_spec.get_loss(name)
    need = spec.reference_need(cfg)
    B = labels.shape[0] // 2
    if not spec.pairwise:
        pol, ref, tea, labels, B = pol[:B], ref[:B], tea[:B], labels[:B], B
    inp = loss_spec.LossInputs(policy_logits=pol, labels=labels, n_pairs=B,
                       reference_logps=logprobs.token_logps(ref, labels) if need == "logps" else None,
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
    assert token_terms.state_potential(z, "logsumexp", tau).item() == pytest.approx(
        tau * math.log(sum(math.exp(v / tau) for v in z.tolist())), rel=1e-6)
    assert token_terms.state_potential(z, "max").item() == pytest.approx(max(p), rel=1e-6)
    top = sorted(p, reverse=True)
    assert token_terms.state_potential(z, "margin").item() == pytest.approx(top[0] - top[1], rel=1e-5)
    assert token_terms.state_potential(z, "expectation").item() == pytest.approx(sum(a * b for a, b in zip(p, z.tolist())), rel=1e-6)
    assert token_terms.action_potential(z, torch.tensor(2), "logit").item() == pytest.approx(2.0)
    assert token_terms.action_potential(z, torch.tensor(2), "logprob").item() == pytest.approx(math.log(p[2]), rel=1e-6)


def test_value_from_normalised_logprobs_is_zero_at_temperature_one():
    """docs/losses.md (tvkd identities): V must come from raw logits; from stored log-probs it is 0."""
    z = torch.randn(3, 5, 11) * 4
    assert token_terms.state_potential(torch.log_softmax(z, -1), "logsumexp", 1.0).abs().max() < 1e-5
    assert token_terms.state_potential(z, "logsumexp", 1.0).abs().min() > 0.1


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
            elif potential in ("max", "margin", "expectation"):
                def phi(z):
                    p = sorted(lsm(z).exp().tolist(), reverse=True)
                    if potential == "max":
                        return p[0]
                    if potential == "margin":
                        return p[0] - p[1]
                    return sum(a * b for a, b in zip(lsm(z).exp().tolist(), z.tolist()))
                v_next = 0.0 if (p == pos[-1] and terminal == "zero") else phi(z_next)
                psi = gamma * v_next - phi(z_cur)
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
    dict(alpha=0.5, beta=0.1, gamma=0.9, terminal_value="teacher", potential="max"),
    dict(alpha=0.5, beta=0.1, gamma=0.8, terminal_value="zero", potential="margin"),
    dict(alpha=0.5, beta=0.1, gamma=1.0, terminal_value="teacher", potential="expectation"),
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


def test_tvkd_implicit_reward_potential_matches_hand_computation():
    """psi_t = beta_T (log p_T(y_t|s_t) - log p_Tref(y_t|s_t)), the teacher's reference read only for
    this potential; summed over a pair it is ddpo's teacher reward margin."""
    pol, ref, tea, labels = make_batch(seed=3)
    tref = torch.randn(tea.shape, generator=torch.Generator().manual_seed(9)) * 2
    alpha, beta, beta_t = 0.6, 0.1, 0.25
    cfg = cfg_of("tvkd", alpha=alpha, beta=beta, potential="implicit_reward", teacher_beta=beta_t)
    spec = loss_spec.get_loss("tvkd")
    assert spec.teacher_reference_need(cfg) and not spec.teacher_reference_need(cfg_of("tvkd"))
    teacher = spec.teacher_reference_features(tref, labels, cfg, spec.teacher_features(tea, labels, cfg))
    inp = loss_spec.LossInputs(policy_logits=pol, labels=labels, n_pairs=2, teacher=teacher,
                               reference_logps=logprobs.token_logps(ref, labels))
    loss, metrics = spec.compute(inp, cfg)
    g = []
    for row in range(4):
        total = 0.0
        for p in response_positions(labels, row):
            y = labels[row, p]
            psi = beta_t * (lsm(tea[row, p - 1])[y].item() - lsm(tref[row, p - 1])[y].item())
            total += beta * (lsm(pol[row, p - 1])[y].item() - lsm(ref[row, p - 1])[y].item()) - alpha * psi
        g.append(total)
    want = sum(-math.log(1 / (1 + math.exp(-(g[i] - g[2 + i])))) for i in range(2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # the shaping margin is alpha times ddpo's teacher reward margin on the same pair
    d_teacher = loss_spec.get_loss("ddpo")
    dcfg = cfg_of("ddpo", teacher_beta=beta_t)
    feats = d_teacher.teacher_reference_features(tref, labels, dcfg, d_teacher.teacher_features(tea, labels, dcfg))
    _, dm = d_teacher.compute(loss_spec.LossInputs(policy_logits=pol, labels=labels, n_pairs=2, teacher=feats,
                                                   reference_logps=logprobs.token_logps(ref, labels)), dcfg)
    assert torch.allclose(metrics["shaping/margin"], alpha * dm["teacher_rewards/margins"], atol=1e-5)
    with pytest.raises(ValueError, match="loss.teacher_beta"):
        spec.validate(cfg_of("tvkd", potential="implicit_reward", teacher_beta=0.0))


def test_tvkd_with_alpha_zero_is_dpo():
    pol, ref, tea, labels = make_batch(seed=2)
    tv, _ = run_spec("tvkd", pol, ref, tea, labels, alpha=0.0, beta=0.2)
    dpo, _ = run_spec("dpo", pol, ref, tea, labels, beta=0.2)
    assert tv.item() == pytest.approx(dpo.item(), abs=1e-6)


@pytest.mark.parametrize("potential", token_terms.STATE_POTENTIALS)
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
    monkeypatch.setattr(LG, "CHUNK_ELEMENTS", 2 * V)  # one position per chunk
    assert logits_lib.chunk_positions(4, V) == 1
    parts = [run_spec(n, pol, ref, tea, labels, **kw)[0] for n, kw in
             [("tvkd", {}), ("tdpo", {}), ("dckd", {}), ("tvkd", {"variant": "released", "top_k": 3})]]
    for a, b in zip(whole, parts):
        assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_chunked_policy_gradient_matches(monkeypatch):
    pol, ref, tea, labels = make_batch(seed=6)
    grads = []
    for elements in (1 << 25, V):
        monkeypatch.setattr(LG, "CHUNK_ELEMENTS", elements)
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
    assert loss_spec.get_loss("tvkd").reference_need(cfg_of("tvkd", variant=variant)) is None


def test_released_teacher_value_with_authors_defaults_is_log_sum_p_to_the_07():
    z = torch.randn(2, 4, V)
    ids = z.topk(3, -1).indices
    t = logprobs.collapse_topk(z, ids)
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
    loss, m = run_spec("vanillakd", pol, ref, tea, labels, kd_weight=1.0, sft_weight=0.5, top_k=k)
    want = sum(0.5 * hand_nll(pol, labels, r) + hand_fkl(pol, tea, labels, r, k) for r in range(2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss, m = run_spec("dckd", pol, ref, tea, labels, lam=0.1, top_k=k)
    want = sum(hand_nll(pol, labels, i) + 0.1 * (hand_fkl(pol, tea, labels, i, k) + hand_fkl(pol, tea, labels, 2 + i, k))
               for i in range(2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_topk_collapse_with_all_but_one_token_equals_full_vocabulary():
    pol, ref, tea, labels = make_batch(seed=11)
    full, _ = run_spec("dckd", pol, ref, tea, labels, top_k=None)
    collapsed, _ = run_spec("dckd", pol, ref, tea, labels, top_k=V - 1)
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

    for kind in token_terms.STATE_POTENTIALS:
        phi = lambda z: token_terms.state_potential(z, kind, 0.7).double()
        # psi_1 = gamma phi(s2) - phi(s1); psi_2 = gamma * 0 - phi(s2) (terminal potential 0)
        moved = shaped(lambda a, b: (phi(z_mid[a]) - phi(z_root)) + (0.0 - phi(z_mid[a])))
        assert (moved - base).abs().max() < 1e-9, kind
    for kind in token_terms.ACTION_POTENTIALS:
        moved = shaped(lambda a, b: token_terms.action_potential(z_root, torch.tensor(a), kind).double()
                       + token_terms.action_potential(z_mid[a], torch.tensor(b), kind).double())
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
        loss_spec.get_loss("tvkd").validate(cfg_of("tvkd", **kw))


def test_kd_bad_config_names_the_key():
    with pytest.raises(ValueError, match=r"loss\.top_k"):
        loss_spec.get_loss("dckd").validate(cfg_of("dckd", top_k=0))
    with pytest.raises(ValueError, match=r"loss\.alpha"):
        loss_spec.get_loss("tdpo").validate(cfg_of("tdpo", alpha=-1))


# ------------------------------------------------------------------ additions: edge cases and caveats

def test_response_ending_at_the_last_position_reads_its_final_state_there():
    """A response whose EOS sits at input position L-1: its s_{T+1} is logits position L-1,
    which the shifted [:, :-1] tensors do not contain; the loss must still use it."""
    pol, ref, tea, labels = make_batch(seed=12)
    labels[0, PROMPT:] = torch.randint(0, V, (LEN - PROMPT,))   # chosen row 0 ends at L-1
    assert labels[0, -1] != -100
    loss, m = run_spec("tvkd", pol, ref, tea, labels, alpha=0.5, gamma=1.0, terminal_value="teacher")
    assert m["value/chosen_last"][0].item() == pytest.approx(
        0.1 * torch.logsumexp(tea[0, LEN - 1].double() / 0.1, -1).item(), rel=1e-6)
    assert loss.item() == pytest.approx(hand_tvkd(pol, ref, tea, labels, 0.5, 0.1, 0.1, 1.0, "teacher"), rel=1e-5)
    # the final state's logits matter: change them and the loss moves by alpha * delta V
    tea2 = tea.clone()
    tea2[0, LEN - 1] += 1.0                                  # V(s_{T+1}^w) += 1 (logsumexp shift)
    loss2, m2 = run_spec("tvkd", pol, ref, tea2, labels, alpha=0.5, gamma=1.0, terminal_value="teacher")
    assert (m2["shaping/margin"][0] - m["shaping/margin"][0]).item() == pytest.approx(0.5, abs=1e-5)
    assert loss2.item() != pytest.approx(loss.item(), abs=1e-4)
    # ... unless terminal_value is zero
    z1, _ = run_spec("tvkd", pol, ref, tea, labels, alpha=0.5, terminal_value="zero", gamma=0.9)
    z2, _ = run_spec("tvkd", pol, ref, tea2, labels, alpha=0.5, terminal_value="zero", gamma=0.9)
    assert z1.item() == pytest.approx(z2.item(), abs=1e-7)


def test_teacher_features_are_one_float_per_state_and_equal_by_hand():
    pol, ref, tea, labels = make_batch(seed=13)
    f = loss_spec.get_loss("tvkd").teacher_features(tea, labels, cfg_of("tvkd", value_temperature=0.7))
    assert set(f) == {"values"} and f["values"].shape == labels.shape
    assert torch.allclose(f["values"].double(), 0.7 * torch.logsumexp(tea.double() / 0.7, -1), atol=1e-5)
    f = loss_spec.get_loss("tvkd").teacher_features(tea, labels, cfg_of("tvkd", potential="logprob"))
    assert set(f) == {"values", "psi"} and f["psi"].shape == (labels.shape[0], LEN - 1)
    f = loss_spec.get_loss("tvkd").teacher_features(tea, labels, cfg_of("tvkd", variant="released", top_k=3))
    assert set(f) == {"topk_ids"} and f["topk_ids"].shape == (*labels.shape, 3)
    f = loss_spec.get_loss("tvkd").teacher_features(tea, labels, cfg_of("tvkd", variant="released_teacher_value", top_k=3))
    assert f["teacher_collapsed"].shape == (*labels.shape, 4)
    assert torch.allclose(f["teacher_collapsed"].exp().sum(-1), torch.ones(labels.shape), atol=1e-5)
    f = loss_spec.get_loss("dckd").teacher_features(tea, labels, cfg_of("dckd"))
    assert set(f) == {"teacher_logp"} and f["teacher_logp"].shape == tea.shape


def test_released_teacher_value_with_student_weight_and_temperature():
    pol, ref, tea, labels = make_batch(seed=14)
    kw = dict(top_k=4, gamma=0.7, released_alpha0=0.4, released_alpha1=0.3, released_alpha_tilde=0.5)
    loss, m = run_spec("tvkd", pol, ref, tea, labels, variant="released_teacher_value", **kw)
    assert loss.item() == pytest.approx(hand_released(pol, tea, labels, 4, 0.7, "value", 0.4, 0.3, 0.5), rel=1e-5)
    assert set(m) >= {"rewards/chosen", "logps/chosen", "shaping/chosen", "shaping/margin"}
    # the released recipe's rewards are R(y): -log sigma(R_w - R_l) is the loss
    want = -torch.nn.functional.logsigmoid(m["rewards/chosen"] - m["rewards/rejected"]).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_released_gradient_reaches_the_next_state_entropy():
    """R(y) holds -gamma H(pi~(.|s_{t+1})) for every token but the last: the policy logits at
    s_T (the state of the last token) get a gradient from it, gamma=0 removes exactly that
    part, and the state after the last token, s_{T+1}, is never read (0 after the last token)."""
    pol, ref, tea, labels = make_batch(seed=15)
    ids = tea.topk(3, -1).indices
    grads = []
    for gamma in (0.0, 1.0):
        p = pol.clone().requires_grad_(True)
        token_terms.released_rewards(logprobs.collapse_topk(p, ids), None, ids, labels, gamma, "entropy")[0].backward()
        grads.append(p.grad)
    pos = response_positions(labels, 0)
    assert len(pos) >= 2
    last = pos[-1]
    assert grads[1][0, last].abs().max() == 0 and grads[1][0, last + 1:].abs().max() == 0
    assert (grads[1][0, last - 1] - grads[0][0, last - 1]).abs().max() > 1e-3
    assert (grads[1][0, pos[0] - 1] - grads[0][0, pos[0] - 1]).abs().max() == 0   # s_1 is never a "next" state


def test_tdpo_is_finite_where_softmax_underflows_and_matches_float64():
    """The KL is taken from log-softmax: with logits 1e4 apart, softmax().log() gives -inf
    and 0 * inf = nan; log-softmax stays exact."""
    pol, ref, tea, labels = make_batch(seed=16)
    ref = ref.clone()
    ref[..., 0] -= 1e4        # the reference puts (numerically) zero mass on token 0
    pol = pol.clone()
    pol[..., 1] -= 1e4        # the policy puts zero mass on token 1
    labels = labels.clone()
    labels[labels == 1] = 2   # keep the data off the impossible policy token
    loss, m = run_spec("tdpo", pol, ref, tea, labels)
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in m.values())
    want, kl = hand_tdpo(pol, ref, labels, 0.5, 0.1, True)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert m["kl/rejected"].tolist() == pytest.approx(kl[2:], rel=1e-5)


def test_tdpo_gradient_matches_plain_autograd():
    pol, ref, tea, labels = make_batch(seed=17)
    for tdpo2 in (True, False):
        p = pol.clone().requires_grad_(True)
        run_spec("tdpo", p, ref, tea, labels, alpha=0.5, beta=0.1, if_tdpo2=tdpo2)[0].backward()
        q = pol.double().clone().requires_grad_(True)
        P, R = torch.log_softmax(q[:, :-1], -1), torch.log_softmax(ref.double()[:, :-1], -1)
        m = (labels[:, 1:] != -100).double()
        tok = labels[:, 1:].clamp(min=0).unsqueeze(-1)
        lp = (P.gather(-1, tok).squeeze(-1) * m).sum(-1)
        lr = (R.gather(-1, tok).squeeze(-1) * m).sum(-1)
        kl = ((R.exp() * (R - P)).sum(-1) * m).sum(-1)
        h = (lp[:2] - lr[:2]) - (lp[2:] - lr[2:])
        u = h - (0.5 * (kl[2:] - kl[:2].detach()) if tdpo2 else (kl[2:] - kl[:2]))
        (-torch.nn.functional.logsigmoid(0.1 * u)).mean().backward()
        assert torch.allclose(p.grad.double(), q.grad, atol=1e-6)


def test_more_losses_chunked_equal_unchunked(monkeypatch):
    pol, ref, tea, labels = make_batch(seed=18)
    cases = [("tvkd", {"potential": "logit"}), ("tvkd", {"potential": "margin", "gamma": 0.9}),
             ("tvkd", {"variant": "released_teacher_value", "top_k": 3}),
             ("vanillakd", {"top_k": 3, "sft_weight": 0.3}), ("vanillakd", {}),
             ("dckd", {"top_k": 2})]
    whole = [run_spec(n, pol, ref, tea, labels, **kw)[0] for n, kw in cases]
    monkeypatch.setattr(LG, "CHUNK_ELEMENTS", 3 * 4 * V)   # three positions per chunk (9 = 3 chunks)
    parts = [run_spec(n, pol, ref, tea, labels, **kw)[0] for n, kw in cases]
    for (n, kw), a, b in zip(cases, whole, parts):
        assert a.item() == pytest.approx(b.item(), abs=1e-6), (n, kw)


def test_vanillakd_topk_all_but_one_equals_full_and_metrics():
    pol, ref, tea, labels = make_batch(seed=19)
    full, m = run_spec("vanillakd", pol, ref, tea, labels)
    collapsed, _ = run_spec("vanillakd", pol, ref, tea, labels, top_k=V - 1)
    assert collapsed.item() == pytest.approx(full.item(), rel=1e-5)
    # the defaults: kd_weight 1, sft_weight 0: the loss is the mean per-token FKL of y_w
    assert full.item() == pytest.approx(sum(hand_fkl(pol, tea, labels, r) for r in range(2)) / 2, rel=1e-5)
    assert m["kd/fkl"].shape == (2,) and m["kd/nll"].tolist() == pytest.approx(
        [hand_nll(pol, labels, r) for r in range(2)], rel=1e-5)
    assert loss_spec.get_loss("vanillakd").pairwise is False and loss_spec.get_loss("dckd").pairwise is True


def test_kd_vocabulary_mismatch_is_a_clear_error():
    pol, ref, tea, labels = make_batch(seed=20)
    big = torch.cat([tea, torch.zeros(*tea.shape[:2], 2)], -1)
    with pytest.raises(ValueError, match="vocabulary"):
        run_spec("dckd", pol, ref, big, labels)
    big[..., -1] = 100.0      # a token the student does not have is in the teacher's top-k
    with pytest.raises(ValueError, match="tokenizer"):
        run_spec("dckd", pol, ref, big, labels, top_k=2)
    with pytest.raises(ValueError, match=r"loss\.top_k"):
        run_spec("tvkd", pol, ref, tea, labels, variant="released", top_k=V + 1)


def test_missing_alpha_names_the_key_and_yaml_defaults_validate():
    cfg = cfg_of("tvkd")
    cfg.alpha = "???"
    with pytest.raises(ValueError, match=r"loss\.alpha"):
        loss_spec.get_loss("tvkd").validate(cfg)
    for name in ("tvkd", "tdpo", "vanillakd", "dckd"):
        cfg = cfg_of(name)
        assert cfg.name == name
        loss_spec.get_loss(name).validate(cfg)
    tv = cfg_of("tvkd")
    assert (tv.beta, tv.gamma, tv.value_temperature, tv.terminal_value, tv.use_reference, tv.potential, tv.variant,
            tv.top_k, tv.released_alpha0, tv.released_alpha1, tv.released_alpha_tilde) == \
        (0.1, 1.0, None, "teacher", True, "logsumexp", "paper", 50, 0.7, 0.0, 1.0)
    td = cfg_of("tdpo")
    assert (td.alpha, td.beta, td.if_tdpo2) == (0.5, 0.1, True)
    assert (cfg_of("dckd").lam, cfg_of("dckd").top_k) == (0.1, None)
    vk = cfg_of("vanillakd")
    assert (vk.kd_weight, vk.sft_weight, vk.top_k) == (1.0, 0.0, None)
    spec = loss_spec.get_loss("tvkd")
    assert spec.reference_need(tv) == "logps"
    assert spec.reference_need(cfg_of("tvkd", use_reference=False)) is None
    assert loss_spec.get_loss("tdpo").reference_need(td) == "logits"


# ------------------------------------------------------------------ policy invariance by soft value iteration

def soft_vi_policies(r, ref1, ref2, psi1, psi2, beta):
    """Two-step deterministic MDP: s1 --a--> s2(a) --b--> s3(a, b) (terminal), reward r[a, b] at
    the end. Soft (KL-regularised) value iteration for max E[sum_t r_t + psi_t] - beta KL(pi || ref):
        Q2(a, b) = r[a, b] + psi2[a, b];  V2(a) = beta log sum_b ref2[a, b] exp(Q2 / beta)
        Q1(a)    = psi1[a] + V2(a);       pi_t  = ref_t exp((Q_t - V_t) / beta)
    Returns (pi1 [A], pi2 [A, A])."""
    q2 = r + psi2
    v2 = beta * torch.logsumexp(torch.log(ref2) + q2 / beta, dim=1)
    pi2 = ref2 * torch.exp((q2 - v2[:, None]) / beta)
    q1 = psi1 + v2
    v1 = beta * torch.logsumexp(torch.log(ref1) + q1 / beta, dim=0)
    return ref1 * torch.exp((q1 - v1) / beta), pi2


def tabular_problem(A=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(A, A, generator=g, dtype=torch.float64)
    ref1 = torch.softmax(torch.randn(A, generator=g, dtype=torch.float64), 0)
    ref2 = torch.softmax(torch.randn(A, A, generator=g, dtype=torch.float64), 1)
    z1 = torch.randn(A, generator=g, dtype=torch.float64) * 2        # teacher logits at s1
    z2 = torch.randn(A, A, generator=g, dtype=torch.float64) * 2     # at s2(a)
    z3 = torch.randn(A, A, A, generator=g, dtype=torch.float64) * 2  # at s3(a, b)
    return r, ref1, ref2, z1, z2, z3


def loss_psi(phi1, phi2, phi3, gamma, terminal):
    """psi of both steps for every (a, b), through the loss's own `tvkd_shaping`: a response of
    two tokens (a, b) with values (V(s1), V(s2(a)), V(s3(a, b)))."""
    A = phi2.shape[0]
    cur = torch.stack([phi1.expand(A, A), phi2[:, None].expand(A, A)], -1).reshape(A * A, 2)
    nxt = torch.stack([phi2[:, None].expand(A, A), phi3], -1).reshape(A * A, 2)
    psi = L.tvkd_shaping(cur.float(), nxt.float(), torch.ones(A * A, 2), gamma, terminal).double().reshape(A, A, 2)
    return psi[:, 0, 0], psi[..., 1]     # psi1 depends on a only; psi2 on (a, b)


@pytest.mark.parametrize("kind", token_terms.STATE_POTENTIALS)
def test_soft_value_iteration_state_potentials_keep_the_policy(kind):
    r, ref1, ref2, z1, z2, z3 = tabular_problem()
    beta, alpha = 0.5, 1.0
    base = soft_vi_policies(r, ref1, ref2, torch.zeros(4, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64), beta)
    phi = lambda z: token_terms.state_potential(z.float(), kind, 0.7).double()
    psi1, psi2 = loss_psi(phi(z1), phi(z2), phi(z3), 1.0, "zero")
    shaped = soft_vi_policies(r, ref1, ref2, alpha * psi1, alpha * psi2, beta)
    for got, want in zip(shaped, base):
        assert (got - want).abs().max() < 1e-6, kind


@pytest.mark.parametrize("kind", token_terms.ACTION_POTENTIALS)
def test_soft_value_iteration_action_potentials_move_the_policy(kind):
    r, ref1, ref2, z1, z2, z3 = tabular_problem()
    beta, alpha, A = 0.5, 1.0, 4
    base = soft_vi_policies(r, ref1, ref2, torch.zeros(A, dtype=torch.float64), torch.zeros(A, A, dtype=torch.float64), beta)
    psi1 = torch.stack([token_terms.action_potential(z1, torch.tensor(a), kind) for a in range(A)])
    psi2 = torch.stack([torch.stack([token_terms.action_potential(z2[a], torch.tensor(b), kind) for b in range(A)]) for a in range(A)])
    shaped = soft_vi_policies(r, ref1, ref2, alpha * psi1, alpha * psi2, beta)
    assert max((g - w).abs().max().item() for g, w in zip(shaped, base)) > 1e-2, kind


def test_invariance_needs_gamma_one_and_a_constant_terminal_potential():
    """Ng et al.'s theorem for an undiscounted episodic problem (the DPO token MDP) holds for
    gamma = 1 with a constant terminal potential. TVKD's default terminal_value=teacher makes
    the shaping alpha (V(s_{T+1}) - V(s_1)): a terminal bonus alpha V_teacher(s_{T+1}) that moves
    the optimum; gamma < 1 adds -(1-gamma) V(s_{t+1}) at every step and moves it too. (This is
    where TVKD's distillation signal comes from; with gamma = 1 and terminal zero it is DPO.)"""
    r, ref1, ref2, z1, z2, z3 = tabular_problem()
    beta, alpha, A = 0.5, 1.0, 4
    zeros = torch.zeros(A, dtype=torch.float64), torch.zeros(A, A, dtype=torch.float64)
    base = soft_vi_policies(r, ref1, ref2, *zeros, beta)
    phi = lambda z: token_terms.state_potential(z.float(), "logsumexp", 0.7).double()
    for gamma, terminal in [(1.0, "teacher"), (0.9, "zero")]:
        psi1, psi2 = loss_psi(phi(z1), phi(z2), phi(z3), gamma, terminal)
        shaped = soft_vi_policies(r, ref1, ref2, alpha * psi1, alpha * psi2, beta)
        assert max((g - w).abs().max().item() for g, w in zip(shaped, base)) > 1e-3, (gamma, terminal)
    # terminal_value=teacher at gamma=1 is exactly a terminal reward alpha V(s3)
    psi1, psi2 = loss_psi(phi(z1), phi(z2), phi(z3), 1.0, "teacher")
    shaped = soft_vi_policies(r, ref1, ref2, alpha * psi1, alpha * psi2, beta)
    bonus = soft_vi_policies(r + alpha * phi(z3), ref1, ref2, *zeros, beta)
    for g, w in zip(shaped, bonus):
        assert (g - w).abs().max() < 1e-5


PEAK_MEMORY_PROBE = r"""
import ctypes, sys
import torch
sys.path.insert(0, sys.argv[1])
import losses  # registers the losses
import prefkd.logits as LG
from prefkd import logprobs, loss_spec
from omegaconf import OmegaConf

libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 1 << 16)       # M_MMAP_THRESHOLD fixed: freed large blocks go back to the system
torch.set_num_threads(1)

def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

def peak_growth(fn):
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = hwm()
    fn()
    return hwm() - before

g = torch.Generator().manual_seed(0)
n, length, vocab = 4, 64, 32768
pol = torch.randn(n, length, vocab, generator=g).requires_grad_(True)
ref = torch.randn(n, length, vocab, generator=g)
labels = torch.randint(0, vocab, (n, length), generator=g)
labels[:, :8] = -100
LG.CHUNK_ELEMENTS = n * vocab                       # one position per chunk (0.5 MB)
cfg = OmegaConf.create(dict(name="tdpo", alpha=0.5, beta=0.1, if_tdpo2=True))
run = lambda: loss_spec.get_loss("tdpo").compute(
    loss_spec.LossInputs(policy_logits=pol, labels=labels, n_pairs=n // 2, reference_logits=ref), cfg)
run()                                                # lazy imports
control = peak_growth(lambda: logprobs.token_logps(ref, labels))   # one full-size logsumexp temporary
out = [n * length * vocab * 4 / 2 ** 20, control, peak_growth(run)]
with torch.no_grad():                                # teacher_features run under no_grad
    for name, kw in [("tvkd", {}), ("tvkd", dict(potential="logprob")), ("tvkd", dict(variant="released_teacher_value")),
                     ("dckd", dict(top_k=50)), ("dckd", {})]:
        base = dict(tvkd=dict(alpha=0.5, beta=0.1, value_temperature=None, potential="logsumexp", variant="paper",
                              top_k=50), dckd=dict(lam=0.1, top_k=None))[name]
        c = OmegaConf.create(dict(name=name, **{**base, **kw}))
        out.append(peak_growth(lambda: loss_spec.get_loss(name).teacher_features(ref, labels, c)))
print(*out)
"""


def test_tdpo_forward_never_allocates_a_third_full_size_tensor():
    """Chunking, measured in a fresh process (peak RSS, VmHWM): with fp32 policy and reference
    logits of 32 MB each allocated beforehand, TDPO's forward pass raises the peak by far less
    than one more [N, L, V] fp32 tensor, and so do the teacher reductions of tvkd and top-k KD.
    The control, an unchunked token_logps (one full-size logsumexp temporary), shows the probe
    does see such a tensor."""
    import subprocess
    import sys
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    repo = os.path.dirname(L.__file__)
    res = subprocess.run([sys.executable, "-c", PEAK_MEMORY_PROBE, repo], capture_output=True, text=True, timeout=120)
    if res.returncode != 0 and ("clear_refs" in res.stderr or "libc" in res.stderr):
        pytest.skip("cannot reset the peak RSS here: " + res.stderr.strip().splitlines()[-1])
    assert res.returncode == 0, res.stderr
    full, control, tdpo, *features = map(float, res.stdout.split())
    assert control > 0.8 * full, (control, full)
    assert tdpo < 0.3 * full, (tdpo, full)
    # teacher_features: the paper's values, the action potentials and the top-k reductions stay
    # far below one [N, L, V] tensor; full-vocabulary KD keeps exactly one (written in place)
    *small, kd_full = features
    assert max(small) < 0.3 * full, (small, full)
    assert kd_full < 1.3 * full, (kd_full, full)
