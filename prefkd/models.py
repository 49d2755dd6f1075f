"""Every model of a run is built here: the policy, the frozen reference, the teacher and the
teacher's own reference, from an archive (a checkpoint of ours), a hub id / local path or a
config (random weights, seeded); and the device they run on.

One place decides each frozen model's source, seed and dtype (`source`), so that the trainer,
precompute.py and the cache key (prefkd/output_cache.py) agree on what "the teacher" is; one
class (`FrozenModels`) builds the frozen models a loss needs, wraps them like the policy (the
trainer's `wrap`: FSDP sharding, tensor parallel or a device move) and runs the loss spec's
feature functions on them. `pick_device` is the one device rule; `shard_fsdp` the one FSDP
sharding rule (the FSDP trainer and generate.py).
"""
import contextlib
import os
from typing import Callable, Dict, NamedTuple, Optional

import torch
from omegaconf import OmegaConf

import utils
from prefkd import checkpoints, cross_tokenizer, lean_loading
from prefkd.logprobs import response_mask, token_logps

ROLES = ("policy", "reference", "teacher", "teacher_reference")


class Source(NamedTuple):
    """Where a model of a run comes from: its model config (config/model or config/teacher),
    checkpoint (None: name_or_path, else init_config), the seed of its random initialisation
    and its dtype name."""
    model_cfg: object
    archive: Optional[str]
    seed: int
    dtype: str


def source(cfg, role: str) -> Source:
    """The source of the run's `role` model. The reference is the *starting* policy (never a
    resumed one). The teacher and its reference are seeded seed+1 and seed+2: randomly
    initialised ones (tests, a pipeline's first stage) then differ from the student."""
    if role in ("policy", "reference"):
        dtype = cfg.model.policy_dtype if role == "policy" else cfg.model.reference_dtype
        return Source(cfg.model, cfg.model.get("archive"), int(cfg.seed), dtype)
    if role == "teacher":
        return Source(cfg.teacher, cfg.teacher.get("archive"), int(cfg.seed) + 1, cfg.teacher.reference_dtype)
    if role == "teacher_reference":
        return Source(cfg.teacher, cfg.teacher.get("reference_archive"), int(cfg.seed) + 2,
                      cfg.teacher.reference_dtype)
    raise ValueError(f"unknown model role {role!r}; one of {ROLES}")


def pick_device(cfg, rank: int = 0) -> torch.device:
    """`trainer.device` (auto: a GPU if there is one): the local GPU of this process (LOCAL_RANK,
    else rank modulo the GPUs), or the CPU."""
    want = cfg.trainer.get("device", "auto") if cfg is not None else "auto"
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        return torch.device("cuda", local)
    return torch.device("cpu")


def load_tokenizer(model_cfg):
    import preference_datasets as data
    return data.get_tokenizer(model_cfg.tokenizer)


def build(cfg, role: str, tokenizer, archive: Optional[str] = None):
    """The run's `role` model (see `source`), unwrapped; `archive` overrides its checkpoint (the
    policy resumed from a checkpoint)."""
    src = source(cfg, role)
    return build_model(src.model_cfg, tokenizer, utils.get_dtype(src.dtype), archive or src.archive, src.seed)


def build_model(model_cfg, tokenizer, dtype: torch.dtype, archive: Optional[str] = None, seed: int = 0):
    """Instantiate a causal LM: from `archive` (a checkpoint of ours) if given, else from
    `name_or_path`, else randomly initialised from `init_config` (seeded, so every rank builds
    the same weights). Under lean_loading.deferred() (FSDPTrainer) the model is built on the
    meta device instead, and FSDPTrainer.wrap gives each rank only its own shards of these
    same weights (prefkd/lean_loading.py)."""
    if lean_loading.active():
        from transformers import AutoConfig
        path = checkpoints.resolve_checkpoint(archive) if archive else model_cfg.name_or_path
        config = AutoConfig.from_pretrained(path) if path else init_model_config(model_cfg, tokenizer)
        return lean_loading.meta_model(config, dtype, path,
                                       lambda: _build_full_model(model_cfg, tokenizer, dtype, archive, seed))
    return _build_full_model(model_cfg, tokenizer, dtype, archive, seed)


