"""The paired comparison over seeds (prefkd/comparison.py) against hand computations, and the
table report.py prints under the results with it."""
import json
import math
import os

import pytest

import report
from prefkd import comparison

# Student's t quantiles from the printed tables
T975 = {2: 4.302653, 4: 2.776445}
T80 = {4: 0.940965}


def test_t_quantiles_match_the_printed_tables():
    for df, t in T975.items():
        assert comparison.t_quantile(0.975, df) == pytest.approx(t, abs=1e-6)
    assert comparison.t_quantile(0.8, 4) == pytest.approx(T80[4], abs=1e-6)


def test_the_paired_interval_equals_a_hand_computation():
    method, baseline = {0: 0.40, 1: 0.45, 2: 0.38}, {0: 0.36, 1: 0.40, 2: 0.37}
    # d = 0.04, 0.05, 0.01: mean 0.1/3; sd = sqrt(((0.04-m)^2 + (0.05-m)^2 + (0.01-m)^2) / 2)
    m = 0.1 / 3
    sd = math.sqrt(((0.04 - m) ** 2 + (0.05 - m) ** 2 + (0.01 - m) ** 2) / 2)
    half = T975[2] * sd / math.sqrt(3)
    d = comparison.paired(method, baseline)
    assert (d.n, d.mean, d.sd) == (3, pytest.approx(m), pytest.approx(sd))
    assert (d.low, d.high) == (pytest.approx(m - half, abs=1e-6), pytest.approx(m + half, abs=1e-6))
    assert not d.resolved  # [-0.018, 0.085] holds 0
    # a seed only one side ran is left out; a consistent difference is resolved
    d = comparison.paired({0: 0.5, 1: 0.6, 2: 0.55, 7: 0.0}, {0: 0.4, 1: 0.48, 2: 0.46})
    assert d.n == 3 and d.low > 0 and d.resolved
    assert comparison.paired({0: 0.5}, {0: 0.4}).low is None and not comparison.paired({0: 0.5}, {0: 0.4}).resolved
    assert comparison.paired({1: 0.5}, {0: 0.4}) is None


def test_the_designs_smallest_differences():
    sds = [0.03, 0.04]
    pooled = math.sqrt((0.03 ** 2 + 0.04 ** 2) / 2)
    assert comparison.resolvable(sds, 5) == pytest.approx(T975[4] * pooled / math.sqrt(5), abs=1e-6)
    assert comparison.detectable(sds, 5) == pytest.approx((T975[4] + T80[4]) * pooled / math.sqrt(5), abs=1e-6)
    assert comparison.detectable(sds, 1) is None and comparison.resolvable([], 5) is None


def write_eval(root, name, result):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    with open(os.path.join(root, name, "eval.json"), "w") as f:
        json.dump(result, f)


def test_the_report_prints_the_paired_differences_against_the_baseline(tmp_path):
    root = str(tmp_path)
    write_eval(root, "student_sft", {"task_exact": 0.2})
    dpo, tvkd, simpo = [0.36, 0.40, 0.37], [0.40, 0.45, 0.38], [0.46, 0.50, 0.47]
    for seed in range(3):
        write_eval(root, f"methods/dpo_seed{seed}", {"task_exact": dpo[seed]})
        write_eval(root, f"methods/tvkd_seed{seed}", {"task_exact": tvkd[seed]})
        write_eval(root, f"methods/simpo_seed{seed}", {"task_exact": simpo[seed]})
    with open(os.path.join(root, "pipeline.yaml"), "w") as f:
        f.write("methods: [dpo, tvkd, simpo]\nseeds: 3\nbaseline: dpo\nlabels: {tvkd: tvkd (paper)}\n")
    table = report.write_report(root)
    assert "Paired differences in task exact against dpo" in table
    d = comparison.paired(dict(enumerate(tvkd)), dict(enumerate(dpo)))
    assert f"| tvkd (paper) | 3 | {d.mean:+.3f} | [{d.low:+.3f}, {d.high:+.3f}] |" in table
    assert "| simpo | 3 | +0.100 * | [+0.100, +0.100] |" in table  # the same +0.1 every seed: resolved
    sds = [d.sd, 0.0]
    assert f"resolves an observed difference of {comparison.resolvable(sds, 3):.3f}" in table
    assert table == open(os.path.join(root, "results.md")).read().rstrip("\n")
    # one seed: no interval, and the report says why
    with open(os.path.join(root, "pipeline.yaml"), "w") as f:
        f.write("methods: [dpo, tvkd]\nseeds: 1\nbaseline: dpo\n")
    assert "they need at least 2 seeds" in report.write_report(root)
    with open(os.path.join(root, "pipeline.yaml"), "w") as f:
        f.write("methods: [dpo, tvkd]\nseeds: 1\nbaseline: null\n")
    assert "Paired" not in report.write_report(root)
