"""Composing configs outside a Hydra app: train.py's for a list of overrides (the pipeline, precompute.py,
the in-process stages) and the other commands' own (evaluate.py, generate.py), with the renamed
keys refused by their new names.
"""
import os
from typing import Dict, Iterable

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

import utils
from prefkd import loss_spec

# Keys that were renamed: an old name on a command line is refused with the new one.
RENAMED = {"reference_cache": "reference.cache", "trainer.cpu_devices": "trainer.cpu_workers",
           "wandb.enabled": "wandb.mode (wandb.mode=disabled turns wandb off)"}



def compose(overrides: Iterable[str]):
    """The config train.py would see for these command-line overrides (Hydra's compose API, on
    config/; struct mode off, as train.py runs): the one place outside a Hydra app that composes."""
    refuse_renamed(overrides)
    with initialize_config_dir(config_dir=os.path.join(utils.REPO_DIR, "config"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    OmegaConf.set_struct(cfg, False)
    return cfg


def compose_command(config_name: str, argv: Iterable[str], open_keys: Iterable[str] = ("data",)):
    """The config of a command other than train.py (config/<config_name>.yaml) for its
    key=value arguments, with Hydra's override grammar (datasets=[a,b], x=null). Keys under
    `open_keys` (free-form sections such as data.*) may be new. A bare argument, an unknown key or
    a required key left unset is a ValueError naming it."""
    argv = [str(a) for a in argv]
    bare = [a for a in argv if "=" not in a]
    if bare:
        raise ValueError(f"argument {bare[0]!r} is not key=value: {config_name}.py takes Hydra-style key=value "
                         f"arguments, e.g. checkpoint={bare[0]}")
    path = os.path.join(utils.REPO_DIR, "config", f"{config_name}.yaml")
    known = sorted(OmegaConf.load(path).keys())
    tops = [a.lstrip("+~").split("=", 1)[0].split(".")[0] for a in argv]
    unknown = [t for t in tops if t not in known]
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r}: the keys of {config_name}.py are {known} "
                         f"(config/{config_name}.yaml)")
    overrides = [("++" + a.lstrip("+")) if t in tuple(open_keys) else a for a, t in zip(argv, tops)]
    try:
        with initialize_config_dir(config_dir=os.path.dirname(path), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except HydraException as e:
        raise ValueError(f"{config_name}.py: {e}".rstrip(".") + f". The keys of {config_name}.py are {known} "
                         f"(config/{config_name}.yaml)") from None
    missing = [k for k in cfg if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise ValueError(f"{config_name}.py: {missing[0]}=<...> is required (config/{config_name}.yaml says what it is)")
    OmegaConf.set_struct(cfg, False)
    return cfg


def renamed_keys() -> Dict[str, str]:
    """{old key: new key} of every renamed key, the losses' own (LossSpec.renamed) included."""
    out = dict(RENAMED)
    for name, spec in loss_spec.LOSSES.items():
        for old, new in spec.renamed.items():
            out.setdefault(f"loss.{old}", f"loss.{new}")
    return out


def refuse_renamed(overrides: Iterable[str]) -> None:
    """A command-line override naming a renamed key gets a message naming the new key."""
    renamed = renamed_keys()
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in renamed:
            new = renamed[key]
            example = "" if " " in new else f" (e.g. {new}={o.split('=', 1)[1] if '=' in o else '...'})"
            raise ValueError(f"{key} was renamed: use {new}{example}")
