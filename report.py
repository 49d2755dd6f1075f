"""Rebuild the results table and plot of a pipeline directory.

    python report.py runs/pipeline

Reads <dir>/{teacher_dpo,teacher_sft,student_sft}/eval.json and <dir>/methods/*/eval.json
(written by pipeline.py / evaluate.py) and the runs' metrics.jsonl, and writes
<dir>/results.md, results.csv and results.png. Rows: DPO teacher, SFT teacher, SFT student,
then each student method (runs named <method>_seed<k>): with a pipeline.yaml (written by
pipeline.py) the methods and seeds it lists, in its order (the paper's row order in the
presets); else every run found, by name; columns: the task scores
(task_<name>, one per name the scorer returns), held-out logp accuracy, preference accuracy
and margin (the implicit reward scored with one common beta for every row, named in the
column's title): mean ± sample standard deviation over seeds (the mean alone for one seed; the
CSV leaves the _std column empty then).
"""
import csv
import glob
import json
import os
import re
import statistics
import sys
from typing import Dict, List, Optional

from omegaconf import OmegaConf

import utils
from prefkd import comparison

# Task columns come first, one per score name found in the eval.json files (task_<name>:
# the data set's scorer, see prefkd/scorers.py); then these.
COLUMNS = [("logp_accuracy", "held-out logp acc."), ("pref_accuracy", "pref. acc. (vs ref)"),
           ("pref_margin", "pref. margin"), ("kl_ref", "KL to ref. (per token, own answers)")]
# a reward model's columns (eval.reward_model), shown when some model has them
RM_COLUMNS = [("reward", "RM score"), ("reward_win_rate", "RM win rate vs SFT student")]
FIXED = [("DPO teacher", "teacher_dpo"), ("SFT teacher", "teacher_sft"), ("SFT student", "student_sft")]


def load_json(path):
    with open(path) as f:
        return json.load(f)


def collect(root: str, dirs: Optional[Dict[str, str]] = None) -> Dict[str, List[dict]]:
    """{row name: [eval results, one per seed]} in table order; `dirs`: the directory of a fixed
    stage run elsewhere (a study's reused stage), else <root>/<stage>."""
    rows: Dict[str, List[dict]] = {}
    for name, sub in FIXED:
        path = os.path.join((dirs or {}).get(sub) or os.path.join(root, sub), "eval.json")
        if os.path.exists(path):
            rows[name] = [load_json(path)]
    found: Dict[str, List[dict]] = {}
    order, n_seeds, _ = pipeline_methods(root)
    for path in sorted(glob.glob(os.path.join(root, "methods", "*", "eval.json"))):
        run = os.path.basename(os.path.dirname(path))
        method, seed = re.match(r"^(.*?)(?:_seed(\d+))?$", run).groups()
        if order and (method not in order or (seed is not None and int(seed) >= n_seeds)):
            continue  # another pipeline command's run in the same directory
        found.setdefault(method, []).append({**load_json(path), **train_margins(os.path.dirname(path)),
                                             "seed": int(seed or 0)})
    # the pipeline's order of methods (the paper's row order in the presets), else by name
    for method in sorted(found, key=lambda m: (order.index(m) if m in order else len(order), m)):
        rows[method] = found[method]
    if not rows:
        raise ValueError(f"{root}: no eval.json found (run pipeline.py, or evaluate.py on its runs)")
    return rows


