"""The top-k collapse and its "rest" slot in float32, against float64 references.

The references below never call `collapse_topk`: they take the rest slot's probability as
the plain float64 sum of the probabilities of the tokens outside the top-k (no cancellation,
so exact), and with k = V they are the full-vocabulary quantities (no rest slot at all).
Every loss is compared with its float64 value and every policy gradient with the float64
autograd gradient, elementwise.
"""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import losses as L
from prefkd import loss_spec
from prefkd import logprobs

V = 50


def cfg_of(name, **kw):
    base = OmegaConf.load(f"{L.__file__.rsplit('/', 1)[0]}/config/loss/{name}.yaml")
    return OmegaConf.merge(base, kw)


def loss_and_grad(name, pol, tea, labels, **kw):
    """The registered loss in float32 and d loss / d policy logits."""
    cfg = cfg_of(name, **kw)
    spec = loss_spec.get_loss(name)
    p = pol.float().clone().requires_grad_(True)
    n_pairs = labels.shape[0] if not spec.pairwise else labels.shape[0] // 2
    inp = loss_spec.LossInputs(policy_logits=p, labels=labels, n_pairs=n_pairs,
                       teacher=spec.teacher_features(tea.float(), labels, cfg))
    loss, _ = spec.compute(inp, cfg)
    loss.backward()
    return loss.item(), p.grad.double()


# ------------------------------------------------------------------ float64 references

def slots64(logp, ids, k):
    """float64 collapse, independent of losses.py: [..., V] log-probs -> [..., k(+1)] slots.
    The rest slot is log of the summed probabilities outside ids; k = V has no rest slot."""
    top = logp.gather(-1, ids)
    if k == logp.shape[-1]:
        return top
    outside = torch.ones_like(logp, dtype=torch.bool).scatter(-1, ids, False)
    rest = torch.where(outside, logp.exp(), torch.zeros_like(logp)).sum(-1, keepdim=True).log()
    return torch.cat([top, rest], -1)


def fkl64(pol64, tea, k):
    """[N, L-1] per-token FKL(p_T || pi) in float64 (shifted), full vocabulary when k is None."""
    T = torch.log_softmax(tea[:, :-1].double(), -1)
    S = torch.log_softmax(pol64[:, :-1], -1)
    if k is not None:
        ids = tea[:, :-1].float().topk(k, dim=-1).indices
        T, S = slots64(T, ids, k), slots64(S, ids, k)
    return (T.exp() * (T - S)).sum(-1)


def kd64(name, pol, tea, labels, k, lam=0.1):
    """vanillakd (kd_weight 1, sft_weight 0) or dckd (lam) in float64: (loss, grad)."""
    p = pol.double().clone().requires_grad_(True)
    m = (labels[:, 1:] != -100).double()
    fkl = (fkl64(p, tea, k) * m).sum(-1) / m.sum(-1)
    if name == "vanillakd":
        loss = fkl.mean()
    else:
        S = torch.log_softmax(p[:, :-1], -1)
        nll = -(S.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1) * m).sum(-1) / m.sum(-1)
        B = labels.shape[0] // 2
        loss = (nll[:B] + lam * (fkl[:B] + fkl[B:])).mean()
    loss.backward()
    return loss.item(), p.grad


