"""Masks and log-probabilities of responses: the small shared basics every loss, the trainer, the
caches and the evaluation read (one definition each).

Indexing convention. ``labels`` are Hugging Face style: ``labels[:, i]`` is the token at input
position i, IGNORE_INDEX (-100) off the response. The logits at position i predict token i+1, so
the per-token tensors are *shifted*: index j of a ``[N, L-1]`` tensor is the response token
``labels[:, j+1]`` and the state before it (logits position j). The logits at the position of
the last response token (the EOS) are the state after the response, s_{T+1}.

Top-k collapse: a distribution collapsed onto the teacher's top-K tokens plus one "rest" slot
(the top-K KD losses and TVKD's released recipe; docs/losses.md).
"""
import math
from typing import Dict, Tuple

import torch

from prefkd.logits import LazyLogits, Logits, chunked

_LOG2 = math.log(2.0)
IGNORE_INDEX = -100  # label value ignored by the losses (prompt and padding positions)


def response_mask(labels: torch.LongTensor) -> torch.Tensor:
    """[N, L] labels -> [N, L-1] float mask of response tokens in shifted indexing."""
    return (labels[:, 1:] != IGNORE_INDEX).float()


def shifted_targets(labels: torch.LongTensor) -> torch.LongTensor:
    """[N, L] labels -> [N, L-1] token ids in shifted indexing (0 off the response)."""
    t = labels[:, 1:].clone()
    t[t == IGNORE_INDEX] = 0
    return t


def token_logps(logits: Logits, labels: torch.LongTensor) -> torch.Tensor:
    """Per-token log p(y_t | s_t), zero off the response.

    Args:
        logits: [N, L, V] unshifted logits, or a `LazyLogits` of that shape.
        labels: [N, L] with IGNORE_INDEX off the response.
    Returns:
        [N, L-1] float32 log-probs (shifted indexing).

    Uses gather - logsumexp rather than log_softmax so that no second [N, L, V] tensor is
    materialised. A `LazyLogits` is projected chunk by chunk along the sequence (recomputed in
    backward), so no [N, L, V] tensor exists at all.
    """
    if isinstance(logits, LazyLogits):
        def pick(z, y):
            z = z.float()
            return torch.gather(z, -1, y) - torch.logsumexp(z, dim=-1, keepdim=True)
        out = chunked(pick, logits[:, :-1], shifted_targets(labels).unsqueeze(-1), grad=True).squeeze(-1)
        return out * response_mask(labels)
    logits = logits[:, :-1].float()
    targets = labels[:, 1:].clone()
    mask = targets != IGNORE_INDEX
    targets[~mask] = 0
    picked = torch.gather(logits, 2, targets.unsqueeze(2)).squeeze(2)
    return (picked - torch.logsumexp(logits, dim=-1)) * mask


