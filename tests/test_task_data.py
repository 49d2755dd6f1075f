"""A user's own task (tests/fixtures/reverse): local files by name, the start-up data report
(files, counts, formats, truncation, model length), scorers named in the config, and
non-UTF-8 input. CPU, offline, fast."""
import json
import os
import shutil

import pytest

from prefkd import data_checks
from prefkd import scorers
from prefkd import models
from prefkd import tokenizer_facts
from prefkd.data import rows as data_rows
from prefkd.data import loading as data_loading

REVERSE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "reverse")
SCORER_FILE = os.path.join(REVERSE, "reverse_scorer.py")
PROMPT = "Write the letters of this word in reverse order: "


@pytest.fixture
def one_thread():
    """Training tests run with num_threads=1 (fast on a shared CPU); torch's setting is process-wide."""
    import torch
    n = torch.get_num_threads()
    yield "num_threads=1"
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return tokenizer_facts.get_tokenizer("embedded")


def rows(name):
    with open(os.path.join(REVERSE, name)) as f:
        return [json.loads(line) for line in f]


def local(**kw):
    return {"local": {"path": REVERSE, **kw}}


def load(split, **options):
    return data_loading.get_dataset("local", split, silent=True, options=options)


# ---------------------------------------------------------------------------
# 2. local files by name, and where each split comes from
# ---------------------------------------------------------------------------


def test_a_directory_reads_train_and_test_and_names_what_it_leaves_unread():
    assert (len(load("train", **local())), len(load("test", **local()))) == (48, 16)
    info = data_loading.describe_split("local", "train", local())
    assert info == {"source": [os.path.join(REVERSE, "train.jsonl")], "holdout": None, "rows": 48, "examples": 48,
                    "skipped": 0, "unread": ["sft_train.jsonl"], "note": None}


@pytest.mark.parametrize("name", ["sft_train.jsonl", "sft_train"])  # a file name, or a file stem of the directory
def test_train_and_test_files_by_name(name):
    words = [r["prompt"][0]["content"] for r in rows("sft_train.jsonl")]
    opts = local(train=name, test="test.jsonl")
    train, test = load("train", **opts), load("test", **opts)
    assert [e["prompt"][0]["content"] for e in train] == words and len(test) == 16
    assert data_loading.describe_split("local", "train", opts)["unread"] == ["train.jsonl"]
    # a named train file with no test file named: its prompts are split by hash, and that is said
    opts = local(train=name)
    train, test = load("train", **opts), load("test", **opts)
    assert (len(train), len(test)) == (60, 4) and not {e["where"] for e in train} & {e["where"] for e in test}
    assert data_loading.describe_split("local", "test", opts)["holdout"] == 0.05
    # an absolute path needs no data.local.path
    only = {"local": {"train": os.path.join(REVERSE, "sft_train.jsonl"), "test": os.path.join(REVERSE, "test.jsonl")}}
    assert (len(load("train", **only)), len(load("test", **only))) == (64, 16)
    with pytest.raises(data_rows.DataError, match=r"data.local.test=nope.jsonl: no such file \(looked in "):
        load("test", **local(test="nope.jsonl"))


