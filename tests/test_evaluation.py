"""evaluate.py on a run of one's own task (tests/fixtures/reverse): every setting from the run's
config, key=value arguments that override one each, every held-out row evaluated once, judge-ready files."""
import json
import os

import pytest

import evaluate
from prefkd import tokenizer_facts

REVERSE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "reverse")
SCORER = os.path.join(REVERSE, "reverse_scorer.py") + ":score"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """An SFT run (one step) on the reverse task's preference files, with its scorer and lengths."""
    import torch
    import train
    from conftest import FAST, compose
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("eval_run")
    over = list(FAST) + [f"runs_dir={root}", "loss=sft", "datasets=[local]", f"data.local.path={REVERSE}",
                         f"data.scorer={SCORER}", "max_length=80", "max_prompt_length=64", "max_new_tokens=6",
                         "n_examples=8", "eval_every=null", "n_eval_examples=8", "eval_batch_size=8", "exp_name=rev",
                         "num_threads=1", f"data.cache_dir={root}/cache"]
    try:
        yield train.run(compose(over), over)
    finally:
        torch.set_num_threads(threads)


def test_defaults_come_from_the_run_and_every_row_is_evaluated_once(run_dir, tmp_path, capsys):
    gens, alpaca, mt = tmp_path / "g.jsonl", tmp_path / "alpaca.json", tmp_path / "mt.jsonl"
    assert evaluate.main([f"checkpoint={run_dir}", "n=500", f"generations={gens}", f"alpaca_eval={alpaca}",
                          f"mt_bench={mt}"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert "n=500 is more than the 16 held-out examples of ['local']: evaluating each of the 16 once" in err
    s = result["settings"]
    assert (s["datasets"], s["n"], s["max_length"], s["max_prompt_length"], s["max_new_tokens"], s["batch_size"]) == \
        (["local"], 16, 80, 64, 6, 8)
    assert s["scorers"] == {"local": SCORER} and s["config"].endswith("trainer_state.json") and s["generator"] == "rev"
    assert result["n"] == 16 and {"task_correct", "task_letters", "logp_accuracy"} <= set(result)
    rows = [json.loads(line) for line in gens.read_text().splitlines()]
    test = [json.loads(line) for line in open(os.path.join(REVERSE, "test.jsonl"))]
    # each held-out row exactly once, in order, with its original prompt beside the model's input
    assert [r["prompt"] for r in rows] == [t["prompt"] for t in test] and [r["id"] for r in rows] == list(range(16))
    assert [r["reference"] for r in rows] == [t["chosen"][0]["content"] for t in test]
    r = rows[0]
    assert r["prompt_text"] == test[0]["prompt"][0]["content"]
    assert r["model_input"] == f"<|user|>{r['prompt_text']}<|end|><|assistant|>"
    assert result["task_letters"] == pytest.approx(sum(x["scores"]["letters"] for x in rows) / 16)
    # AlpacaEval: a JSON list of instruction / output / generator
    assert json.loads(alpaca.read_text())[0] == {"instruction": r["prompt_text"], "output": r["completion"],
                                                "generator": "rev", "dataset": "local"}
    # MT-Bench answer file, and its question file beside it
    answers = [json.loads(line) for line in mt.read_text().splitlines()]
    assert set(answers[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert (answers[0]["question_id"], answers[0]["model_id"], answers[0]["choices"]) == \
        (1, "rev", [{"index": 0, "turns": [r["completion"]]}])
    assert len({a["answer_id"] for a in answers}) == 16
    questions = [json.loads(line) for line in (tmp_path / "mt.questions.jsonl").read_text().splitlines()]
    assert questions[0] == {"question_id": 1, "category": "local", "turns": [r["prompt_text"]]}


def test_flags_override_one_setting_each_and_the_run_directory_forms_agree(run_dir, capsys):
    step = os.path.join(run_dir, open(os.path.join(run_dir, "LATEST")).read().strip())
    a = evaluate.evaluate_checkpoint(run_dir, n_examples=4)
    b = evaluate.evaluate_checkpoint(step, n_examples=4)
    assert {k: v for k, v in a.items() if k != "settings"} == {k: v for k, v in b.items() if k != "settings"}
    c = evaluate.evaluate_checkpoint(os.path.join(run_dir, "LATEST"), n_examples=4, max_length=48,
                                     max_prompt_length=24, max_new_tokens=2)
    assert (c["settings"]["max_length"], c["settings"]["max_prompt_length"], c["settings"]["max_new_tokens"]) == \
        (48, 24, 2)
    assert c["settings"]["datasets"] == ["local"] and c["n"] == 4
    # another data set and scorer by flag: the embedded task, with its default scorer
    d = evaluate.evaluate_checkpoint(run_dir, datasets=["embedded"], n_examples=3, options={"scorer": None})
    assert d["n"] == 3 and {"task_exact", "task_partial"} <= set(d) and "task_correct" not in d


def test_a_bad_scorer_flag_fails_before_the_model_is_loaded(run_dir, capsys, monkeypatch):
    from prefkd import models
    monkeypatch.setattr(models, "load_checkpoint", lambda *a: pytest.fail("the model was loaded"))
    assert evaluate.main([f"checkpoint={run_dir}", "scorer=nowhere_module:score"]) == 2
    assert "error: data.scorer='nowhere_module:score': cannot import module" in capsys.readouterr().err


def test_training_time_evaluation_counts_each_held_out_row_once():
    """trainers.BasicTrainer.batch_iterator("test") asks for n_eval_examples rows of one epoch:
    256 requested of a 16-row split gives the 16 rows, once each."""
    import preference_datasets as pdata
    tok = tokenizer_facts.get_tokenizer("embedded")
    batches = list(pdata.get_batch_iterator(["local"], tok, split="test", batch_size=5, shuffle=False, max_length=80,
                                            max_prompt_length=64, n_epochs=1, n_examples=256, silent=True,
                                            options={"local": {"path": REVERSE}}))
    prompts = [p[0]["content"] for b in batches for p in b["original_prompt"]]
    assert len(prompts) == len(set(prompts)) == 16


def test_key_value_arguments_are_checked_before_anything_loads(capsys):
    """evaluate.py takes Hydra-style key=value (config/evaluate.yaml): a bare path, a misspelt key
    or no checkpoint is refused with exit 2 and a message naming what to write."""
    assert evaluate.main(["runs/x"]) == 2
    assert "argument 'runs/x' is not key=value" in capsys.readouterr().err
    assert evaluate.main(["chekpoint=runs/x"]) == 2
    err = capsys.readouterr().err
    assert "chekpoint" in err and "'checkpoint'" in err and "config/evaluate.yaml" in err
    assert evaluate.main(["n=3"]) == 2
    assert "checkpoint=<...> is required" in capsys.readouterr().err


def test_the_implicit_reward_uses_a_common_beta_not_the_runs(tmp_path):
    """One rule with the pipeline: pref_margin is scored with beta = 0.1 for every run (a simpo
    run trains with beta 2.0), unless beta= is given."""
    (tmp_path / "config.yaml").write_text("loss: {name: simpo, beta: 2.0}\nmax_length: 48\n")
    assert evaluate.resolve_settings(str(tmp_path))["beta"] == 0.1
    assert evaluate.resolve_settings(str(tmp_path), beta=2.0)["beta"] == 2.0


def test_the_kl_to_the_reference_on_own_answers_equals_a_hand_computation():
    """evaluate.own_answer_kl: per answer, the mean over its tokens (through the first eos) of the
    full-distribution KL(pi || ref) at the state before each; computed here row by row without
    padding, against the batched, padded computation."""
    import types
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model, ref = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    tok = types.SimpleNamespace(eos_token_id=2, pad_token_id=0)
    prompts = [[5, 6, 7], [8, 9]]
    answers = [[3, 4, 2, 0], [4, 4, 4, 4]]  # the first stops at its eos (2), the second runs to the limit
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    batch = {"prompt_input_ids": ids, "prompt_attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]])}
    generated = torch.cat([ids, torch.tensor(answers)], dim=1)
    got = evaluate.own_answer_kl(model, ref, batch, generated, tok)
    kept = [[3, 4, 2], [4, 4, 4, 4]]
    with torch.no_grad():
        for i, (p, a) in enumerate(zip(prompts, kept)):
            row = torch.tensor([p + a])
            lp, lr = (torch.log_softmax(m(row).logits[0].double(), -1) for m in (model, ref))
            kls = [float((lp[t].exp() * (lp[t] - lr[t])).sum()) for t in range(len(p) - 1, len(p) + len(a) - 1)]
            assert got[i].item() == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert torch.allclose(evaluate.own_answer_kl(model, model, batch, generated, tok), torch.zeros(2), atol=1e-6)