def train_margins(run: str) -> Dict[str, float]:
    """{"shaping_margin": the last evaluation's shaping margin} of a run that logs one (tvkd's
    alpha sum psi, chosen minus rejected: how much the teacher moves the pair's margin), from
    its metrics.jsonl; {} otherwise."""
    path, out = os.path.join(run, "metrics.jsonl"), {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if "shaping_eval/margin" in rec:
                    out = {"shaping_margin": rec["shaping_eval/margin"]}
    return out


def pipeline_methods(root: str):
    """(methods, seeds, {method: its row label}) of the last pipeline command that wrote `root`
    (its pipeline.yaml), or ([], 0, {}): the table shows what that command asked for, though
    several commands (the embedded table and the table5 ablation, say) share the directory and
    its finished runs."""
    cfg = pipeline_record(root)
    if cfg is None:
        return [], 0, {}
    labels = {str(k): str(v) for k, v in (cfg.get("labels") or {}).items()}
    return [str(m) for m in (cfg.get("methods") or [])], int(cfg.get("seeds") or 1), labels


def pipeline_record(root: str):
    """The config the last pipeline command wrote to <root>/pipeline.yaml, or None."""
    path = os.path.join(root, "pipeline.yaml")
    return OmegaConf.load(path) if os.path.exists(path) else None


def mean_std(values: List[float]):
    """(mean, sample standard deviation); the deviation is None for a single value (no spread)."""
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def columns(rows: Dict[str, List[dict]]) -> List[tuple]:
    """[(key, title)]: task_<name> columns in the order first seen, then COLUMNS."""
    task = {}
    for results in rows.values():
        for r in results:
            for k, v in r.items():
                if k.startswith("task_") and isinstance(v, (int, float)):
                    task.setdefault(k, "task " + k[len("task_"):].replace("_", " "))
    rm = [(k, t) for k, t in RM_COLUMNS if any(k in r for results in rows.values() for r in results)]
    return list(task.items()) + rm + [(k, margin_title(rows) if k == "pref_margin" else t) for k, t in COLUMNS]


def margin_title(rows: Dict[str, List[dict]]) -> str:
    """The margin's column title, naming the beta of the implicit reward it was scored with: one
    common beta for every row (evaluate.py's and the pipeline's rule), so margins compare across
    methods whatever beta each trained with."""
    betas = {r["settings"]["beta"] for results in rows.values() for r in results
             if r.get("pref_margin") is not None and isinstance(r.get("settings"), dict) and "beta" in r["settings"]}
    if not betas:
        return "pref. margin"
    return f"pref. margin (common β = {betas.pop():g})" if len(betas) == 1 else "pref. margin (β differs by row)"


def summarise(rows: Dict[str, List[dict]], extra: List[tuple] = ()) -> List[dict]:
    """A row per model: mean and std of each column (and of the `extra` (key, title) columns)."""
    out = []
    cols = columns(rows) + list(extra)
    for name, results in rows.items():
        row = {"method": name, "seeds": len(results)}
        for key, _ in cols:
            # pref_* exist only for models evaluated against a reference (not the SFT rows)
            m, s = mean_std([r[key] for r in results if key in r])
            row[key], row[key + "_std"] = m, s
        out.append(row)
    return out


def _cell(mean, std) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def markdown(summary: List[dict], cols: List[tuple], labels: Optional[Dict[str, str]] = None) -> str:
    """The table; a row shows its label (the pipeline's `labels`) where it has one."""
    labels = labels or {}
    present = [(k, t) for k, t in cols if any(r.get(k) is not None for r in summary)]
    lines = ["| method | seeds | " + " | ".join(t for _, t in present) + " |",
             "|---|---|" + "---|" * len(present)]
    for r in summary:
        cells = [_cell(r.get(k), r.get(k + "_std")) for k, _ in present]
        lines.append(f"| {labels.get(r['method'], r['method'])} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves(root: str, key: str = "logp_accuracy") -> Dict[str, List[tuple]]:
    """{method: [(examples, mean, std over seeds)]} of one metric at the evaluation points the
    runs logged: `task_<name>` reads task_eval/<name> (logged with sample_during_eval=true),
    logp_accuracy reads heldout_eval/logp_accuracy; a method whose runs logged neither is absent.
    std is None where one seed logged the point."""
    logged = "task_eval/" + key[len("task_"):] if key.startswith("task_") else "heldout_eval/" + key
    per: Dict[str, Dict[int, List[float]]] = {}
    for path in glob.glob(os.path.join(root, "methods", "*", "metrics.jsonl")):
        method = re.sub(r"_seed\d+$", "", os.path.basename(os.path.dirname(path)))
        last: Dict[int, float] = {}
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if logged in rec:
                    last[rec["examples"]] = rec[logged]  # a resumed run's last word
        for ex, v in last.items():
            per.setdefault(method, {}).setdefault(ex, []).append(v)
    return {m: sorted((ex, *mean_std(v)) for ex, v in d.items()) for m, d in sorted(per.items())}


def plot_key(summary: List[dict], cols: List[tuple]) -> str:
    """The headline metric, the one the table leads with: the first task score (the embedded
    task's `exact`), else the held-out logp accuracy."""
    task = [k for k, _ in cols if k.startswith("task_") and any(r.get(k) is not None for r in summary)]
    return task[0] if task else "logp_accuracy"


def _bars(ax, summary: List[dict], key: str, title: str) -> None:
    """One bar per model with a value of `key`: mean, seeds' std as the error bar (the fixed
    stages grey)."""
    rows = [r for r in summary if r.get(key) is not None]
    vals = [r[key] for r in rows]
    ax.bar([r["method"] for r in rows], vals, yerr=[r[key + "_std"] or 0.0 for r in rows], capsize=4,
           color=["#888888" if r["method"] in dict(FIXED) else "#1f77b4" for r in rows])
    ax.set_ylabel(title + " (held-out)")
    ax.set_title(f"{title} per model (mean ± std over seeds)")
    if vals and 0.0 <= min(vals) and max(vals) <= 1.0 and key != "reward":  # a share: zoom in on the range used
        ax.set_ylim(max(0.0, min(vals) - 0.1), min(1.0, max(vals) + 0.05))
    ax.tick_params(axis="x", rotation=40)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")


def plot(root: str, summary: List[dict], path: str, cols: List[tuple]) -> List[str]:
    """results.png: the headline score per model, the reward model's score per model (where
    there is one), and the headline score over training (each method's logged evaluation points,
    mean ± std over seeds; the SFT student and the DPO teacher as dashed lines). Without logged
    task scores the curves show the held-out logp accuracy, and their title says so. Returns the
    panels' titles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key, titles = plot_key(summary, cols), dict(cols)
    panels = [key] + (["reward"] if any(r.get("reward") is not None for r in summary) else [])
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(6.5 * (len(panels) + 1), 4.5))
    for ax, k in zip(axes, panels):
        _bars(ax, summary, k, titles.get(k, k))
    lines = curves(root, key)
    shown = key if lines else "logp_accuracy"
    ax = axes[-1]
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours, and a marker per ten: 13+ methods stay apart
    for i, (method, pts) in enumerate((lines or curves(root)).items()):
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0.0 for p in pts], capsize=3,
                    marker="osD^v"[i // 10 % 5], color=colors[(2 * i) % 20 + (i // 10) % 2], label=method)
    for r in summary:
        if r["method"] in ("SFT student", "DPO teacher") and r.get(shown) is not None:
            ax.axhline(r[shown], linestyle="--", color="#888888", linewidth=1)
            ax.annotate(r["method"], (0, r[shown]), fontsize=7, color="#555555", xycoords=("axes fraction", "data"))
    ax.set_xlabel("training examples")
    ax.set_ylabel(titles.get(shown, shown) + " (held-out, during training)")
    ax.set_title(f"{titles.get(shown, shown)} over training" + ("" if lines or not key.startswith("task_") else
                                                               " (no task score logged: sample_during_eval=false)"))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    return [a.get_title() for a in axes]


def paired_lines(rows: Dict[str, List[dict]], key: str, title: str, baseline: Optional[str],
                 labels: Dict[str, str]) -> List[str]:
    """The paired differences of `key` against the baseline method (prefkd/comparison.py): a table
    of each method's mean difference and 95% interval over the seeds both ran (* where it
    excludes 0), and the design's smallest resolvable and detectable differences; a line saying
    why not where there is no baseline or fewer than 2 seeds."""
    if not baseline:
        return []
    if baseline not in rows:
        return [f"No paired differences: the baseline {baseline} is not a row of this table (set baseline=<method>)."]
    base = {r["seed"]: r[key] for r in rows[baseline] if key in r}
    diffs = {m: comparison.paired({r["seed"]: r[key] for r in results if key in r}, base)
             for m, results in rows.items() if m != baseline and all("seed" in r for r in results)}
    diffs = {m: d for m, d in diffs.items() if d is not None}
    n = min((d.n for d in diffs.values()), default=0)
    if n < 2:
        return [f"No paired differences against {baseline}: they need at least 2 seeds (seeds=5 for the studies)."]
    lines = [f"Paired differences in {title} against {labels.get(baseline, baseline)} (same seed: same data order "
             f"and start; 95% t interval over the seeds; * the interval excludes 0):", "",
             f"| method | seeds | Δ {title} | 95% interval |", "|---|---|---|---|"]
    for m, d in diffs.items():
        mark = " *" if d.resolved else ""
        lines.append(f"| {labels.get(m, m)} | {d.n} | {d.mean:+.3f}{mark} | [{d.low:+.3f}, {d.high:+.3f}] |")
    sds = [d.sd for d in diffs.values() if d.sd is not None]
    lines += ["", f"The design ({n} seeds, pooled spread of the differences {comparison.pooled_sd(sds):.3f}) resolves "
              f"an observed difference of {comparison.resolvable(sds, n):.3f} (the interval's half-width) and "
              f"detects a true one of {comparison.detectable(sds, n):.3f} with 80% power."]
    return lines


def write_report(root: str, dirs: Optional[Dict[str, str]] = None) -> str:
    """results.md / .csv / .png of one pipeline directory (`dirs`: its stages run elsewhere); under
    the table, the paired differences of the headline score against the pipeline's `baseline`."""
    rows = collect(root, dirs)
    cols = columns(rows)
    summary = summarise(rows)
    labels = pipeline_methods(root)[2]
    table = markdown(summary, cols, labels)
    record = pipeline_record(root)
    key = plot_key(summary, cols)
    paired = paired_lines(rows, key, dict(cols).get(key, key), record.get("baseline") if record else None, labels)
    table += "\n\n" + "\n".join(paired) if paired else ""
    with open(os.path.join(root, "results.md.tmp"), "w") as f:
        f.write(table + "\n")
    os.replace(os.path.join(root, "results.md.tmp"), os.path.join(root, "results.md"))
    fields = ["method", "seeds"] + [x for k, _ in cols for x in (k, k + "_std")]
    with open(os.path.join(root, "results.csv.tmp"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in summary:
            w.writerow({k: r.get(k) for k in fields})
    os.replace(os.path.join(root, "results.csv.tmp"), os.path.join(root, "results.csv"))
    plot(root, summary, os.path.join(root, "results.png"), cols)
    return table


GROUP_COLUMNS = [("pref_margin", "pref. margin"), ("shaping_margin", "shaping margin")]


def write_group_report(where: str, groups: List, plot_x: Optional[str] = None) -> str:
    """One table over a study's pipelines (`groups`: their configs, as pipeline.py resolved them):
    a row per model, per group the task score (the first task column), the preference margin and
    the shaping margin; a method a group refused shows why below the table, and under it each group's
    paired differences against its `baseline` (with 2 seeds or more). Writes results.md,
    results.csv and results.png (the task score against `plot_x`, a setting of each group, else
    bars per group) in `where`."""
    per, sections = [], []
    for g in groups:
        rows = collect(g.out, dict(g.get("reuse") or {}))  # a reused stage's run (prefkd/pipeline_stages.stage_dirs)
        cols = columns(rows)
        task = next((k for k, _ in cols if k.startswith("task_")), "logp_accuracy")
        title = f"{g.group} ({g.teacher} → {g.model})"
        per.append((g, title, {r["method"]: r for r in summarise(rows, GROUP_COLUMNS)}, [(task, dict(cols)[task])] + GROUP_COLUMNS))
        group_labels = {str(k): str(v) for k, v in (g.get("labels") or {}).items()}
        paired = paired_lines(rows, task, dict(cols)[task], g.get("baseline"), group_labels)
        sections += [f"**{title}**", ""] + paired + [""] if len(paired) > 1 else []
    names = list(dict.fromkeys(m for _, _, s, _ in per for m in s))
    names += [m for g, *_ in per for m in (g.get("absent") or {}) if m not in names]
    head = [f"{title}: {t}" for _, title, _, cols in per for _, t in cols]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    notes, records, labels = [], [], {str(k): str(v) for k, v in (groups[0].get("labels") or {}).items()}
    for m in names:
        cells = []
        for g, title, summary, cols in per:
            r = summary.get(m)
            refused = m in (g.get("absent") or {})
            cells += ["refused" if refused else _cell(r.get(k), r.get(k + "_std")) if r else "-" for k, _ in cols]
            if r:
                records.append({"group": g.group, **r})
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
    for g, title, *_ in per:
        notes += [f"- {m} in {g.group}: {why}" for m, why in (g.get("absent") or {}).items()]
    table = "\n".join(lines + ([""] + notes if notes else []) + ([""] + sections if sections else []))
    os.makedirs(where, exist_ok=True)
    utils.atomic_write_text(os.path.join(where, "results.md"), table + "\n")
    fields = ["group", "method", "seeds"] + [x for k, _ in per[0][3] for x in (k, k + "_std")]
    with open(os.path.join(where, "results.csv.tmp"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    os.replace(os.path.join(where, "results.csv.tmp"), os.path.join(where, "results.csv"))
    plot_groups(per, names, os.path.join(where, "results.png"), plot_x)
    return table


def plot_groups(per: List, names: List[str], path: str, plot_x: Optional[str]) -> None:
    """The study's headline score per model: against `plot_x` (lines, mean ± std over seeds), else
    grouped bars (one group of bars per pipeline)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key, title = per[0][3][0]
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / max(1, len(names))
    for i, m in enumerate(names):
        pts = [((OmegaConf.select(g, plot_x) if plot_x else j), s[m][key], s[m][key + "_std"] or 0.0)
               for j, (g, _, s, _) in enumerate(per) if m in s and s[m].get(key) is not None]
        if not pts:
            continue
        xs, ys, es = zip(*pts)
        if plot_x:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m, linestyle="--" if m in dict(FIXED) else "-")
        else:
            ax.bar([x + i * width for x in xs], ys, width, yerr=es, capsize=2, label=m)
    if plot_x:
        ax.set_xlabel(plot_x)
    else:
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(per))], [t for _, t, _, _ in per])
    ax.set_ylabel(f"{title} (held-out)")
    ax.set_title(f"{title} per model (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    try:
        print(write_report(argv[0]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
