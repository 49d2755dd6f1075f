"""The loss registry: every training objective of the framework, as pure functions.

Each loss is two layers:

* a pure function of per-token or per-sequence tensors (``dpo_loss``, ``ipo_loss``...),
  written after the equations of ``docs/losses.md`` with the tensor shapes in its
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

Chunked output layer. With `output_chunking: true` (the default) the trainer hands the losses
`LazyLogits` (a model's final hidden states [N, L, H] and output weight [V, H]) in place of
every [N, L, V] logits tensor; `chunked` projects one chunk of positions at a time inside the
chunk functions (recomputed in backward), so no [N, L, V] tensor of any model exists. The
losses' code is the same for both.
"""
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

IGNORE_INDEX = -100
Metrics = Dict[str, torch.Tensor]


# ------------------------------------------------------------------ per-token helpers

def response_mask(labels: torch.LongTensor) -> torch.Tensor:
    """[N, L] labels -> [N, L-1] float mask of response tokens in shifted indexing."""
    return (labels[:, 1:] != IGNORE_INDEX).float()


def token_logps(logits: "Logits", labels: torch.LongTensor) -> torch.Tensor:
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
    """What the trainer hands a loss. N = 2B rows for pairwise losses (chosen first), B otherwise.

    With the chunked output layer (config `output_chunking`), policy_logits, reference_logits
    and the teacher's full-vocabulary features are `LazyLogits` of that shape: the losses read
    them only through `chunked` / `token_logps` / slicing / `.shape` / `.detach()`."""
    policy_logits: "Logits"                          # [N, L, V], with grad
    labels: torch.LongTensor                         # [N, L]
    n_pairs: int                                     # B
    reference_logps: Optional[torch.Tensor] = None   # [N, L-1] if spec.reference == "logps"
    reference_logits: Optional["Logits"] = None      # [N, L, V] if spec.reference == "logits"
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

GENERATION_SOURCES = ("teacher", "reference", "policy")


@dataclass(frozen=True)
class Generation:
    """Responses a loss trains on that the trainer generates for the batch's prompts, before any
    forward pass (so the teacher, reference and policy all see the generated responses).

    source: "teacher" (the frozen teacher), "reference" (the frozen starting student: loaded
        even when the loss reads none of its outputs) or "policy" (the current student).
    replaces: the batch responses the generations replace, "chosen" or "rejected" (the rows
        [0, B) or [B, 2B) of a pairwise loss; "chosen" for single-target losses).
    probability: chance that a training micro-batch is generated (else it keeps the data's
        responses); drawn from a generator seeded identically on every rank.
    temperature: None for greedy decoding (or beam search with num_beams > 1); > 0 samples
        at that temperature from the full distribution (no top-k / top-p).
    num_beams: beam search width of greedy decoding (1: plain greedy).
    max_new_tokens: None: up to the run's max_length (prompt + response).
    train_only: evaluation batches keep the data's responses.
    Generations of a frozen source are cached per prompt: each prompt is generated once."""
    source: str
    replaces: str = "chosen"
    probability: float = 1.0
    temperature: Optional[float] = None
    num_beams: int = 1
    max_new_tokens: Optional[int] = None
    train_only: bool = False

    @property
    def frozen(self) -> bool:
        return self.source != "policy"


@dataclass(frozen=True)
class LossSpec:
    name: str
    compute: ComputeFn
    # True: chosen and rejected rows (N = 2B); False: one row per example (N = B), the chosen
    # response, or the data set's SFT target when sft_targets is True.
    pairwise: bool = True
    sft_targets: bool = False
    # What the loss needs of the frozen reference: None, "logps" ([N, L-1] per-token log-probs)
    # or "logits" (the full [N, L, V] logits); or a function of the loss config returning one.
    reference: Need = None
    # Reduces the teacher's [N, L, V] logits to what the loss needs, right after the teacher's
    # forward pass, so that the full teacher logits do not outlive it. None: no teacher.
    teacher_features: Optional[Callable] = None
    validate: Optional[Callable[[object], None]] = None
    # The teacher's own reference (its SFT model, `teacher.reference_archive`), a second frozen
    # teacher-side model: (its [N, L, V] logits, labels, cfg, the dict teacher_features returned)
    # -> the dict the loss reads as LossInputs.teacher, called right after its forward pass (it
    # may consume entries of the teacher's dict). None: not loaded.
    teacher_reference_features: Optional[Callable] = None
    # Responses generated by a model for the batch's prompts: a function of the loss config
    # returning a `Generation` or None (train on the data's responses).
    generation: Optional[Callable[[object], Optional[Generation]]] = None
    # The loss.* settings the teacher features depend on, as {key: value} (a function of the loss
    # config): what a teacher cache (prefkd/output_cache.py) is keyed by besides the models and data.
    # None: the whole loss config (safe, but any loss.* change then invalidates a cache).
    teacher_feature_settings: Optional[Callable[[object], Dict]] = None

    def reference_need(self, cfg) -> Optional[str]:
        return self.reference(cfg) if callable(self.reference) else self.reference

    def generation_need(self, cfg) -> Optional[Generation]:
        return self.generation(cfg) if self.generation is not None else None

    def teacher_need(self, cfg) -> bool:
        """The teacher model is loaded for its features or to generate responses."""
        gen = self.generation_need(cfg)
        return self.teacher_features is not None or (gen is not None and gen.source == "teacher")

    def teacher_reference_need(self, cfg) -> bool:
        return self.teacher_reference_features is not None

    def reference_model_need(self, cfg) -> bool:
        """The frozen reference model is loaded for its outputs or to generate responses."""
        gen = self.generation_need(cfg)
        return bool(self.reference_need(cfg)) or (gen is not None and gen.source == "reference")


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
    """The metrics every preference loss logs (docs/losses.md); per-example [B] tensors."""
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

@register("sft", pairwise=False, sft_targets=True)
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


# ================================================================== teacher-based losses
#
# Vocabulary-sized work (log-softmax, KL, logsumexp, top-k) runs in chunks along the
# sequence, sized so that a chunk holds about CHUNK_ELEMENTS floats: with a 128k vocabulary
# the [2B, L, V] fp32 temporaries are what run out of memory first. Where the chunk needs
# the policy's gradient it is recomputed in backward (activation checkpointing), so autograd
# does not keep a full-size log-softmax alive either.

