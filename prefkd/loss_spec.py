"""The loss registry's machinery: what a loss declares it needs (`LossSpec`), how it is
registered (`register`), and what the trainer hands it (`LossInputs`).

The trainer, the caches, precompute.py and the evaluation never branch on a loss name or on a
particular loss's config keys: they read the spec. A loss declares here whether it trains on
pairs, what it reads of the frozen reference and of the teacher (and the teacher's own
reference), which responses a model must generate for it, and whether its teacher features
can be cached (vocabulary-sized features cannot); the loss functions themselves live in
losses.py, with the helpers they share at the end of this module (pair log-probs, the logged
reward metrics, the validation of shared keys).
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from prefkd.logits import Logits
from prefkd.logprobs import response_mask, sequence_logps, split_pairs, token_logps

Metrics = Dict[str, torch.Tensor]


@dataclass
class LossInputs:
    """What the trainer hands a loss. N = 2B rows for pairwise losses (chosen first), B otherwise.

    With the chunked output layer (config `output_chunking`), policy_logits, reference_logits
    and the teacher's full-vocabulary features are `LazyLogits` of that shape: the losses read
    them only through `chunked` / `token_logps` / slicing / `.shape` / `.detach()`."""
    policy_logits: Logits                          # [N, L, V], with grad
    labels: torch.LongTensor                         # [N, L]
    n_pairs: int                                     # B
    reference_logps: Optional[torch.Tensor] = None   # [N, L-1] if spec.reference == "logps"
    reference_logits: Optional[Logits] = None      # [N, L, V] if spec.reference == "logits"
    teacher: Optional[Dict[str, torch.Tensor]] = None  # spec.teacher_features(teacher_logits, labels, cfg)
    # {name: [N]}: spec.sequence_teacher of the teacher's features on its own tokens of the same
    # text (a teacher with another tokenizer, prefkd/cross_tokenizer.py); then `teacher` is None
    teacher_sequence: Optional[Dict[str, torch.Tensor]] = None
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


def teacher_sequence(inp: LossInputs, reduce: Callable, cfg) -> Dict[str, torch.Tensor]:
    """A loss's per-response teacher signal (its `sequence_teacher` function, `reduce`): computed on
    the teacher's own tokens (LossInputs.teacher_sequence), else reduced from the per-token
    features with the student's response mask: with one tokenizer, the same numbers."""
    if inp.teacher_sequence is not None:
        return inp.teacher_sequence
    return reduce(inp.teacher, inp.mask, cfg)


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
    # Whether this loss config reads the teacher's reference (a function of the loss config; None:
    # whenever teacher_reference_features is declared), e.g. only one of a loss's potentials does.
    teacher_reference: Optional[Callable[[object], bool]] = None
    # Responses generated by a model for the batch's prompts: a function of the loss config
    # returning a `Generation` or None (train on the data's responses).
    generation: Optional[Callable[[object], Optional[Generation]]] = None
    # The loss.* settings the teacher features depend on, as {key: value} (a function of the loss
    # config): what a teacher cache (prefkd/output_cache.py) is keyed by besides the models and data.
    # None: the whole loss config (safe, but any loss.* change then invalidates a cache).
    teacher_feature_settings: Optional[Callable[[object], Dict]] = None

    # The teacher signal per response: (the teacher's features as teacher_features and
    # teacher_reference_features return them for a [N, L] batch, its [N, L-1] response mask, cfg)
    # -> {name: [N]}. Declared, the loss reads its teacher only through these (LossInputs.
    # teacher_sequence, or this function of LossInputs.teacher), so a teacher with another tokenizer
    # computes them on its own tokens of the same text (prefkd/cross_tokenizer.py). None: the loss
    # reads the teacher per token of the student's sequence (another tokenizer is refused).
    sequence_teacher: Optional[Callable] = None
    # Why a loss config cannot use sequence_teacher (a function of the loss config: a phrase, or None).
    sequence_teacher_problem: Optional[Callable[[object], Optional[str]]] = None

    # Names of the teacher features that hold one value per vocabulary entry at every position
    # for this loss config (full-vocabulary KD: the teacher's log-softmax): they cannot be cached
    # (a 128k vocabulary is 512 kB a token). None: no such feature.
    vocab_sized_features: Optional[Callable[[object], Tuple[str, ...]]] = None
    # What the user can change to make the teacher cacheable, added to a refusal (a function of the
    # loss config returning a phrase such as "set loss.top_k=K"), or None.
    cache_hint: Optional[Callable[[object], Optional[str]]] = None
    # Checks of loss settings against the vocabulary size (e.g. a top-k), given len(tokenizer).
    check_vocab: Optional[Callable[[object, int], None]] = None
    # Old loss.* names refused with a message naming the new one: {old: new}.
    renamed: Dict[str, str] = field(default_factory=dict)
    # What the policy outputs: "lm", a causal LM's logits; "scalar", one value per sequence (a
    # reward model: AutoModelForSequenceClassification with one label; LossInputs.policy_logits
    # is then [N, 1]). Built by prefkd/models.py from the same starting models.
    head: str = "lm"

    def reference_need(self, cfg) -> Optional[str]:
        return self.reference(cfg) if callable(self.reference) else self.reference

    def generation_need(self, cfg) -> Optional[Generation]:
        return self.generation(cfg) if self.generation is not None else None

    def teacher_need(self, cfg) -> bool:
        """The teacher model is loaded for its features or to generate responses."""
        gen = self.generation_need(cfg)
        return self.teacher_features is not None or (gen is not None and gen.source == "teacher")

    def teacher_reference_need(self, cfg) -> bool:
        """The teacher's own reference (its SFT model) is loaded and its features computed."""
        if self.teacher_reference_features is None:
            return False
        return self.teacher_reference is None or bool(self.teacher_reference(cfg))

    def teacher_cache_problem(self, cfg) -> Optional[str]:
        """Why this loss, with loss config `cfg`, cannot read its teacher from a cache (None if it can):
        no teacher, responses generated during the run, or vocabulary-sized features."""
        if not self.teacher_need(cfg):
            return f"loss={self.name} uses no teacher"
        hint = self.cache_hint(cfg) if self.cache_hint is not None else None
        hint = f"{hint}, or " if hint else ""
        gen = self.generation_need(cfg)
        if gen is not None:
            what = {"teacher": "generates its training responses with the teacher",
                    "policy": "reads the teacher on responses sampled from the current student",
                    "reference": "reads the teacher on responses generated during the run by the starting student"}
            return (f"loss={self.name} {what.get(gen.source, 'trains on generated responses')}: those are not known "
                    f"before training, so its teacher outputs cannot be precomputed; {hint}run it with the live "
                    "teacher (no teacher.cache)")
        if self.teacher_features is None:
            return f"loss={self.name} reads no teacher features"
        big = self.vocab_sized_features(cfg) if self.vocab_sized_features is not None else ()
        if big:
            return (f"loss={self.name} reads vocabulary-sized teacher features ({', '.join(big)}: one value per "
                    "token of the vocabulary at every position), which cannot be cached (a 128k vocabulary is "
                    f"512 kB a token); {hint}run it with the live teacher (no teacher.cache)")
        return None

    def reference_model_need(self, cfg) -> bool:
        """The frozen reference model is loaded for its outputs or to generate responses."""
        gen = self.generation_need(cfg)
        return bool(self.reference_need(cfg)) or (gen is not None and gen.source == "reference")


