"""LoRA adapters (`model.lora`, built with `peft`): attaching them to a policy, their seeded
initial weights, the reference as the adapters switched off, their checkpoint files and the
merged model.

`model.lora.r: null` is full fine-tuning. With `r` set, the policy is a `peft.PeftModel` over
its starting model (model.archive, name_or_path or init_config) and only the adapters train.

* Initial weights: peft's own initialisation (`reset_lora_parameters`: A kaiming-uniform, B zero),
  run once more after injection under a CPU generator seeded with the run's seed, in module
  order. Every process (and the lean FSDP path, whose base is still on the meta device) thus
  gets the same adapters, and building them does not move the run's random stream.
* The reference of a LoRA policy is `AdaptersOff(policy)`: the same module with its adapters
  disabled (peft's `disable_adapter`), in eval mode. It is exactly the starting model; no second
  copy of the base is held.
* A checkpoint holds the adapter in peft's format under `<step>/adapter/` (adapter_config.json,
  adapter_model.safetensors; `PeftModel.from_pretrained(base, <step>/adapter)` reads it) and,
  at the end of a run (every save with `model.lora.save_merged: true`), the merged model as the
  ordinary Hugging Face files of the step directory. A subdirectory, because transformers'
  `from_pretrained` on a directory with a top-level adapter_config.json loads the adapter's
  base instead of the merged weights next to it.
"""
import contextlib
import json
import os
import warnings
from typing import Dict, Optional

import torch
from omegaconf import OmegaConf

import utils

ADAPTER_DIR = "adapter"
ADAPTER_NAME = "default"  # peft's name of the one adapter
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
OWN_KEYS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules"}
NOT_PEFT = ("save_merged",)  # model.lora keys of ours that are not LoraConfig fields
LEAN_INITS = (True, False, "gaussian")  # initialisations that need no base weights


def enabled(model_cfg) -> bool:
    """Whether this model config trains LoRA adapters (model.lora.r set)."""
    lora = model_cfg.get("lora") if model_cfg is not None else None
    return lora is not None and lora.get("r") is not None