CHUNK_ELEMENTS = 1 << 25


def chunk_positions(n_rows: int, vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, n_rows * vocab))


class LazyLogits:
    """A vocabulary-sized [N, L, V] tensor that is never materialised whole (the chunked output
    layer, config key `output_chunking`).

    A leaf is a model's output layer applied to its final hidden states,

        logits = hidden @ weight.T (+ bias)      hidden [N, L, H], weight [V, H], bias [V] or None

    and a node applies a position-wise function to the chunks of its children
    (``map``: the teacher's log-softmax; ``combine``: ADPA's advantage, a difference of two
    models' log-softmaxes). ``chunked`` slices it along the sequence and projects each slice
    inside its (checkpointed) chunk function, so at most one chunk's [N, c, V] logits exist;
    the losses read it exactly as they read a logits tensor, through ``chunked`` and
    ``token_logps``. Gradients reach `hidden` and `weight` (a tied embedding included) through
    ordinary autograd.

    Supported: ``shape``, ``t[rows, positions]`` with slices on the first two dims only,
    ``detach()``, ``map(fn)``, ``combine(fn, *parts)`` and ``materialize()`` (the full tensor,
    for tests and small inputs)."""

    def __init__(self, hidden: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, *, fn: Optional[Callable] = None,
                 children: Tuple["LazyLogits", ...] = ()):
        if fn is None:
            if hidden is None or weight is None or hidden.dim() != 3 or weight.dim() != 2 \
                    or hidden.shape[-1] != weight.shape[-1]:
                raise ValueError("LazyLogits needs hidden [N, L, H] and weight [V, H]")
        elif not children:
            raise ValueError("a LazyLogits node needs children")
        self.hidden, self.weight, self.bias, self.fn, self.children = hidden, weight, bias, fn, tuple(children)

    @property
    def shape(self) -> torch.Size:
        if self.fn is None:
            return torch.Size((*self.hidden.shape[:2], self.weight.shape[0]))
        return self.children[0].shape

    @property
    def requires_grad(self) -> bool:
        if self.fn is None:
            return any(t is not None and t.requires_grad for t in (self.hidden, self.weight, self.bias))
        return any(c.requires_grad for c in self.children)

    def __getitem__(self, idx) -> "LazyLogits":
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) > 2 or not all(isinstance(i, slice) for i in idx):
            raise IndexError(f"LazyLogits takes slices of its rows and positions only, got {idx!r}")
        if self.fn is None:
            return LazyLogits(self.hidden[idx], self.weight, self.bias)
        return LazyLogits(fn=self.fn, children=tuple(c[idx] for c in self.children))

    def detach(self) -> "LazyLogits":
        if self.fn is None:
            return LazyLogits(self.hidden.detach(), self.weight.detach(),
                              None if self.bias is None else self.bias.detach())
        return LazyLogits(fn=self.fn, children=tuple(c.detach() for c in self.children))

    def map(self, fn: Callable) -> "LazyLogits":
        """fn([N, c, V] chunk) -> [N, c, V], applied lazily."""
        return LazyLogits(fn=fn, children=(self,))

    @staticmethod
    def combine(fn: Callable, *parts: "LazyLogits") -> "LazyLogits":
        """fn(chunk of parts[0], chunk of parts[1], ...) -> [N, c, V], applied lazily."""
        return LazyLogits(fn=fn, children=parts)

    def materialize(self) -> torch.Tensor:
        if self.fn is None:
            return F.linear(self.hidden, self.weight, self.bias)
        return self.fn(*(c.materialize() for c in self.children))


Logits = Union[torch.Tensor, LazyLogits]


def _materialized(fn: Callable, *parts):
    """fn applied to the parts, each LazyLogits projected (this chunk only) first."""
    return fn(*(p.materialize() if isinstance(p, LazyLogits) else p for p in parts))


