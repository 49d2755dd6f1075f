"""generate.py: greedy and sampled generations of a checkpoint as a trainable data set;
resumable, reproducible, and the same under 2 processes as under one."""
import json
import os

import pytest
import torch

from conftest import leave_process_group, train_run

import generate
import utils
from prefkd import checkpoints
from prefkd import tokenizer_facts
from prefkd.data import loading as data_loading
from prefkd.data import encoding


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    os.environ.setdefault("PREFERENCE_DATA_CACHE", str(root / "cache"))
    run_dir, _ = train_run(root, ["loss=sft", "n_examples=256", "lr=3e-3", "eval_every=null", "exp_name=sft"])
    return run_dir


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_generate(args):
    cfg = generate.parse_args(args)
    return generate.generate(cfg)


def test_greedy_rows_are_the_models_own_greedy_answers_and_train_as_sft_data(tmp_path, sft_run):
    from transformers import AutoModelForCausalLM
    out = run_generate([f"checkpoint={sft_run}", f"out={tmp_path}/g.jsonl", "n=20", "batch_size=8", "split=test"])
    got = rows(out)
    test = data_loading.get_dataset("embedded", "test", silent=True)
    assert [r["prompt"] for r in got] == [ex["prompt"] for ex in test[:20]]
    # one prompt by hand, unpadded: the same greedy answer
    ckpt = checkpoints.resolve_checkpoint(sft_run)
    model, tok = AutoModelForCausalLM.from_pretrained(ckpt).eval(), tokenizer_facts.get_tokenizer(ckpt)
    for i in (0, 13):
        ids = torch.tensor([encoding.encode_text(got[i]["prompt"], {}, tok)["prompt"]])
        ref = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        assert got[i]["completion"] == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    # the run's lengths are the defaults: at most max_length - max_prompt_length = 24 new tokens
    assert 1 <= min(len(r["completion"]) for r in got) and max(len(r["completion"]) for r in got) <= 24
    assert all(r["generator"] == "sft" for r in got)
    # and the file is a data set: SFT on it trains (the loss falls)
    _, records = train_run(tmp_path, ["loss=sft", "datasets=[local]", f"data.local.path={out}", "n_examples=64",
                                      "lr=3e-3", "eval_every=null", "exp_name=on_gen", "data.test_fraction=0.2"])
    losses = [r["loss/train"] for r in records if "loss/train" in r]
    assert losses[-1] < losses[0]


def test_an_interrupted_sampled_generation_resumes_to_the_same_rows(tmp_path, sft_run):
    args = [f"checkpoint={sft_run}", "n=24", "batch_size=8", "do_sample=true", "temperature=0.9", "seed=3"]
    full = rows(run_generate(args + [f"out={tmp_path}/full.jsonl"]))
    assert len(full) == 24 and len({r["completion"] for r in full}) > 1
    # a crash after 8 rows, the 9th half-written
    partial = tmp_path / "cut.jsonl.partial"
    lines = [json.dumps(r) + "\n" for r in full[:8]]
    partial.write_text("".join(lines) + lines[0][:17])
    resumed = rows(run_generate(args + [f"out={tmp_path}/cut.jsonl"]))
    assert resumed == full
    assert not partial.exists()
    # another seed samples other rows
    other = rows(run_generate(args[:-1] + ["seed=4", f"out={tmp_path}/other.jsonl"]))
    assert other != full


@pytest.mark.parametrize("args,match", [
    (["out=x.jsonl"], "name a checkpoint"),
    (["checkpoint=/does/not/exist", "out=x.jsonl"], "not usable"),
    (["checkpoint={run}", "split=dev", "out=x.jsonl"], "split='dev'"),
    (["checkpoint={run}", "temperature=0", "out=x.jsonl"], "temperature=0"),
    (["checkpoint={run}", "nope=1", "out=x.jsonl"], "unknown argument 'nope'"),
    (["checkpoint={run}"], "out="),
])
def test_bad_arguments_are_refused_before_loading(args, match, sft_run):
    with pytest.raises(ValueError, match=match):
        generate.parse_args([a.replace("{run}", sft_run) for a in args])


def _two_process_worker(rank, world, args, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        generate.generate(generate.parse_args(args))
    except BaseException:
        utils.close_process_group(clean=False)
        raise
    leave_process_group()


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_processes_write_the_rows_of_one(tmp_path, sft_run, fsdp):
    import socket
    import torch.multiprocessing as mp
    args = [f"checkpoint={sft_run}", "n=20", "batch_size=4", "do_sample=true", "seed=1", f"fsdp={str(fsdp).lower()}"]
    one = rows(run_generate(args + [f"out={tmp_path}/one.jsonl"]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_process_worker, args=(2, args + [f"out={tmp_path}/two.jsonl"], port), nprocs=2, join=True)
    assert rows(tmp_path / "two.jsonl") == one


REVERSE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "reverse")


def test_seqkd_reading_the_teachers_generation_files_trains_as_it_does_generating(tmp_path, sft_run):
    """The pipeline's generation stage: generate.py writes the teacher's greedy answers once;
    a seqkd run reading them (generations=) computes the same losses as one that generates."""
    local = ["datasets=[local]", f"data.local.path={REVERSE}", "data.local.train=train.jsonl",
             "data.local.test=test.jsonl"]
    files = [run_generate([f"checkpoint={sft_run}", f"out={tmp_path}/t.{split}.jsonl", f"split={split}", "batch_size=8",
                           "max_new_tokens=24"] + local[1:] + ["datasets=[local]"]) for split in ("train", "test")]
    meta = json.load(open(files[0] + ".meta.json"))
    assert meta["checkpoint"] == checkpoints.resolve_checkpoint(sft_run) and meta["do_sample"] is False
    assert meta["rows"] == len(rows(files[0])) == 48
    common = ["loss=seqkd", "teacher=tiny_teacher", f"teacher.archive={sft_run}", "n_examples=24",
              "eval_every=16", "lr=1e-3", "n_eval_examples=16"] + local
    _, live = train_run(tmp_path, common + ["exp_name=live"])
    _, cached = train_run(tmp_path, common + ["exp_name=file", f"generations=[{files[0]},{files[1]}]"])
    key = lambda recs, k: [r[k] for r in recs if k in r]  # noqa: E731
    assert len(key(live, "loss/train")) == 3 and len(key(live, "loss/eval")) >= 2
    for k in ("loss/train", "loss/eval"):
        assert key(cached, k) == pytest.approx(key(live, k), abs=1e-6)


def test_generation_files_that_do_not_match_the_run_are_refused(tmp_path, sft_run):
    import train
    from conftest import compose
    out = run_generate([f"checkpoint={sft_run}", f"out={tmp_path}/g.jsonl", "n=4", "split=test", "do_sample=true"])
    base = ["teacher=tiny_teacher", f"teacher.archive={sft_run}", f"generations=[{out}]"]
    with pytest.raises(ValueError, match="do_sample=True, but this run's do_sample gives False"):
        train.validate_config(compose(["loss=seqkd"] + base))
    with pytest.raises(ValueError, match="loss=dpo trains on the data's responses"):
        train.validate_config(compose(["loss=dpo"] + base))
    os.remove(out + ".meta.json")
    with pytest.raises(ValueError, match="has no g.jsonl.meta.json beside it"):
        train.validate_config(compose(["loss=seqkd"] + base))