def lora_config(model_cfg, key: str = "model.lora"):
    """The peft.LoraConfig of `model_cfg.lora`: r, alpha, dropout, target_modules, and any other
    LoraConfig field passed through. A bad field is a ValueError naming `key`."""
    from peft import LoraConfig
    values = OmegaConf.to_container(model_cfg.lora, resolve=True)
    kwargs = {OWN_KEYS.get(k, k): v for k, v in values.items() if k not in NOT_PEFT}
    kwargs["task_type"] = "CAUSAL_LM"
    try:
        return LoraConfig(**kwargs)
    except TypeError as e:
        fields = sorted(set(OWN_KEYS) | set(NOT_PEFT)) + ["(or any peft.LoraConfig field)"]
        raise ValueError(f"{key}: {e} (the keys of {key} are {fields})") from None
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def lora_layers(model):
    from peft.tuners.lora import LoraLayer
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def base_name(name: str) -> str:
    """The starting model's name of a PeftModel parameter or buffer (base_model.model.x.base_layer.w -> x.w)."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def init_weights(model, config, seed: int) -> Dict[str, torch.Tensor]:
    """Give every adapter its initial weights (see the module docstring) on the CPU; adapters of
    a base on the meta device are computed on the CPU, returned ({name: tensor}) and left on meta."""
    fresh: Dict[str, torch.Tensor] = {}
    with utils.fork_rng(seed):
        for _, layer in lora_layers(model):
            parts = [getattr(layer, n) for n in layer.adapter_layer_names]
            on_meta = any(p.is_meta for part in parts for p in part.parameters())
            if on_meta:
                for part in parts:
                    part.to_empty(device="cpu")
            if config.init_lora_weights is False:
                for part in (layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]):
                    part.reset_parameters()
            else:
                layer.reset_lora_parameters(ADAPTER_NAME, config.init_lora_weights)
    for name, p in model.named_parameters():
        if p.requires_grad and not p.is_meta:
            fresh[name] = p.detach().clone()
    if any(p.is_meta for p in model.parameters()):
        for _, layer in lora_layers(model):
            for n in layer.adapter_layer_names:
                getattr(layer, n).to("meta")
    return fresh


def attach(model, model_cfg, seed: int, adapter_dir: Optional[str] = None):
    """`model` (the starting model, possibly on the meta device for lean FSDP loading) as a
    PeftModel with LoRA adapters of `model_cfg.lora`: initialised (seeded), or read from
    `adapter_dir` (a resumed checkpoint's adapter). Only the adapters require gradients."""
    from peft import get_peft_model
    config = lora_config(model_cfg)
    lean = model.__dict__.pop("lean_source", None)
    if lean is not None and (config.use_dora or config.init_lora_weights not in LEAN_INITS):
        raise ValueError(f"model.lora: use_dora / init_lora_weights={config.init_lora_weights!r} need the base "
                         "weights to initialise the adapters: set trainer.lean_loading=false")
    with utils.fork_rng(seed), warnings.catch_warnings():  # peft's initialisation draws random numbers
        # peft reads transformers' deprecated is_gradient_checkpointing: its FutureWarning is not ours
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    fresh = init_weights(peft_model, config, seed)
    if adapter_dir is not None:
        fresh = read_weights(peft_model, adapter_dir)
        if lean is None:
            params = dict(peft_model.named_parameters())
            with torch.no_grad():
                for name, t in fresh.items():
                    params[name].copy_(t)
    if lean is not None:
        lean.rename, lean.fresh = base_name, fresh
        peft_model.lean_source = lean
    return peft_model


def saved_name(name: str) -> str:
    """peft's file name of an adapter parameter (the adapter's name dropped)."""
    return name.replace(f".{ADAPTER_NAME}.", ".").replace(f".{ADAPTER_NAME}", "")


def read_weights(model, adapter_dir: str) -> Dict[str, torch.Tensor]:
    """{parameter name: tensor} of every trainable parameter of `model`, from `adapter_dir`."""
    from safetensors.torch import load_file
    path = os.path.join(adapter_dir, WEIGHTS_FILE)
    saved = load_file(path)
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            if saved_name(name) not in saved:
                raise ValueError(f"{path} has no {saved_name(name)}: it is not this run's adapter "
                                 f"(model.lora differs from the one it was trained with?)")
            out[name] = saved[saved_name(name)].to(p.dtype)
    return out


def trainable_state(model) -> Dict[str, torch.Tensor]:
    """The adapter's weights, full and on the CPU, under peft's file names (a collective under
    FSDP: every rank calls it)."""
    from torch.distributed.tensor import DTensor
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if isinstance(p, DTensor) else p
            out[saved_name(name)] = t.detach().cpu().clone()
    return out


def write_adapter(directory: str, weights: Dict[str, torch.Tensor], model, base: Optional[str]) -> None:
    """peft's adapter files in `directory`; `base`: the starting model's path or hub id (None: a
    random initialisation, which no adapter directory can name)."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    config = model.peft_config[ADAPTER_NAME]
    config.base_model_name_or_path = base
    config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(directory, WEIGHTS_FILE),
              metadata={"format": "pt"})


@torch.no_grad()
def merged_state_dict(full_sd: Dict[str, torch.Tensor], model) -> Dict[str, torch.Tensor]:
    """The merged model's state dict (plain transformers names) of a PeftModel's full state dict:
    peft's `merge_and_unload` on a meta copy of the model holding these tensors (rank 0, CPU)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    base = model.get_base_model()
    # building the skeleton initialises weights (on meta, yet drawing random numbers): the run's
    # stream, saved next to this merged model for an exact resume, must not move
    with utils.fork_rng(0), torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base.config, dtype=next(iter(full_sd.values())).dtype)
        peft_model = get_peft_model(skeleton, model.peft_config[ADAPTER_NAME], autocast_adapter_dtype=False)
    # merging adds the delta into each adapted base weight in place: copies of those, so that a
    # state dict sharing the live model's tensors (one process, CPU) leaves the model untouched
    peft_model.load_state_dict({k: v.clone() if ".base_layer." in k else v for k, v in full_sd.items()},
                               strict=False, assign=True)
    merged = peft_model.merge_and_unload()
    return {k: v for k, v in merged.state_dict().items() if not v.is_meta}


