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
import copy
import os
from typing import Callable, Dict, NamedTuple, Optional

import torch
from omegaconf import OmegaConf

import utils
from prefkd import adapters, checkpoints, cross_tokenizer, lean_loading, tokenizer_facts
from prefkd.logprobs import response_mask, token_logps

ROLES = ("policy", "reference", "teacher", "teacher_reference")


class ModelOrigin(NamedTuple):
    """Where a model of a run comes from: its model config (config/model or config/teacher),
    checkpoint (None: name_or_path, else init_config), the seed of its random initialisation
    and its dtype name."""
    model_cfg: object
    archive: Optional[str]
    seed: int
    dtype: str


def origin(cfg, role: str) -> ModelOrigin:
    """The source of the run's `role` model. The reference is the *starting* policy (never a
    resumed one). The teacher and its reference are seeded seed+1 and seed+2: randomly
    initialised ones (tests, a pipeline's first stage) then differ from the student."""
    if role in ("policy", "reference"):
        # a LoRA policy's reference is the policy with its adapters off: the policy's dtype
        own = role == "policy" or adapters.enabled(cfg.model)
        return ModelOrigin(cfg.model, cfg.model.get("archive"), int(cfg.seed),
                      cfg.model.policy_dtype if own else cfg.model.reference_dtype)
    if role == "teacher":
        return ModelOrigin(cfg.teacher, cfg.teacher.get("archive"), int(cfg.seed) + 1, cfg.teacher.reference_dtype)
    if role == "teacher_reference":
        return ModelOrigin(cfg.teacher, cfg.teacher.get("reference_archive"), int(cfg.seed) + 2,
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
    return tokenizer_facts.get_tokenizer(model_cfg.tokenizer)


def build(cfg, role: str, tokenizer, archive: Optional[str] = None, head: str = "lm"):
    """The run's `role` model (see `source`), unwrapped; `archive` overrides its checkpoint (the
    policy resumed from a checkpoint). A LoRA policy (model.lora.r set, prefkd/adapters.py) is its
    starting model with adapters: initialised, or those of the resumed checkpoint. head="scalar"
    (a reward model's loss spec): the starting model with a one-output scalar head instead of its
    language-model head (`with_scalar_head`)."""
    src = origin(cfg, role)
    dtype = utils.get_dtype(src.dtype)
    if head == "scalar":
        return with_scalar_head(build_model(src.model_cfg, tokenizer, dtype, archive or src.archive, src.seed),
                                tokenizer, src.seed)
    if role == "policy" and adapters.enabled(cfg.model):
        resumed = adapters.location(checkpoints.resolve_checkpoint(archive)) if archive else None
        if archive and resumed is None:
            raise ValueError(f"{archive} holds no adapter ({adapters.ADAPTER_DIR}/): it was not written by a "
                             "run with model.lora.r set")
        base = build_model(src.model_cfg, tokenizer, dtype, src.archive, src.seed)
        return adapters.attach(base, src.model_cfg, src.seed, resumed)
    return build_model(src.model_cfg, tokenizer, dtype, archive or src.archive, src.seed)


def build_model(model_cfg, tokenizer, dtype: torch.dtype, archive: Optional[str] = None, seed: int = 0):
    """Instantiate a causal LM: from `archive` (a checkpoint of ours) if given, else from
    `name_or_path`, else randomly initialised from `init_config` (seeded, so every rank builds
    the same weights). Under lean_loading.deferred() (FSDPTrainer) the model is built on the
    meta device instead, and FSDPTrainer.wrap gives each rank only its own shards of these
    same weights (prefkd/lean_loading.py)."""
    return set_attention(_build_model(model_cfg, tokenizer, dtype, archive, seed), model_cfg)


def set_attention(model, model_cfg):
    """The model with model_cfg.attn_implementation (sdpa by default; eager; flash_attention_2 / 3)."""
    impl = model_cfg.get("attn_implementation") or "sdpa"
    if getattr(model.config, "_attn_implementation", None) != impl:
        model.set_attn_implementation(impl)
    return model


def _build_model(model_cfg, tokenizer, dtype: torch.dtype, archive: Optional[str] = None, seed: int = 0):
    if lean_loading.active():
        from transformers import AutoConfig
        path = checkpoints.resolve_checkpoint(archive) if archive else model_cfg.name_or_path
        if archive and not is_model_dir(path):  # base + adapter: merged by rank 0 (broadcast)
            config, path = archive_config(path), None
        else:
            config = AutoConfig.from_pretrained(path) if path else init_model_config(model_cfg, tokenizer)
        return lean_loading.meta_model(config, dtype, path,
                                       lambda: _build_full_model(model_cfg, tokenizer, dtype, archive, seed))
    return _build_full_model(model_cfg, tokenizer, dtype, archive, seed)


def is_model_dir(path: str) -> bool:
    """A directory with a Hugging Face model's files (a merged LoRA checkpoint included)."""
    return os.path.isfile(os.path.join(path, "config.json"))


def adapter_base(path: str) -> str:
    """The base model of the adapter-only checkpoint `path` (refused if it names none)."""
    where = adapters.location(path)
    base = adapters.base_of(where) if where else None
    if where is None:
        raise ValueError(f"{path} is not a checkpoint: no config.json and no {adapters.CONFIG_FILE}")
    if not base:
        raise ValueError(f"{where} is an adapter over a randomly initialised model, which it cannot name: use "
                         "the run's final checkpoint (it holds the merged model) or train with "
                         "model.lora.save_merged=true")
    return checkpoints.resolve_checkpoint(base) if os.path.exists(os.path.expanduser(base)) else base


def archive_config(path: str):
    """The transformers config of the model in checkpoint `path` (a model or an adapter directory)."""
    from transformers import AutoConfig
    if is_model_dir(path):
        return AutoConfig.from_pretrained(path)
    base = adapter_base(path)
    return archive_config(base) if os.path.isdir(base) else AutoConfig.from_pretrained(base)


def policy_config(cfg, check_archives: bool = True):
    """The transformers config of the policy's starting model, read without loading weights; None
    if it cannot be read here (a hub model not cached offline, an archive not written yet)."""
    from transformers import AutoConfig
    archive = cfg.model.get("archive")
    if archive and check_archives:
        return archive_config(checkpoints.resolve_checkpoint(archive))
    try:
        if cfg.model.get("name_or_path"):
            return AutoConfig.from_pretrained(cfg.model.name_or_path)
    except (OSError, ValueError):
        return None
    return init_model_config(cfg.model, load_tokenizer(cfg.model)) if cfg.model.get("init_config") else None


def check_head(cfg, spec) -> None:
    """What a scalar-head (reward-model) loss cannot combine with, refused naming the key."""
    if spec.head == "lm":
        return
    refused = {"padding_free": bool(cfg.get("padding_free")), "sample_during_eval": bool(cfg.get("sample_during_eval")),
               "model.lora.r": adapters.enabled(cfg.model),
               "trainer": cfg.trainer.name == "TensorParallelTrainer"}
    for key, bad in refused.items():
        if bad:
            raise ValueError(f"loss={spec.name} trains a scalar head (a reward model), which {key}="
                             f"{OmegaConf.select(cfg, key)} does not support: packed rows, sampling, LoRA and the "
                             "tensor-parallel wrapper need a language-model head; leave it at its default")


def is_scalar_head(config) -> bool:
    """A reward model's config: a sequence-classification architecture."""
    return any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


def with_scalar_head(model, tokenizer, seed: int):
    """`model` as a reward model: AutoModelForSequenceClassification with one output, its base (the
    decoder) taken from `model`, the new head initialised seeded (a reward model already: as it is,
    when it has one output). Its pad token is the tokenizer's, which the head's pooling reads to find
    each row's last token."""
    from transformers import AutoModelForSequenceClassification
    pad = tokenizer_facts.pad_id(tokenizer)
    if is_scalar_head(model.config) or hasattr(model, "score"):
        if model.config.num_labels != 1:
            raise ValueError(f"the reward model has {model.config.num_labels} outputs; loss=rm trains one")
        # The trainer pads pairs with the tokenizer's pad id and the head finds each row's last
        # token by config.pad_token_id: the two must be one id (a reward model saved without one,
        # or with another, would be trained on padding positions).
        model.config.pad_token_id = pad
        return model
    config = copy.deepcopy(model.config)
    config.num_labels, config.architectures, config.pad_token_id = 1, None, pad
    with fork_rng(seed):
        rm = AutoModelForSequenceClassification.from_config(config, dtype=model.dtype)
    rm.base_model.load_state_dict(model.base_model.state_dict())
    rm.config.architectures = [type(rm).__name__]  # what load_archive and from_pretrained read back
    return rm


def load_archive(path: str, dtype: torch.dtype):
    """The model of a resolved checkpoint `path`: its Hugging Face files (a reward model's: with its
    scalar head), or (an adapter directory, ours or peft's) its base with the adapter merged in
    (peft's merge_and_unload)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    if is_model_dir(path):
        cls = AutoModelForSequenceClassification if is_scalar_head(AutoConfig.from_pretrained(path)) \
            else AutoModelForCausalLM
        return cls.from_pretrained(path, dtype=dtype)
    from peft import PeftModel
    base_path = adapter_base(path)
    base = load_archive(base_path, dtype) if os.path.isdir(base_path) else \
        AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    return PeftModel.from_pretrained(base, adapters.location(path)).merge_and_unload()


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
        return load_archive(checkpoints.resolve_checkpoint(archive), dtype)
    if model_cfg.name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, dtype=dtype)
    config = init_model_config(model_cfg, tokenizer)
    with fork_rng(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


fork_rng = utils.fork_rng  # building a model does not move the run's random stream


def load_checkpoint(path: str, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) of a checkpoint of ours (a run directory, its LATEST or a
    step-* directory) or any Hugging Face model directory."""
    ckpt = checkpoints.resolve_checkpoint(path)
    if not is_model_dir(ckpt) and adapters.location(ckpt) is None:
        raise ValueError(f"{path} is not a checkpoint (no config.json at {ckpt})")
    model = load_archive(ckpt, dtype).eval()
    return model, tokenizer_facts.get_tokenizer(ckpt if os.path.isfile(os.path.join(ckpt, "tokenizer_config.json"))
                                     else adapter_base(ckpt))


def base_location(cfg) -> Optional[str]:
    """The policy's starting model as an adapter directory names its base (peft's
    base_model_name_or_path): the resolved archive, a local path made absolute, a hub id, or None
    (a random initialisation)."""
    archive, name = cfg.model.get("archive"), cfg.model.get("name_or_path")
    if archive:
        return checkpoints.resolve_checkpoint(archive)
    if name and os.path.exists(os.path.expanduser(str(name))):
        return os.path.abspath(os.path.expanduser(str(name)))
    return str(name) if name else None


def describe_start(cfg) -> str:
    """Where the policy starts (and a LoRA policy's reference comes from), in words."""
    start = base_location(cfg)
    if start is None:
        return f"the random initialisation of model={cfg.model.name} (seed {cfg.seed})"
    carried = cfg.model.get("archive") and adapters.location(start)
    return start + (" (a LoRA run: its adapter merged into its base, as that checkpoint holds it)" if carried else "")


def startup_report(cfg, spec, policy, frozen) -> Dict:
    """What a run trains and what its reference is (printed at start-up, <run>/model_report.json):
    {"parameters": {trainable, total}, "lora": the adapter's settings and target modules or None,
    "reference": in words, "reference_mode": none | cache | frozen copy | adapters off}."""
    lora = None
    if adapters.enabled(cfg.model):
        config = policy.peft_config[adapters.ADAPTER_NAME]
        targets = sorted(n[len("base_model.model."):] for n, _ in adapters.lora_layers(policy))
        lora = {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                "target_modules": targets, "target_module_names": sorted({t.rsplit(".", 1)[-1] for t in targets}),
                "save_merged": bool(cfg.model.lora.get("save_merged"))}
    need = spec.reference_need(cfg.loss) or ("generation only" if frozen.reference is not None else None)
    if need is None:
        mode, text = "none", "none"
    elif frozen.reference_cache is not None:
        mode, text = "cache", f"{need} from the reference cache"
    elif isinstance(frozen.reference, adapters.AdaptersOff):
        mode, text = "adapters off", f"{need}: the policy with its adapters off = {describe_start(cfg)}"
    else:
        mode, text = "frozen copy", f"{need}: a frozen copy of {describe_start(cfg)} ({cfg.model.reference_dtype})"
    return {"parameters": adapters.count_parameters(policy), "lora": lora, "reference": text, "reference_mode": mode}


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

    def __init__(self, cfg, spec, tokenizer, caches: Optional[Dict] = None, roles=("reference", "teacher"),
                 reference_from_policy: bool = False):
        caches = caches or {}
        self.cfg, self.spec, self.student_tokenizer = cfg, spec, tokenizer
        # a LoRA policy is its own reference with the adapters off (use_policy): none is built
        self.reference_from_policy = reference_from_policy
        self.teacher_cache, self.reference_cache = caches.get("teacher"), caches.get("reference")
        self.reference = self.teacher = self.teacher_reference = None
        self.teacher_tokenizer, self.teacher_tokens = None, "student"
        if spec.teacher_need(cfg.loss) and "teacher" in roles:
            # Tokenizers are cheap: check them before any model is loaded. "own": the teacher reads
            # its own tokenization of the text (prefkd/cross_tokenizer.py)
            self.teacher_tokenizer = load_tokenizer(cfg.teacher)
            self.teacher_tokens = cross_tokenizer.check(cfg, spec, tokenizer, self.teacher_tokenizer)
        if "reference" in roles and spec.reference_model_need(cfg.loss) and self.reference_cache is None \
                and not reference_from_policy:
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
        self.reference_from_policy = False
        self.teacher_cache, self.reference_cache = caches.get("teacher"), caches.get("reference")
        self.reference, self.teacher, self.teacher_reference = reference, teacher, teacher_reference
        return self

    def use_policy(self, policy) -> None:
        """A LoRA policy (wrapped) as the reference, its adapters switched off (prefkd/adapters.py)."""
        if self.reference_from_policy and self.spec.reference_model_need(self.cfg.loss) and self.reference_cache is None:
            self.reference = adapters.AdaptersOff(policy)

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
        rows = cross_tokenizer.teacher_rows(batch, self.teacher_tokenizer, self.cfg, self.spec.pairwise,
                                            self.student_tokenizer)
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
