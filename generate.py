"""Generate responses with a checkpoint for the prompts of a data set split, and write them
as a data set any loss can train on (TRL's standard prompt/completion format, read back
with `datasets=[local] data.local.path=<out>`).

    python generate.py checkpoint=runs/pipeline/teacher_dpo/LATEST out=teacher_gen.jsonl   # greedy, train split
    python generate.py checkpoint=<ckpt> datasets=[dpomix] split=train out=gen.jsonl n=2000 \
        do_sample=true temperature=0.9 max_new_tokens=512
    torchrun --nproc_per_node=8 generate.py checkpoint=<ckpt> out=gen.jsonl                # data parallel
    torchrun --nproc_per_node=8 generate.py checkpoint=<ckpt> out=gen.jsonl fsdp=true      # sharded weights

Uses: seqkd trains on a teacher's generations; on-policy preference data starts from a
student's. Every setting defaults to the checkpoint's own run config (data sets, data
options, lengths) where it has one; `key=value` arguments override.

Resumable: rows are appended to `<out>.partial` in prompt order and flushed batch by batch;
a re-run continues after the last complete row, and the file is renamed to `<out>` when
every prompt is done (an existing complete `<out>` is left alone). Sampling is seeded per
row, so a resumed or re-run generation is identical to an uninterrupted one.

A complete file has its settings beside it (`<out>.meta.json`: checkpoint, data, decoding),
which a training run that reads it (`generations=[<file>, ...]`) checks.

Distributed: under torchrun each rank generates every world_size-th batch and the rows are
merged in prompt order; with `fsdp=true` the model is sharded with FSDP2 like the trainer's
and every rank runs the same number of generate calls (synced_gpus).
"""
import json
import os
import sys
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf

import utils
from prefkd import checkpoints, config_compose, models, tokenizer_facts
from prefkd.data import rows as data_rows
from prefkd.data import loading as data_loading
from prefkd.data import encoding

def parse_args(argv: List[str]):
    """The settings (config/generate.yaml) for key=value arguments, completed from the
    checkpoint's run config and checked; a ValueError names the bad argument."""
    cfg = config_compose.compose_command("generate", argv)
    if not cfg.checkpoint:
        raise ValueError("name a checkpoint: python generate.py checkpoint=<run dir, LATEST or step-* dir> out=<file>")
    if not cfg.out:
        raise ValueError("out=<file.jsonl> is required")
    ckpt = checkpoints.resolve_checkpoint(cfg.checkpoint)
    problem = checkpoints.model_dir_problem(ckpt) if os.path.isdir(ckpt) else f"no directory {ckpt}"
    if problem:
        raise ValueError(f"checkpoint {cfg.checkpoint!r} is not usable: {problem}")
    run = run_config(ckpt)
    cfg.datasets = list(cfg.datasets or (run.get("datasets") if run else None) or ["embedded"])
    cfg.data = OmegaConf.merge((run.get("data") if run else None) or {}, cfg.data or {})
    for key, fallback in (("max_prompt_length", 24), ("truncation_mode", "keep_end")):
        if cfg[key] is None:
            cfg[key] = run.get(key, fallback) if run else fallback
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = (run["max_length"] - run["max_prompt_length"]) if run and "max_length" in run else 256
    check_settings(cfg)
    cfg.checkpoint = ckpt
    return cfg


def check_settings(cfg) -> None:
    """Each setting within its range, named when it is not."""
    if cfg.split not in data_rows.SPLITS:
        raise ValueError(f"split={cfg.split!r}: use one of {list(data_rows.SPLITS)}")
    for key in ("batch_size", "max_new_tokens", "max_prompt_length"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key}={cfg[key]!r} must be a whole number >= 1")
    if cfg.n is not None and (not isinstance(cfg.n, int) or cfg.n < 1):
        raise ValueError(f"n={cfg.n!r} must be a whole number >= 1 (or null: every prompt)")
    if not (isinstance(cfg.temperature, (int, float)) and cfg.temperature > 0):
        raise ValueError(f"temperature={cfg.temperature!r} must be > 0")
    if not (isinstance(cfg.top_p, (int, float)) and 0 < cfg.top_p <= 1):
        raise ValueError(f"top_p={cfg.top_p!r} must be in (0, 1]")
    if cfg.truncation_mode not in encoding.TRUNCATION_MODES:
        raise ValueError(f"truncation_mode={cfg.truncation_mode!r}: use one of {list(encoding.TRUNCATION_MODES)}")