class AdaptersOff:
    """A LoRA policy seen as its frozen reference: every call runs with the adapters disabled
    and in eval mode (the starting model exactly, no dropout), then restores the policy's mode.
    Attribute access passes through to the policy."""

    def __init__(self, policy):
        self.__dict__["policy"] = policy

    @contextlib.contextmanager
    def off(self):
        training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter():
                yield
        finally:
            self.policy.train(training)

    def __call__(self, *args, **kwargs):
        with self.off():
            return self.policy(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.off():
            return self.policy.generate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.__dict__["policy"], name)


def location(path: str) -> Optional[str]:
    """The adapter directory of a checkpoint or peft directory `path` (itself or its adapter/), or None."""
    for d in (os.path.join(path, ADAPTER_DIR), path):
        if os.path.isfile(os.path.join(d, CONFIG_FILE)):
            return d
    return None


def base_of(adapter_dir: str) -> Optional[str]:
    """The base model an adapter directory names (base_model_name_or_path), or None."""
    with open(os.path.join(adapter_dir, CONFIG_FILE)) as f:
        return json.load(f).get("base_model_name_or_path")


def count_parameters(model) -> Dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


# ------------------------------------------------------------------ checks, before any model loads

def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check(cfg, base_config=None) -> None:
    """Bad LoRA settings, refused naming the key before any model loads: teacher.lora (the teacher
    is frozen), model.lora's ranges and peft fields, a trainer that cannot shard adapters, and
    (given the starting model's transformers config) target modules the model does not have."""
    teacher = cfg.get("teacher")
    if teacher is not None and enabled(teacher):
        raise ValueError(f"teacher.lora.r={teacher.lora.r}: the teacher is frozen in this run, there is nothing for "
                         "adapters to train. Train the teacher with LoRA as the policy of its own run "
                         "(model=<teacher> model.lora.r=...; pipeline: stages.teacher_dpo.model.lora.r=...) and "
                         "point teacher.archive at that run")
    if not enabled(cfg.model):
        return
    lora = cfg.model.lora
    if not isinstance(lora.r, int) or isinstance(lora.r, bool) or lora.r < 1:
        raise ValueError(f"model.lora.r={lora.r!r} must be a whole number >= 1 (null: full fine-tuning)")
    if not _number(lora.get("alpha")) or lora.alpha <= 0:
        raise ValueError(f"model.lora.alpha={lora.get('alpha')!r} must be a number > 0")
    if not _number(lora.get("dropout")) or not 0 <= lora.dropout < 1:
        raise ValueError(f"model.lora.dropout={lora.get('dropout')!r} must be in [0, 1)")
    if cfg.trainer.name == "TensorParallelTrainer":
        raise ValueError("model.lora.r with trainer=TensorParallelTrainer: the tensor_parallel wrapper splits "
                         "nn.Linear layers by its own rules and does not know peft's LoRA layers (their base "
                         "layer and adapters would be split apart); use trainer=FSDPTrainer (or BasicTrainer)")
    config = lora_config(cfg.model)
    if base_config is not None:
        check_targets(config, base_config, cfg.model.name)


def check_targets(config, model_config, name: str) -> None:
    """peft's own injection on a meta-device copy of the model (no weights): an unknown target
    module or one peft cannot adapt is a ValueError naming model.lora.target_modules."""
    import copy
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    modules = [n for n, _ in model.named_modules()]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    hint = f"model={name} ({type(model).__name__}) has the linear layers {linear}; all-linear adapts every one " \
           "of the decoder blocks'"
    targets = config.target_modules
    if isinstance(targets, (list, set, tuple)):
        unknown = sorted(t for t in targets if not any(n == t or n.endswith("." + t) for n in modules))
        if unknown:
            raise ValueError(f"model.lora.target_modules: no module of model={name} is called {unknown}; {hint}")
    try:
        get_peft_model(model, copy.deepcopy(config))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"model.lora: peft cannot adapt model={name} with target_modules={targets!r} ({e}); "
                         f"{hint}") from None
