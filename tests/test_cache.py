"""Teacher and reference caches (precompute.py, prefkd/output_cache.py): a run that reads a cache has the
losses of the run with the live model, the cached model is not loaded, and a cache computed with
other settings (or for a loss that cannot use one) is refused with an error naming the key.

The teachers are randomly initialised tiny_teacher checkpoints (equality does not need trained
ones); every run is 2 training steps of 8 pairs plus one evaluation of 16.
"""
import os

import pytest
import torch

from conftest import FAST, compose, read_metrics, train_run
from prefkd import models
from prefkd import tokenizer_facts
from prefkd import loss_spec

SHORT = ["n_examples=16", "n_eval_examples=16", "eval_every=null", "data.check_lengths=null"]
TINY = FAST + SHORT


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two tiny_teacher checkpoints with different random weights: (teacher, other)."""
    root = tmp_path_factory.mktemp("teachers")
    tok = tokenizer_facts.get_tokenizer("embedded")
    out = []
    for seed in (1, 2):
        path = str(root / f"t{seed}")
        model = models.build_model(compose(["model=tiny_teacher"]).model, tok, torch.float32, seed=seed)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out.append(path)
    return out


def precompute(tmp_path, kind, overrides):
    import precompute as pc
    return pc.precompute(compose(TINY + [f"runs_dir={tmp_path}"] + overrides), kind, log=lambda *a: None)


def losses_of(records):
    pick = lambda key: [r[key] for r in records if key in r]
    return pick("loss/train"), pick("loss/eval")


def counting_build(monkeypatch):
    """Count the models models.build_model builds."""
    built, real = [], models.build_model
    monkeypatch.setattr(models, "build_model", lambda *a, **k: built.append(1) or real(*a, **k))
    return built


TEACHER_CASES = {
    "tvkd": ["loss=tvkd"],
    "tvkd_max": ["loss=tvkd", "loss.potential=max", "loss.gamma=0.9"],
    "tvkd_logprob": ["loss=tvkd", "loss.potential=logprob"],
    "tvkd_tau": ["loss=tvkd", "loss.value_temperature=0.5", "loss.gamma=0.9"],
    "tvkd_released": ["loss=tvkd", "loss.variant=released", "loss.top_k=5"],
    "tvkd_released_tv": ["loss=tvkd", "loss.variant=released_teacher_value", "loss.top_k=5"],
    "vanillakd_topk": ["loss=vanillakd", "loss.top_k=5"],
    "dckd_topk": ["loss=dckd", "loss.top_k=7"],
    "ddpo": ["loss=ddpo", "teacher.reference_archive={other}"],
    "dpo": ["loss=dpo"],
}


def trainer_losses(tmp_path, name, overrides):
    """The training losses of a short run (BasicTrainer's train_step over the run's batches) and
    its held-out losses, without the run's start-up report and checkpoint (the caches are
    checked by train.prepare, as train.py does)."""
    import train
    import trainers
    cfg = train.prepare(compose(TINY + [f"runs_dir={tmp_path}", f"exp_name={name}"] + overrides))
    os.makedirs(train.run_dir_of(cfg))
    t = trainers.BasicTrainer(cfg, train.run_dir_of(cfg))
    t.t0 = 0.0
    steps = [t.train_step(batch)["loss/train"] for batch in t.batch_iterator("train")]
    t.policy.eval()
    held_out = [float(t.compute_loss(batch, train=False)[0]) for batch in t.batch_iterator("test")]
    return steps, held_out


@pytest.mark.parametrize("case", sorted(TEACHER_CASES))
def test_cached_run_has_the_live_runs_losses(tmp_path, teachers, case, monkeypatch):
    teacher, other = teachers
    overrides = [o.format(other=other) for o in TEACHER_CASES[case]] + ["lr=1e-3", "n_examples=24"]
    if case != "dpo":
        overrides += ["teacher=tiny_teacher", f"teacher.archive={teacher}"]
    cfg = compose(TINY + overrides)
    spec = loss_spec.get_loss(cfg.loss.name)
    caches = []
    if spec.teacher_features is not None:
        caches.append(f"teacher.cache={tmp_path}/teacher_cache")
        manifest = precompute(tmp_path, "teacher", overrides + caches[-1:])
        assert manifest["rows"] > 0
    if spec.reference_need(cfg.loss) == "logps":
        caches.append(f"reference.cache={tmp_path}/reference.cache")
        manifest = precompute(tmp_path, "reference", overrides + caches[-1:])
        assert list(manifest["features"]) == ["reference_logps"]
    live = trainer_losses(tmp_path, "live", overrides)
    built = counting_build(monkeypatch)
    cached = trainer_losses(tmp_path, "cached", overrides + caches)
    assert len(built) == 1  # the policy: no teacher, teacher reference or reference was loaded
    assert len(live[0]) == 3 and len(live[1]) == 1
    assert cached[0] == pytest.approx(live[0], abs=1e-6, rel=0)
    assert cached[1] == pytest.approx(live[1], abs=1e-6, rel=0)


def test_train_py_run_with_both_caches_has_the_live_losses(tmp_path, teachers):
    """The whole train.py path (start-up, training, evaluation, checkpoint) with cached models."""
    overrides = ["loss=tvkd", "loss.gamma=0.9", "exp_name=r", "teacher=tiny_teacher", f"teacher.archive={teachers[0]}"]
    caches = [f"teacher.cache={tmp_path}/t", f"reference.cache={tmp_path}/r"]
    precompute(tmp_path, "teacher", overrides + caches[:1])
    precompute(tmp_path, "reference", overrides + caches[1:])
    _, live = train_run(tmp_path / "live", SHORT + overrides)
    _, cached = train_run(tmp_path / "cached", SHORT + overrides + caches)
    (lt, le), (ct, ce) = losses_of(live), losses_of(cached)
    assert len(ct) == 2 and len(ce) == 1 and ct == pytest.approx(lt, abs=1e-6, rel=0)
    assert ce == pytest.approx(le, abs=1e-6, rel=0)


def test_one_cache_covers_several_seeds_and_is_recomputed_only_when_needed(tmp_path, teachers):
    """seed=0,1 caches the union of both seeds' examples (each once); --if-needed keeps a cache with
    the same key that covers the requested seeds and replaces one that does not."""
    import precompute as pc
    overrides = TINY + [f"runs_dir={tmp_path}", "loss=tvkd", "teacher=tiny_teacher", f"teacher.archive={teachers[0]}",
                        "n_examples=24", "lr=1e-3"]
    cache = f"teacher.cache={tmp_path}/t"
    logs = []
    both = pc.run("teacher", overrides + ["seed=0,1", cache], log=logs.append)
    one = pc.precompute(compose(overrides + ["seed=0", f"teacher.cache={tmp_path}/t0"]), "teacher", log=logs.append)
    # the two seeds draw different examples; a seed's own cache holds fewer rows than the union
    assert one["coverage"]["train"] < both["coverage"]["train"] <= 2 * one["coverage"]["train"]
    assert [p["seed"] for p in both["coverage"]["plans"]] == [0, 1]
    for seed in (0, 1):
        live = trainer_losses(tmp_path, f"live{seed}", overrides[len(TINY) + 1:] + [f"seed={seed}"])
        cached = trainer_losses(tmp_path, f"cached{seed}", overrides[len(TINY) + 1:] + [f"seed={seed}", cache])
        assert cached[0] == pytest.approx(live[0], abs=1e-6, rel=0) and len(live[0]) == 3
    with pytest.raises(Exception, match="rows of this batch are not in the cache"):
        trainer_losses(tmp_path, "seed2", overrides[len(TINY) + 1:] + ["seed=2", cache])
    stamp = os.path.getmtime(f"{tmp_path}/t/manifest.json")
    for seeds in ("seed=0,1", "seed=1"):  # covered: kept
        assert pc.main(["teacher"] + overrides + [seeds, cache, "--if-needed"]) == 0
    assert os.path.getmtime(f"{tmp_path}/t/manifest.json") == stamp
    assert pc.main(["teacher"] + overrides + ["seed=0,1,2", cache, "--if-needed"]) == 0  # seed 2 is not: replaced
    assert [p["seed"] for p in output_cache_manifest(f"{tmp_path}/t")["coverage"]["plans"]] == [0, 1, 2]
    # another teacher checkpoint: the key differs, the cache is replaced rather than reused
    assert pc.main(["teacher"] + overrides[:-2] + [f"teacher.archive={teachers[1]}", "seed=0,1,2", cache,
                                                   "--if-needed"]) == 0
    assert teachers[1] in output_cache_manifest(f"{tmp_path}/t")["key"]["teacher.archive"]["source"]
    # without a checkpoint the reference (the starting policy) is initialised from each run's seed: one
    # cache cannot serve several seeds
    with pytest.raises(ValueError, match="randomly initialised with each run's seed"):
        pc.run("reference", TINY + ["loss=dpo", "seed=0,1", f"reference.cache={tmp_path}/x"])


def cache_rows(path, kind):
    """{row key: {feature: array}} of a finished cache."""
    import numpy as np
    from prefkd import output_cache
    cache = output_cache.FeatureCache(path, kind)
    cache._load_index()
    return {k: {name: np.asarray(m[int(cache._offsets[name][i]):int(cache._offsets[name][i + 1])])
                for name, m in cache._maps.items()} for k, i in cache._index.items()}


@pytest.mark.parametrize("kind,overrides", [
    ("teacher", ["loss=ddpo", "teacher.reference_archive={other}"]),
    ("reference", ["loss=dpo", "model=tiny_teacher", "model.archive={other}"]),
])
def test_two_processes_precompute_the_rows_and_values_of_one(tmp_path, teachers, kind, overrides):
    """trainer=FSDPTrainer precomputes with one process per device (2 CPU workers here), each a share
    of the batches: the cache holds the same rows with the same values as one process's."""
    import numpy as np
    from prefkd import output_cache
    common = [o.format(other=teachers[1]) for o in overrides] + [
        "teacher=tiny_teacher", f"teacher.archive={teachers[0]}", "n_examples=40", "seed=0,1"]
    key = output_cache.CONFIG_KEY[kind]
    import precompute as pc
    run = lambda extra: pc.run(kind, TINY + [f"runs_dir={tmp_path}"] + common + extra, log=lambda *a: None)  # noqa
    one = run([f"{key}={tmp_path}/one"])
    two = run([f"{key}={tmp_path}/two", "trainer=FSDPTrainer", "trainer.cpu_workers=2"])
    assert two["processes"] == 2 and two["rows"] == one["rows"] > 0 and two["tokens"] == one["tokens"]
    assert two["coverage"] == {**one["coverage"]} and two["key"] == one["key"]
    a, b = cache_rows(f"{tmp_path}/one", kind), cache_rows(f"{tmp_path}/two", kind)
    assert set(a) == set(b)
    for k in a:
        for name in a[k]:
            np.testing.assert_allclose(b[k][name], a[k][name], atol=1e-6, rtol=0)
    assert not [n for n in os.listdir(tmp_path) if ".parts-" in n or ".tmp-" in n]  # the parts are removed