def test_a_single_file_with_a_test_file_beside_it_is_flagged(tmp_path):
    shutil.copy(os.path.join(REVERSE, "train.jsonl"), tmp_path / "train.jsonl")
    shutil.copy(os.path.join(REVERSE, "test.jsonl"), tmp_path / "test.jsonl")
    single = {"local": {"path": str(tmp_path / "train.jsonl")}}
    info = data_loading.describe_split("local", "test", single)
    assert info["source"] == [str(tmp_path / "train.jsonl")] and info["holdout"] == 0.05 and info["examples"] == 2
    assert "test.jsonl lies beside it: to test on it pass data.local.test=test.jsonl" in info["note"]
    # naming the split silences it: the test file, or the hash split on purpose
    assert len(load("test", local={"path": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")})) == 16
    assert data_loading.describe_split("local", "test", {"local": {"path": str(tmp_path / "train.jsonl"),
                                                            "test": "holdout"}})["note"] is None


def test_startup_report_prints_which_file_feeds_which_split(tok, tmp_path):
    from conftest import compose
    cfg = compose(["loss=dpo", "datasets=[local]", f"data.local.path={REVERSE}", "max_length=80",
                   "max_prompt_length=64", f"data.cache_dir={tmp_path}/cache"])
    lines = []
    report = data_checks.startup_report(cfg, tok, need_pairs=True, sft_mode=False, echo=lines.append)
    assert lines[:3] == [
        f"data: local/train <- {REVERSE}/train.jsonl: 48 rows -> 48 examples, conversational (chat template); "
        "truncated: 0/48",
        f"data: local/test <- {REVERSE}/test.jsonl: 16 rows -> 16 examples, conversational (chat template); "
        "truncated: 0/16",
        "data: local: also in its directory, read by no split: sft_train.jsonl (name a file with data.local.train / "
        "data.local.test)"]
    assert "data: n_eval_examples=256 is more than the 16 held-out examples: the evaluation uses each of the 16 once" \
        in lines
    assert report["warnings"] == [] and report["scorers"] == {"local": None}
    assert report["model"] == {"max_length": 80, "max_prompt_length": 64, "max_position_embeddings": {"model": 128}}


# ---------------------------------------------------------------------------
# 3. formats: plain text vs conversational
# ---------------------------------------------------------------------------


def plain(rows_):
    """The reverse rows with every message list replaced by its text."""
    return [{k: (v[0]["content"] if isinstance(v, list) else v) for k, v in r.items()} for r in rows_]


def write(path, rows_):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_))


def test_splits_of_different_formats_are_refused_before_any_model(tmp_path, monkeypatch):
    import train
    from conftest import FAST, compose
    write(tmp_path / "train.jsonl", plain(rows("train.jsonl")))   # strings: no chat template
    shutil.copy(os.path.join(REVERSE, "test.jsonl"), tmp_path / "test.jsonl")  # message lists: chat template
    formats = data_checks.dataset_formats(["local"], {"local": {"path": str(tmp_path)}})
    assert formats == {"local": {"train": "text", "test": "chat"}}
    monkeypatch.setattr(models, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    over = list(FAST) + [f"runs_dir={tmp_path}/runs", "loss=dpo", "datasets=[local]", f"data.local.path={tmp_path}",
                         "exp_name=mixed"]
    with pytest.raises(data_rows.DataError) as err:
        train.run(compose(over), over)
    assert ("data set 'local' is formatted inconsistently: train is plain text (strings, no chat template); test is "
            "conversational (message lists, formatted with the chat template)") in str(err.value)
    assert "data.allow_mixed_formats=true" in str(err.value)
    assert not os.path.exists(tmp_path / "runs" / "mixed")
    warnings = data_checks.check_formats(formats, {"allow_mixed_formats": True})
    assert len(warnings) == 1 and "formatted inconsistently" in warnings[0]
    # rows of both formats inside one split are refused the same way
    write(tmp_path / "train.jsonl", plain(rows("train.jsonl"))[:3] + rows("train.jsonl")[3:])
    with pytest.raises(data_rows.DataError, match="train is a mix of plain text and conversational rows"):
        data_checks.check_formats(data_checks.dataset_formats(["local"], {"local": {"path": str(tmp_path)}}))


# ---------------------------------------------------------------------------
# 4. truncation and the model's length
# ---------------------------------------------------------------------------


def test_truncation_is_counted_and_the_keys_to_raise_are_named(tok):
    # the chat-templated prompt is [bos] <|user|> content <|end|> <|assistant|>: 4 + len(content) tokens
    # (one token per character); the response is the reversed word + <|end|> + eos
    lengths = [4 + len(r["prompt"][0]["content"]) for r in rows("train.jsonl")]
    totals = [p + 2 + len(r["chosen"][0]["content"]) for p, r in zip(lengths, rows("train.jsonl"))]
    t = data_checks.truncation_stats("local", "train", tok, local(), 48, 24)  # the config's defaults
    # every prompt + response is longer than 48: each prompt is cut to 24 tokens, and the responses then fit
    assert t == {"checked": 48, "of": 48, "truncated": 48, "share": 1.0, "prompt_cut": 48,
                 "prompt_cut_tokens_mean": round(sum(p - 24 for p in lengths) / 48, 1),
                 "prompt_cut_tokens_max": max(lengths) - 24, "response_cut": 0, "response_cut_tokens_mean": 0,
                 "response_cut_tokens_max": 0, "longest_prompt": max(lengths), "longest_total": max(totals)}
    assert (max(lengths), max(totals)) == (59, 67)
    warning = data_checks.truncation_warning("local/train", t, 48, 24)
    assert warning.startswith("local/train: 48 of 48 examples (100%) are truncated at max_length=48, "
                              "max_prompt_length=24: 48 prompts cut by ")
    assert "raise max_length (longest prompt + response: 67 tokens) and max_prompt_length (longest prompt: 59" in warning
    # at max_length=67 nothing is cut; at 66 the 6-letter words' pairs are, and since their prompts (59 tokens)
    # already fit max_prompt_length=60, their responses lose their last 2 tokens (<|end|> and eos)
    assert data_checks.truncation_stats("local", "train", tok, local(), 67, 60)["truncated"] == 0
    t = data_checks.truncation_stats("local", "train", tok, local(), 66, 60)
    n_long = sum(x > 66 for x in totals)
    assert (t["truncated"], t["prompt_cut"], t["response_cut"], t["response_cut_tokens_max"]) == (n_long, 0, n_long, 2)
    assert f"{n_long} responses cut by 2 tokens on average (up to 2)" in data_checks.truncation_warning(
        "local/train", t, 66, 60)
    # up to 5% truncated is not flagged
    assert data_checks.truncation_warning("x", dict(t, share=0.05), 66, 60) is None
    # a sample: evenly spaced examples
    assert data_checks.truncation_stats("local", "train", tok, local(), 48, 24, limit=10)["checked"] == 10
    # SFT mode measures the SFT target
    sft = data_checks.truncation_stats("local", "train", tok, local(train="sft_train.jsonl", test="test.jsonl"), 48,
                                       24, sft_mode=True)
    assert (sft["checked"], sft["truncated"]) == (64, 64)


def test_train_reports_truncation_and_a_model_too_short_for_max_length(tmp_path, capsys, one_thread):
    import train
    from conftest import FAST, compose
    over = list(FAST) + [f"runs_dir={tmp_path}", "loss=sft", "datasets=[local]", f"data.local.path={REVERSE}",
                         "max_length=200", "max_prompt_length=24", "n_examples=8", "eval_every=null", "n_eval_examples=8",
                         "exp_name=short", one_thread]
    run_dir = train.run(compose(over), over)
    out = capsys.readouterr().out
    with open(os.path.join(run_dir, "data_summary.json")) as f:
        summary = json.load(f)
    assert summary["model"]["max_position_embeddings"] == {"model": 128}
    assert [w for w in summary["warnings"] if "max_position_embeddings" in w] == [
        "max_length=200 is longer than the model's max_position_embeddings=128 (model tiny: init_config): positions "
        "past it are untrained (or fail); lower max_length to <= 128"]
    assert "WARNING: max_length=200 is longer than the model's max_position_embeddings=128" in out
    # max_length=200 fits every example: nothing is truncated
    assert [s["truncation"]["truncated"] for s in summary["splits"].values()] == [0, 0]


def test_max_positions_of_a_checkpoint_or_a_local_model_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 64}))
    from omegaconf import OmegaConf
    got = data_checks.max_positions(OmegaConf.create({"name": "m", "name_or_path": str(tmp_path), "archive": None}))
    assert got == {"value": 64, "from": str(tmp_path / "config.json")}
    assert data_checks.max_positions(OmegaConf.create({"name": "m", "name_or_path": "org/hub-only"})) is None