def released64(pol, tea, labels, k, gamma, branch, a0=0.7, a1=0.0, at=1.0):
    """The released recipe in float64, position by position: (loss, grad, R(y) [N],
    gamma sum_t X(s_{t+1}) [N])."""
    p = pol.double().clone().requires_grad_(True)
    S_all = torch.log_softmax(p, -1)
    T_all = torch.log_softmax(tea.double(), -1)
    ids_all = tea.float().topk(k, dim=-1).indices
    R, X = [], []
    for row in range(labels.shape[0]):
        pos = [j for j in range(labels.shape[1]) if labels[row, j] != -100]
        total = shaping = torch.zeros((), dtype=torch.float64)
        for j in pos:
            y, ids = int(labels[row, j]), ids_all[row, j - 1]
            s = slots64(S_all[row, j - 1], ids, k)
            slot = ids.tolist().index(y) if y in ids.tolist() else k
            total = total + s[slot]
            if j != pos[-1]:
                ids_n = ids_all[row, j]
                s_n = slots64(S_all[row, j], ids_n, k)
                if branch == "entropy":
                    x = -(s_n.exp() * s_n).sum()
                else:
                    t_n = slots64(T_all[row, j], ids_n, k)
                    x = at * torch.logsumexp((a1 * s_n + a0 * t_n) / at, -1)
                total = total - gamma * x
                shaping = shaping + gamma * x
        R.append(total)
        X.append(shaping)
    R = torch.stack(R)
    B = len(R) // 2
    loss = -F.logsigmoid(R[:B] - R[B:]).mean()
    loss.backward()
    return loss.item(), p.grad, R.detach(), torch.stack(X).detach()


def assert_grad_close(got, want, rel=1e-4, what=""):
    assert torch.isfinite(got).all(), f"{what}: non-finite gradient, max |grad| {got.abs().max().item():.3g}"
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rel * scale, f"{what}: max |grad error| {err:.3g} > {rel} x max |grad| {scale:.3g}"


# ------------------------------------------------------------------ inputs

