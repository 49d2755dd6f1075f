"""Real data sets on local fixtures in their exact public schemas (tests/fixtures/<name>/),
local files in TRL's formats, chat templates, validation and the tokenisation cache."""
import json
import os

import pytest

import preference_datasets as pdata
from prefkd import models
from prefkd import tokenizer_facts
from prefkd.data import sources as data_sources
from prefkd.data import rows as data_rows
from prefkd.data import loading as data_loading
from prefkd.data import encoding

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
NAMED = ["hh", "shp", "se", "dpomix", "ultrafeedback", "helpsteer2", "deita"]


@pytest.fixture(scope="module")
def tok():
    return tokenizer_facts.get_tokenizer("embedded")


def opts_for(name, **extra):
    return {"paths": {name: os.path.join(FIXTURES, name)}, **extra}


def core(ex):
    return {k: ex[k] for k in ("prompt", "chosen", "rejected", "sft_target")}


def user(text):
    return [{"role": "user", "content": text}]


H, A = "\n\nHuman: ", "\n\nAssistant:"
EXPECTED_TRAIN_FIRST = {
    "hh": {"prompt": H + "What is 2+2?" + A, "chosen": " It is 4.", "rejected": " It is 5.", "sft_target": " It is 4."},
    "shp": {"prompt": H + "Why is the sky blue?" + A, "chosen": " Rayleigh scattering.", "rejected": " Because it is.",
            "sft_target": " Rayleigh scattering."},
    "se": {"prompt": H + "How do I reverse a list in Python?" + A, "chosen": " Use slicing:\n\n<code>x[::-1]</code>",
           "rejected": " Write a loop.", "sft_target": " Use slicing:\n\n<code>x[::-1]</code>"},
    "dpomix": {"prompt": user("Say hi."), "chosen": "Hi!", "rejected": "No.", "sft_target": "Hi!"},
    "ultrafeedback": {"prompt": user("Translate 'cat' to French."), "chosen": "chat", "rejected": "chien",
                      "sft_target": "chat"},
    "helpsteer2": {"prompt": user("List two primes."), "chosen": "2 and 3.", "rejected": "4 and 6.",
                   "sft_target": "2 and 3."},
    "deita": {"prompt": user("Greet me."), "chosen": None, "rejected": None, "sft_target": "Hello there!"},
}
# train/test sizes after conversion (rows -> examples): SHP drops a ratio < 2 row, SE makes
# every pair of differently scored answers, HelpSteer2 pairs consecutive rows and drops ties
SIZES = {"hh": (3, 1), "shp": (2, 1), "se": (4, 1), "dpomix": (2, 1), "ultrafeedback": (2, 1),
         "helpsteer2": (2, 1), "deita": (2, 1)}


@pytest.mark.parametrize("name", NAMED)
def test_fixture_converts_to_the_expected_examples(name):
    train = data_loading.get_dataset(name, "train", silent=True, options=opts_for(name))
    test = data_loading.get_dataset(name, "test", silent=True, options=opts_for(name))
    assert (len(train), len(test)) == SIZES[name]
    assert core(train[0]) == EXPECTED_TRAIN_FIRST[name]
    assert train[0]["chat"] == isinstance(EXPECTED_TRAIN_FIRST[name]["prompt"], list)
    # a HelpSteer2 pair is named by its second row, where it is complete
    assert train[0]["where"].endswith(": line 2" if name == "helpsteer2" else ": line 1")


@pytest.mark.parametrize("name", NAMED)
def test_hub_name_goes_through_the_same_converter(name, monkeypatch):
    """With no local path the hub id is loaded with datasets.load_dataset; fed the fixture
    (as the hub would hand over its rows), the examples are identical to the local path's."""
    import datasets
    src = data_sources.SOURCES[name]
    calls = []

    def fake_load(path, split=None, **kw):
        calls.append((path, split))
        files = [f for f in os.listdir(os.path.join(FIXTURES, name)) if f.split(".")[0] == split]
        return datasets.Dataset.from_json(os.path.join(FIXTURES, name, files[0]))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    for split in ("train", "test"):
        hub = data_loading.get_dataset(name, split, silent=True)
        local = data_loading.get_dataset(name, split, silent=True, options=opts_for(name))
        assert [core(e) for e in hub] == [core(e) for e in local]
    assert calls == [(src.hub, src.splits["train"]), (src.hub, src.splits["test"])]