def output_cache_manifest(path):
    import json
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def test_cache_sizes_per_token(tmp_path, teachers):
    common = ["teacher=tiny_teacher", f"teacher.archive={teachers[0]}"]
    tvkd = precompute(tmp_path, "teacher", common + ["loss=tvkd", f"teacher.cache={tmp_path}/a"])
    assert tvkd["bytes_per_token"] == 4.0 and list(tvkd["features"]) == ["values"]
    topk = precompute(tmp_path, "teacher", common + ["loss=vanillakd", "loss.top_k=50",
                                                     f"teacher.cache={tmp_path}/b"])
    assert topk["bytes_per_token"] == 50 * 4 + 51 * 4  # int32 ids + float32 collapsed log-probs


def test_a_cache_computed_with_other_settings_is_refused(tmp_path, teachers):
    import train
    from prefkd import output_cache
    teacher, other = teachers
    base = ["loss=tvkd", "loss.variant=released", "loss.top_k=5", "teacher=tiny_teacher",
            f"teacher.archive={teacher}", f"teacher.cache={tmp_path}/c", "exp_name=x", f"runs_dir={tmp_path}"]
    precompute(tmp_path, "teacher", base)
    train.prepare(compose(TINY + base))  # the run's own settings: accepted
    for change, message in [(f"teacher.archive={other}", r"teacher.archive: other weights"),
                            ("loss.top_k=6", r"loss.top_k: 5 in the cache, 6 now"),
                            ("max_length=40", r"max_length: 48 in the cache, 40 now")]:
        with pytest.raises(output_cache.CacheMismatch, match=message):
            train.prepare(compose(TINY + base + [change]))
    # settings the features do not depend on are free (alpha, beta of the released recipe; the seed)
    train.prepare(compose(TINY + base + ["loss.alpha=0.9", "seed=3"]))
    # a row the cache does not hold is an error at lookup, never a silent zero
    cache = output_cache.FeatureCache(f"{tmp_path}/c", "teacher")
    ids = torch.tensor([[1, 50, 51, 52, 2]])
    with pytest.raises(output_cache.CacheError, match="1 of the 1 rows of this batch are not in the cache"):
        cache.lookup(ids, torch.tensor([[-100, -100, 51, 52, 2]]), torch.ones_like(ids))