def chunked_token_logps(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """`token_logps` chunk by chunk along the sequence (for frozen models, no grad): [N, L, V]
    unshifted logits, [N, L] labels -> [N, L-1] log p(y_t|s_t), zero off the response, without
    a full-size fp32 copy of bf16 logits."""
    def pick(z, y):
        z = z.float()
        return torch.gather(z, -1, y) - torch.logsumexp(z, dim=-1, keepdim=True)
    out = chunked(pick, logits[:, :-1], shifted_targets(labels).unsqueeze(-1)).squeeze(-1)
    return out * response_mask(labels)


def sequence_logps(per_token: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """[N, T] per-token values -> [N] sums (or means over response tokens)."""
    total = (per_token * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def split_pairs(t: torch.Tensor, n_pairs: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows [0, B) are the chosen responses, rows [B, 2B) the rejected ones."""
    return t[:n_pairs], t[n_pairs:]


def last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """[N, T] response mask -> [N, T] one-hot of each row's last response token."""
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), idx, torch.full_like(idx, -1)).max(dim=1, keepdim=True).values
    return (idx == last).float() * mask


def gather_next(values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[N, L] per-position values -> (V(s_t), V(s_{t+1})) in shifted indexing, [N, L-1] each.

    The state s_t of token j (shifted) is logits position j; s_{t+1} is position j+1. For the
    last response token, position j+1 is the EOS position: its value is V(s_{T+1})."""
    return values[:, :-1], values[:, 1:]


# A finite stand-in for log 0, used for a "rest" slot that holds no token. exp() of it is
# exactly 0 in float32 and float64, so its slot adds exactly nothing to a KL, an entropy or a
# logsumexp over the slots, and 0 * LOG_ZERO = 0 where 0 * log 0 = 0 * -inf would be NaN (in the
# loss and in its gradient). It stays finite under the scalings the released recipe applies
# ((a1 S + a0 T) / a~ with weights up to ~1e8).
LOG_ZERO = -1e30


def collapse_topk(logits: torch.Tensor, ids: torch.LongTensor) -> torch.Tensor:
    """Log-probs of a distribution collapsed onto K given tokens plus one "rest" slot.

    Args: logits [..., V]; ids [..., K] distinct token ids (the teacher's top-K at that state).
    Returns: [..., K+1] float32 log-probs:

        slot i < K:  log p(ids_i)          = z(ids_i) - logsumexp(z)
        slot K:      log sum_{a not in ids} p(a) = logsumexp(z over the tokens outside ids) - logsumexp(z)

    Where the K ids hold at least half the mass, the rest slot is taken from the logits outside
    them (a masked copy of this chunk), never as log(1 - sum of the K probabilities): once the rest holds less than float32's
    resolution of 1 (~6e-8) that sum rounds to 1, the log to log 0, and its gradient
    explodes. This way it is exact and finite however peaked the distribution is.
    The ids are overwritten with LOG_ZERO rather than -inf, so the logsumexp never meets
    an all -inf row: K = V (nothing outside) or only -inf logits outside (a teacher's padded
    vocabulary rows masked to -inf) give a rest slot of LOG_ZERO + log K - logsumexp(z),
    i.e. LOG_ZERO in float32, whose probability is exactly 0; the K+1 slots then give exactly
    the full-vocabulary KL / entropy / logsumexp, and the gradient is finite (no 0 * -inf).
    Otherwise the filled entries add exactly 0 to the rest: exp(LOG_ZERO - z) is 0 for any
    logit z above about -1e29. Where the K ids hold less than half the mass the rest is
    log1p(-sum of their probabilities), exact in float32 when it holds nearly everything."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    top = torch.gather(logits, -1, ids) - lse
    outside = logits.scatter(-1, ids, LOG_ZERO)
    rest_masked = torch.logsumexp(outside, dim=-1, keepdim=True) - lse
    # Where the top-K hold less than half the mass, the rest is near all of it and the difference
    # above cancels (logsumexp(outside) ~ lse): its float32 error is ~6e-8 absolute, i.e. 6e-8 / m
    # relative to log(1 - m) ~ -m for a top-K mass m, and so is its gradient's. log1p(-m) from the
    # top-K's own log-mass is exact there. The `where` picks a branch per row; the unused branch
    # is fed a safe argument (log 1/4) so that its gradient, multiplied by 0, is finite, not NaN.
    top_mass = torch.logsumexp(top, dim=-1, keepdim=True)
    small = top_mass < -_LOG2
    rest_log1p = torch.log1p(-torch.exp(torch.where(small, top_mass, torch.full_like(top_mass, -2 * _LOG2))))
    rest = torch.where(small, rest_log1p, rest_masked)
    return torch.cat([top, rest], dim=-1)


def collapsed_token_logp(collapsed: torch.Tensor, ids: torch.LongTensor, tokens: torch.LongTensor) -> torch.Tensor:
    """log pi~(y|s): the slot of token y in a collapsed distribution (its own slot if y is
    among the K ids, else the rest slot). collapsed [..., K+1], ids [..., K], tokens [...]."""
    hit = ids == tokens.unsqueeze(-1)
    slot = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(tokens, ids.shape[-1]))
    return torch.gather(collapsed, -1, slot.unsqueeze(-1)).squeeze(-1)


def forward_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_T || pi_theta) = sum_a p_T(a) (log p_T(a) - log pi_theta(a)), over the last dim."""
    p = teacher_logp.exp()
    return (p * (teacher_logp - student_logp)).sum(-1)


def answer_kl(policy_logits, reference_logits, mask: torch.Tensor) -> torch.Tensor:
    """[N] per-token KL(pi || pi_ref) averaged over each row's masked positions:
    mean_t sum_a pi(a|s_t) (log pi(a|s_t) - log pi_ref(a|s_t)), the full distributions at every
    state (not a one-sample estimate). Logits [N, L, V] (or LazyLogits), mask [N, L] of the
    states that predict a response token."""
    kl = chunked(lambda z, r: forward_kl(torch.log_softmax(z.float(), -1), torch.log_softmax(r.float(), -1))
                 .unsqueeze(-1), policy_logits, reference_logits).squeeze(-1)
    return (kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def teacher_topk_ids(teacher_logits: torch.Tensor, k, key: str) -> torch.LongTensor:
    """[N, L, V] teacher logits -> [N, L, k] ids of its top-k tokens at every position (chunked).
    `key` names the config entry in the error raised when k exceeds the vocabulary."""
    k, vocab = int(k), teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"loss.{key}={k} must be in [1, vocabulary size {vocab}]")
    return chunked(lambda z: z.topk(k, dim=-1).indices, teacher_logits)


def check_teacher_vocab(teacher: Dict[str, torch.Tensor], policy_logits: torch.Tensor) -> None:
    """A clear error instead of a shape error (or an out-of-range gather) when the teacher's
    vocabulary dimension differs from the student's. Top-k ids are accepted whenever they
    index into the student's vocabulary (a teacher whose embedding is padded beyond the
    shared tokenizer is fine)."""
    vocab = policy_logits.shape[-1]
    if "teacher_logp" in teacher and teacher["teacher_logp"].shape[-1] != vocab:
        raise ValueError(f"the teacher's logits have {teacher['teacher_logp'].shape[-1]} entries per position and "
                         f"the student's {vocab}: full-vocabulary KD needs one vocabulary (or set loss.top_k)")
    if "topk_ids" in teacher and teacher["topk_ids"].numel() and int(teacher["topk_ids"].max()) >= vocab:
        raise ValueError(f"the teacher's top-k contains token id {int(teacher['topk_ids'].max())}, outside the "
                         f"student's vocabulary of {vocab}: teacher and student must share one tokenizer")