def test_shp_pairs_follow_labels_and_the_ratio_filter():
    train = data_loading.get_dataset("shp", "train", silent=True, options=opts_for("shp"))
    # row 2 has labels=0: B preferred; row 3 has ratio 4/3 < 2: dropped (the DPO repo's filter)
    assert core(train[1]) == {"prompt": H + "Why is the sky blue?" + A, "chosen": " Light scatters off air molecules.",
                              "rejected": " Magic.", "sft_target": " Light scatters off air molecules."}


def test_se_pairs_every_differently_scored_answer_pair():
    train = data_loading.get_dataset("se", "train", silent=True, options=opts_for("se"))
    first_q = [(e["chosen"], e["rejected"]) for e in train if "reverse" in e["prompt"]]
    slicing = " Use slicing:\n\n<code>x[::-1]</code>"
    assert first_q == [(slicing, " Write a loop."), (slicing, " Use reversed()."), (" Use reversed().", " Write a loop.")]
    assert data_sources.strip_html("<p>a <b>b</b></p><pre><code>x = 1</code></pre><div>gone</div>") == "a b\n\n<code>x = 1</code>"


def test_helpsteer2_pairs_by_helpfulness_and_drops_ties():
    train = data_loading.get_dataset("helpsteer2", "train", silent=True, options=opts_for("helpsteer2"))
    assert [(e["prompt"][0]["content"], e["chosen"], e["rejected"]) for e in train] == [
        ("List two primes.", "2 and 3.", "4 and 6."), ("Add 1 and 1.", "2", "3")]  # "Say yes." is a tie


def test_deita_is_sft_only_and_keeps_the_system_turn(tok):
    train = data_loading.get_dataset("deita", "train", silent=True, options=opts_for("deita"))
    assert train[1]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to 3."}]
    with pytest.raises(data_rows.DataError, match="without preference pairs.*loss=sft"):
        data_loading.check_datasets(["deita"], tok, opts_for("deita"), need_pairs=True)
    assert data_loading.check_datasets(["deita"], tok, opts_for("deita"), need_pairs=False) == {
        "deita/train": {"examples": 2, "skipped": 0}, "deita/test": {"examples": 1, "skipped": 0}}


# ---------------------------------------------------------------------------
# Chat templates: the prompt/response split is exact
# ---------------------------------------------------------------------------


