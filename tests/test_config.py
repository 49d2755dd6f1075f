"""Every option of every config group composes and validates; bad input fails fast, naming the key."""
import os

import pytest

from conftest import REPO, compose

GROUPS = ["loss", "model", "teacher", "trainer"]


def options(group):
    """The choices of a group (files starting with _ are shared bases, not choices)."""
    return sorted(f[:-5] for f in os.listdir(os.path.join(REPO, "config", group))
                  if f.endswith(".yaml") and not f.startswith("_"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group, monkeypatch):
    import train
    from prefkd import hub_access
    # the hub models (model=llama1b) are checked as if the hub were reachable: the offline refusal
    # has its own tests (test_run_plan.py)
    monkeypatch.setattr(hub_access, "_hub_reachable", lambda timeout=3.0: True)
    # likewise a converted model's directory (model=smollm2_135m): its absence is refused in test_run_plan.py
    monkeypatch.setattr(hub_access, "missing_local_paths", lambda cfg: [])
    opts = options(group)
    assert opts, group
    for opt in opts:
        cfg = compose([f"{group}={opt}"])
        assert cfg[group].name == opt
        if group == "loss" and train.loss_spec.get_loss(opt).teacher_need(cfg.loss):
            # composes, and refuses to start without a teacher, naming the key to set
            with pytest.raises(ValueError, match="teacher="):
                train.validate_config(cfg)
        else:
            train.validate_config(cfg)


def test_readme_names_only_existing_config_options():
    import re
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    # a group choice (teacher=llama8b), not a dotted key that ends in a group's name (caches.teacher=false)
    for group, name in re.findall(r"(?<![\w.])(loss|model|teacher|trainer)=([A-Za-z_][A-Za-z0-9_]*)", text):
        assert name in options(group), f"README mentions {group}={name}, which does not exist"


@pytest.mark.parametrize("overrides,match", [
    (["loss=nope"], "loss"),
    (["loss=dpo", "loss.beta=???"], "loss.beta"),
    (["loss=dpo", "loss.beta=-1"], "loss.beta"),
    (["batch_size=10", "gradient_accumulation_steps=4"], "batch_size"),
    (["model.archive=/does/not/exist"], "model.archive"),
    (["optimizer=Adamm"], "optimizer"),
    (["trainer=FSDPTrainer", "trainer.cpu_workers=3", "batch_size=8"], "batch_size"),
])
def test_bad_input_is_a_clear_error(overrides, match):
    import train
    if overrides[0] == "loss=nope":
        from hydra.errors import MissingConfigException
        with pytest.raises(MissingConfigException, match="nope"):
            compose(overrides)
        return
    cfg = compose(overrides)
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        train.validate_config(cfg)


def test_derived_exp_name_is_stable_and_ignores_resume():
    import train
    cfg = compose(["loss=dpo", "loss.beta=0.2"])
    a = train.derive_exp_name(cfg, ["loss=dpo", "loss.beta=0.2", "seed=1"])
    b = train.derive_exp_name(cfg, ["seed=1", "loss=dpo", "loss.beta=0.2", "resume=true", "wandb.mode=online"])
    assert a == b == "dpo_tiny_loss.beta=0.2_seed=1"