# ---------------------------------------------------------------------------
# 5. scorers named in the config
# ---------------------------------------------------------------------------


def test_scorer_by_file_path_and_by_module_name(monkeypatch):
    prompt = [{"role": "user", "content": PROMPT + "abc"}]
    by_file = scorers.Scorer(f"{SCORER_FILE}:score")
    assert by_file(prompt, "cba") == {"correct": 1.0, "letters": 1.0}
    assert by_file(PROMPT + "abc", "cbx and more") == {"correct": 0.0, "letters": pytest.approx(2 / 3)}
    monkeypatch.syspath_prepend(REVERSE)
    by_module = scorers.Scorer("reverse_scorer:score")
    assert by_module(prompt, "") == {"correct": 0.0, "letters": 0.0}
    task = scorers.for_config(["local", "embedded"], {"scorer": "reverse_scorer:score"})  # one scorer for all
    assert task.specs() == {"local": "reverse_scorer:score", "embedded": "reverse_scorer:score"}
    assert task.common() is task.by_dataset["local"]


def test_bad_scorers_are_named(tmp_path):
    (tmp_path / "bad.py").write_text(
        "NOT_CALLABLE = 3\n"
        "def listy(p, c):\n    return [1.0]\n"
        "def text(p, c):\n    return {'ok': 'yes'}\n"
        "def flaky(p, c):\n    return {'a': 1.0} if c else {'b': 0.0}\n"
        "def boom(p, c):\n    raise KeyError('no word')\n")
    f = str(tmp_path / "bad.py")
    cases = [("nocolon", "expected '<module>:<function>'"),
             ("no_such_module_xyz:score", "cannot import module 'no_such_module_xyz'"),
             (f"{tmp_path}/missing.py:score", "no such file"),
             (f"{f}:nope", "has no attribute 'nope'"),
             (f"{f}:NOT_CALLABLE", "NOT_CALLABLE is a int, not a callable")]
    for spec, problem in cases:
        with pytest.raises(scorers.ScorerError) as err:
            scorers.Scorer(spec)
        assert str(err.value).startswith(f"data.scorer={spec!r}: ") and problem in str(err.value), str(err.value)
    with pytest.raises(scorers.ScorerError, match="returned list .*must return a non-empty dict"):
        scorers.Scorer(f"{f}:listy")("p", "c")
    with pytest.raises(scorers.ScorerError, match="returned 'ok': 'yes'; every score must be a name"):
        scorers.Scorer(f"{f}:text")("p", "c")
    flaky = scorers.Scorer(f"{f}:flaky")
    flaky("p", "c")
    with pytest.raises(scorers.ScorerError, match=r"returned the scores \['b'\], earlier \['a'\]"):
        flaky("p", "")
    with pytest.raises(scorers.ScorerError, match="raised KeyError: 'no word'"):
        scorers.Scorer(f"{f}:boom")("p", "c")