def test_chat_response_tokens_are_exactly_the_assistant_turn(tok):
    options = opts_for("dpomix")
    batch = next(pdata.get_batch_iterator(["dpomix"], tok, split="train", batch_size=2, shuffle=False,
                                          max_length=200, max_prompt_length=100, options=options, silent=True))
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"}]
    for kind, answer in (("chosen", "6"), ("rejected", "7")):
        ids = batch[f"{kind}_input_ids"][1][batch[f"{kind}_attention_mask"][1].bool()].tolist()
        labels = batch[f"{kind}_labels"][1][: len(ids)].tolist()
        response = [t for t in labels if t != -100]
        assert tok.decode(response) == answer + "<|end|></s>"
        # prompt + response == [bos] + the template applied to the whole conversation + [eos]
        full = tok.apply_chat_template(conv + [{"role": "assistant", "content": answer}], tokenize=False)
        assert ids == [tok.bos_token_id] + tok(full, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        prompt_ids = ids[: len(ids) - len(response)]
        assert tok.decode(prompt_ids) == "<s><|user|>2+2?<|end|><|assistant|>4<|end|><|user|>3+3?<|end|><|assistant|>"
    # generation starts right after the generation prompt
    assert tok.decode(batch["prompt_input_ids"][1].tolist()).endswith("<|assistant|>")


def test_hh_keeps_its_human_assistant_format(tok):
    batch = next(pdata.get_batch_iterator(["hh"], tok, split="test", batch_size=1, shuffle=False, max_length=200,
                                          max_prompt_length=100, options=opts_for("hh"), silent=True))
    ids = batch["chosen_input_ids"][0].tolist()
    assert tok.decode(ids) == "<s>\n\nHuman: Capital of France?\n\nAssistant: Paris.</s>"


def test_tokenizer_without_template_uses_the_default_and_a_config_template_wins(tok):
    ex = {"prompt": user("hi"), "chosen": "yo", "rejected": "no", "sft_target": "yo", "chat": True}
    saved = tok.chat_template
    try:
        tok.chat_template = None
        prompt, resp = encoding.format_example(ex, tok)
        assert prompt == "<|user|>\nhi</s><|assistant|>\n" and resp["chosen"] == "yo</s>"
    finally:
        tok.chat_template = saved
    custom = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    prompt, resp = encoding.format_example(ex, tok, custom)
    assert (prompt, resp["rejected"]) == ("[user]hi[assistant]", "no")
    bad = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    with pytest.raises(data_rows.DataError, match="chat template does not render the prompt"):
        encoding.format_example(ex, tok, bad)


def test_truncation_keeps_bos_and_the_chosen_end_of_a_chat_prompt(tok):
    ex = {"prompt": user("x" * 50), "chosen": "ab", "rejected": "cd", "sft_target": "ab", "chat": True}
    prompt, resp = encoding.format_example(ex, tok)
    ids = encoding.encode_text(prompt, resp, tok)
    for mode, tail in (("keep_end", "<|end|><|assistant|>"), ("keep_start", "<|user|>xxx")):
        out = encoding.build_pair(ids["prompt"], ids["chosen"], ids["rejected"], tok.bos_token_id, 20, 12, mode)
        assert len(out["prompt_input_ids"]) == 12 and out["prompt_input_ids"][0] == tok.bos_token_id
        text = tok.decode(out["prompt_input_ids"][1:])
        assert (text.endswith(tail) if mode == "keep_end" else text.startswith(tail))
        assert tok.decode([t for t in out["chosen_labels"] if t != -100]) == "ab<|end|></s>"


# ---------------------------------------------------------------------------
# Local files in TRL's standard formats
# ---------------------------------------------------------------------------


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def local(path, **cols):
    return {"local": {"path": str(path), **cols}}


def load_local(path, split="train", **kw):
    return data_loading.get_dataset("local", split, silent=True, options={**local(path), **kw})


def test_local_formats(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [
        {"prompt": "p1", "chosen": "good", "rejected": "bad"},                                    # strings
        {"prompt": user("p2"), "chosen": [{"role": "assistant", "content": "a"}],                # explicit prompt
         "rejected": [{"role": "assistant", "content": "b"}]},
        {"chosen": user("p3") + [{"role": "assistant", "content": "c"}],                          # implicit prompt
         "rejected": user("p3") + [{"role": "assistant", "content": "d"}]}])
    write_jsonl(d / "test.jsonl", [{"messages": user("q") + [{"role": "assistant", "content": "r"}]},
                                   {"prompt": "q2", "completion": "r2"}])
    train = load_local(d)
    assert [core(e) for e in train] == [
        {"prompt": "p1", "chosen": "good", "rejected": "bad", "sft_target": "good"},
        {"prompt": user("p2"), "chosen": "a", "rejected": "b", "sft_target": "a"},
        {"prompt": user("p3"), "chosen": "c", "rejected": "d", "sft_target": "c"}]
    assert [e["chat"] for e in train] == [False, True, True]
    assert [core(e) for e in load_local(d, "test")] == [
        {"prompt": user("q"), "chosen": None, "rejected": None, "sft_target": "r"},
        {"prompt": "q2", "chosen": None, "rejected": None, "sft_target": "r2"}]


def test_local_json_parquet_csv_and_renamed_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"question": f"q{i}", "better": f"g{i}", "worse": f"b{i}"} for i in range(40)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "a.parquet"))
    (tmp_path / "a.csv").write_text("question,better,worse\n" + "".join(f"q{i},g{i},b{i}\n" for i in range(40)))
    cols = dict(prompt="question", chosen="better", rejected="worse")
    results = []
    for name in ("a.json", "a.parquet", "a.csv"):
        o = {"local": {"path": str(tmp_path / name), **cols}, "test_fraction": 0.25}
        train = data_loading.get_dataset("local", "train", silent=True, options=o)
        test = data_loading.get_dataset("local", "test", silent=True, options=o)
        assert len(train) + len(test) == 40 and 3 <= len(test) <= 20  # a single file: prompts held out by hash
        assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}
        results.append(sorted(core(e)["prompt"] for e in test))
    assert results[0] == results[1] == results[2]
    assert core(train[0]) == {"prompt": train[0]["prompt"], "chosen": "g" + train[0]["prompt"][1:],
                              "rejected": "b" + train[0]["prompt"][1:], "sft_target": "g" + train[0]["prompt"][1:]}


