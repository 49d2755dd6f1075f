"""sft / dpo / ipo against hand computations (docs/losses.md)."""
import math

import torch

import losses as L
from prefkd import loss_spec
from prefkd import logprobs


def logsig(x):
    return -math.log1p(math.exp(-x))


def test_token_logps_matches_log_softmax_and_masks_prompt():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 6, -100, -100]])
    got = logprobs.token_logps(logits, labels)
    ref = torch.log_softmax(logits, -1)
    assert got.shape == (2, 4)
    # shifted: index j is token labels[:, j+1] predicted from position j
    assert torch.allclose(got[0, 1], ref[0, 1, 3]) and torch.allclose(got[0, 3], ref[0, 3, 1])
    assert torch.allclose(got[1, 0], ref[1, 0, 2]) and torch.allclose(got[1, 1], ref[1, 1, 6])
    assert got[0, 0] == 0 and got[1, 2] == 0 and got[1, 3] == 0
    assert logprobs.response_mask(labels).tolist() == [[0, 1, 1, 1], [1, 1, 0, 0]]


def test_dpo_hand_computation_and_label_smoothing():
    pc, pr, rc, rr = (torch.tensor([x]) for x in (-3.0, -5.0, -4.0, -4.5))
    h = (-3.0 + 4.0) - (-5.0 + 4.5)  # 1.5
    for beta, eps in [(0.1, 0.0), (0.5, 0.2)]:
        loss, cr, rj = L.dpo_loss(pc, pr, rc, rr, beta, eps)
        want = -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
        assert abs(loss.item() - want) < 1e-6
        assert abs(cr.item() - beta * 1.0) < 1e-6 and abs(rj.item() - beta * -0.5) < 1e-6
    loss, _, _ = L.dpo_loss(pc, pr, rc, rr, 0.1, reference_free=True)
    assert abs(loss.item() + logsig(0.1 * 2.0)) < 1e-6


def test_ipo_hand_computation():
    loss = L.ipo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.7]), beta=0.1)
    h = (-1.0 + 1.5) - (-2.0 + 1.7)  # 0.8
    assert abs(loss.item() - (h - 5.0) ** 2) < 1e-5


def test_sft_loss_is_mean_token_nll_per_example():
    logps = torch.tensor([[0.0, -1.0, -2.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(L.sft_loss(logps, mask), torch.tensor([1.5, 3.0]))


def _inputs(seed=0, B=2, Lx=6, V=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * B, Lx, V, generator=g)
    ref_logits = torch.randn(2 * B, Lx, V, generator=g)
    labels = torch.randint(0, V, (2 * B, Lx), generator=g)
    labels[:, :2] = -100
    labels[0, -1] = -100
    return logits, ref_logits, labels


def test_registered_dpo_equals_pure_function_on_sequence_sums():
    from omegaconf import OmegaConf
    logits, ref_logits, labels = _inputs()
    inp = loss_spec.LossInputs(policy_logits=logits, labels=labels, n_pairs=2,
                       reference_logps=logprobs.token_logps(ref_logits, labels))
    cfg = OmegaConf.create({"name": "dpo", "beta": 0.3, "label_smoothing": 0.0, "reference_free": False})
    loss, metrics = loss_spec.get_loss("dpo").compute(inp, cfg)
    full = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    rfull = torch.log_softmax(ref_logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    m = (labels[:, 1:] != -100).float()
    s, r = (full * m).sum(-1), (rfull * m).sum(-1)
    h = (s[:2] - r[:2]) - (s[2:] - r[2:])
    want = -torch.nn.functional.logsigmoid(0.3 * h).mean()
    assert torch.allclose(loss, want, atol=1e-6)
    assert torch.allclose(metrics["rewards/margins"], 0.3 * h, atol=1e-6)
    assert metrics["rewards/accuracies"].tolist() == (h > 0).float().tolist()


def test_unknown_loss_names_the_key():
    import pytest
    with pytest.raises(ValueError, match="loss.name"):
        loss_spec.get_loss("nope")
