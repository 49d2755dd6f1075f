"""A run resolved once (prefkd/run_plan.py, train.validate_config): the defects found while
splitting the framework by concept, each refused with a clear error before anything loads; the
loss spec's declarations (cacheability, renamed keys, the vocabulary check); and the top-k rest
slot exact in float32."""
import os
import subprocess
import sys

import pytest
import torch

import train
from conftest import REPO, compose
from prefkd import hub_access, output_cache, run_plan
from prefkd.logprobs import collapse_topk


def cli(args, env=None):
    """`python train.py args` in a subprocess: (exit code, stderr)."""
    run = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=300, cwd=REPO)
    return run.returncode, run.stderr


@pytest.mark.parametrize("name", ["nan", "1e3", "12"])
def test_a_numeric_run_name_is_refused_naming_exp_name(tmp_path, name):
    cfg = compose([f"runs_dir={tmp_path}", f"exp_name={name}"])
    with pytest.raises(ValueError, match="exp_name=.* is read as a number"):
        train.prepare(cfg)


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", "."])
def test_a_run_name_must_stay_inside_runs_dir(tmp_path, name):
    cfg = compose([f"runs_dir={tmp_path}", f"exp_name={name}"])
    with pytest.raises(ValueError, match="must name a directory inside runs_dir"):
        train.prepare(cfg)
    assert os.listdir(tmp_path) == []   # nothing written


def test_refusals_exit_2_without_hydra_traceback(tmp_path):
    code, err = cli(["trainer=FSDPTrainer", "batch_size=3", f"runs_dir={tmp_path}"])
    assert code == 2 and "batch_size=3 must be a positive multiple" in err and "HYDRA_FULL_ERROR" not in err


@pytest.mark.parametrize("args,new", [(["loss=gkd", "loss.teacher_top_k=5"], "loss.top_k=5"),
                                      (["reference_cache=/tmp/r"], "reference.cache=/tmp/r"),
                                      (["trainer=TensorParallelTrainer", "trainer.cpu_devices=2"],
                                       "trainer.cpu_workers=2"),
                                      (["wandb.enabled=false"], "wandb.mode=disabled")])
def test_an_old_key_name_is_refused_naming_the_new_one(tmp_path, args, new):
    code, err = cli(args + [f"runs_dir={tmp_path}"])
    assert code == 2 and "was renamed" in err and new in err, err


def test_offline_a_hub_model_and_data_set_are_refused_naming_the_keys(tmp_path):
    code, err = cli(["loss=dpo", "model=llama1b", "datasets=[dpomix]", f"runs_dir={tmp_path}"],
                    env={"HF_HUB_OFFLINE": "1"})
    assert code == 2, err
    for key in ("model.name_or_path=", "model.tokenizer=", "data.paths.dpomix"):
        assert key in err, err
    assert "OSError" not in err and "Traceback" not in err


