"""Per-token building blocks that several losses combine, kept apart from the losses themselves
(losses.py): the teacher's value potentials (TVKD and its Table 5 ablations), TDPO's per-token
terms, the top-K released-recipe rewards, and the divergences of the KD losses (forward KL,
generalized JSD) on the full vocabulary or the teacher's top-K. Each is chunked along the
sequence (prefkd/logits.py) and written after docs/losses.md.
"""
import math
from typing import Callable

import torch

from prefkd.logits import chunked
from prefkd.logprobs import (collapse_topk, collapsed_token_logp, forward_kl, last_token_mask, response_mask,
                             shifted_targets, check_teacher_vocab)
from prefkd.loss_spec import LossInputs


STATE_POTENTIALS = ("logsumexp", "max", "margin", "expectation")


ACTION_POTENTIALS = ("logit", "logprob")


def state_potential(z: torch.Tensor, kind: str, tau: float = 1.0) -> torch.Tensor:
    """A state-only potential from teacher logits.

    Args:
        z: [..., V] teacher logits at a state.
        kind: logsumexp -- V(s) = tau logsumexp(z / tau), the soft value of a DPO-trained
              policy whose logits are its Q-values (TVKD Lemma 1);
              max -- max_a p_T(a|s); margin -- top-1 minus top-2 probability;
              expectation -- sum_a p_T(a|s) z(a)   (the paper's Table 5 ablations).
        tau: value temperature (logsumexp only).
    Returns: [...] potentials.
    """
    z = z.float()
    if kind == "logsumexp":
        return tau * torch.logsumexp(z / tau, dim=-1)
    logp = torch.log_softmax(z, dim=-1)
    if kind == "max":
        return logp.max(dim=-1).values.exp()
    if kind == "margin":
        top2 = logp.topk(2, dim=-1).values.exp()
        return top2[..., 0] - top2[..., 1]
    if kind == "expectation":
        return (logp.exp() * z).sum(-1)
    raise ValueError(f"unknown state potential {kind!r}; use one of {STATE_POTENTIALS}")


def action_potential(z: torch.Tensor, actions: torch.LongTensor, kind: str) -> torch.Tensor:
    """An action-dependent shaping term psi(s, a), used as psi_t directly: `logit` = z(a),
    `logprob` = log p_T(a|s). The paper's Corollary 2.1: these break policy invariance.

    Args: z [..., V] teacher logits; actions [...] token ids. Returns [...]."""
    z = z.float()
    picked = torch.gather(z, -1, actions.unsqueeze(-1)).squeeze(-1)
    if kind == "logit":
        return picked
    if kind == "logprob":
        return picked - torch.logsumexp(z, dim=-1)
    raise ValueError(f"unknown action potential {kind!r}; use one of {ACTION_POTENTIALS}")


def _tdpo_chunk(ref: torch.Tensor, pol: torch.Tensor, targets: torch.LongTensor) -> torch.Tensor:
    """One chunk of `tdpo_token_terms`: ref, pol [N, c, V], targets [N, c] -> [N, c, 3]."""
    ref_logp = torch.log_softmax(ref.float(), -1)
    pol_logp = torch.log_softmax(pol.float(), -1)
    idx = targets.unsqueeze(-1)
    return torch.stack([pol_logp.gather(-1, idx).squeeze(-1), ref_logp.gather(-1, idx).squeeze(-1),
                        forward_kl(ref_logp, pol_logp)], dim=-1)


def tdpo_token_terms(reference_logits: torch.Tensor, policy_logits: torch.Tensor, labels: torch.LongTensor):
    """The three per-token quantities of TDPO in one chunked pass over the vocabulary.

    Args:
        reference_logits: [N, L, V] unshifted, no grad.
        policy_logits: [N, L, V] unshifted, with grad.
        labels: [N, L], IGNORE_INDEX off the response.
    Returns:
        policy_logps, reference_logps, kl: [N, L-1] each (shifted indexing, zero off the
        response): log pi_theta(y_t|s_t), log pi_ref(y_t|s_t) and KL(pi_ref(.|s_t) || pi_theta(.|s_t)).

    Both log-softmaxes are taken chunk by chunk along the sequence in fp32 and recomputed in
    backward, so besides the two models' logits only one chunk's [N, c, V] temporaries are
    ever alive (never a third [N, L, V] fp32 tensor)."""
    mask = response_mask(labels)
    terms = chunked(_tdpo_chunk, reference_logits[:, :-1], policy_logits[:, :-1], shifted_targets(labels), grad=True)
    return terms[..., 0] * mask, terms[..., 1] * mask, terms[..., 2] * mask