def test_losses_that_cannot_use_a_cache_refuse_it(tmp_path, teachers, capsys):
    import train
    from prefkd import output_cache
    t = ["teacher=tiny_teacher", f"teacher.archive={teachers[0]}", f"runs_dir={tmp_path}", "exp_name=x"]
    tc = f"teacher.cache={tmp_path}/none"
    for overrides, message in [
            (["loss=vanillakd"], r"vocabulary-sized teacher features \(teacher_logp.*loss.top_k=K"),
            (["loss=dpkd"], r"vocabulary-sized teacher features"),
            (["loss=seqkd"], r"generates its training responses with the teacher"),
            (["loss=gkd", "loss.lam=0.5", "loss.top_k=5"], r"sampled from the current student"),
            (["loss=adpa", "loss.top_k=5", f"teacher.reference_archive={teachers[1]}"],
             r"generated during the run by the starting student")]:
        with pytest.raises(output_cache.CacheError, match=message):
            train.prepare(compose(TINY + t + overrides + [tc]))
        with pytest.raises(output_cache.CacheError, match=message):  # precompute refuses before any model loads
            precompute(tmp_path, "teacher", t + overrides + [tc])
    with pytest.raises(output_cache.CacheError, match="reads no reference log-probs"):
        train.prepare(compose(TINY + ["loss=sft", f"reference.cache={tmp_path}/r"]))
    with pytest.raises(output_cache.CacheError, match="full logits"):
        precompute(tmp_path, "reference", ["loss=tdpo", f"reference.cache={tmp_path}/r"])
    # tdpo keeps its live reference, and says so
    _, records = train_run(tmp_path, SHORT + ["loss=tdpo", "n_examples=8", "exp_name=tdpo",
                                              f"reference.cache={tmp_path}/r"])
    assert "reference.cache" in capsys.readouterr().out and records


