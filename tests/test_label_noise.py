"""Label noise (data.flip_fraction): a seeded, hash-chosen share of the train pairs has chosen and
rejected swapped; test splits are untouched; the count is reported at start-up and in
data_summary.json, and the caches are keyed by it."""
import json
import os

import pytest

from prefkd import tokenizer_facts
from prefkd.data import loading as data_loading

REVERSE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "reverse")


def swapped(clean, noisy):
    """Indices whose chosen and rejected are exchanged (everything else equal)."""
    out = []
    for i, (a, b) in enumerate(zip(clean, noisy)):
        assert a["prompt"] == b["prompt"] and a.get("sft_target") == b.get("sft_target")
        if (a["chosen"], a["rejected"]) != (b["chosen"], b["rejected"]):
            assert (a["chosen"], a["rejected"]) == (b["rejected"], b["chosen"])
            out.append(i)
    return out


@pytest.mark.parametrize("name,options", [("embedded", {}), ("local", {"local": {"path": REVERSE}})])
def test_the_requested_share_of_train_pairs_is_flipped_deterministically(name, options):
    clean, fp0 = data_loading.load_dataset_checked(name, "train", options, silent=True)
    by = {}
    for f in (0.2, 0.4):
        noisy, fp = data_loading.load_dataset_checked(name, "train", {**options, "flip_fraction": f}, silent=True)
        by[f] = swapped(clean, noisy)
        assert len(by[f]) == round(f * len(clean))  # exactly the share (rounded to a whole pair)
        assert fp != fp0 and f"flip{f:g}" in fp
        again, _ = data_loading.load_dataset_checked(name, "train", {**options, "flip_fraction": f}, silent=True)
        assert swapped(clean, again) == by[f]  # deterministic
    assert set(by[0.2]) < set(by[0.4])  # a larger share flips a superset
    other, _ = data_loading.load_dataset_checked(name, "train", {**options, "flip_fraction": 0.2, "flip_seed": 1}, silent=True)
    assert swapped(clean, other) != by[0.2] and len(swapped(clean, other)) == len(by[0.2])
    # the test split is untouched, and no flip leaves the fingerprint as it was
    test, tfp = data_loading.load_dataset_checked(name, "test", options, silent=True)
    ntest, ntfp = data_loading.load_dataset_checked(name, "test", {**options, "flip_fraction": 0.4}, silent=True)
    assert ntest == test and ntfp == tfp
    assert data_loading.load_dataset_checked(name, "train", {**options, "flip_fraction": 0.0}, silent=True)[1] == fp0
    info = data_loading.describe_split(name, "train", {**options, "flip_fraction": 0.4})
    assert info["flipped"] == len(by[0.4]) and data_loading.describe_split(name, "test", {**options, "flip_fraction": 0.4}
                                                                   )["flipped"] == 0


@pytest.mark.parametrize("value", [1.5, -0.1, "half"])
def test_a_bad_share_is_refused_naming_the_key(value):
    with pytest.raises(ValueError, match="data.flip_fraction"):
        data_loading.data_options({"flip_fraction": value})
    with pytest.raises(ValueError, match="data.flip_seed"):
        data_loading.data_options({"flip_seed": 0.5})


def test_a_run_reports_the_flipped_pairs_and_its_caches_are_keyed_by_them(tmp_path, capsys):
    """train.py's start-up data check (what it prints and writes to <run>/data_summary.json)
    counts the flipped pairs; the cache key of a noisy run differs from the clean one's."""
    import train
    from conftest import FAST, compose
    from prefkd import output_cache
    over = list(FAST) + [f"runs_dir={tmp_path}", "loss=dpo", "datasets=[local]", f"data.local.path={REVERSE}",
                         "max_length=80", "max_prompt_length=64", "data.flip_fraction=0.25",
                         f"data.cache_dir={tmp_path}/cache"]
    splits = train.check_data(compose(over))["splits"]
    n = len(data_loading.load_dataset_checked("local", "train", {"local": {"path": REVERSE}}, silent=True)[0])
    assert splits["local/train"]["flipped"] == round(0.25 * n) and splits["local/test"]["flipped"] == 0
    assert f"labels of {round(0.25 * n)} pairs flipped (data.flip_fraction)" in capsys.readouterr().out
    json.dumps(splits)  # what data_summary.json holds
    tok = tokenizer_facts.get_tokenizer("embedded")
    noisy = output_cache._data_key(compose(over), tok)
    clean = output_cache._data_key(compose([o for o in over if "flip" not in o]), tok)
    assert noisy["data sources"]["local/train"] != clean["data sources"]["local/train"]
    assert "flip_fraction" in noisy["data"] and "flip_fraction" not in clean["data"]