def test_a_model_path_that_does_not_exist_is_refused_naming_the_keys_and_the_converter(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFKD_MODELS", str(tmp_path / "none"))
    cfg = compose(["model=smollm2_135m", "loss=dpo"])
    with pytest.raises(ValueError, match=r"no such local directory: model.name_or_path=.*/none/smollm2-135m-instruct; "
                                         r"model.tokenizer=.*scripts/import_gguf.py"):
        train.validate_config(cfg)
    monkeypatch.setattr(hub_access, "_hub_reachable", lambda timeout=3.0: True)  # not a hub id, even online
    with pytest.raises(ValueError, match="no such local directory"):
        train.validate_config(cfg)


def test_top_k_must_be_a_whole_number_within_the_vocabulary(tmp_path):
    base = [f"runs_dir={tmp_path}", "teacher=tiny_teacher"]
    for loss in ("gkd", "adpa", "vanillakd", "dckd"):
        with pytest.raises(ValueError, match=r"loss.top_k must be a whole number"):
            train.prepare(compose(base + [f"loss={loss}", "loss.top_k=2.5"]))
    vocab = len(__import__("prefkd.tokenizer_facts").tokenizer_facts.get_tokenizer("embedded"))
    with pytest.raises(ValueError, match=f"loss.top_k={vocab + 1} exceeds the vocabulary size {vocab}"):
        train.prepare(compose(base + ["loss=vanillakd", f"loss.top_k={vocab + 1}"]))
    with pytest.raises(ValueError, match="exceeds the vocabulary size"):
        train.prepare(compose(base + ["loss=tvkd", "loss.variant=released", f"loss.top_k={vocab + 1}"]))


def test_the_spec_declares_cacheability_without_probing():
    """Whether a teacher cache can serve a loss is the spec's answer (no model, no random logits)."""
    def problem(*overrides):
        return output_cache.teacher_cache_problem(compose(["teacher=tiny_teacher", *overrides]))
    assert problem("loss=tvkd") is None and problem("loss=ddpo") is None
    assert problem("loss=vanillakd", "loss.top_k=5") is None
    assert "vocabulary-sized" in problem("loss=vanillakd") and "loss.top_k=K" in problem("loss=vanillakd")
    assert "vocabulary-sized" in problem("loss=dpkd")
    assert "loss.lam=0" in problem("loss=gkd", "loss.lam=0.5", "loss.top_k=5")
    assert "generates its training responses" in problem("loss=seqkd")
    assert "uses no teacher" in problem("loss=dpo")


def test_run_plan_reads_the_spec_once():
    plan = run_plan.RunPlan.of(compose(["loss=adpa", "teacher=tiny_teacher"]))
    assert (plan.reference, plan.teacher, plan.teacher_reference) == (None, True, True)
    assert plan.reference_model and plan.generation.source == "reference" and plan.caches == {}
    plan = run_plan.RunPlan.of(compose(["loss=dpo", "reference.cache=/tmp/r"]))
    assert (plan.reference, plan.teacher, plan.caches) == ("logps", False, {"reference": "/tmp/r"})


def _collapse64(z, ids):
    """The collapsed distribution in float64: log p(ids), log(1 - their mass)."""
    lse = torch.logsumexp(z, -1, keepdim=True)
    top = z.gather(-1, ids) - lse
    return torch.cat([top, torch.log1p(-top.exp().sum(-1, keepdim=True))], -1)


@pytest.mark.parametrize("mass", [1e-4, 1e-2, 0.3, 0.7, 1 - 1e-6])
def test_rest_slot_and_its_gradient_are_exact_in_float32(mass):
    """The top-k collapse every top-k loss reads (gkd, adpa, vanillakd, dckd, tvkd's released
    recipe): against float64, value and gradient to float32 precision whatever the top-k mass m
    (the rest slot used to lose ~6e-8 / m relative where the rest holds nearly everything)."""
    g = torch.Generator().manual_seed(0)
    V, K = 64, 4
    z = torch.randn(3, V, generator=g, dtype=torch.float64)
    ids = torch.arange(K).expand(3, K)
    # shift the top-k logits so that they hold `mass` of the probability
    rest = torch.logsumexp(z[:, K:], -1, keepdim=True)
    top = torch.logsumexp(z[:, :K], -1, keepdim=True)
    z[:, :K] += rest - top + torch.log(torch.tensor(mass / (1 - mass), dtype=torch.float64))
    w = torch.randn(3, K + 1, generator=g, dtype=torch.float64)
    z64 = z.clone().requires_grad_(True)
    (w * _collapse64(z64, ids)).sum().backward()
    z32 = z.float().requires_grad_(True)
    out32 = collapse_topk(z32, ids)
    out32_value = out32.detach()
    (w.float() * out32).sum().backward()
    ref = _collapse64(z, ids)
    rel = lambda a, b: float(((a.double() - b).abs() / b.abs().clamp(min=1e-30)).max())
    assert rel(out32_value[:, K], ref[:, K]) < 1e-5, (mass, out32_value[:, K], ref[:, K])
    assert float((z32.grad.double() - z64.grad).abs().max() / z64.grad.abs().max()) < 1e-5