def test_an_interrupted_precompute_leaves_no_cache(tmp_path, teachers, monkeypatch):
    from prefkd import output_cache
    calls = []
    real = output_cache.CacheWriter.add

    def crash(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(self, *a, **k)

    monkeypatch.setattr(output_cache.CacheWriter, "add", crash)
    with pytest.raises(KeyboardInterrupt):
        precompute(tmp_path, "teacher", ["loss=tvkd", "teacher=tiny_teacher", f"teacher.archive={teachers[0]}",
                                         f"teacher.cache={tmp_path}/c"])
    assert not [n for n in os.listdir(tmp_path) if n == "c" or n.startswith("c.tmp")]  # temporary dir removed
    with pytest.raises(output_cache.CacheError, match="no finished cache"):
        output_cache.FeatureCache(f"{tmp_path}/c", "teacher")


def test_fsdp_two_processes_with_caches_match_the_live_run(tmp_path, teachers):
    from test_distributed import assert_same, free_port, launch
    common = SHORT + ["loss=tvkd", "loss.gamma=0.9", "lr=1e-3", "exp_name=d", "teacher=tiny_teacher",
                      f"teacher.archive={teachers[0]}"]
    caches = [f"teacher.cache={tmp_path}/t", f"reference.cache={tmp_path}/r"]
    precompute(tmp_path, "teacher", common + caches[:1])
    precompute(tmp_path, "reference", common + caches[1:])
    _, single = train_run(tmp_path / "single", common)
    fsdp = read_metrics(launch(tmp_path / "fsdp", common + caches + [
        "trainer=FSDPTrainer", "trainer.cpu_workers=2", f"trainer.port={free_port()}"]))
    assert_same(single, fsdp, ["loss/train", "shaping_train/margin", "value_train/chosen_last", "loss/eval"], tol=1e-5)