def init_model_config(model_cfg, tokenizer):
    """The transformers config of a model randomly initialised from `init_config`."""
    from transformers import AutoConfig
    init = OmegaConf.to_container(model_cfg.init_config, resolve=True)
    model_type = init.pop("model_type")
    return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **init)


def _build_full_model(model_cfg, tokenizer, dtype: torch.dtype, archive: Optional[str] = None, seed: int = 0):
    from transformers import AutoModelForCausalLM
    if archive:
        return AutoModelForCausalLM.from_pretrained(checkpoints.resolve_checkpoint(archive), dtype=dtype)
    if model_cfg.name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, dtype=dtype)
    config = init_model_config(model_cfg, tokenizer)
    with fork_rng(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


@contextlib.contextmanager
def fork_rng(seed: int):
    """Seed torch's CPU generator for the block and restore its state after it: building a
    model does not move the run's random stream."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


def load_checkpoint(path: str, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) of a checkpoint of ours (a run directory, its LATEST or a
    step-* directory) or any Hugging Face model directory."""
    from transformers import AutoModelForCausalLM
    import preference_datasets as data
    ckpt = checkpoints.resolve_checkpoint(path)
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        raise ValueError(f"{path} is not a checkpoint (no config.json at {ckpt})")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
    return model, data.get_tokenizer(ckpt)


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def shard_fsdp(model, mesh, block_name: Optional[str], mp_policy=None, what: str = "the model"):
    """FSDP2: `fully_shard` on every decoder block (modules whose class is `block_name`; None: any
    class named *DecoderLayer), then on the root. The one sharding rule of every model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp_policy = mp_policy or MixedPrecisionPolicy()
    match = (lambda n: n == block_name) if block_name else (lambda n: n.endswith("DecoderLayer"))
    blocks = [m for m in model.modules() if match(type(m).__name__)]
    if not blocks:
        raise ValueError(f"{what}: block_name={block_name!r} matches no module of {type(model).__name__}: "
                         "set it to the model's decoder layer class")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    return model


# ------------------------------------------------------------------ frozen models and their features

class FrozenModels:
    """The frozen models a run's loss needs (its `LossSpec`): the reference (its per-token
    log-probs or full logits, or only to generate), the teacher (its features) and the
    teacher's own reference; a model whose outputs come from a cache (prefkd/output_cache.py)
    is not loaded. Built with `build` in the order reference, teacher, teacher reference;
    `wrap` then places each like the policy (the trainer's wrap)."""

    def __init__(self, cfg, spec, tokenizer, caches: Optional[Dict] = None, roles=("reference", "teacher")):
        caches = caches or {}
        self.cfg, self.spec = cfg, spec
        self.teacher_cache, self.reference_cache = caches.get("teacher"), caches.get("reference")
        self.reference = self.teacher = self.teacher_reference = None
        self.teacher_tokenizer, self.teacher_tokens = None, "student"
        if spec.teacher_need(cfg.loss) and "teacher" in roles:
            # Tokenizers are cheap: check them before any model is loaded. "own": the teacher reads
            # its own tokenization of the text (prefkd/cross_tokenizer.py)
            self.teacher_tokenizer = load_tokenizer(cfg.teacher)
            self.teacher_tokens = cross_tokenizer.check(cfg, spec, tokenizer, self.teacher_tokenizer)
        if "reference" in roles and spec.reference_model_need(cfg.loss) and self.reference_cache is None:
            self.reference = freeze(build(cfg, "reference", tokenizer))  # for its outputs, or to generate
        # a teacher of another vocabulary that only generates (seqkd) is read from generations= files
        generates_only = self.teacher_tokens == "own" and spec.teacher_features is None
        if "teacher" in roles and spec.teacher_need(cfg.loss) and self.teacher_cache is None and not generates_only:
            self.teacher = freeze(build(cfg, "teacher", self.teacher_tokenizer))
            if spec.teacher_reference_need(cfg.loss):
                self.teacher_reference = freeze(build(cfg, "teacher_reference", self.teacher_tokenizer))

    @classmethod
    def of(cls, cfg, spec, reference=None, teacher=None, teacher_reference=None, caches: Optional[Dict] = None):
        """FrozenModels holding models built elsewhere (tests, benchmarks), with no loading."""
        self = cls.__new__(cls)
        caches = caches or {}
        self.cfg, self.spec, self.teacher_tokenizer, self.teacher_tokens = cfg, spec, None, "student"
        self.teacher_cache, self.reference_cache = caches.get("teacher"), caches.get("reference")
        self.reference, self.teacher, self.teacher_reference = reference, teacher, teacher_reference
        return self

    def wrap(self, wrap: Callable) -> None:
        """Place every loaded model: wrap(model, its model config, trainable=False)."""
        if self.reference is not None:
            self.reference = wrap(self.reference, self.cfg.model, trainable=False)
        if self.teacher is not None:
            self.teacher = wrap(self.teacher, self.cfg.teacher, trainable=False)
        if self.teacher_reference is not None:
            self.teacher_reference = wrap(self.teacher_reference, self.cfg.teacher, trainable=False)

    @torch.no_grad()
    def teacher_features(self, inputs: Dict[str, torch.Tensor], logits: Callable, device) -> Optional[Dict]:
        """What the loss reads of the teacher (LossInputs.teacher) for one batch {input_ids,
        attention_mask, labels}: from the cache, or the spec's feature functions on the
        teacher's (and its reference's) logits, `logits(model, model_in)`. None: no teacher."""
        labels = inputs["labels"]
        if self.teacher_cache is not None:  # features precomputed by precompute.py
            return self.teacher_cache.lookup(inputs["input_ids"], labels, inputs["attention_mask"], device)
        if self.spec.teacher_features is None or self.teacher is None:
            return None
        model_in = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        out = self.spec.teacher_features(logits(self.teacher, model_in), labels, self.cfg.loss)
        if self.teacher_reference is not None:
            out = self.spec.teacher_reference_features(logits(self.teacher_reference, model_in), labels,
                                                       self.cfg.loss, out)
        return out

    def teacher_inputs(self, batch: Dict, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The rows the teacher reads for a batch: the student's `inputs`, or (a teacher with its
        own tokenizer) its own tokenization of the batch's text, on the inputs' device."""
        if self.teacher_tokens != "own":
            return inputs
        rows = cross_tokenizer.teacher_rows(batch, self.teacher_tokenizer, self.cfg, self.spec.pairwise)
        return {k: v.to(inputs["input_ids"].device) for k, v in rows.items()}

    def teacher_outputs(self, batch: Dict, inputs: Dict[str, torch.Tensor], logits: Callable, device) -> Dict:
        """The LossInputs fields of the teacher for one batch: {"teacher": its features on the
        student's rows}, or {"teacher_sequence": the loss's per-response signal on the teacher's
        own rows} (LossSpec.sequence_teacher, with the teacher's response mask); {} if none."""
        rows = self.teacher_inputs(batch, inputs)
        features = self.teacher_features(rows, logits, device)
        if features is None:
            return {}
        if self.teacher_tokens != "own":
            return {"teacher": features}
        return {"teacher_sequence": self.spec.sequence_teacher(features, response_mask(rows["labels"]), self.cfg.loss)}

    @torch.no_grad()
    def reference_outputs(self, inputs: Dict[str, torch.Tensor], logits: Callable, device) -> Dict:
        """{reference_logps: [N, L-1]} or {reference_logits: [N, L, V]} as the spec asks; {} if none."""
        need = self.spec.reference_need(self.cfg.loss)
        if not need:
            return {}
        labels = inputs["labels"]
        if self.reference_cache is not None:
            return {"reference_logps": self.reference_cache.lookup(inputs["input_ids"], labels,
                                                                   inputs["attention_mask"], device)["reference_logps"]}
        r_logits = logits(self.reference, {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]})
        if need == "logps":
            return {"reference_logps": token_logps(r_logits, labels)}
        return {"reference_logits": r_logits}
