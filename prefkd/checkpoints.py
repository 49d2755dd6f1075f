"""Checkpoint I/O: writing, publishing, pruning, integrity and loading of training checkpoints.

``<run>/step-XXXXXXXX/`` is a Hugging Face directory (config.json, model.safetensors, tokenizer
files) that ``AutoModelForCausalLM.from_pretrained`` loads with no code of ours, plus
``optimizer.pt``, ``trainer_state.json`` and one RNG file per rank. It is written under a
temporary name; once every file is on disk a ``COMPLETE`` manifest records their sizes, the
directory is renamed into place and ``<run>/LATEST`` is replaced atomically. A step is saved
once; the directory LATEST names is never deleted or rewritten in place; a checkpoint whose
files do not match its manifest is not complete, and ``resume=true`` then falls back to the
newest complete one. A crash mid-save leaves LATEST pointing at the previous checkpoint; a
failed write (a full disk) removes its partial directory.

A checkpoint is complete when its COMPLETE manifest exists and every file it lists is there with
the size recorded. The manifest is written last, after every file has been flushed to disk, so
a crash at any point leaves either no manifest or a true one; a file truncated or removed later
is caught by its size.
"""
import json
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch

import utils
from prefkd import optimizer_state
from utils import RunError, atomic_write_json, atomic_write_text, fsync_dir, rank0_print, remove_tree
from prefkd import adapters


class CheckpointWriteError(RunError):
    """A checkpoint could not be written (a full disk, say); its partial directory is removed."""


