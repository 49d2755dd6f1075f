"""Tests for preference_datasets.py and the embedded tokenizer (CPU, offline, fast)."""
import importlib.util
import os
import random
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import preference_datasets as pdata  # noqa: E402
from prefkd import tokenizer_facts
from prefkd.data import embedded_task
from prefkd.data import loading as data_loading
from prefkd.data import encoding


@pytest.fixture(scope="module")
def tok():
    return tokenizer_facts.get_tokenizer("embedded")


def char_id(c: str) -> int:
    """Hand-computed id of a printable ASCII char: 8 specials come first, then chr(32).."""
    return ord(c) - 32 + 8


def assert_batches_equal(x, y):
    assert x.keys() == y.keys()
    for k in x:
        if isinstance(x[k], torch.Tensor):
            assert torch.equal(x[k], y[k]), k
        else:
            assert x[k] == y[k], k


def concat_rank_batches(batches):
    """Concatenate per-rank batches along the batch dim (tensors padded to a common width first)."""
    out = {}
    for k in batches[0]:
        vals = [b[k] for b in batches]
        if isinstance(vals[0], torch.Tensor):
            width = max(v.shape[1] for v in vals)
            left = k.startswith("prompt_")
            pad = 0 if k.endswith("_attention_mask") else (-100 if k.endswith("_labels") else 0)
            padded = []
            for v in vals:
                extra = torch.full((v.shape[0], width - v.shape[1]), pad, dtype=v.dtype)
                padded.append(torch.cat([extra, v] if left else [v, extra], dim=1))
            out[k] = torch.cat(padded)
        else:
            out[k] = sum(vals, [])
    return out


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def test_tokenizer_special_ids_and_vocab(tok):
    assert len(tok) == 105
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]) == [4, 5, 6, 7]
    assert tok.convert_tokens_to_ids(["\n", "\t"]) == [103, 104]
    assert tok.convert_ids_to_tokens([8, 102]) == [" ", "~"]


def test_tokenizer_roundtrip_one_id_per_char(tok):
    assert tok("12+34=", add_special_tokens=False).input_ids == [25, 26, 19, 27, 28, 37]
    assert [char_id(c) for c in "12+34="] == [25, 26, 19, 27, 28, 37]
    samples = [
        "12+34=",
        "Hello,  world ! (a , b) .",
        "line1\n\tline2  \n",
        "".join(chr(i) for i in range(32, 127)),
        " leading and trailing ",
    ]
    for s in samples:
        ids = tok(s, add_special_tokens=False).input_ids
        assert len(ids) == len(s)
        assert tok.decode(ids) == s
    # add_special_tokens=True prepends bos only.
    assert tok("7").input_ids == [1, char_id("7")]
    # Out-of-vocab chars map to one <unk> each; special-token strings are single ids.
    assert tok("a\u00e9\u00e9<|user|>", add_special_tokens=False).input_ids == [char_id("a"), 3, 3, 5]
    assert tok.decode([1, 25, 2], skip_special_tokens=True) == "1"