def test_a_bad_scorer_stops_train_before_any_model(tmp_path, monkeypatch):
    import train
    from conftest import FAST, compose
    monkeypatch.setattr(models, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    over = list(FAST) + [f"runs_dir={tmp_path}", "datasets=[local]", f"data.local.path={REVERSE}",
                         "data.scorer=reverse_scorer_missing:score", "exp_name=bad"]
    with pytest.raises(scorers.ScorerError, match="data.scorer='reverse_scorer_missing:score': cannot import"):
        train.run(compose(over), over)


def test_training_logs_the_task_scores_of_ones_own_scorer(tmp_path, one_thread):
    """sample_during_eval: the generations are scored by data.scorer on the original prompt."""
    from conftest import train_run
    _, metrics = train_run(tmp_path, ["loss=sft", "datasets=[local]", f"data.local.path={REVERSE}",
                                      f"data.scorer={SCORER_FILE}:score", "max_length=80", "max_prompt_length=64",
                                      "n_examples=8", "eval_every=null", "sample_during_eval=true", "n_eval_samples=8",
                                      "max_new_tokens=6", "n_eval_examples=8", "exp_name=scored", one_thread])
    last = metrics[-1]
    assert {"task_eval/correct", "task_eval/letters"} <= set(last) and "task_eval/exact" not in last
    assert 0.0 <= last["task_eval/correct"] <= last["task_eval/letters"] <= 1.0


# ---------------------------------------------------------------------------
# non-UTF-8 input
# ---------------------------------------------------------------------------


def test_a_non_utf8_byte_names_the_file_and_line(tmp_path):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode()
    bad = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'
    (tmp_path / "train.jsonl").write_bytes(b"\n".join([good, bad, good.replace(b'"p"', b'"q"')]) + b"\n")
    (tmp_path / "test.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\n")  # a byte-order mark is fine
    with pytest.raises(data_rows.DataError) as err:
        load("train", local={"path": str(tmp_path)})
    assert (f"{tmp_path}/train.jsonl: line 2: not valid UTF-8 (byte 0xe9 at byte 16 of the line); save the file as "
            "UTF-8") in str(err.value)
    assert [e["prompt"] for e in load("train", local={"path": str(tmp_path)}, skip_invalid=True)] == ["p", "q"]
    assert [e["prompt"] for e in load("test", local={"path": str(tmp_path)})] == ["p"]
    # whole-file formats: a JSON array and CSV
    (tmp_path / "a.json").write_bytes(b'[\n' + good + b',\n' + bad + b'\n]')
    with pytest.raises(data_rows.DataError, match=r"a.json: line 3: not valid UTF-8 \(byte 0xe9"):
        load("train", local={"path": str(tmp_path / "a.json")})
    (tmp_path / "a.csv").write_bytes(b"prompt,chosen,rejected\np,a,b\ncaf\xe9,a,b\n")
    with pytest.raises(data_rows.DataError, match=r"a.csv: line 3: not valid UTF-8 \(byte 0xe9 at byte 4 of the line\)"):
        load("train", local={"path": str(tmp_path / "a.csv")})
