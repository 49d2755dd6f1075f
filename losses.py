"""The loss registry: every training objective of the framework, as pure functions.

Each loss is two layers:

* a pure function of per-token or per-sequence tensors (``dpo_loss``, ``ipo_loss``...),
  written after the equations of ``shared/spec/LOSSES.md`` with the tensor shapes in its
  docstring, so that a unit test can compare it with a hand computation;
* a ``LossSpec`` registered under the loss's config name, which declares what the loss
  needs from the trainer (a reference model? which of its outputs? a teacher? pairs or
  single targets?) and maps the trainer's ``LossInputs`` onto the pure function.

The trainer never branches on a loss name: it reads the spec. Adding a loss means one
function and one ``@register`` here plus one YAML file in ``config/loss/``.

Indexing convention. ``labels`` are Hugging Face style: ``labels[:, i]`` is the token at
input position i, -100 off the response. The logits at position i predict token i+1, so
the per-token tensors used below are *shifted*: index j of a ``[N, L-1]`` tensor is the
response token ``labels[:, j+1]`` and the state before it (logits position j). The logits
at the position of the last response token (the EOS) are the state after the response,
s_{T+1}; losses that need it (TVKD) read it from the unshifted logits.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
Metrics = Dict[str, torch.Tensor]


# ------------------------------------------------------------------ per-token helpers

def response_mask(labels: torch.LongTensor) -> torch.Tensor:
    """[N, L] labels -> [N, L-1] float mask of response tokens in shifted indexing."""
    return (labels[:, 1:] != IGNORE_INDEX).float()


def token_logps(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Per-token log p(y_t | s_t), zero off the response.

    Args:
        logits: [N, L, V] unshifted logits.
        labels: [N, L] with IGNORE_INDEX off the response.
    Returns:
        [N, L-1] float32 log-probs (shifted indexing).

    Uses gather - logsumexp rather than log_softmax so that no second [N, L, V] tensor is
    materialised.
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:].clone()
    mask = targets != IGNORE_INDEX
    targets[~mask] = 0
    picked = torch.gather(logits, 2, targets.unsqueeze(2)).squeeze(2)
    return (picked - torch.logsumexp(logits, dim=-1)) * mask


def sequence_logps(per_token: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """[N, T] per-token values -> [N] sums (or means over response tokens)."""
    total = (per_token * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def split_pairs(t: torch.Tensor, n_pairs: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows [0, B) are the chosen responses, rows [B, 2B) the rejected ones."""
    return t[:n_pairs], t[n_pairs:]


# ------------------------------------------------------------------ pure losses

def sft_loss(policy_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean token negative log-likelihood of each target.

    Args:
        policy_logps: [B, T] per-token log pi_theta(y_t|s_t), zero off the response.
        mask: [B, T] response mask.
    Returns:
        [B] per-example mean NLL. The batch loss is their mean, so that it decomposes
        exactly over data-parallel ranks holding equal numbers of examples.
    """
    return -sequence_logps(policy_logps, mask, average=True)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float, label_smoothing: float = 0.0, reference_free: bool = False):
    """DPO (Rafailov et al. 2023, Eq. 7) and conservative DPO.

        h    = [L_theta(y_w) - L_ref(y_w)] - [L_theta(y_l) - L_ref(y_l)]
        loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)

    Args:
        *_logps: [B] summed response log-probs.
        beta: inverse temperature of the implicit reward.
        label_smoothing: eps, the assumed probability that a label is flipped (cDPO).
        reference_free: use L_ref = 0 (a uniform reference).
    Returns:
        losses [B], chosen_rewards [B], rejected_rewards [B]  (rewards = beta (L_theta - L_ref), detached).
    """
    if reference_free:
        reference_chosen_logps = torch.zeros_like(reference_chosen_logps)
        reference_rejected_logps = torch.zeros_like(reference_rejected_logps)
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(policy_chosen_avg_logps: torch.Tensor, policy_rejected_avg_logps: torch.Tensor,
             reference_chosen_avg_logps: torch.Tensor, reference_rejected_avg_logps: torch.Tensor,
             beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, Eq. 17) with length-averaged log-probs, as the paper and TRL do.

        h'   = [avg L_theta(y_w) - avg L_ref(y_w)] - [avg L_theta(y_l) - avg L_ref(y_l)]
        loss = (h' - 1 / (2 beta))^2

    Args: [B] length-averaged response log-probs; beta the regularisation strength.
    Returns: [B] losses.
    """
    h = (policy_chosen_avg_logps - reference_chosen_avg_logps) - (policy_rejected_avg_logps - reference_rejected_avg_logps)
    return (h - 1.0 / (2.0 * beta)) ** 2


# ------------------------------------------------------------------ registry