def log_softmax_f32(z: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [..., V] float32 log-softmax."""
    return torch.log_softmax(z.float(), -1)


def chunked(fn: Callable, *tensors: Logits, grad: bool = False) -> torch.Tensor:
    """Apply ``fn`` to slices [:, i:i+c] of every tensor (dim 1 = sequence) and concatenate
    the results along dim 1. ``fn`` must be position-wise (output dim 1 = the slice's length).
    A `LazyLogits` argument reaches ``fn`` as the projected [N, c, V] logits of its slice.

    c = chunk_positions(N, V) with N, V the first tensor's first and last dims.
    ``grad=True`` (and grad enabled): each chunk is recomputed in backward (activation
    checkpointing), so autograd keeps only the inputs' slices, never a full-size temporary
    (for a LazyLogits: the hidden states' slice; the projection is recomputed too).
    Otherwise the chunks are written into one preallocated output, so the peak is the output
    plus one chunk's temporaries (no list of chunks plus a concatenated copy)."""
    n, length, vocab = tensors[0].shape[0], tensors[0].shape[1], tensors[0].shape[-1]
    c = chunk_positions(n, vocab)
    use_checkpoint = grad and torch.is_grad_enabled()
    if length <= c and not use_checkpoint:
        return _materialized(fn, *tensors)
    outs, out = [], None
    for i in range(0, length, c):
        parts = [t[:, i:i + c] for t in tensors]
        if use_checkpoint:
            outs.append(torch.utils.checkpoint.checkpoint(_materialized, fn, *parts, use_reentrant=False))
            continue
        y = _materialized(fn, *parts)
        if y.requires_grad:  # an autograd graph through the chunks: keep them and concatenate
            outs.append(y)
            continue
        if out is None:
            out = y.new_empty(y.shape[:1] + (length,) + y.shape[2:])
        out[:, i:i + y.shape[1]] = y
    return out if out is not None else torch.cat(outs, dim=1)


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


# ------------------------------------------------------------------ potentials (teacher values)

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

    The rest slot is taken from the logits outside the K ids (a masked copy of this chunk),
    never as log(1 - sum of the K probabilities): once the rest holds less than float32's
    resolution of 1 (~6e-8) that sum rounds to 1, the log to log 0, and its gradient
    explodes. This way it is exact and finite however peaked the distribution is.
    The ids are overwritten with LOG_ZERO rather than -inf, so the logsumexp never meets
    an all -inf row: K = V (nothing outside) or only -inf logits outside (a teacher's padded
    vocabulary rows masked to -inf) give a rest slot of LOG_ZERO + log K - logsumexp(z),
    i.e. LOG_ZERO in float32, whose probability is exactly 0; the K+1 slots then give exactly
    the full-vocabulary KL / entropy / logsumexp, and the gradient is finite (no 0 * -inf).
    Otherwise the filled entries add exactly 0 to the rest: exp(LOG_ZERO - z) is 0 for any
    logit z above about -1e29."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    top = torch.gather(logits, -1, ids) - lse
    outside = logits.scatter(-1, ids, LOG_ZERO)
    rest = torch.logsumexp(outside, dim=-1, keepdim=True) - lse
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


def shifted_targets(labels: torch.LongTensor) -> torch.LongTensor:
    """[N, L] labels -> [N, L-1] token ids in shifted indexing (0 off the response)."""
    t = labels[:, 1:].clone()
    t[t == IGNORE_INDEX] = 0
    return t


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
                         f"the student's {vocab}: full-vocabulary KD needs one vocabulary (or set loss.teacher_top_k)")
    if "topk_ids" in teacher and teacher["topk_ids"].numel() and int(teacher["topk_ids"].max()) >= vocab:
        raise ValueError(f"the teacher's top-k contains token id {int(teacher['topk_ids'].max())}, outside the "
                         f"student's vocabulary of {vocab}: teacher and student must share one tokenizer")


# ------------------------------------------------------------------ tdpo

def sequence_kl(reference_logits: torch.Tensor, policy_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SeqKL(y) = sum_t m_t KL(pi_ref(.|s_t) || pi_theta(.|s_t)) over the full vocabulary.

    Args: *_logits [N, L, V] unshifted; mask [N, L-1] (shifted). Returns [N].
    Computed from log-softmax of both models, chunk by chunk along the sequence."""
    def kl(ref, pol):
        return forward_kl(torch.log_softmax(ref.float(), -1), torch.log_softmax(pol.float(), -1))
    per_token = chunked(kl, reference_logits[:, :-1], policy_logits[:, :-1], grad=True)
    return (per_token * mask).sum(-1)


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


def tdpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
              chosen_kl, rejected_kl, beta: float, alpha: float, if_tdpo2: bool = True):
    """TDPO (Zeng et al. 2024, Eq. 12 / TDPO repo `tdpo_loss`).

        h     = [L_theta(y_w) - L_ref(y_w)] - [L_theta(y_l) - L_ref(y_l)]
        TDPO1: u = h - (SeqKL(y_l) - SeqKL(y_w))
        TDPO2: u = h - alpha (SeqKL(y_l) - stopgrad(SeqKL(y_w)))
        loss  = -log sigma(beta u)

    Args: [B] summed log-probs and [B] sequence KLs. Returns losses [B], chosen_rewards [B],
    rejected_rewards [B] (beta (L_theta - L_ref), detached)."""
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    if if_tdpo2:
        u = h - alpha * (rejected_kl - chosen_kl.detach())
    else:
        u = h - (rejected_kl - chosen_kl)
    losses = -F.logsigmoid(beta * u)
    return (losses, beta * (policy_chosen_logps - reference_chosen_logps).detach(),
            beta * (policy_rejected_logps - reference_rejected_logps).detach())


def _validate_tdpo(cfg):
    require(cfg, "beta", positive=True)
    require(cfg, "alpha", nonnegative=True)


@register("tdpo", reference="logits", validate=_validate_tdpo)
def _tdpo(inp: LossInputs, cfg):
    pol_tok, ref_tok, kl_tok = tdpo_token_terms(inp.reference_logits, inp.policy_logits, inp.labels)
    pol, ref, kl = (t.sum(-1) for t in (pol_tok, ref_tok, kl_tok))
    (pc, pr), (rc, rr), (kc, kr) = (split_pairs(t, inp.n_pairs) for t in (pol, ref, kl))
    losses, cr, rj = tdpo_loss(pc, pr, rc, rr, kc, kr, cfg.beta, cfg.alpha, cfg.get("if_tdpo2", True))
    metrics = preference_metrics(cr, rj, pc, pr)
    metrics.update({"kl/chosen": kc.detach(), "kl/rejected": kr.detach(), "kl/margin": (kr - kc).detach()})
    return losses.mean(), metrics


# ------------------------------------------------------------------ tvkd

TVKD_VARIANTS = ("paper", "released", "released_teacher_value")
TERMINAL_VALUES = ("teacher", "zero")


def tvkd_tau(cfg) -> float:
    tau = cfg.get("value_temperature")
    return float(cfg.beta if tau is None else tau)


def tvkd_shaping(values_cur: torch.Tensor, values_next: torch.Tensor, mask: torch.Tensor, gamma: float,
                 terminal_value: str = "teacher") -> torch.Tensor:
    """Per-token potential-based shaping psi_t = gamma V(s_{t+1}) - V(s_t) (Ng et al. 1999).

    Args: values_cur, values_next [N, T] (shifted: V(s_t), V(s_{t+1})); mask [N, T];
    terminal_value: "teacher" keeps the teacher's V(s_{T+1}), "zero" sets it to 0
    (the terminal potential of episodic shaping). Returns [N, T] psi, zero off the response."""
    if terminal_value == "zero":
        values_next = values_next * (1.0 - last_token_mask(mask))
    return (gamma * values_next - values_cur) * mask


def tvkd_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, psi: torch.Tensor, mask: torch.Tensor,
              n_pairs: int, beta: float, alpha: float):
    """TVKD (Kwon et al., NeurIPS 2025, Eq. for L_TVKD): DPO with the reward shaped by alpha psi.

        g(y) = beta sum_t m_t (l_theta,t - l_ref,t) - alpha sum_t m_t psi_t
        loss = -log sigma( g(y_w) - g(y_l) )

    Args: policy_logps, reference_logps, psi, mask: [2B, T] (chosen rows first).
    Returns losses [B], shaping [2B] (alpha sum_t m_t psi_t)."""
    g_dpo = beta * ((policy_logps - reference_logps) * mask).sum(-1)
    shaping = alpha * (psi * mask).sum(-1)
    g = g_dpo - shaping
    g_w, g_l = split_pairs(g, n_pairs)
    return -F.logsigmoid(g_w - g_l), shaping


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


def _tvkd_teacher_features(teacher_logits: torch.Tensor, labels: torch.LongTensor, cfg) -> Dict[str, torch.Tensor]:
    """Reduce the teacher's [N, L, V] logits to what TVKD reads:
    paper variant -- `values` [N, L] (the chosen state potential at every position; for the
    action potentials, the logsumexp value, for the metrics) and, for logit/logprob, `psi`
    [N, L-1] per token; released variants -- `topk_ids` [N, L, k] and `teacher_collapsed`
    [N, L, k+1] (the latter only for released_teacher_value: the entropy branch reads only
    the ids)."""
    variant = cfg.get("variant", "paper")
    if variant != "paper":
        ids = teacher_topk_ids(teacher_logits, cfg.get("top_k", 50), "top_k")
        if variant == "released":
            return {"topk_ids": ids}
        return {"topk_ids": ids, "teacher_collapsed": chunked(collapse_topk, teacher_logits, ids)}
    potential, tau = cfg.get("potential", "logsumexp"), tvkd_tau(cfg)
    state_kind = potential if potential in STATE_POTENTIALS else "logsumexp"
    out = {"values": chunked(lambda z: state_potential(z, state_kind, tau).unsqueeze(-1), teacher_logits).squeeze(-1)}
    if potential in ACTION_POTENTIALS:
        tokens = shifted_targets(labels).unsqueeze(-1)
        out["psi"] = chunked(lambda z, a: action_potential(z, a.squeeze(-1), potential).unsqueeze(-1),
                             teacher_logits[:, :-1], tokens).squeeze(-1)
    return out


def _validate_tvkd(cfg):
    require(cfg, "alpha", nonnegative=True)
    require(cfg, "beta", positive=True)
    require(cfg, "gamma", nonnegative=True)
    require(cfg, "variant", choices=TVKD_VARIANTS)
    require(cfg, "potential", choices=STATE_POTENTIALS + ACTION_POTENTIALS)
    require(cfg, "terminal_value", choices=TERMINAL_VALUES)
    tau = cfg.get("value_temperature")
    if tau is not None and not tau > 0:
        raise ValueError(f"loss.value_temperature must be > 0 (or null = beta), got {tau}")
    if cfg.get("variant") != "paper":
        require(cfg, "top_k", positive=True)


def _tvkd_feature_settings(cfg) -> Dict:
    """What `_tvkd_teacher_features` depends on: the variant and its top-k, or the potential and
    the resolved value temperature (null means loss.beta)."""
    variant = cfg.get("variant", "paper")
    if variant != "paper":
        return {"variant": variant, "top_k": int(cfg.get("top_k", 50))}
    return {"variant": variant, "potential": cfg.get("potential", "logsumexp"), "value_temperature": tvkd_tau(cfg)}


def _tvkd_reference(cfg):
    return "logps" if cfg.get("variant", "paper") == "paper" and cfg.get("use_reference", True) else None


@register("tvkd", reference=_tvkd_reference, teacher_features=_tvkd_teacher_features, validate=_validate_tvkd,
          teacher_feature_settings=_tvkd_feature_settings)
def _tvkd(inp: LossInputs, cfg):
    pol = sequence_logps(inp.policy_logps, inp.mask)
    variant = cfg.get("variant", "paper")
    if variant != "paper":
        t = inp.teacher
        check_teacher_vocab(t, inp.policy_logits)
        student = chunked(collapse_topk, inp.policy_logits, t["topk_ids"], grad=True)
        r, x = released_rewards(student, t.get("teacher_collapsed"), t["topk_ids"], inp.labels, cfg.gamma,
                                "entropy" if variant == "released" else "teacher_value",
                                cfg.get("released_alpha0", 0.7), cfg.get("released_alpha1", 0.0),
                                cfg.get("released_alpha_tilde", 1.0), return_terms=True)
        r_w, r_l = split_pairs(r, inp.n_pairs)
        losses = -F.logsigmoid(r_w - r_l)
        # rewards/* are R(y) itself (this recipe has no beta and no reference)
        metrics = preference_metrics(r_w, r_l, *split_pairs(pol, inp.n_pairs))
        xw, xl = split_pairs(x, inp.n_pairs)
        metrics.update({"shaping/chosen": xw.detach(), "shaping/rejected": xl.detach(),
                        "shaping/margin": (xw - xl).detach()})
        return losses.mean(), metrics
    ref_logps = inp.reference_logps if inp.reference_logps is not None else torch.zeros_like(inp.policy_logps)
    v_cur, v_next = gather_next(inp.teacher["values"])
    if "psi" in inp.teacher:
        psi = inp.teacher["psi"] * inp.mask
    else:
        psi = tvkd_shaping(v_cur, v_next, inp.mask, cfg.gamma, cfg.get("terminal_value", "teacher"))
    losses, shaping = tvkd_loss(inp.policy_logps, ref_logps, psi, inp.mask, inp.n_pairs, cfg.beta, cfg.alpha)
    ref = sequence_logps(ref_logps, inp.mask)
    (pc, pr), (rc, rr) = split_pairs(pol, inp.n_pairs), split_pairs(ref, inp.n_pairs)
    metrics = preference_metrics(cfg.beta * (pc - rc), cfg.beta * (pr - rr), pc, pr)
    final_value = (v_next * last_token_mask(inp.mask)).sum(-1)
    (vw, vl), (sw, sl) = split_pairs(final_value, inp.n_pairs), split_pairs(shaping, inp.n_pairs)
    metrics.update({"value/chosen_last": vw.detach(), "value/rejected_last": vl.detach(),
                    "shaping/chosen": sw.detach(), "shaping/rejected": sl.detach(),
                    "shaping/margin": (sw - sl).detach()})
    return losses.mean(), metrics


# ------------------------------------------------------------------ knowledge distillation

def _kd_teacher_features(teacher_logits: torch.Tensor, labels: torch.LongTensor, cfg) -> Dict[str, torch.Tensor]:
    """Full vocabulary (teacher_top_k null): the teacher's log-probs, one [N, L, V] tensor.
    teacher_top_k K: `topk_ids` [N, L, K] and `teacher_collapsed` [N, L, K+1] only."""
    k = cfg.get("teacher_top_k")
    if k is None:
        if isinstance(teacher_logits, LazyLogits):  # projected chunk by chunk where the loss reads it
            return {"teacher_logp": teacher_logits.map(log_softmax_f32)}
        return {"teacher_logp": chunked(log_softmax_f32, teacher_logits)}
    ids = teacher_topk_ids(teacher_logits, k, "teacher_top_k")
    return {"topk_ids": ids, "teacher_collapsed": chunked(collapse_topk, teacher_logits, ids)}


def _kd_feature_settings(cfg) -> Dict:
    """What `_kd_teacher_features` depends on."""
    return {"teacher_top_k": cfg.get("teacher_top_k")}


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


def kd_loss(nll: torch.Tensor, fkl: torch.Tensor, sft_weight: float, kd_weight: float) -> torch.Tensor:
    """VanillaKD: sft_weight NLL(y_w) + kd_weight FKL(p_T || pi_theta) on y_w, both per-token
    means over the response. Args/returns: [B]."""
    return sft_weight * nll + kd_weight * fkl


def dckd_loss(nll_w: torch.Tensor, fkl_w: torch.Tensor, fkl_l: torch.Tensor, lam: float) -> torch.Tensor:
    """DCKD (Gao et al., ICLR 2025): NLL(y_w) + lambda FKL on y_w + lambda FKL on y_l, per-token
    means over each response. Args/returns: [B]."""
    return nll_w + lam * (fkl_w + fkl_l)


def _validate_kd(cfg, weights):
    for w in weights:
        require(cfg, w, nonnegative=True)
    k = cfg.get("teacher_top_k")
    if k is not None and not k >= 1:
        raise ValueError(f"loss.teacher_top_k must be >= 1 or null (full vocabulary), got {k}")


@register("vanillakd", pairwise=False, teacher_features=_kd_teacher_features,
          teacher_feature_settings=_kd_feature_settings,
          validate=lambda cfg: _validate_kd(cfg, ("kd_weight", "sft_weight")))
def _vanillakd(inp: LossInputs, cfg):
    nll = sft_loss(inp.policy_logps, inp.mask)
    fkl = sequence_logps(token_fkl(inp), inp.mask, average=True)
    losses = kd_loss(nll, fkl, cfg.sft_weight, cfg.kd_weight)
    return losses.mean(), {"kd/fkl": fkl.detach(), "kd/nll": nll.detach(),
                           "logps/chosen": sequence_logps(inp.policy_logps, inp.mask).detach()}


@register("dckd", teacher_features=_kd_teacher_features, teacher_feature_settings=_kd_feature_settings,
          validate=lambda cfg: _validate_kd(cfg, ("lam",)))
def _dckd(inp: LossInputs, cfg):
    nll_w, _ = split_pairs(sft_loss(inp.policy_logps, inp.mask), inp.n_pairs)
    fkl_w, fkl_l = split_pairs(sequence_logps(token_fkl(inp), inp.mask, average=True), inp.n_pairs)
    losses = dckd_loss(nll_w, fkl_w, fkl_l, cfg.lam)
    pc, pr = split_pairs(sequence_logps(inp.policy_logps, inp.mask), inp.n_pairs)
    return losses.mean(), {"kd/fkl_chosen": fkl_w.detach(), "kd/fkl_rejected": fkl_l.detach(),
                           "kd/nll": nll_w.detach(), "logps/chosen": pc.detach(), "logps/rejected": pr.detach()}


# ================================================================== Table 1 baselines
#
# simpo, wpo (reference-based or reference-free preference losses), ddpo, dpkd, gkd (teacher
# losses), seqkd and adpa (trained on generated responses). What each needs from the trainer
# is declared in its LossSpec: `reference`, `teacher_features`, `teacher_reference_features`
# (the teacher's own SFT reference, `teacher.reference_archive`) and `generation` (responses
# generated for the batch's prompts).

def chunked_token_logps(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """`token_logps` chunk by chunk along the sequence (for frozen models, no grad): [N, L, V]
    unshifted logits, [N, L] labels -> [N, L-1] log p(y_t|s_t), zero off the response, without
    a full-size fp32 copy of bf16 logits."""
    def pick(z, y):
        z = z.float()
        return torch.gather(z, -1, y) - torch.logsumexp(z, dim=-1, keepdim=True)
    out = chunked(pick, logits[:, :-1], shifted_targets(labels).unsqueeze(-1)).squeeze(-1)
    return out * response_mask(labels)


def _validate_generation(cfg, sampled: bool = False):
    """The decoding fields shared by the losses that train on generated responses."""
    t = cfg.get("temperature")
    if sampled:
        require(cfg, "temperature", positive=True)
    elif t is not None and not t > 0:
        raise ValueError(f"loss.temperature must be > 0 (or null: greedy decoding), got {t}")
    n = cfg.get("max_new_tokens")
    if n is not None and not (isinstance(n, int) and n >= 1):
        raise ValueError(f"loss.max_new_tokens must be a positive integer or null (up to max_length), got {n}")
    beams = cfg.get("num_beams", 1)
    if not (isinstance(beams, int) and beams >= 1):
        raise ValueError(f"loss.num_beams must be a positive integer, got {beams}")


# ------------------------------------------------------------------ simpo

def simpo_loss(policy_chosen_avg_logps: torch.Tensor, policy_rejected_avg_logps: torch.Tensor,
               beta: float, gamma: float):
    """SimPO (Meng et al. 2024, Eq. 6): length-normalised reward, no reference, target margin gamma.

        r(y) = beta / |y| * L_theta(y)                  (L_theta(y) = sum_t m_t l_theta,t)
        loss = -log sigma( r(y_w) - r(y_l) - gamma )

    Args:
        policy_*_avg_logps: [B] per-token averages L_theta(y) / |y| over response tokens.
        beta: reward scale; gamma: target reward margin.
    Returns:
        losses [B], chosen_rewards [B], rejected_rewards [B] (r(y), detached)."""
    chosen_rewards = beta * policy_chosen_avg_logps
    rejected_rewards = beta * policy_rejected_avg_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def _validate_simpo(cfg):
    require(cfg, "beta", positive=True)
    require(cfg, "gamma")


@register("simpo", reference=None, validate=_validate_simpo)
def _simpo(inp: LossInputs, cfg):
    pc_avg, pr_avg = split_pairs(sequence_logps(inp.policy_logps, inp.mask, average=True), inp.n_pairs)
    losses, cr, rj = simpo_loss(pc_avg, pr_avg, cfg.beta, cfg.gamma)
    pc, pr = split_pairs(sequence_logps(inp.policy_logps, inp.mask), inp.n_pairs)
    return losses.mean(), preference_metrics(cr, rj, pc, pr)


# ------------------------------------------------------------------ wpo

def log_sum_squared_probs(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v pi(v|s)^2 = logsumexp(2 z) - 2 logsumexp(z), position-wise: [..., V] logits -> [...]."""
    z = logits.float()
    return torch.logsumexp(2.0 * z, dim=-1) - 2.0 * torch.logsumexp(z, dim=-1)


def wpo_weights(policy_logps: torch.Tensor, log_sum_sq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO's sequence weight (Zhou et al. 2024, the TRL `use_weighting` form), without grad:

        w(y) = exp( mean_t [ l_theta,t - log sum_v pi_theta(v|s_t)^2 ] )     (mean over response tokens)

    Args: policy_logps, log_sum_sq, mask: [N, T]. Returns [N] weights (detached)."""
    return torch.exp(sequence_logps((policy_logps - log_sum_sq).detach(), mask, average=True))


def wpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             chosen_weights: torch.Tensor, rejected_weights: torch.Tensor, beta: float):
    """WPO: DPO's loss of each pair weighted by the (detached) product of its sequence weights.

        loss = min(1, w(y_w) w(y_l)) * ( -log sigma(beta h) )

    Args: [B] summed log-probs and [B] weights. With unit weights this is DPO exactly.
    Returns losses [B], chosen_rewards [B], rejected_rewards [B], pair weights [B]."""
    dpo, cr, rj = dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                           reference_rejected_logps, beta)
    weight = (chosen_weights * rejected_weights).clamp(max=1.0).detach()
    return weight * dpo, cr, rj, weight


@register("wpo", reference="logps", validate=lambda cfg: require(cfg, "beta", positive=True))
def _wpo(inp: LossInputs, cfg):
    logps = inp.policy_logps  # computed (and cached) with grad, outside the no_grad block below
    with torch.no_grad():
        lss = chunked(lambda z: log_sum_squared_probs(z).unsqueeze(-1), inp.policy_logits[:, :-1].detach())
        w = wpo_weights(logps, lss.squeeze(-1), inp.mask)
    pc, pr, rc, rr = pair_logps(inp)
    wc, wr = split_pairs(w, inp.n_pairs)
    losses, cr, rj, weight = wpo_loss(pc, pr, rc, rr, wc, wr, cfg.beta)
    metrics = preference_metrics(cr, rj, pc, pr)
    metrics.update({"wpo/weight": weight, "wpo/chosen_weight": wc, "wpo/rejected_weight": wr})
    return losses.mean(), metrics


# ------------------------------------------------------------------ seqkd

def seqkd_loss(policy_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SeqKD (Kim & Rush 2016): the SFT loss on the teacher's own responses y_T to the training prompts.

        loss(x) = -1/|y_T| sum_t log pi_theta(y_T,t | x, y_T,<t)

    Args: policy_logps [B, T] per-token log-probs of the teacher-generated responses; mask [B, T].
    Returns [B] per-example mean NLL."""
    return sft_loss(policy_logps, mask)


def _seqkd_generation(cfg) -> Generation:
    return Generation("teacher", "chosen", temperature=cfg.get("temperature"), num_beams=cfg.get("num_beams", 1),
                      max_new_tokens=cfg.get("max_new_tokens"))


@register("seqkd", pairwise=False, sft_targets=True, generation=_seqkd_generation, validate=_validate_generation)
def _seqkd(inp: LossInputs, cfg):
    losses = seqkd_loss(inp.policy_logps, inp.mask)
    return losses.mean(), {"kd/nll": losses.detach(),
                           "logps/chosen": sequence_logps(inp.policy_logps, inp.mask).detach(),
                           "kd/response_length": inp.mask.sum(-1)}


# ------------------------------------------------------------------ ddpo

def teacher_implicit_rewards(teacher_logps: torch.Tensor, teacher_reference_logps: torch.Tensor,
                             mask: torch.Tensor, teacher_beta: float) -> torch.Tensor:
    """r_T(y) = beta_T (L_teacher(y) - L_teacher_ref(y)): the DPO teacher's implicit reward against
    its own SFT reference. Args: [N, T] per-token log-probs and mask. Returns [N]."""
    return teacher_beta * ((teacher_logps - teacher_reference_logps) * mask).sum(-1)


def ddpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
              teacher_chosen_rewards: torch.Tensor, teacher_rejected_rewards: torch.Tensor, beta: float):
    """Distilled DPO (Fisch et al. 2024): regress the student's implicit reward margin on the teacher's.

        h    = [L_theta(y_w) - L_ref(y_w)] - [L_theta(y_l) - L_ref(y_l)]
        loss = ( beta h - [r_T(y_w) - r_T(y_l)] )^2

    Args: [B] summed log-probs of the policy and its reference, [B] teacher rewards r_T.
    Returns losses [B], chosen_rewards [B], rejected_rewards [B] (beta (L_theta - L_ref), detached).
    The loss is 0 exactly where the student's margin equals the teacher's."""
    chosen = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected = beta * (policy_rejected_logps - reference_rejected_logps)
    losses = ((chosen - rejected) - (teacher_chosen_rewards - teacher_rejected_rewards)) ** 2
    return losses, chosen.detach(), rejected.detach()


def _ddpo_teacher_features(teacher_logits, labels, cfg):
    return {"teacher_logps": chunked_token_logps(teacher_logits, labels)}


def _ddpo_teacher_reference_features(teacher_reference_logits, labels, cfg, teacher):
    return {**teacher, "teacher_reference_logps": chunked_token_logps(teacher_reference_logits, labels)}


def _validate_ddpo(cfg):
    require(cfg, "beta", positive=True)
    require(cfg, "teacher_beta", positive=True)


@register("ddpo", reference="logps", teacher_features=_ddpo_teacher_features,
          teacher_reference_features=_ddpo_teacher_reference_features, validate=_validate_ddpo,
          teacher_feature_settings=lambda cfg: {})  # per-token log-probs of both teacher models only
def _ddpo(inp: LossInputs, cfg):
    pc, pr, rc, rr = pair_logps(inp)
    r_t = teacher_implicit_rewards(inp.teacher["teacher_logps"], inp.teacher["teacher_reference_logps"], inp.mask,
                                   cfg.teacher_beta)
    tc, tr = split_pairs(r_t, inp.n_pairs)
    losses, cr, rj = ddpo_loss(pc, pr, rc, rr, tc, tr, cfg.beta)
    metrics = preference_metrics(cr, rj, pc, pr)
    metrics.update({"teacher_rewards/chosen": tc.detach(), "teacher_rewards/rejected": tr.detach(),
                    "teacher_rewards/margins": (tc - tr).detach(),
                    "teacher_rewards/accuracies": (tc > tr).float().detach()})
    return losses.mean(), metrics


# ------------------------------------------------------------------ dpkd

def dpkd_margins(policy_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """DPKD's per-state margin (Li et al. 2024), position-wise over the last dim:

        a_T = argmax_a p_T(a|s),  a_S = argmax_a pi_theta(a|s)   (a_S: no gradient through the argmax)
        h   = [log pi_theta(a_T) - log pi_theta(a_S)] - [log p_T(a_T) - log p_T(a_S)]

    Args: policy_logp, teacher_logp [..., V] log-probs. Returns [...]. h = 0 where a_T = a_S."""
    a_t = teacher_logp.argmax(-1, keepdim=True)
    a_s = policy_logp.detach().argmax(-1, keepdim=True)
    pick = lambda lp, a: torch.gather(lp, -1, a).squeeze(-1)
    return (pick(policy_logp, a_t) - pick(policy_logp, a_s)) - (pick(teacher_logp, a_t) - pick(teacher_logp, a_s))


def dpkd_loss(policy_logps: torch.Tensor, margins: torch.Tensor, mask: torch.Tensor, beta: float,
              kd_ratio: float) -> torch.Tensor:
    """DPKD: (1 - kd_ratio) NLL(y_w) + kd_ratio * mean_t -log sigma(beta h_t).

    Args: policy_logps [B, T] per-token log pi_theta(y_t|s_t) of y_w; margins [B, T] the h_t at the
    states of y_w; mask [B, T]. Returns [B]; with kd_ratio = 0 it is the SFT loss."""
    nll = sft_loss(policy_logps, mask)
    pref = sequence_logps(-F.logsigmoid(beta * margins), mask, average=True)
    return (1.0 - kd_ratio) * nll + kd_ratio * pref


def _full_teacher_logp(teacher_logits, labels, cfg):
    """The teacher's full log-softmax [N, L, V] (exact for losses that read the teacher at a token
    chosen by the student, which is unknown when the teacher runs)."""
    if isinstance(teacher_logits, LazyLogits):
        return {"teacher_logp": teacher_logits.map(log_softmax_f32)}
    return {"teacher_logp": chunked(log_softmax_f32, teacher_logits)}


def _validate_dpkd(cfg):
    require(cfg, "beta", positive=True)
    ratio = require(cfg, "kd_ratio")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"loss.kd_ratio must be in [0, 1], got {ratio}")


@register("dpkd", pairwise=False, teacher_features=_full_teacher_logp, validate=_validate_dpkd)
def _dpkd(inp: LossInputs, cfg):
    check_teacher_vocab(inp.teacher, inp.policy_logits)
    h = chunked(lambda pl, tl: dpkd_margins(torch.log_softmax(pl.float(), -1), tl).unsqueeze(-1),
                inp.policy_logits[:, :-1], inp.teacher["teacher_logp"][:, :-1], grad=True).squeeze(-1) * inp.mask
    losses = dpkd_loss(inp.policy_logps, h, inp.mask, cfg.beta, cfg.kd_ratio)
    with torch.no_grad():
        agree = chunked(lambda pl, tl: (pl.argmax(-1) == tl.argmax(-1)).float().unsqueeze(-1),
                        inp.policy_logits[:, :-1].detach(), inp.teacher["teacher_logp"][:, :-1]).squeeze(-1)
    return losses.mean(), {"kd/nll": sft_loss(inp.policy_logps, inp.mask).detach(),
                           "kd/margin": sequence_logps(h.detach(), inp.mask, average=True),
                           "kd/argmax_agreement": sequence_logps(agree, inp.mask, average=True),
                           "logps/chosen": sequence_logps(inp.policy_logps, inp.mask).detach()}


# ------------------------------------------------------------------ gkd

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


def gkd_loss(token_jsd: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GKD: the per-token JSD_b(p_T || pi_theta)(s_t) averaged over each response's tokens (the
    data's y_w, or with probability lambda a response sampled from the student).

    Args: token_jsd [B, T]; mask [B, T]. Returns [B]."""
    return sequence_logps(token_jsd, mask, average=True)


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


def _gkd_generation(cfg) -> Optional[Generation]:
    lam = cfg.get("lam", 0.0) or 0.0
    if lam <= 0:
        return None
    return Generation("policy", "chosen", probability=float(lam), temperature=cfg.temperature,
                      max_new_tokens=cfg.get("max_new_tokens"), train_only=True)


def _validate_gkd(cfg):
    for key in ("b", "lam"):
        v = require(cfg, key)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"loss.{key} must be in [0, 1], got {v}")
    _validate_kd(cfg, ())
    _validate_generation(cfg, sampled=cfg.lam > 0)


@register("gkd", pairwise=False, teacher_features=_kd_teacher_features, generation=_gkd_generation,
          validate=_validate_gkd)
def _gkd(inp: LossInputs, cfg):
    b = float(cfg.b)
    losses = gkd_loss(token_divergence(inp, lambda tl, sl: generalized_jsd(tl, sl, b)), inp.mask)
    return losses.mean(), {"kd/jsd": losses.detach(),
                           "logps/chosen": sequence_logps(inp.policy_logps, inp.mask).detach()}


# ------------------------------------------------------------------ adpa

def expected_advantage(policy_logp: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """sum_a pi_theta(a|s) A(s, a), position-wise over the last dim: [..., K] log-probs and advantages -> [...]."""
    return (policy_logp.exp() * advantage).sum(-1)


def adpa_loss(policy_logps_w: torch.Tensor, mask_w: torch.Tensor, expected_adv_s: torch.Tensor,
              mask_s: torch.Tensor, w: float) -> torch.Tensor:
    """ADPA (Gao et al., ICLR 2025), advantage-guided distillation:

        A(s, a) = log pi_dpo_teacher(a|s) - log pi_sft_teacher(a|s)
        loss    = NLL(y_w) - w * mean_t sum_a pi_theta(a|s_t) A(s_t, a)      (t over the student's y_s)

    Args:
        policy_logps_w [B, T], mask_w [B, T]: per-token log pi_theta of the chosen response y_w.
        expected_adv_s [B, T'], mask_s [B, T']: sum_a pi_theta(a|s_t) A(s_t, a) at the states of the
            student-generated response y_s (from `expected_advantage`).
        w: weight of the advantage term.
    Returns [B]."""
    return sft_loss(policy_logps_w, mask_w) - w * sequence_logps(expected_adv_s, mask_s, average=True)


def _generated_rows(t: torch.Tensor) -> torch.Tensor:
    """ADPA's rows [B, 2B) (the student's responses y_s; rows [0, B) hold y_w)."""
    return t[t.shape[0] // 2:]


def _adpa_teacher_features(teacher_logits, labels, cfg):
    """The DPO teacher on y_s only: its full log-softmax, or with teacher_top_k K its top-K ids and
    collapsed log-probs (both [B, L, .])."""
    return _kd_teacher_features(_generated_rows(teacher_logits), _generated_rows(labels), cfg)


def _adpa_teacher_reference_features(teacher_reference_logits, labels, cfg, teacher):
    """A(s, a) on y_s from the SFT teacher's logits: `advantage` [B, L, V] (written in place over the
    DPO teacher's log-probs, so one full-size tensor), or [B, L, K+1] with `topk_ids`."""
    ref = _generated_rows(teacher_reference_logits)
    if "topk_ids" in teacher:
        ids = teacher["topk_ids"]
        return {"topk_ids": ids, "advantage": teacher["teacher_collapsed"] - chunked(collapse_topk, ref, ids)}
    adv = teacher.pop("teacher_logp")
    if adv.shape[-1] != ref.shape[-1]:
        raise ValueError(f"the DPO teacher has {adv.shape[-1]} logits per position and its SFT reference "
                         f"(teacher.reference_archive) {ref.shape[-1]}: they must share one vocabulary")
    if isinstance(adv, LazyLogits) and isinstance(ref, LazyLogits):  # both chunked output layers
        return {"advantage": LazyLogits.combine(lambda a, r: a - log_softmax_f32(r), adv, ref)}
    adv, ref = (x.materialize() if isinstance(x, LazyLogits) else x for x in (adv, ref))
    c = chunk_positions(adv.shape[0], adv.shape[-1])
    for i in range(0, adv.shape[1], c):
        adv[:, i:i + c] -= torch.log_softmax(ref[:, i:i + c].float(), -1)
    return {"advantage": adv}


def _adpa_generation(cfg) -> Generation:
    return Generation("reference", "rejected", temperature=cfg.get("temperature"),
                      max_new_tokens=cfg.get("max_new_tokens"))


def _validate_adpa(cfg):
    require(cfg, "w", nonnegative=True)
    _validate_kd(cfg, ())
    _validate_generation(cfg)


@register("adpa", teacher_features=_adpa_teacher_features, teacher_reference_features=_adpa_teacher_reference_features,
          generation=_adpa_generation, validate=_validate_adpa)
def _adpa(inp: LossInputs, cfg):
    B, t = inp.n_pairs, inp.teacher
    pol_s = inp.policy_logits[B:, :-1]
    if "topk_ids" in t:
        check_teacher_vocab(t, inp.policy_logits)
        per = chunked(lambda pl, a, ids: expected_advantage(collapse_topk(pl, ids), a).unsqueeze(-1),
                      pol_s, t["advantage"][:, :-1], t["topk_ids"][:, :-1], grad=True)
    else:
        if t["advantage"].shape[-1] != inp.policy_logits.shape[-1]:
            raise ValueError(f"the teacher's logits have {t['advantage'].shape[-1]} entries per position and the "
                             f"student's {inp.policy_logits.shape[-1]}: ADPA over the full vocabulary needs one "
                             "vocabulary (or set loss.teacher_top_k)")
        per = chunked(lambda pl, a: expected_advantage(torch.log_softmax(pl.float(), -1), a).unsqueeze(-1),
                      pol_s, t["advantage"][:, :-1], grad=True)
    mask_w, mask_s = split_pairs(inp.mask, B)
    adv = per.squeeze(-1) * mask_s
    logps_w, logps_s = split_pairs(inp.policy_logps, B)
    losses = adpa_loss(logps_w, mask_w, adv, mask_s, cfg.w)
    return losses.mean(), {"kd/nll": sft_loss(logps_w, mask_w).detach(),
                           "kd/advantage": sequence_logps(adv.detach(), mask_s, average=True),
                           "kd/generated_length": mask_s.sum(-1),
                           "logps/chosen": sequence_logps(logps_w, mask_w).detach(),
                           "logps/generated": sequence_logps(logps_s, mask_s).detach()}