def test_mixing_data_sets(tok, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"prompt": "sort 21=", "chosen": "12", "rejected": "21"}])
    write_jsonl(d / "test.jsonl", [{"prompt": "sort 31=", "chosen": "13", "rejected": "31"}])
    options = {**local(d), **opts_for("dpomix")}
    batch = next(pdata.get_batch_iterator(["dpomix", "local"], tok, split="train", batch_size=3, shuffle=False,
                                          options=options, silent=True))
    assert batch["dataset"] == ["dpomix", "dpomix", "local"] and batch["chosen"] == ["Hi!", "6", "12"]


# ---------------------------------------------------------------------------
# Validation: every bad row is named, or skipped and counted
# ---------------------------------------------------------------------------

GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}
BAD_ROWS = [
    ({"prompt": "p", "chosen": "a"}, "missing column 'rejected'"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "column 'prompt' is int, expected text"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "column 'prompt' is empty"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "column 'chosen' is empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen is identical to rejected"),
    ('{"prompt": "p", "chosen": "a", "rejected": ', "broken JSON"),
    ({"prompt": user("p"), "chosen": [{"role": "assistant", "content": {"text": "a"}}],
      "rejected": [{"role": "assistant", "content": "b"}]}, r"chosen\[0\].content is dict, expected text"),
    ({"prompt": "p", "chosen": ["a"], "rejected": "b"}, "must be a message"),
    ({"prompt": user("p"), "chosen": [{"role": "robot", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "has role 'robot'"),
    ({"chosen": user("p") + [{"role": "assistant", "content": "a"}],
      "rejected": user("other") + [{"role": "assistant", "content": "b"}]}, "differ before their last assistant"),
    ([1, 2], "a row must be an object"),
]


@pytest.mark.parametrize("row,problem", BAD_ROWS)
def test_bad_row_is_named_or_skipped(tmp_path, row, problem):
    d = tmp_path / "d"
    d.mkdir()
    path = write_jsonl(d / "train.jsonl", [GOOD, GOOD | {"prompt": "q"}, row, GOOD | {"prompt": "r"}])
    write_jsonl(d / "test.jsonl", [GOOD])
    with pytest.raises(data_rows.DataError) as err:
        load_local(d)
    msg = str(err.value)
    assert f"{path}: line 3:" in msg and "1 invalid row" in msg and "data.skip_invalid=true" in msg
    assert __import__("re").search(problem, msg), msg
    kept = load_local(d, skip_invalid=True)
    assert [e["prompt"] for e in kept] == ["p", "q", "r"]
    assert data_loading.skipped_rows("local", "train", {**local(d), "skip_invalid": True}) == 1


def test_named_data_set_row_problems_name_the_file(tmp_path):
    d = tmp_path / "hh"
    d.mkdir()
    path = write_jsonl(d / "train.jsonl", [{"chosen": H + "x" + A + " y", "rejected": H + "other" + A + " z"},
                                           {"chosen": H + "x" + A + " y"}, {"chosen": "no turns", "rejected": "n"}])
    write_jsonl(d / "test.jsonl", [{"chosen": H + "x" + A + " y", "rejected": H + "x" + A + " z"}])
    with pytest.raises(data_rows.DataError) as err:
        data_loading.get_dataset("hh", "train", silent=True, options={"paths": {"hh": str(d)}})
    msg = str(err.value)
    assert "3 invalid row(s)" in msg
    assert f"{path}: line 1: rejected does not continue the same dialogue" in msg
    assert f"{path}: line 2: missing column 'rejected'" in msg
    assert f"{path}: line 3: chosen has no '\\n\\nAssistant:' turn" in msg


def test_missing_path_split_and_unknown_option(tmp_path):
    with pytest.raises(data_rows.DataError, match="needs data.local.path"):
        data_loading.get_dataset("local", "train", silent=True)
    with pytest.raises(data_rows.DataError, match="no such file"):
        load_local(tmp_path / "nope.jsonl")
    (tmp_path / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(data_rows.DataError, match="no file for split 'test'"):
        load_local(tmp_path, "test")
    with pytest.raises(ValueError, match="unknown option data.skip_invalud"):
        data_loading.data_options({"skip_invalud": True})


def test_bad_data_stops_train_before_any_model_is_built(tmp_path, monkeypatch):
    """The error comes from validation in train.run: no model is built, no run directory written."""
    import train
    from conftest import FAST, compose
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [GOOD, {"prompt": "p", "chosen": "x", "rejected": "x"}])
    write_jsonl(d / "test.jsonl", [GOOD])
    monkeypatch.setattr(models, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    over = list(FAST) + [f"runs_dir={tmp_path}/runs", "loss=dpo", "datasets=[local]", f"data.local.path={d}",
                         "exp_name=bad"]
    with pytest.raises(data_rows.DataError, match=r"train.jsonl: line 2: chosen is identical to rejected"):
        train.run(compose(over), over)
    assert not os.path.exists(tmp_path / "runs" / "bad")


def test_sft_on_deita_and_dpo_on_a_local_file_train(tmp_path):
    """End to end through train.py: skipped rows are counted in data_summary.json."""
    import train
    from conftest import FAST, compose, read_metrics
    d = tmp_path / "d"
    d.mkdir()
    rows = [{"prompt": f"sort {i}{i + 1}=", "chosen": f"{i}{i + 1}", "rejected": f"{i + 1}{i}"} for i in range(8)]
    write_jsonl(d / "train.jsonl", rows + [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    write_jsonl(d / "test.jsonl", rows[:4])
    common = list(FAST) + [f"runs_dir={tmp_path}/runs", "batch_size=4", "eval_batch_size=4", "n_examples=8",
                           "eval_every=null", "max_length=64", "max_prompt_length=48"]
    over = common + ["loss=dpo", "datasets=[local]", f"data.local.path={d}", "data.skip_invalid=true", "exp_name=l"]
    run_dir = train.run(compose(over), over)
    with open(os.path.join(run_dir, "data_summary.json")) as f:
        summary = json.load(f)
    assert {k: (v["source"], v["rows"], v["examples"], v["skipped"], v["format"]) for k, v in summary["splits"].items()} \
        == {"local/train": ([str(d / "train.jsonl")], 9, 8, 1, "text"), "local/test": ([str(d / "test.jsonl")], 4, 4, 0, "text")}
    assert summary["splits"]["local/train"]["truncation"]["truncated"] == 0 and summary["warnings"] == []
    assert "heldout_eval/logp_accuracy" in read_metrics(run_dir)[-1]
    over = common + ["loss=sft", "datasets=[deita]", f"data.paths.deita={FIXTURES}/deita", "batch_size=2",
                     "eval_batch_size=1", "n_examples=4", "exp_name=s"]
    run_dir = train.run(compose(over), over)
    last = read_metrics(run_dir)[-1]
    assert "loss/eval" in last and "heldout_eval/logp_accuracy" not in last  # SFT-only: no pairs to rank
    # evaluation on real data: preference metrics where there are pairs, generations saved for judges
    import evaluate
    gens = tmp_path / "g.jsonl"
    res = evaluate.evaluate_checkpoint(run_dir, run_dir, ["dpomix"], n_examples=1, batch_size=1, max_new_tokens=3,
                                       max_length=64, max_prompt_length=48, generations=str(gens),
                                       options=opts_for("dpomix"))
    assert res["n"] == 1 and res["pref_accuracy"] == 0.0 and res["pref_margin"] == 0.0  # policy == reference
    assert 0.0 <= res["logp_accuracy"] <= 1.0 and "task_exact" not in res
    row = json.loads(gens.read_text())
    assert row["model_input"] == "<|user|>Name a fruit.<|end|><|assistant|>" and row["dataset"] == "dpomix"
    assert row["prompt"] == user("Name a fruit.") and row["prompt_text"] == "Name a fruit."
    res = evaluate.evaluate_checkpoint(run_dir, None, ["deita"], n_examples=1, batch_size=1, max_new_tokens=3,
                                       max_length=64, max_prompt_length=48, options=opts_for("deita"))
    assert res["n"] == 1 and not [k for k in res if k.endswith("accuracy") or k.startswith("task_")]


# ---------------------------------------------------------------------------
# Tokenisation cache
# ---------------------------------------------------------------------------


def run_epoch(tok, cache_dir, **kw):
    stats = {}
    batches = list(pdata.get_batch_iterator(["embedded"], tok, split="test", batch_size=50, shuffle=False,
                                            max_length=48, max_prompt_length=24, cache_dir=str(cache_dir),
                                            stats=stats, silent=True, **kw))
    return batches, stats


def test_cache_tokenises_once_and_each_rank_only_its_share(tok, tmp_path, monkeypatch):
    from test_data import assert_batches_equal
    calls = []
    real = encoding.encode_text
    monkeypatch.setattr(encoding, "encode_text", lambda *a, **k: calls.append(1) or real(*a, **k))
    r0, s0 = run_epoch(tok, tmp_path, rank=0, world_size=2)
    r1, s1 = run_epoch(tok, tmp_path, rank=1, world_size=2)
    assert s0 == {"hits": 0, "misses": 250} and s1 == {"hits": 0, "misses": 250} and len(calls) == 500
    again, s = run_epoch(tok, tmp_path, rank=0, world_size=2)  # second run: nothing tokenised
    assert s == {"hits": 250, "misses": 0} and len(calls) == 500
    for x, y in zip(r0, again):
        assert_batches_equal(x, y)
    whole, s = run_epoch(tok, tmp_path)  # one process reads both ranks' files
    assert s == {"hits": 500, "misses": 0}
    uncached, _ = run_epoch(tok, tmp_path / "other")
    for x, y in zip(whole, uncached):
        assert_batches_equal(x, y)


def test_cache_key_changes_with_the_data_file_and_the_template(tok, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [GOOD])
    path = write_jsonl(d / "test.jsonl", [GOOD])

    def stats(**extra):
        s = {}
        list(pdata.get_batch_iterator(["local"], tok, split="test", batch_size=1, shuffle=False, stats=s,
                                      options={**local(d), **extra}, cache_dir=str(tmp_path / "c"), silent=True))
        return s

    assert stats() == {"hits": 0, "misses": 1} and stats() == {"hits": 1, "misses": 0}
    write_jsonl(path, [GOOD | {"chosen": "changed"}])
    os.utime(path, ns=(1, 1))  # a different size/mtime: a different cache entry
    assert stats() == {"hits": 0, "misses": 1}
    assert stats(chat_template="{{ messages }}") == {"hits": 0, "misses": 1}


def test_a_damaged_cache_file_is_a_miss(tok, tmp_path):
    run_epoch(tok, tmp_path)
    for root, _, files in os.walk(tmp_path):
        for f in files:
            open(os.path.join(root, f), "wb").write(b"garbage")
    _, s = run_epoch(tok, tmp_path)
    assert s == {"hits": 0, "misses": 500}