@dataclass
class LossInputs:
    """What the trainer hands a loss. N = 2B rows for pairwise losses (chosen first), B otherwise."""
    policy_logits: torch.Tensor                      # [N, L, V], with grad
    labels: torch.LongTensor                         # [N, L]
    n_pairs: int                                     # B
    reference_logps: Optional[torch.Tensor] = None   # [N, L-1] if spec.reference == "logps"
    reference_logits: Optional[torch.Tensor] = None  # [N, L, V] if spec.reference == "logits"
    teacher: Optional[Dict[str, torch.Tensor]] = None  # spec.teacher_features(teacher_logits, labels, cfg)
    _cache: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def mask(self) -> torch.Tensor:
        if "mask" not in self._cache:
            self._cache["mask"] = response_mask(self.labels)
        return self._cache["mask"]

    @property
    def policy_logps(self) -> torch.Tensor:
        """[N, L-1] per-token policy log-probs (with grad)."""
        if "policy_logps" not in self._cache:
            self._cache["policy_logps"] = token_logps(self.policy_logits, self.labels)
        return self._cache["policy_logps"]


ComputeFn = Callable[[LossInputs, object], Tuple[torch.Tensor, Metrics]]
Need = Union[None, str, Callable[[object], Optional[str]]]


@dataclass(frozen=True)
class LossSpec:
    name: str
    compute: ComputeFn
    pairwise: bool = True
    # What the loss needs of the frozen reference: None, "logps" ([N, L-1] per-token log-probs)
    # or "logits" (the full [N, L, V] logits); or a function of the loss config returning one.
    reference: Need = None
    # Reduces the teacher's [N, L, V] logits to what the loss needs, right after the teacher's
    # forward pass, so that the full teacher logits do not outlive it. None: no teacher.
    teacher_features: Optional[Callable] = None
    validate: Optional[Callable[[object], None]] = None

    def reference_need(self, cfg) -> Optional[str]:
        return self.reference(cfg) if callable(self.reference) else self.reference

    def teacher_need(self, cfg) -> bool:
        return self.teacher_features is not None


LOSSES: Dict[str, LossSpec] = {}


def register(name: str, **spec_fields):
    def wrap(fn: ComputeFn) -> ComputeFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        LOSSES[name] = LossSpec(name=name, compute=fn, **spec_fields)
        return fn
    return wrap


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (config key `loss.name`); registered losses: {sorted(LOSSES)}")
    return LOSSES[name]


# ------------------------------------------------------------------ config checks

def require(cfg, key: str, positive: bool = False, nonnegative: bool = False, choices=None):
    """Raise a ValueError naming `loss.<key>` if it is missing or out of range."""
    from omegaconf import OmegaConf
    if OmegaConf.is_config(cfg) and OmegaConf.is_missing(cfg, key):
        raise ValueError(f"loss.{key} is required for loss={cfg.name}: pass loss.{key}=<value>")
    value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    if value is None:
        raise ValueError(f"loss.{key} is required for loss={cfg.name}: pass loss.{key}=<value>")
    if choices is not None and value not in choices:
        raise ValueError(f"loss.{key}={value!r} is not one of {list(choices)}")
    if positive and not value > 0:
        raise ValueError(f"loss.{key} must be > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"loss.{key} must be >= 0, got {value}")
    return value


def preference_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps) -> Metrics:
    """The metrics every preference loss logs (LOSSES.md); per-example [B] tensors."""
    return {
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().detach(),
        "rewards/margins": (chosen_rewards - rejected_rewards).detach(),
        "logps/chosen": policy_chosen_logps.detach(),
        "logps/rejected": policy_rejected_logps.detach(),
    }


def pair_logps(inp: LossInputs, average: bool = False):
    """(policy chosen, policy rejected, reference chosen, reference rejected) summed log-probs, [B] each.
    The reference ones are zeros when the loss has no reference."""
    pol = sequence_logps(inp.policy_logps, inp.mask, average)
    ref = (sequence_logps(inp.reference_logps, inp.mask, average) if inp.reference_logps is not None
           else torch.zeros_like(pol))
    return (*split_pairs(pol, inp.n_pairs), *split_pairs(ref, inp.n_pairs))


# ------------------------------------------------------------------ sft / dpo / ipo

@register("sft", pairwise=False)
def _sft(inp: LossInputs, cfg):
    losses = sft_loss(inp.policy_logps, inp.mask)
    return losses.mean(), {"logps/chosen": sequence_logps(inp.policy_logps, inp.mask).detach()}


def _validate_dpo(cfg):
    require(cfg, "beta", positive=True)
    eps = cfg.get("label_smoothing", 0.0) or 0.0
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {eps}")


@register("dpo", reference=lambda cfg: None if cfg.get("reference_free", False) else "logps",
          validate=_validate_dpo)
def _dpo(inp: LossInputs, cfg):
    pc, pr, rc, rr = pair_logps(inp)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.get("label_smoothing", 0.0) or 0.0,
                              reference_free=cfg.get("reference_free", False))
    return losses.mean(), preference_metrics(cr, rj, pc, pr)


@register("ipo", reference="logps", validate=lambda cfg: require(cfg, "beta", positive=True))
def _ipo(inp: LossInputs, cfg):
    pc, pr, rc, rr = pair_logps(inp, average=True)
    losses = ipo_loss(pc, pr, rc, rr, cfg.beta)
    pcs, prs, rcs, rrs = pair_logps(inp)
    return losses.mean(), preference_metrics(cfg.beta * (pcs - rcs), cfg.beta * (prs - rrs), pcs, prs)