def report_draws():
    """The defect report's inputs: torch.manual_seed(0), then five draws of 2 rows of 6
    positions (V = 50, logits 2 N(0, 1), 4 response tokens after a 2-token prompt)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        pol = torch.randn(2, 6, V, generator=g) * 2
        tea = torch.randn(2, 6, V, generator=g) * 2
        labels = torch.randint(0, V, (2, 6), generator=g)
        labels[:, :2] = -100
        yield pol, tea, labels


def peaked_batch(seed, n=4, length=8, prompt=2):
    """Peaked teacher and student: logits 2 N(0, 1) plus one dominant token per state. The
    teacher's is +30 or +12 (its top-5 hold all but ~1e-11 or ~1e-3 of its mass), the
    student's is +30 (all but ~1e-11), on the teacher's dominant token or on another one.
    Half the response tokens are the teacher's dominant token, the others random (most of
    them in the rest slot of k = 5)."""
    g = torch.Generator().manual_seed(seed)
    pol = torch.randn(n, length, V, generator=g) * 2
    tea = torch.randn(n, length, V, generator=g) * 2
    peak_t = torch.randint(0, V, (n, length, 1), generator=g)
    height_t = torch.where(torch.rand(n, length, 1, generator=g) < 0.5, 30.0, 12.0)
    tea.scatter_add_(-1, peak_t, height_t)
    peak_s = torch.where(torch.rand(n, length, 1, generator=g) < 0.5, peak_t,
                         torch.randint(0, V, (n, length, 1), generator=g))
    pol.scatter_add_(-1, peak_s, torch.full((n, length, 1), 30.0))
    labels = torch.where(torch.rand(n, length, generator=g) < 0.5, peak_t[..., 0].roll(1, dims=1),
                         torch.randint(0, V, (n, length), generator=g))
    labels[:, :prompt] = -100
    for row in range(n):                       # responses of different lengths
        labels[row, length - row % 3:] = -100
    return pol, tea, labels


# ------------------------------------------------------------------ collapse_topk itself

def test_collapse_with_k_equal_to_vocabulary_is_the_full_distribution():
    """k = V: the V slots are the log-softmax and the rest slot has probability exactly 0
    (a finite stand-in for log 0), with a finite gradient."""
    for pol, tea, _ in report_draws():
        ids = tea.topk(V, -1).indices
        p = pol.clone().requires_grad_(True)
        c = logprobs.collapse_topk(p, ids)
        want = torch.log_softmax(pol.double(), -1).gather(-1, ids)
        assert (c[..., :V].double() - want).abs().max() < 1e-5
        assert torch.isfinite(c).all() and (c[..., V].exp() == 0).all(), c[..., V]
        (c.exp() * c).sum().backward()
        assert torch.isfinite(p.grad).all()
    # a teacher whose vocabulary is padded with two rows of -inf logits, top-V of V + 2: its
    # rest slot holds nothing either, and must be as finite as the student's (no 0 * -inf)
    padded = torch.cat([tea, torch.full((*tea.shape[:-1], 2), float("-inf"))], -1).requires_grad_(True)
    c = logprobs.collapse_topk(padded, ids)
    assert (c[..., :V].double() - torch.log_softmax(tea.double(), -1).gather(-1, ids)).abs().max() < 1e-5
    assert torch.isfinite(c).all() and (c[..., V].exp() == 0).all(), c[..., V]
    (c.exp() * c).sum().backward()
    assert torch.isfinite(padded.grad).all() and (padded.grad[..., V:] == 0).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_collapse_rest_slot_is_exact_for_peaked_distributions(seed):
    """k < V and all but ~1e-11 of the mass in the top-k: log(1 - their total) is log 0 in
    float32, the rest slot must still be log of the mass outside, to float32 precision,
    with the float64 gradient."""
    pol, tea, _ = peaked_batch(seed)
    ids = tea.topk(5, -1).indices
    p = pol.clone().requires_grad_(True)
    c = logprobs.collapse_topk(p, ids)
    p64 = pol.double().clone().requires_grad_(True)
    c64 = slots64(torch.log_softmax(p64, -1), ids, 5)
    assert (c64[..., 5] < -15).float().mean() > 0.3    # float32 cannot represent 1 - p_rest there
    assert torch.allclose(c.double(), c64, rtol=1e-6, atol=1e-5), (c - c64).abs().max()
    w = torch.randn(c.shape, generator=torch.Generator().manual_seed(seed))
    (c * w).sum().backward()
    (c64 * w.double()).sum().backward()
    assert_grad_close(p.grad.double(), p64.grad, what="collapse_topk")


# ------------------------------------------------------------------ (a) k = V is full-vocabulary KD

@pytest.mark.parametrize("name", ["vanillakd", "dckd"])
def test_topk_equal_to_vocabulary_is_full_vocabulary_kd_with_its_gradient(name):
    """The defect report: top_k = V must be full-vocabulary KD, loss and gradient,
    in float32 (before the fix: loss within 1e-5 but gradients off, up to ~1e14)."""
    maxima = []
    for i, (pol, tea, labels) in enumerate(report_draws()):
        want, want_grad = kd64(name, pol, tea, labels, None)
        maxima.append(round(want_grad.abs().max().item(), 3))
        full, full_grad = loss_and_grad(name, pol, tea, labels, top_k=None)
        got, grad = loss_and_grad(name, pol, tea, labels, top_k=V)
        assert full == pytest.approx(want, rel=1e-6), i
        assert got == pytest.approx(want, rel=1e-6), i
        assert got == pytest.approx(full, rel=1e-6), i
        assert_grad_close(full_grad, want_grad, what=f"draw {i}, full vocabulary")
        assert_grad_close(grad, want_grad, what=f"draw {i}, top_k=V")
    if name == "vanillakd":   # the report's full-vocabulary figures: these are its inputs
        assert maxima == [0.116, 0.101, 0.099, 0.090, 0.072]


def test_topk_equal_to_vocabulary_on_a_larger_batch_has_finite_gradients():
    """More states than the report's draws (16 rows of 24 positions): every one of them
    must give the full-vocabulary gradient, not just most."""
    g = torch.Generator().manual_seed(1)
    pol, tea = torch.randn(16, 24, V, generator=g) * 2, torch.randn(16, 24, V, generator=g) * 2
    labels = torch.randint(0, V, (16, 24), generator=g)
    labels[:, :2] = -100
    want, want_grad = kd64("vanillakd", pol, tea, labels, None)
    got, grad = loss_and_grad("vanillakd", pol, tea, labels, top_k=V)
    assert got == pytest.approx(want, rel=1e-6)
    assert_grad_close(grad, want_grad, what="16 x 24, top_k=V")


# ------------------------------------------------------------------ (b) peaked, k < V

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name,k", [("vanillakd", 5), ("vanillakd", 1), ("dckd", 5)])
def test_topk_kd_on_peaked_distributions_matches_float64(name, k, seed):
    pol, tea, labels = peaked_batch(seed)
    want, want_grad = kd64(name, pol, tea, labels, k)
    got, grad = loss_and_grad(name, pol, tea, labels, top_k=k)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert_grad_close(grad, want_grad, what=f"{name} k={k} seed={seed}")


def test_topk_kd_on_peaked_distributions_with_k_equal_to_vocabulary():
    pol, tea, labels = peaked_batch(3)
    want, want_grad = kd64("vanillakd", pol, tea, labels, None)
    got, grad = loss_and_grad("vanillakd", pol, tea, labels, top_k=V)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert_grad_close(grad, want_grad, what="peaked, top_k=V")


# ------------------------------------------------------------------ (c) the released tvkd variants

RELEASED = [("released", "entropy", {}),
            ("released_teacher_value", "value", {}),
            ("released_teacher_value", "value",
             dict(released_alpha0=0.4, released_alpha1=0.3, released_alpha_tilde=0.5))]


def check_released(pol, tea, labels, variant, branch, kw, k, what, gamma=0.9):
    """float32 loss, R(y) = rewards/*, gamma sum_t X(s_{t+1}) = shaping/* and the policy
    gradient against float64. The tolerances are float32's: R sums ~10 terms of size ~10,
    and where the loss is tiny (-log sigma(d), d >> 1) its relative error is d's absolute one."""
    a = dict(a0=kw.get("released_alpha0", 0.7), a1=kw.get("released_alpha1", 0.0),
             at=kw.get("released_alpha_tilde", 1.0))
    want, want_grad, R, X = released64(pol, tea, labels, k, gamma, branch, **a)
    cfg = cfg_of("tvkd", variant=variant, top_k=k, gamma=gamma, **kw)
    spec = loss_spec.get_loss("tvkd")
    p = pol.clone().requires_grad_(True)
    inp = loss_spec.LossInputs(policy_logits=p, labels=labels, n_pairs=labels.shape[0] // 2,
                       teacher=spec.teacher_features(tea, labels, cfg))
    loss, m = spec.compute(inp, cfg)
    loss.backward()
    got_R = torch.cat([m["rewards/chosen"], m["rewards/rejected"]]).double()
    got_X = torch.cat([m["shaping/chosen"], m["shaping/rejected"]]).double()
    assert ((got_R - R).abs() <= 5e-7 * R.abs() + 1e-6).all(), (what, got_R - R)
    assert ((got_X - X).abs() <= 2e-7 * X.abs() + 1e-6).all(), (what, got_X - X)
    assert loss.item() == pytest.approx(want, rel=2e-5), what
    assert_grad_close(p.grad.double(), want_grad, what=what)


@pytest.mark.parametrize("variant,branch,kw", RELEASED)
@pytest.mark.parametrize("seed", [0, 1])
def test_released_variants_on_peaked_distributions_match_float64(variant, branch, kw, seed):
    """k = 5 < V with a peaked student: its rest slot (which the data token often falls in)
    must be log of its mass outside the teacher's top-5, not log 0."""
    pol, tea, labels = peaked_batch(seed)
    check_released(pol, tea, labels, variant, branch, kw, 5, f"{variant} {kw} seed={seed}")


@pytest.mark.parametrize("variant,branch,kw", RELEASED)
def test_released_variants_with_k_equal_to_vocabulary_match_float64(variant, branch, kw):
    """k = V, on the report's draws (one pair: row 0 chosen, row 1 rejected) and on peaked
    batches: the rest slot is empty and adds nothing (no entropy, no logsumexp term), so R(y)
    is the full-vocabulary one; gradients finite and equal to float64's."""
    for i, (pol, tea, labels) in enumerate(report_draws()):
        check_released(pol, tea, labels, variant, branch, kw, V, f"draw {i}, {variant} {kw}")
    for seed in (0, 1):
        pol, tea, labels = peaked_batch(seed)
        check_released(pol, tea, labels, variant, branch, kw, V, f"peaked seed={seed}, {variant} {kw}")
