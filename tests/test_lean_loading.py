"""Lean loading under FSDP (prefkd/lean_loading.py): 2 gloo processes on the CPU build every model on
the meta device, shard it and materialise only their own shards; the gathered full state dict
must equal, bit for bit, what the single-process path (from_pretrained / seeded from_config)
builds. One spawn covers every case (~15 s): our checkpoint with tied embeddings (fp32 and
cast to bf16), a sharded multi-file hub-style directory (index json) loaded by name_or_path,
random init from init_config, a checkpoint whose names do not match (broadcast fallback), and a
LoRA policy over our checkpoint and over random init (peft's names, the adapters' seeded weights).
The FSDP training runs on the lean path are tests/test_distributed.py."""
import os
import socket

import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from prefkd import adapters, models
from prefkd import tokenizer_facts

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
INIT = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 67, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def model_cfg(**kw):
    base = {"name": "t", "name_or_path": None, "tokenizer": "embedded", "init_config": dict(INIT),
            "archive": None, "block_name": "LlamaDecoderLayer", "policy_dtype": "float32",
            "reference_dtype": "float32", "fsdp_policy_mp": None}
    base.update(kw)
    return OmegaConf.create(base)


def make_checkpoints(root):
    """(archive dir: our format, tied embeddings; sharded hub-style dir with an index; a
    directory whose tensor names lack the 'model.' prefix)."""
    from safetensors.torch import save_file
    tok = tokenizer_facts.get_tokenizer("embedded")
    tied = models._build_full_model(model_cfg(init_config=dict(INIT, tie_word_embeddings=True)), tok,
                                      torch.float32, seed=3)
    archive = os.path.join(root, "archive")
    os.makedirs(archive)
    sd = {k: v.contiguous() for k, v in tied.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, os.path.join(archive, "model.safetensors"), metadata={"format": "pt"})
    tied.config.save_pretrained(archive)
    untied = models._build_full_model(model_cfg(), tok, torch.bfloat16, seed=4)
    hub = os.path.join(root, "hub")
    untied.save_pretrained(hub, max_shard_size="20KB")
    renamed = os.path.join(root, "renamed")
    os.makedirs(renamed)
    save_file({k.replace("model.", "", 1): v.contiguous() for k, v in untied.state_dict().items()},
              os.path.join(renamed, "model.safetensors"), metadata={"format": "pt"})
    untied.config.save_pretrained(renamed)
    return archive, hub, renamed


CASES = [  # (name, model cfg overrides, dtype, archive key, seed, expected strategy)
    ("archive-tied-fp32", {}, "float32", "archive", 0, "slices"),
    ("archive-tied-bf16", {}, "bfloat16", "archive", 0, "slices"),
    ("hub-sharded-index", {"name_or_path": "hub"}, "float32", None, 0, "slices"),
    ("random-init", {}, "float32", None, 7, "broadcast"),
    ("random-init-bf16", {}, "bfloat16", None, 8, "broadcast"),
    ("renamed-fallback", {}, "float32", "renamed", 0, "broadcast"),
    # a LoRA policy (prefkd/adapters.py): the base read under its peft names, the adapters' seeded
    # initial weights filled on every rank
    ("lora-archive", {"lora": LORA}, "float32", "archive", 0, "slices"),
    ("lora-random-init", {"lora": LORA}, "float32", None, 9, "broadcast"),
]


def worker(rank, world, port, root, paths, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from prefkd import lean_loading
    import trainers
    import utils
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tok = tokenizer_facts.get_tokenizer("embedded")

        class Shell:  # what FSDPTrainer.wrap needs of the trainer
            mesh = init_device_mesh("cpu", (world,))
            device = torch.device("cpu")
        problems = []
        for name, over, dtype_name, archive_key, seed, expected in CASES:
            over = {k: paths[v] if k == "name_or_path" else v for k, v in over.items()}
            cfg = model_cfg(**over)
            dtype = getattr(torch, dtype_name)
            archive = paths[archive_key] if archive_key else None
            with lean_loading.deferred():
                model = models.build_model(cfg, tok, dtype, archive, seed)
                model = adapters.attach(model, cfg, seed) if "lora" in over else model
            source = model.lean_source
            assert all(p.is_meta for p in model.parameters())
            model = trainers.FSDPTrainer.wrap(Shell(), model, cfg, trainable=True)
            got = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            buffers = {k: b.clone() for k, b in model.named_buffers()}
            if rank == 0:
                ref = models._build_full_model(cfg, tok, dtype, archive, seed)
                ref = adapters.attach(ref, cfg, seed) if "lora" in over else ref
                want = ref.state_dict()
                if source.strategy != expected:
                    problems.append(f"{name}: strategy {source.strategy}, expected {expected}")
                if sorted(got) != sorted(want):
                    problems.append(f"{name}: keys differ {sorted(set(got) ^ set(want))}")
                for k in want:
                    if k in got and not (got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])):
                        problems.append(f"{name}: {k} differs ({got[k].dtype} vs {want[k].dtype})")
                for k, b in ref.named_buffers():
                    if not (k in buffers and buffers[k].dtype == b.dtype and torch.equal(buffers[k], b)):
                        problems.append(f"{name}: buffer {k} differs")
                tied = ref.config.tie_word_embeddings
                inner = model.get_base_model() if "lora" in over else model
                if tied != (inner.lm_head.weight is inner.model.embed_tokens.weight):
                    problems.append(f"{name}: tying {tied} not kept")
                if ref.training != model.training:
                    problems.append(f"{name}: training mode {model.training} vs {ref.training}")
            # the sharded model runs: same logits as the full model
            ids = torch.arange(1, 17).reshape(2, 8)
            logits = model(input_ids=ids).logits
            if rank == 0 and not torch.equal(logits, ref(input_ids=ids).logits):
                problems.append(f"{name}: logits differ")
        errors[rank] = "\n".join(problems)
    except Exception:  # reported by the parent
        import traceback
        errors[rank] = traceback.format_exc()
        utils.close_process_group(clean=False)
        raise
    from conftest import leave_process_group
    leave_process_group()


def test_lean_loading_two_ranks_equals_full_load(tmp_path):
    paths = dict(zip(("archive", "hub", "renamed"), make_checkpoints(str(tmp_path))))
    assert os.path.isfile(os.path.join(paths["hub"], "model.safetensors.index.json"))
    assert len([f for f in os.listdir(paths["hub"]) if f.endswith(".safetensors")]) > 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    errors = mp.Manager().dict()
    mp.start_processes(worker, args=(2, port, str(tmp_path), paths, errors), nprocs=2, start_method="spawn")
    assert errors.get(0) == "" and errors.get(1) == "", dict(errors)


def test_safetensors_rows_read(tmp_path):
    """SafetensorsFile.read_rows: byte-range reads equal safetensors' own loader, any dtype."""
    from safetensors.torch import save_file
    from prefkd import lean_loading
    tensors = {"a": torch.randn(7, 5), "b": torch.randn(3, 2, 4).bfloat16(), "c": torch.tensor(3.5),
               "d": torch.arange(10, dtype=torch.int64), "e": torch.randn(0, 3)}
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path)
    f = lean_loading.SafetensorsFile(path)
    try:
        assert torch.equal(f.read_rows("a", 2, 6), tensors["a"][2:6])
        assert torch.equal(f.read_rows("b", 1, 3), tensors["b"][1:3])
        assert torch.equal(f.read_rows("c", 0, 1), tensors["c"])
        assert torch.equal(f.read_rows("d", 9, 10), tensors["d"][9:])
        assert f.read_rows("a", 7, 7).shape == (0, 5)
    finally:
        f.close()