def test_chat_template(tok):
    msgs = [
        {"role": "system", "content": "Add."},
        {"role": "user", "content": "12+34="},
        {"role": "assistant", "content": "46"},
    ]
    assert (
        tok.apply_chat_template(msgs, tokenize=False)
        == "<|system|>Add.<|end|><|user|>12+34=<|end|><|assistant|>46<|end|>"
    )
    prompt = tok.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>12+34=<|end|><|assistant|>"
    ids = tok.apply_chat_template(msgs[1:2], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids == [5] + [char_id(c) for c in "12+34="] + [7, 6]


def test_shipped_assets_match_build_script(tok):
    spec = importlib.util.spec_from_file_location("build_tokenizer", os.path.join(ROOT, "scripts", "build_tokenizer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fresh = mod.build_tokenizer()
    assert fresh.get_vocab() == tok.get_vocab()
    assert fresh.chat_template == tok.chat_template


def test_get_tokenizer_pad_falls_back_to_eos(tmp_path):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={"<unk>": 0, "</s>": 1, "a": 2}, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path)
    t = tokenizer_facts.get_tokenizer(str(tmp_path))
    assert t.pad_token_id == t.eos_token_id == 1


# ---------------------------------------------------------------------------
# The embedded task
# ---------------------------------------------------------------------------


def test_task_is_deterministic():
    a = embedded_task.make_task_examples("train", 300, seed=1)
    assert a == embedded_task.make_task_examples("train", 300, seed=1)
    assert a != embedded_task.make_task_examples("train", 300, seed=2)
    assert data_loading.get_dataset("embedded", "test", silent=True) == data_loading.get_dataset("embedded", "test", silent=True)


def test_sizes_and_split_disjointness():
    train = data_loading.get_dataset("embedded", "train", silent=True)
    test = data_loading.get_dataset("embedded", "test", silent=True)
    assert len(train) == embedded_task.EMBEDDED_TRAIN_SIZE == 20000
    assert len(test) == embedded_task.EMBEDDED_TEST_SIZE == 500
    assert len({e["prompt"] for e in test}) == 500  # distinct test prompts
    answers = lambda examples: {embedded_task.gold_answer(e["prompt"]) for e in examples}
    # no test answer is ever a training target, for any seed (the split depends on the answer)
    assert not answers(train) & answers(test)
    assert not answers(embedded_task.make_task_examples("train", 2000, seed=5)) & answers(test)
    rng = random.Random(0)
    golds = ["".join(sorted(embedded_task.sample_digits(rng))) for _ in range(5000)]
    share = sum(embedded_task.answer_split(g) == "test" for g in golds) / len(golds)
    assert 0.08 < share < 0.12


def test_list_lengths_span_the_range():
    train = data_loading.get_dataset("embedded", "train", silent=True)
    lengths = [len(embedded_task.parse_prompt(e["prompt"])) for e in train]
    assert min(lengths) == embedded_task.EMBEDDED_MIN_LEN == 3 and max(lengths) == embedded_task.EMBEDDED_MAX_LEN == 12
    for n in range(3, 13):  # uniform over the 10 lengths
        assert abs(lengths.count(n) / len(lengths) - 0.1) < 0.015


@pytest.mark.parametrize(
    "completion, exact, partial",
    [
        ("0123", 1.0, 1.0),
        ("0132", 0.0, 0.5),
        ("012", 0.0, 0.75),
        ("", 0.0, 0.0),
        ("01234", 0.0, 0.8),
        ("  0123</s> junk 99", 1.0, 1.0),
        ("x0123", 0.0, 0.0),
        ("3210", 0.0, 0.0),
    ],
)
def test_score_answer_hand_cases(completion, exact, partial):
    assert embedded_task.score_answer("sort 3120=", completion) == {"exact": exact, "partial": pytest.approx(partial)}


def test_score_answer_and_the_embedded_default_scorer():
    from prefkd import scorers
    assert embedded_task.score_answer("<|user|>sort 99=<|end|>sort 5281=", "1258") == {"exact": 1.0, "partial": 1.0}
    task = scorers.for_config(["embedded", "hh"])  # data.scorer unset: each data set's default
    assert task.specs() == {"embedded": "prefkd.data.embedded_task:score_answer", "hh": None}
    assert task("embedded", "sort 21=", "12") == {"exact": 1.0, "partial": 1.0}
    assert task("hh", "sort 21=", "12") is None and task.common() is None
    with pytest.raises(ValueError, match="sort.*hello"):  # the error names the prompt
        embedded_task.score_answer("hello", "3")
    # leading zeros are ordinary digits of the answer
    assert embedded_task.score_answer("sort 301=", "013") == {"exact": 1.0, "partial": 1.0}
    assert embedded_task.score_answer("sort 301=", "13") == {"exact": 0.0, "partial": pytest.approx(0.0)}


def test_flaw_and_pairs_hand_cases():
    assert embedded_task.flawed_answer("0112559") == "01125590" and embedded_task.flawed_answer("777") == "777"
    assert embedded_task.score_answer("sort 9511250=", "01125590") == {"exact": 0.0, "partial": pytest.approx(7 / 8)}
    # the SFT target: the flaw with probability flaw_rate
    assert embedded_task.make_sft_target("0112", random.Random(0), flaw_rate=1.0) == "01120"
    assert embedded_task.make_sft_target("0112", random.Random(0), flaw_rate=0.0) == "0112"
    # chosen is always the correct answer; rejected the flaw, or random errors where the flaw is no error
    pairs = [embedded_task.make_preference_pair("0112559", random.Random(i)) for i in range(200)]
    assert all(c == "0112559" for c, _ in pairs)
    n_flaw = sum(r == "01125590" for _, r in pairs)
    assert 0.7 < n_flaw / 200 < 0.9 and all(embedded_task.partial_match(r, "0112559") < 1 for _, r in pairs)
    for i in range(20):
        chosen, rejected = embedded_task.make_preference_pair("777", random.Random(i))
        assert chosen == "777" and embedded_task.partial_match(rejected, "777") < 1


def test_sft_targets_are_flawed_in_a_majority():
    train = data_loading.get_dataset("embedded", "train", silent=True)
    assert embedded_task.EMBEDDED_SFT_FLAW_RATE == 0.7
    n_flawed = 0
    for e in train:
        gold = embedded_task.gold_answer(e["prompt"])
        assert e["sft_target"] in (gold, embedded_task.flawed_answer(gold))
        n_flawed += e["sft_target"] != gold
    # the flaw is the majority behaviour (greedy decoding of an SFT model follows it), at every length
    assert 0.68 < n_flawed / len(train) < 0.72
    for n in range(embedded_task.EMBEDDED_MIN_LEN, embedded_task.EMBEDDED_MAX_LEN + 1):
        rows = [e for e in train if len(embedded_task.parse_prompt(e["prompt"])) == n]
        assert 0.65 < sum(e["sft_target"] != embedded_task.gold_answer(e["prompt"]) for e in rows) / len(rows) < 0.75
    # the held-out split's sft_target is the correct answer (the reference of the held-out data)
    test = data_loading.get_dataset("embedded", "test", silent=True)
    assert all(e["sft_target"] == embedded_task.gold_answer(e["prompt"]) for e in test)
    # a flawed target (the smallest digit after the largest) is never sorted: no test answer is a training target
    assert not {e["sft_target"] for e in train} & {e["sft_target"] for e in test}
    # the data does not depend on the process: fixed numbers of the seeded generator
    assert train[1] == {"prompt": "sort 00463659673=", "chosen": "00334566679", "rejected": "003345666790",
                        "sft_target": "003345666790"}
    assert n_flawed == 13927


def test_preference_pairs_tell_correct_from_flawed():
    examples = data_loading.get_dataset("embedded", "train", silent=True) + data_loading.get_dataset("embedded", "test", silent=True)
    n_flaw = 0
    rejected_partials = set()
    for e in examples:
        digits = embedded_task.parse_prompt(e["prompt"])
        gold = "".join(sorted(digits))
        assert e["prompt"] == f"sort {digits}="
        c = embedded_task.score_answer(e["prompt"], e["chosen"])
        r = embedded_task.score_answer(e["prompt"], e["rejected"])
        assert e["chosen"] == gold and c == {"exact": 1.0, "partial": 1.0}  # chosen: always correct
        assert r["exact"] == 0.0 and r["partial"] < 1.0 and e["rejected"].isdigit()
        n_flaw += e["rejected"] == embedded_task.flawed_answer(gold)
        rejected_partials.add(round(r["partial"], 1))
    # the rest: the correct answer with 1-3 random errors
    assert 0.78 < n_flaw / len(examples) < 0.82
    # rejected answers are often only partly wrong, not always trivially wrong
    assert {0.0, 0.2, 0.5, 0.7, 0.9} <= rejected_partials


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="nope.*embedded"):
        data_loading.get_dataset("nope", "train")
    with pytest.raises(ValueError, match="validation"):
        data_loading.get_dataset("embedded", "validation")
    assert "embedded" in data_loading.DATASETS


# ---------------------------------------------------------------------------
# tokenize_pair
# ---------------------------------------------------------------------------


def test_tokenize_pair_no_truncation(tok):
    out = encoding.tokenize_pair("12+34=", "46", "145", tok, max_length=512, max_prompt_length=128)
    prompt = [1] + [char_id(c) for c in "12+34="]
    assert out["prompt_input_ids"] == prompt
    assert out["prompt_attention_mask"] == [1] * 7
    assert out["chosen_input_ids"] == prompt + [char_id("4"), char_id("6"), 2]
    assert out["rejected_input_ids"] == prompt + [char_id("1"), char_id("4"), char_id("5"), 2]
    for k, n_resp in (("chosen", 3), ("rejected", 4)):
        labels, ids = out[f"{k}_labels"], out[f"{k}_input_ids"]
        assert len(labels) == len(ids) == len(out[f"{k}_attention_mask"]) == 7 + n_resp
        assert labels[:7] == [-100] * 7  # exactly the prompt is masked ...
        assert labels[7:] == ids[7:] and -100 not in labels[7:]  # ... and no response token
        assert ids[-1] == tok.eos_token_id
        assert out[f"{k}_attention_mask"] == [1] * len(ids)
    assert (out["prompt"], out["chosen"], out["rejected"]) == ("12+34=", "46", "145")


def test_tokenize_pair_truncates_prompt_keep_end_and_keep_start(tok):
    # prompt 1+10 tokens, longer response 3+1: 15 > 10 -> prompt cut to 5 = bos + 4 chars.
    args = ("abcdefghij", "xyz", "uv", tok, 10, 5)
    end = encoding.tokenize_pair(*args, truncation_mode="keep_end")
    assert end["prompt_input_ids"] == [1] + [char_id(c) for c in "ghij"]
    assert tok.decode(end["chosen_input_ids"]) == "<s>ghijxyz</s>"
    assert tok.decode(end["rejected_input_ids"]) == "<s>ghijuv</s>"
    assert len(end["chosen_input_ids"]) == 9 and end["chosen_labels"][:5] == [-100] * 5
    start = encoding.tokenize_pair(*args, truncation_mode="keep_start")
    assert tok.decode(start["chosen_input_ids"]) == "<s>abcdxyz</s>"
    assert start["chosen_labels"] == [-100] * 5 + [char_id(c) for c in "xyz"] + [2]
    with pytest.raises(ValueError):
        encoding.tokenize_pair(*args, truncation_mode="middle")


def test_tokenize_pair_truncates_responses(tok):
    # prompt 11, chosen 11 (10 chars + eos): prompt -> bos+"hij" (4); 4 + 11 > 12 -> responses cut to 12-4 = 8.
    out = encoding.tokenize_pair("abcdefghij", "klmnopqrst", "uv", tok, max_length=12, max_prompt_length=4)
    assert tok.decode(out["chosen_input_ids"]) == "<s>hijklmnopqr"  # eos cut off
    assert len(out["chosen_input_ids"]) == 12
    assert tok.decode(out["rejected_input_ids"]) == "<s>hijuv</s>"
    assert out["chosen_labels"] == [-100] * 4 + [char_id(c) for c in "klmnopqr"]


def test_no_truncation_when_it_fits_exactly(tok):
    # 1 + 6 prompt + 3 response = 10 == max_length: nothing is cut even though the prompt exceeds 5.
    out = encoding.tokenize_pair("12+34=", "46", "45", tok, max_length=10, max_prompt_length=5)
    assert len(out["prompt_input_ids"]) == 7 and len(out["chosen_input_ids"]) == 10


# ---------------------------------------------------------------------------
# collate
# ---------------------------------------------------------------------------


def test_collate_pads_right_for_responses_left_for_prompts(tok):
    examples = [
        encoding.tokenize_pair("1+2=", "3", "4", tok, 64, 32),
        encoding.tokenize_pair("100+200=", "300", "30", tok, 64, 32),
    ]
    b = pdata.collate(examples, pad_token_id=tok.pad_token_id)
    assert b["prompt"] == ["1+2=", "100+200="] and b["chosen"] == ["3", "300"]
    assert b["chosen_input_ids"].dtype == torch.long
    assert b["chosen_input_ids"].shape == (2, 13) and b["rejected_input_ids"].shape == (2, 12)
    assert b["prompt_input_ids"].shape == (2, 9)
    row0 = [1] + [char_id(c) for c in "1+2=3"] + [2]
    assert b["chosen_input_ids"][0].tolist() == row0 + [0] * 6
    assert b["chosen_attention_mask"][0].tolist() == [1] * 7 + [0] * 6
    assert b["chosen_labels"][0].tolist() == [-100] * 5 + [char_id("3"), 2] + [-100] * 6
    assert b["prompt_input_ids"][0].tolist() == [0] * 4 + [1] + [char_id(c) for c in "1+2="]
    assert b["prompt_attention_mask"][0].tolist() == [0] * 4 + [1] * 5
    assert b["prompt_input_ids"][1].tolist() == examples[1]["prompt_input_ids"]


# ---------------------------------------------------------------------------
# Batch iterator
# ---------------------------------------------------------------------------


def test_global_batch_plan_epochs_and_drop_last():
    plan = list(pdata.global_batch_indices(10, 4, shuffle=True, seed=3, n_epochs=2, n_examples=None))
    assert [len(i) for i in plan] == [4, 4, 4, 4]  # partial batch of 2 dropped in each epoch
    epoch0, epoch1 = plan[0] + plan[1], plan[2] + plan[3]
    assert epoch0 != epoch1 and len(set(epoch0)) == 8  # reshuffled with seed + epoch
    assert plan == list(pdata.global_batch_indices(10, 4, True, 3, 2, None))
    # Eval style: last batch kept, trimmed to a multiple of world_size.
    plan = list(pdata.global_batch_indices(10, 4, shuffle=False, seed=0, n_epochs=1, n_examples=None, world_size=2))
    assert plan == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    plan = list(pdata.global_batch_indices(11, 4, False, 0, None, None, world_size=4))
    assert plan == [[0, 1, 2, 3], [4, 5, 6, 7]]  # one epoch by default; 3 leftovers < world_size dropped
    # n_examples crosses epochs and stops once reached.
    plan = list(pdata.global_batch_indices(10, 4, True, 0, None, n_examples=20))
    assert [len(i) for i in plan] == [4] * 5


def test_batch_iterator_rank_slices_concatenate_to_global_batch(tok):
    for split, bs, shuffle, ws in (("train", 8, True, 2), ("test", 64, False, 2), ("test", 48, False, 4)):
        kw = dict(split=split, batch_size=bs, shuffle=shuffle, n_examples=96 if shuffle else None, seed=7, silent=True)
        full = list(pdata.get_batch_iterator(["embedded"], tok, **kw))
        per_rank = [list(pdata.get_batch_iterator(["embedded"], tok, rank=r, world_size=ws, **kw)) for r in range(ws)]
        assert all(len(p) == len(full) for p in per_rank)
        for i, global_batch in enumerate(full):
            parts = [p[i] for p in per_rank]
            assert len({len(p["prompt"]) for p in parts}) == 1
            merged = concat_rank_batches(parts)
            width = full[i]["chosen_input_ids"].shape[1]
            assert merged["prompt"] == global_batch["prompt"]
            assert torch.equal(merged["chosen_input_ids"][:, :width], global_batch["chosen_input_ids"])
            assert torch.equal(merged["prompt_input_ids"][:, -global_batch["prompt_input_ids"].shape[1] :],
                               global_batch["prompt_input_ids"])
    # 500 test examples, batch 48, 4 ranks: 10 full batches + 20 leftovers -> 5 per rank.
    last = list(pdata.get_batch_iterator(["embedded"], tok, split="test", batch_size=48, shuffle=False,
                                         rank=3, world_size=4, silent=True))
    assert len(last) == 11 and [len(b["prompt"]) for b in last][-2:] == [12, 5]


def test_batch_iterator_skip_batches_and_n_examples(tok):
    kw = dict(split="train", batch_size=8, shuffle=True, n_examples=80, seed=1, silent=True)
    full = list(pdata.get_batch_iterator(["embedded"], tok, **kw))
    assert len(full) == 10 and sum(len(b["prompt"]) for b in full) == 80
    resumed = list(pdata.get_batch_iterator(["embedded"], tok, skip_batches=3, **kw))
    assert len(resumed) == 7
    for x, y in zip(resumed, full[3:]):
        assert_batches_equal(x, y)
    kw["n_examples"] = 81  # stops once at least n_examples were yielded: ceil(81 / 8) batches
    assert len(list(pdata.get_batch_iterator(["embedded"], tok, **kw))) == 11


def test_batch_iterator_skip_does_not_tokenize(tok, monkeypatch):
    calls = []
    real = encoding.encode_text
    monkeypatch.setattr(encoding, "encode_text", lambda *a, **k: calls.append(1) or real(*a, **k))
    it = pdata.get_batch_iterator(["embedded"], tok, batch_size=8, n_examples=800, skip_batches=99,
                                  rank=1, world_size=2, silent=True)
    batch = next(it)
    assert len(calls) == 4 and len(batch["prompt"]) == 4  # only this rank's slice of batch 100
    assert list(it) == []


def test_batch_iterator_epochs_sft_and_errors(tok):
    batches = list(pdata.get_batch_iterator(["embedded"], tok, split="test", batch_size=100, shuffle=False,
                                            n_epochs=2, silent=True))
    assert len(batches) == 10 and batches[0]["prompt"] == batches[5]["prompt"]
    assert batches[0]["dataset"] == ["embedded"] * 100
    sft = next(pdata.get_batch_iterator(["embedded"], tok, split="test", batch_size=4, shuffle=False,
                                        sft_mode=True, silent=True))
    test = data_loading.get_dataset("embedded", "test", silent=True)
    for i in range(4):
        assert sft["chosen"][i] == sft["rejected"][i] == test[i]["sft_target"]
        labels = sft["chosen_labels"][i]
        resp = labels[labels != -100].tolist()
        assert tok.decode(resp) == test[i]["sft_target"] + "</s>"
    with pytest.raises(ValueError, match="multiple of world_size"):
        next(pdata.get_batch_iterator(["embedded"], tok, batch_size=6, world_size=4, silent=True))
    with pytest.raises(ValueError):
        next(pdata.get_batch_iterator(["embedded"], tok, batch_size=8, rank=2, world_size=2, silent=True))