def released_rewards(student_collapsed: torch.Tensor, teacher_collapsed: torch.Tensor, ids: torch.LongTensor,
                     labels: torch.LongTensor, gamma: float, next_term: str,
                     a0: float = 0.7, a1: float = 0.0, a_tilde: float = 1.0, return_terms: bool = False):
    """The authors' released recipe (run_tvkd.sh + TVKD.yaml), which differs from the paper's
    equation: no beta, no reference, distributions collapsed onto the teacher's top-k + rest.

        R(y) = sum_t m_t [ log pi~_theta(y_t|s_t) - gamma * X(s_{t+1}) ],  X = 0 after the last token
        entropy branch:       X(s) = H(pi~_theta(.|s))                 over the k+1 slots
        teacher-value branch: X(s) = a~ logsumexp( (a1 log pi~_theta(.|s) + a0 log p~_T(.|s)) / a~ )

    Args: student_collapsed, teacher_collapsed [N, L, k+1] log-probs at every position
    (teacher_collapsed may be None for the entropy branch); ids [N, L, k]; labels [N, L].
    Returns [N] R(y); with return_terms=True, (R(y), gamma sum_t m_t X(s_{t+1})), both [N]."""
    mask = response_mask(labels)
    tokens = shifted_targets(labels)
    tok_logp = collapsed_token_logp(student_collapsed[:, :-1], ids[:, :-1], tokens)
    if next_term == "entropy":
        x = -(student_collapsed.exp() * student_collapsed).sum(-1)
    else:
        x = a_tilde * torch.logsumexp((a1 * student_collapsed + a0 * teacher_collapsed) / a_tilde, dim=-1)
    x_next = x[:, 1:] * (1.0 - last_token_mask(mask))
    r = ((tok_logp - gamma * x_next) * mask).sum(-1)
    return (r, gamma * (x_next * mask).sum(-1)) if return_terms else r


def token_fkl(inp: LossInputs) -> torch.Tensor:
    """[N, L-1] per-token FKL(p_T || pi_theta) at each response state, on the full vocabulary
    or on the teacher's top-K + rest."""
    t = inp.teacher
    check_teacher_vocab(t, inp.policy_logits)
    if "teacher_logp" in t:
        per = chunked(lambda tl, pl: forward_kl(tl, torch.log_softmax(pl.float(), -1)).unsqueeze(-1),
                      t["teacher_logp"][:, :-1], inp.policy_logits[:, :-1], grad=True).squeeze(-1)
    else:
        def fkl(tc, pl, ids):
            return forward_kl(tc, collapse_topk(pl, ids)).unsqueeze(-1)
        per = chunked(fkl, t["teacher_collapsed"][:, :-1], inp.policy_logits[:, :-1], t["topk_ids"][:, :-1],
                      grad=True).squeeze(-1)
    return per * inp.mask


def log_sum_squared_probs(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v pi(v|s)^2 = logsumexp(2 z) - 2 logsumexp(z), position-wise: [..., V] logits -> [...]."""
    z = logits.float()
    return torch.logsumexp(2.0 * z, dim=-1) - 2.0 * torch.logsumexp(z, dim=-1)


def generalized_jsd(teacher_logp: torch.Tensor, student_logp: torch.Tensor, b: float) -> torch.Tensor:
    """Generalised JSD of GKD (Agarwal et al. 2024), position-wise over the last dim:

        M     = b p_T + (1 - b) pi_theta
        JSD_b = b KL(p_T || M) + (1 - b) KL(pi_theta || M)          0 < b < 1
        b = 0: KL(p_T || pi_theta) (forward KL);  b = 1: KL(pi_theta || p_T) (reverse KL)

    (JSD_b itself tends to 0 at both ends; the end points are its limits divided by b, resp.
    1 - b, as in the paper's discussion and TRL's generalized_jsd_loss.)
    Args: teacher_logp, student_logp [..., K] log-probs. Returns [...]."""
    if b == 0.0:
        return forward_kl(teacher_logp, student_logp)
    if b == 1.0:
        return forward_kl(student_logp, teacher_logp)
    log_m = torch.logsumexp(torch.stack([teacher_logp + math.log(b), student_logp + math.log(1.0 - b)]), dim=0)
    return b * forward_kl(teacher_logp, log_m) + (1.0 - b) * forward_kl(student_logp, log_m)


def token_divergence(inp: LossInputs, fn: Callable) -> torch.Tensor:
    """[N, L-1] fn(teacher log-probs, student log-probs) at every response state, on the full
    vocabulary or on the teacher's top-K + rest (the `_kd_teacher_features` layouts)."""
    t = inp.teacher
    check_teacher_vocab(t, inp.policy_logits)
    if "teacher_logp" in t:
        per = chunked(lambda tl, pl: fn(tl, torch.log_softmax(pl.float(), -1)).unsqueeze(-1),
                      t["teacher_logp"][:, :-1], inp.policy_logits[:, :-1], grad=True).squeeze(-1)
    else:
        per = chunked(lambda tc, pl, ids: fn(tc, collapse_topk(pl, ids)).unsqueeze(-1),
                      t["teacher_collapsed"][:, :-1], inp.policy_logits[:, :-1], t["topk_ids"][:, :-1],
                      grad=True).squeeze(-1)
    return per * inp.mask


