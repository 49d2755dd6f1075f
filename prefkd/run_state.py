"""What a resume must find unchanged besides the settings: the run's fingerprint.

Each checkpoint's trainer_state.json holds it; `resume=true` computes it again before any model
loads and refuses a difference, naming it (train.check_resume_settings; resume_allow_changes=true
accepts it and says what changed). A resume that passes is bitwise the uninterrupted run on the
same machine; one that is told about a change is not, and says so.

- code: the checkout's git commit, where it is a git checkout (else absent).
- data.<name>.<split>: the data module's fingerprint of each split (files and options).
- models.<role>: for the policy's start and each frozen model the run loads, the checkpoint it
  resolved to (a run directory's LATEST is read when the run starts) and that checkpoint's weights
  fingerprint. A teacher whose LATEST moved (resumed, retrained, a reused study stage) between the
  interruption and the resume would otherwise be swapped in silently.
- environment: the device (a GPU's name), the processes, the threads per process and the CPU
  kernels torch dispatches to (AVX2 / AVX512: they round differently, which is what moves long
  CPU runs between machines).
"""
import os
import subprocess
from typing import Dict, List, Optional

import torch

import utils
from prefkd.data import loading as data_loading
from prefkd import models
from prefkd import output_cache

KEY = "fingerprint"  # in trainer_state.json


def code_version() -> Optional[str]:
    """The git commit of the checkout, or None when it is not a git checkout (an installed copy)."""
    try:
        out = subprocess.run(["git", "-C", utils.REPO_DIR, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def data_fingerprints(cfg) -> Dict[str, str]:
    return {f"data.{name}.{split}": data_loading.load_dataset_checked(name, split, cfg.get("data"), silent=True)[1]
            for name in cfg.datasets for split in ("train", "test")}


def model_fingerprints(cfg, plan) -> Dict[str, Dict]:
    """{models.<role>: {source, weights}} of the policy's start and of each frozen model `plan` loads."""
    roles = ["policy"] + (["teacher"] if plan.teacher and "teacher" not in plan.caches else []) \
        + (["teacher_reference"] if plan.teacher_reference and "teacher" not in plan.caches else [])
    out = {}
    for role in roles:
        src = models.origin(cfg, role)
        fp = output_cache.model_fingerprint(src.model_cfg, src.archive, src.seed, src.dtype)
        out[f"models.{role}"] = {"source": fp["source"], "weights": fp["weights"]}
    for kind, path in plan.caches.items():  # a cache stands in for its model: its manifest is what is read
        out[f"caches.{kind}"] = {"source": os.path.abspath(str(path)), "weights": cache_fingerprint(path)}
    return out


def cache_fingerprint(path: str) -> Optional[str]:
    import hashlib
    manifest = os.path.join(str(path), "manifest.json")
    if not os.path.isfile(manifest):
        return None
    with open(manifest, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:24]


def environment(cfg, processes: int) -> Dict:
    """The device, processes, threads per process (as the workers will set them) and CPU kernels."""
    device = models.pick_device(cfg)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if cfg.get("num_threads"):
        threads = int(cfg.num_threads)
    elif cfg.trainer.name == "FSDPTrainer":
        # the rule train.spawned_worker applies, computed alike in the launcher and in its workers
        threads = max(1, (os.cpu_count() or 1) // processes)
    else:
        threads = torch.get_num_threads()
    return {"device": name, "processes": processes, "threads": threads,
            "cpu_kernels": torch.backends.cpu.get_cpu_capability()}


def fingerprint(cfg, plan, processes: int) -> Dict:
    """The run's fingerprint now (see the module docstring); flat keys."""
    out: Dict = {"code": code_version()}
    out.update(data_fingerprints(cfg))
    out.update(model_fingerprints(cfg, plan))
    out.update({f"environment.{k}": v for k, v in environment(cfg, processes).items()})
    return out


def changes(saved: Dict, now: Dict) -> List[str]:
    """What differs between a checkpoint's fingerprint and the run's now, one line per key. A key the
    checkpoint does not hold (an older checkpoint, or code version unknown then) is no change."""
    lines = []
    for key in sorted(set(saved) & set(now)):
        if saved[key] is not None and saved[key] != now[key]:
            lines.append(f"{KEY}.{key}: {describe(saved[key])} in the checkpoint, {describe(now[key])} now")
    return lines


def describe(value) -> str:
    if isinstance(value, dict) and "source" in value:
        return f"{value['source']} (weights {value['weights']})"
    return repr(value)