# The registry. It is filled by importing losses.py, whose @register decorators run at import; prefkd
# never imports the spine (the layers in pyproject.toml), so every command, script and the tests'
# conftest import losses once for exactly this, and a lookup in an empty registry says so.
LOSSES: Dict[str, LossSpec] = {}
HEADS = ("lm", "scalar")


def get_loss(name: str) -> LossSpec:
    """The registered spec of loss `name` (config key `loss.name`)."""
    if not LOSSES:
        raise RuntimeError("no loss is registered: `import losses` (the loss registry module) before looking one up")
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (config key `loss.name`); registered losses: {sorted(LOSSES)}")
    return LOSSES[name]


def register(name: str, **spec_fields):
    def wrap(fn: ComputeFn) -> ComputeFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        LOSSES[name] = LossSpec(name=name, compute=fn, **spec_fields)
        return fn
    return wrap


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


# ------------------------------------------------------------------ shared by the losses

def reward_metrics(chosen_rewards, rejected_rewards) -> Metrics:
    """The reward metrics every preference loss logs (docs/losses.md); per-example [B] tensors."""
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": c, "rewards/rejected": r, "rewards/accuracies": (c > r).float(), "rewards/margins": c - r}


def preference_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps) -> Metrics:
    """reward_metrics plus the policy's summed log-probs."""
    return {**reward_metrics(chosen_rewards, rejected_rewards), "logps/chosen": policy_chosen_logps.detach(),
            "logps/rejected": policy_rejected_logps.detach()}


def pair_logps(inp: LossInputs, average: bool = False):
    """(policy chosen, policy rejected, reference chosen, reference rejected) summed log-probs, [B] each.
    The reference ones are zeros when the loss has no reference."""
    pol = sequence_logps(inp.policy_logps, inp.mask, average)
    ref = (sequence_logps(inp.reference_logps, inp.mask, average) if inp.reference_logps is not None
           else torch.zeros_like(pol))
    return (*split_pairs(pol, inp.n_pairs), *split_pairs(ref, inp.n_pairs))


def check_top_k_vocab(cfg, vocab: int) -> None:
    """loss.top_k (when it is read) keeps at most the whole vocabulary."""
    k = cfg.get("top_k")
    if k is None or cfg.get("variant") == "paper":  # tvkd's paper variant reads no top-k
        return
    if int(k) > vocab:
        raise ValueError(f"loss.top_k={k} exceeds the vocabulary size {vocab} of the tokenizer (model.tokenizer): "
                             f"choose K <= {vocab}, or null for the full vocabulary")


def validate_generation(cfg, sampled: bool = False):
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
