"""The Hugging Face hub from here: which models, tokenizers and data sets a run would download,
whether the hub can be reached, and the refusal (naming the keys that point at a local copy)
before anything loads, offline.
"""
import os
import socket
from typing import List

from huggingface_hub import try_to_load_from_cache

from prefkd import loss_spec, tokenizer_facts
from prefkd.data.sources import SOURCES


def _needs_teacher(cfg) -> bool:
    return loss_spec.get_loss(cfg.loss.name).teacher_need(cfg.loss)


def _is_local(path) -> bool:
    """A local path, or a shipped tokenizer ("embedded", "embedded_bpe": tokenizer_facts.get_tokenizer)."""
    return path is None or path in tokenizer_facts.EMBEDDED_TOKENIZERS or os.path.exists(os.path.expanduser(str(path)))


def _hub_cached(repo: str, filename: str, repo_type: str = "model") -> bool:
    try:
        return isinstance(try_to_load_from_cache(repo, filename, repo_type=repo_type), str)
    except Exception:
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def missing_local_paths(cfg) -> List[str]:
    """`key=path` of every model or tokenizer the run names by a filesystem path (absolute, or
    starting with ~ or .) that does not exist: never a hub id, so refused whether or not the hub is up."""
    out = []
    groups = [("model", cfg.model)] + ([("teacher", cfg.teacher)] if _needs_teacher(cfg) else [])
    for group, mcfg in groups:
        for key in ("name_or_path", "tokenizer"):
            value = None if key == "name_or_path" and mcfg.get("archive") else mcfg.get(key)
            if value and str(value).startswith(("/", "~", ".")) and not _is_local(value):
                out.append(f"{group}.{key}={value}")
    return out


def hub_needs(cfg, data_names: List[str]) -> List[str]:
    """`key=hub id` of every model, tokenizer and data set this run would download (not a local path,
    not in the local hub cache)."""
    needs = []
    groups = [("model", cfg.model)] + ([("teacher", cfg.teacher)] if _needs_teacher(cfg) else [])
    for group, mcfg in groups:
        if mcfg.get("archive"):
            continue  # a checkpoint of ours: loaded from disk
        for key, file in (("name_or_path", "config.json"), ("tokenizer", "tokenizer_config.json")):
            value = mcfg.get(key)
            if value and not _is_local(value) and not _hub_cached(str(value), file):
                needs.append(f"{group}.{key}={value}")
    paths = (cfg.get("data") or {}).get("paths") or {}
    for name in data_names:
        src = SOURCES.get(name)
        if src is not None and src.hub and not paths.get(name) and not _hub_cached(src.hub, "README.md", "dataset"):
            needs.append(f"data.paths.{name} (hub data set {src.hub})")
    return needs


def check_hub_access(cfg) -> None:
    """Offline (no route to the hub, or HF_HUB_OFFLINE=1), a run that would download a model or data
    set is refused naming the keys that point at a local copy, before anything loads."""
    missing = missing_local_paths(cfg)
    if missing:
        raise ValueError("no such local directory: " + "; ".join(missing) + ". A model converted from a GGUF "
                         "file (config/model/smollm2_135m.yaml) is written by `python scripts/import_gguf.py` "
                         "(docs/configuration.md#quantised-community-models)")
    needs = hub_needs(cfg, list(cfg.get("datasets") or []))
    if needs and not _hub_reachable():
        raise ValueError("the Hugging Face hub cannot be reached from here, and this run would download: "
                         + "; ".join(needs) + ". Point each key at a local copy (a directory or file), "
                         "e.g. model.name_or_path=/models/Llama-3.2-1B model.tokenizer=/models/Llama-3.2-1B "
                         "data.paths.dpomix=/data/dpo-mix-7k")