def run_config(ckpt: str) -> Optional[Dict]:
    """The training config a checkpoint of ours records (None for a foreign HF directory)."""
    path = os.path.join(ckpt, "trainer_state.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("config")


def unique_prompts(cfg) -> List[Dict]:
    """Examples of the split with distinct prompts, in data set order (a prompt shared by
    several pairs is generated for once)."""
    seen, out = set(), []
    for name in cfg.datasets:
        for ex in data_loading.get_dataset(name, cfg.split, silent=True, options=cfg.data):
            key = json.dumps(ex["prompt"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(ex)
    return out[:cfg.n] if cfg.n else out


def prompt_ids(ex: Dict, tokenizer, cfg) -> List[int]:
    text, _ = encoding.format_example(ex, tokenizer, data_loading.data_options(cfg.data)["chat_template"])
    ids = encoding.encode_text(text, {}, tokenizer)["prompt"]
    head = ids[:1] if tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id] else []
    return head + encoding._keep(ids[len(head):], cfg.max_prompt_length - len(head), cfg.truncation_mode)


def completion_row(ex: Dict, text: str, generator: str) -> Dict:
    """TRL's standard format: a string completion after a string prompt; an assistant
    message after a conversational prompt."""
    completion = [{"role": "assistant", "content": text}] if ex.get("chat") else text
    return {"prompt": ex["prompt"], "completion": completion, "generator": generator}


def load_model(cfg, device):
    """The checkpoint's model, on `device`, or sharded with FSDP2 across the processes (fsdp=true
    under torchrun) by the trainer's sharding rule (models.shard_fsdp)."""
    model = models.load_checkpoint(cfg.checkpoint, utils.get_dtype(cfg.dtype))[0]
    if cfg.fsdp and utils.is_distributed():
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (utils.get_world_size(),))
        return models.shard_fsdp(model, mesh, None, what=f"fsdp=true: {cfg.checkpoint}")
    return model.to(device)


@torch.no_grad()
def generate_rows(model, tokenizer, batch: List[Dict], cfg, first_index: int, device, synced: bool) -> List[str]:
    ids = [prompt_ids(ex, tokenizer, cfg) for ex in batch]
    pad = tokenizer_facts.pad_id(tokenizer)
    # left padding: every prompt ends where generation starts
    input_ids = utils.pad_sequences(ids, pad, left=True).to(device)
    mask = utils.pad_sequences([[1] * len(i) for i in ids], 0, left=True).to(device)
    torch.manual_seed(cfg.seed * 1_000_003 + first_index)  # per-batch seed: resumes reproduce
    kwargs = {"do_sample": True, "temperature": float(cfg.temperature), "top_p": float(cfg.top_p)} \
        if cfg.do_sample else {"do_sample": False}
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                         pad_token_id=pad, synced_gpus=synced, **kwargs)
    # Cut each row at its first EOS (what follows is padding); special tokens before it are kept
    # in the text, so that a trainer reading the file re-encodes the tokens the model generated.
    texts = []
    for row in out[:, input_ids.shape[1]:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=False))
    return texts


def count_complete_rows(path: str) -> int:
    """Rows of a partial output that are whole JSON lines; a torn last line is cut off."""
    if not os.path.exists(path):
        return 0
    good, size = 0, 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                json.loads(line)
            except ValueError:
                break
            good += 1
            size += len(line)
    if size != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(size)
    return good


def meta_path(out: str) -> str:
    """The settings file written beside a complete generation file."""
    return out + ".meta.json"


def generation_meta(cfg, rows: int) -> Dict:
    """What produced a generation file: a trainer that reads it (`generations=`) checks the
    checkpoint and the decoding against the loss's own before using a row."""
    keys = ("datasets", "split", "n", "do_sample", "temperature", "top_p", "max_new_tokens",
            "max_prompt_length", "truncation_mode", "seed", "dtype")
    meta = {k: OmegaConf.to_container(cfg[k]) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in keys}
    meta.update({"checkpoint": os.path.abspath(cfg.checkpoint), "rows": rows})
    return meta


def generate(cfg) -> str:
    """Write the generations of cfg.checkpoint for the split's prompts to cfg.out; returns it."""
    out = os.path.abspath(cfg.out)
    rank, world = utils.get_rank(), utils.get_world_size()
    if os.path.exists(out):
        utils.rank0_print(f"{out} exists: nothing to generate (remove it to generate again)")
        return out
    device = models.pick_device(None, rank)
    tokenizer = tokenizer_facts.get_tokenizer(cfg.checkpoint)
    examples = unique_prompts(cfg)
    partial = out + ".partial"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    done = utils.broadcast_object(count_complete_rows(partial) if rank == 0 else None)
    utils.rank0_print(f"generate: {len(examples)} prompts of {cfg.datasets}/{cfg.split}; {done} already done; "
                      f"{'sampled' if cfg.do_sample else 'greedy'}, max_new_tokens={cfg.max_new_tokens}")
    model = load_model(cfg, device)
    synced = bool(cfg.fsdp and world > 1)
    generator = os.path.basename(os.path.dirname(cfg.checkpoint)) or os.path.basename(cfg.checkpoint)
    bs = cfg.batch_size
    starts = list(range(done, len(examples), bs))
    # rounds of world_size batches: rank r takes batch r of each round; all ranks run the same
    # number of generate calls (an empty batch repeats the last one and is dropped: FSDP needs it)
    with open(partial, "a") if rank == 0 else open(os.devnull, "w") as f:
        for r in range(0, len(starts), world):
            mine = starts[r + rank] if r + rank < len(starts) else None
            s = mine if mine is not None else starts[r]
            batch = examples[s:s + bs]
            texts = generate_rows(model, tokenizer, batch, cfg, s, device, synced)
            rows = [completion_row(ex, t, generator) for ex, t in zip(batch, texts)] if mine is not None else []
            gathered = utils.gather_objects(rows)
            if rank == 0:
                for rank_rows in gathered:
                    for row in rank_rows:
                        f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
    utils.barrier()
    if rank == 0:
        # the settings beside the rows first, so that a complete <out> always has them
        utils.atomic_write_json(meta_path(out), generation_meta(cfg, len(examples)))
        os.replace(partial, out)
        utils.rank0_print(f"wrote {len(examples)} rows to {out}")
    utils.barrier()
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "WORLD_SIZE" in os.environ and not utils.is_distributed():
        import torch.distributed as dist
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    clean = False
    try:
        generate(cfg)
        clean = True
    finally:
        utils.close_process_group(clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