def resolve_checkpoint(path: str) -> str:
    """Accept a checkpoint directory, a run directory, or a run's LATEST pointer; return the
    checkpoint directory. LATEST is a text file naming the newest complete checkpoint."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path) and os.path.basename(path) == "LATEST":
        with open(path) as f:
            return os.path.join(os.path.dirname(path), f.read().strip())
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "LATEST")):
        return resolve_checkpoint(os.path.join(path, "LATEST"))
    return path


MANIFEST = "COMPLETE"


# What a training checkpoint must hold besides the per-rank RNG files: the training state, and
# the model's files or (a LoRA run, prefkd/adapters.py) its adapter's, or both.
REQUIRED_FILES = ("optimizer.pt", "trainer_state.json")
WEIGHT_FILES = (("config.json", "model.safetensors"), ("adapter/adapter_config.json", "adapter/adapter_model.safetensors"))


def _files_of(ckpt: str) -> List[str]:
    """The files of a checkpoint directory and of its subdirectories (the adapter's), relative."""
    out = []
    for root, dirs, names in os.walk(ckpt):
        dirs.sort()
        out += [os.path.relpath(os.path.join(root, n), ckpt) for n in sorted(names)]
    return out


def write_manifest(ckpt: str) -> None:
    """Flush every file of `ckpt` to disk, then record their sizes in its manifest."""
    sizes = {}
    for name in _files_of(ckpt):
        full = os.path.join(ckpt, name)
        if name == MANIFEST:
            continue
        with open(full, "rb") as f:
            os.fsync(f.fileno())
        sizes[name] = os.path.getsize(full)
    for sub in {os.path.dirname(n) for n in sizes if os.path.dirname(n)}:
        fsync_dir(os.path.join(ckpt, sub))
    atomic_write_json(os.path.join(ckpt, MANIFEST), {"files": sizes})
    fsync_dir(ckpt)


def checkpoint_problem(ckpt: str) -> Optional[str]:
    """None if `ckpt` is a complete training checkpoint, else what is wrong with it."""
    if not os.path.isdir(ckpt):
        return "missing"
    try:
        with open(os.path.join(ckpt, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no valid {MANIFEST} manifest (the save did not finish)"
    for name in REQUIRED_FILES:
        if name not in files:
            return f"its manifest lists no {name}"
    if not any(all(n in files for n in group) for group in WEIGHT_FILES):
        return "its manifest lists no model.safetensors (nor an adapter's files)"
    for name, size in files.items():
        full = os.path.join(ckpt, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if os.path.getsize(full) != size:
            return f"{name} has {os.path.getsize(full)} bytes, {size} were written (truncated or replaced)"
    return None


def is_complete_checkpoint(path: str) -> bool:
    return checkpoint_problem(path) is None


def list_checkpoints(run_dir: str):
    """step-* directory names of a run, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(d for d in os.listdir(run_dir) if d.startswith("step-") and os.path.isdir(os.path.join(run_dir, d)))


def latest_name(run_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(run_dir, "LATEST")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def agreed_resume_checkpoint(run_dir: str, log=print) -> Optional[str]:
    """`find_resume_checkpoint` as rank 0 sees it, on every rank: each rank choosing on its own
    could pick different checkpoints (LATEST replaced, or a file still being flushed, between
    their reads)."""
    return utils.broadcast_object(find_resume_checkpoint(run_dir, log) if utils.get_rank() == 0 else None)


def find_resume_checkpoint(run_dir: str, log=print) -> Optional[str]:
    """The checkpoint `resume=true` continues from: the one LATEST names if it is complete,
    else (with a message saying why) the newest complete one; None if there is none."""
    named = latest_name(run_dir)
    if named is not None:
        problem = checkpoint_problem(os.path.join(run_dir, named))
        if problem is None:
            return os.path.join(run_dir, named)
        log(f"warning: {run_dir}/LATEST names {named}, which is damaged ({problem}); "
            "falling back to the newest complete checkpoint")
    for name in reversed(list_checkpoints(run_dir)):
        if name != named and checkpoint_problem(os.path.join(run_dir, name)) is None:
            if named is not None:
                log(f"resuming from {name}")
            return os.path.join(run_dir, name)
    if named is not None:
        log(f"warning: {run_dir} holds no complete checkpoint: starting from the beginning")
    return None


def safetensors_problem(path: str) -> Optional[str]:
    """None if `path` is a readable safetensors file (header parses, data as long as the header
    says), else what is wrong. Reads only the header."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                return f"header length {n} does not fit in the file's {size} bytes (truncated or not safetensors)"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"unreadable safetensors header ({type(e).__name__}: {e})"
    if 8 + n + end != size:
        return f"the header describes {8 + n + end} bytes, the file has {size} (truncated)"
    return None


def model_dir_problem(path: str) -> Optional[str]:
    """None if `path` looks like a loadable model directory (or an adapter directory naming its
    base, prefkd/adapters.py), else what is wrong (naming the file)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return _adapter_dir_problem(path)
    try:
        with open(os.path.join(path, "config.json")) as f:
            json.load(f)
    except ValueError as e:
        return f"{os.path.join(path, 'config.json')} is not valid JSON ({e})"
    tensors = [n for n in os.listdir(path) if n.endswith(".safetensors")]
    for name in sorted(tensors):
        problem = safetensors_problem(os.path.join(path, name))
        if problem:
            return f"{os.path.join(path, name)}: {problem}"
    if not tensors and not any(n.endswith((".bin", ".pt")) for n in os.listdir(path)):
        return f"no weights (*.safetensors) at {path}"
    return None




def _adapter_dir_problem(path: str) -> Optional[str]:
    where = adapters.location(path)
    if where is None:
        return f"no config.json at {path}"
    weights = os.path.join(where, adapters.WEIGHTS_FILE)
    problem = safetensors_problem(weights) if os.path.isfile(weights) else f"no {weights}"
    if problem:
        return f"{weights}: {problem}" if os.path.isfile(weights) else problem
    try:
        base = adapters.base_of(where)
    except ValueError as e:
        return f"{os.path.join(where, adapters.CONFIG_FILE)} is not valid JSON ({e})"
    if not base:
        return (f"{where} holds only an adapter over a randomly initialised model, which it cannot name: use the "
                "run's final checkpoint (it holds the merged model) or train with model.lora.save_merged=true")
    return None


# ------------------------------------------------------------------ writing

def write_files(tmp: str, model_sd: Optional[Dict], optim_blob: Dict, model, tokenizer, trainer_state: Dict) -> None:
    """Rank 0's files of a checkpoint, into the temporary directory `tmp`: the weights as
    safetensors (a tied output layer saved once, as Hugging Face loads it), the model and
    generation configs, the tokenizer, optimizer.pt, trainer_state.json; then the manifest.
    model_sd None: no model files (a LoRA checkpoint holding only its adapter)."""
    from safetensors.torch import save_file
    if model_sd is not None:
        config = model.config if hasattr(model, "config") else model.module.config
        if getattr(config, "tie_word_embeddings", False):
            model_sd.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in model_sd.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    optimizer_state.write(tmp, optim_blob)
    atomic_write_json(os.path.join(tmp, "trainer_state.json"), trainer_state)
    write_manifest(tmp)


def state_is_finite(model_sd: Dict, optim_sd: Dict) -> bool:
    """Every floating tensor of the model and optimizer state dicts is finite."""
    return utils.all_finite(model_sd.values()) and utils.all_finite(
        v for st in optim_sd.get("state", {}).values() for v in (st.values() if isinstance(st, dict) else []))


def save(run_dir: str, step: int, rank: int, agree: Callable[[List[bool]], List[bool]],
         write_rank0: Callable[[str], None], keep: int, rank_state: Optional[Dict] = None) -> str:
    """Write <run>/step-N (N = step): every rank's RNG file, its `rank_state` ({name: object}, each
    non-empty one as <name>_rank<r>.pt) and rank 0's files (`write_rank0(tmp)`)
    into a temporary directory, then rename it into place, point LATEST at it and prune old
    checkpoints (keeping `keep`). On a failed write (a full disk) on any rank the partial
    directory is removed, LATEST is left as it was and CheckpointWriteError says why.
    `agree(flags)`: each flag true on every rank if true on any. Returns the directory."""
    name = f"step-{step:08d}"
    tmp = os.path.join(run_dir, f".{name}.tmp")
    failure = None
    # Every write below is followed by `agree`, never by a bare barrier on the success path only:
    # a rank that raised before a barrier the others wait at would hang the whole job. Any
    # exception counts (safetensors raises its own SafetensorError, not an OSError).
    if rank == 0:
        failure = _attempt(lambda: (remove_tree(tmp), os.makedirs(tmp)))
    if not agree([failure is not None])[0]:
        failure = _attempt(lambda: _write_rank_files(tmp, rank, rank_state))
    # Every rank's RNG file is closed before rank 0 writes the manifest, which records each file's
    # size: without this meeting a slow rank's file could be listed short, and a good checkpoint
    # would later read as damaged.
    if not agree([failure is not None])[0] and rank == 0:
        failure = _attempt(lambda: write_rank0(tmp))
    if agree([failure is not None])[0]:
        if rank == 0:
            remove_tree(tmp)
        cause = failure or RuntimeError("a write failed on another rank")
        plain = utils.describe_write_error(cause, run_dir)
        raise CheckpointWriteError(
            f"writing checkpoint {run_dir}/{name} failed: {plain or f'{type(cause).__name__}: {cause}'}; "
            f"the partial checkpoint was removed and LATEST still names {latest_name(run_dir)}") from failure
    if rank == 0:
        failure = _attempt(lambda: publish(run_dir, tmp, name))
        if failure is not None:
            remove_tree(tmp)
    if agree([failure is not None])[0]:
        plain = utils.describe_write_error(failure, run_dir) if failure is not None else None
        raise CheckpointWriteError(f"publishing checkpoint {run_dir}/{name} failed: "
                                   f"{plain or failure or 'on rank 0'}; LATEST names {latest_name(run_dir)}") from failure
    if rank == 0:
        prune(run_dir, keep=name, n_keep=keep)
        rank0_print(f"saved {os.path.join(run_dir, name)}")
    utils.barrier()
    return os.path.join(run_dir, name)


def _attempt(write: Callable[[], object]) -> Optional[BaseException]:
    """Run `write`; the exception it raised, or None. KeyboardInterrupt still propagates."""
    try:
        write()
    except Exception as e:  # noqa: BLE001 - any failed write is reported through `agree`
        return e
    return None


def _write_rank_files(tmp: str, rank: int, rank_state: Optional[Dict]) -> None:
    """This rank's RNG file and its non-empty `rank_state` objects, each as <name>_rank<r>.pt."""
    torch.save(utils.get_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    for key, obj in (rank_state or {}).items():
        if obj:
            torch.save(obj, os.path.join(tmp, f"{key}_rank{rank}.pt"))


def publish(run_dir: str, tmp: str, name: str) -> None:
    """Rename the finished `tmp` to <run>/<name> and point LATEST at it. A directory already
    called <name> (an abandoned or damaged attempt at this step) is moved aside first, and
    if LATEST names it, LATEST is first pointed at the newest complete checkpoint, so LATEST
    never names a directory that is being replaced."""
    final = os.path.join(run_dir, name)
    aside = None
    if os.path.exists(final):
        if latest_name(run_dir) == name:
            others = [c for c in list_checkpoints(run_dir)
                      if c != name and is_complete_checkpoint(os.path.join(run_dir, c))]
            if others:
                atomic_write_text(os.path.join(run_dir, "LATEST"), others[-1] + "\n")
            else:
                os.remove(os.path.join(run_dir, "LATEST"))
        aside = os.path.join(run_dir, f".{name}.old.{os.getpid()}")
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(run_dir)
    atomic_write_text(os.path.join(run_dir, "LATEST"), name + "\n")
    if aside:
        remove_tree(aside)


def prune(run_dir: str, keep: str, n_keep: int) -> None:
    """Keep the newest n_keep complete checkpoints (always `keep`, the one LATEST names);
    incomplete directories other than those are debris of crashed saves."""
    n_keep = max(1, n_keep or 1)
    complete = [d for d in list_checkpoints(run_dir) if is_complete_checkpoint(os.path.join(run_dir, d))]
    for d in complete[:-n_keep]:
        if d != keep:
            remove_tree(os.path.join(run_dir, d))


def check_finished_run(key: str, path) -> None:
    """Refuse `key`=`path` unless it is a run that reached its end (holds DONE), naming the key."""
    if path is not None and not os.path.isfile(os.path.join(str(path), "DONE")):
        raise ValueError(f"{key}={path}: " + ("not a finished run (no DONE in it)" if os.path.isdir(str(path)) else
                         "no such run directory") + "; name a finished run of that stage, or leave the key out "
                         "to train the stage here")


def mark_done(run_dir: str, step: int, examples_seen: int, n_examples, n_epochs) -> None:
    """<run>/DONE marks a run that reached its end: `resume=true` on it is then a no-op (unless
    it asks for more examples or epochs)."""
    atomic_write_json(os.path.join(run_dir, "DONE"), {"step": step, "examples_seen": examples_seen,
                                                      "n_examples": n_examples, "n_epochs": n_epochs})


# ------------------------------------------------------------------ loading

def load_state(ckpt: str, rank: int, world_size: int, rank_state: Sequence[str] = ()) -> Dict:
    """A checkpoint's training state for a resume: {step, examples_seen} and, for each name of
    `rank_state`, the list of every rank's saved object (the weights are loaded when the policy is
    built, the optimizer and scheduler by prefkd/optimizer_state.py); this rank's RNG state is restored."""
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        state = json.load(f)
    if state["world_size"] != world_size:
        rank0_print(f"note: resuming a {state['world_size']}-process run with {world_size} processes; "
                    "the data order is global, so the losses stay those of the same global batches")
    rng = os.path.join(ckpt, f"rng_rank{rank}.pt")
    if os.path.exists(rng):
        utils.set_rng_state(torch.load(rng, weights_only=False))
    out = {"step": state["step"], "examples_seen": state["examples_seen"]}
    for key in rank_state:
        files = sorted(n for n in os.listdir(ckpt) if n.startswith(f"{key}_rank") and n.endswith(".pt"))
        out[key] = [torch.load(os.path.join(ckpt, n), weights_only=False) for n in files]
    return out


def trim_metrics(path: str, step: int) -> None:
    """On resume, drop the records of steps beyond the checkpoint (they are redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except ValueError:
            pass  # a line cut short by a crash
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))
        rank0_print(f"metrics.jsonl: {len(lines) - len(kept)} records beyond step {step} removed (they are redone)")
