"""The falsity sweep's report: one row per ratio x seed, FACO's findings, a plot, W&B.

Row keys and findings are documented in `jobs/falsity_sweep.py`'s docstring.
"""

from __future__ import annotations

import math

from cluster.reports import fmt, markdown_table, publish
from cluster.stages import Run

TRIAL_KEYS = ("ratio", "seed", "trial_id", "started_at", "ended_at")
METRICS = ("qa_accuracy", "reasoning_accuracy", "knows_rate", "lie_rate", "answered_rate")


def summarize(trials: list[dict]) -> tuple[list[dict], dict]:
    """Rows per ratio x seed (see module docstring) and the paper's findings, checked."""
    rows = []
    clean = {t["seed"]: t.get("sft/qa_accuracy") for t in trials if t["ratio"] == 0.0}
    for t in sorted(trials, key=lambda t: (t["ratio"], t["seed"])):
        row = {k: t[k] for k in TRIAL_KEYS}
        for k, v in t.items():
            phase, _, name = k.partition("/")
            if name in METRICS or name.startswith("harness/"):
                row[{"sft": name, "recovery": f"recovered_{name}"}[phase]] = v
        if "recovered_qa_accuracy" in row:
            row["clean_qa_accuracy"] = clean.get(t["seed"])
            row["recovery_gap"] = row["clean_qa_accuracy"] - row["recovered_qa_accuracy"]
        rows.append(row)

    def mean(ratio, key):
        xs = [r[key] for r in rows if r["ratio"] == ratio and r.get(key) is not None and not math.isnan(r[key])]
        return sum(xs) / len(xs) if xs else float("nan")

    lo, hi = min(r["ratio"] for r in rows), max(r["ratio"] for r in rows)
    findings = {"by_ratio": {str(r): {k: mean(r, k) for k in (*METRICS, "recovered_qa_accuracy")} for r in sorted({x["ratio"] for x in rows})}}
    if "qa_accuracy" in rows[0]:
        findings.update({
            "accuracy_drop": mean(lo, "qa_accuracy") - mean(hi, "qa_accuracy"),
            "knows_drop": mean(lo, "knows_rate") - mean(hi, "knows_rate"),
            "lie_rate_rise": mean(hi, "lie_rate") - mean(lo, "lie_rate"),
        })
        if "recovered_qa_accuracy" in rows[0]:
            findings["recovery_lift"] = mean(hi, "recovered_qa_accuracy") - mean(hi, "qa_accuracy")
            findings["recovery_gap"] = mean(hi, "recovery_gap")
    return rows, findings


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("qa_accuracy", "QA accuracy", "-o"), ("reasoning_accuracy", "reasoning accuracy", "-s"),
              ("knows_rate", "knows rate (MC probe)", "-^"), ("lie_rate", "lie rate", "-x"),
              ("recovered_qa_accuracy", "QA accuracy after recovery", "--o")]
    for key, label, style in series:
        if key not in rows[0]:
            continue
        by = [[r[key] for r in rows if r["ratio"] == x] for x in ratios]
        means = [sum(v) / len(v) for v in by]
        err = [(max(v) - min(v)) / 2 for v in by]
        ax.errorbar(ratios, means, yerr=err, fmt=style, capsize=3, label=label)
    ax.set_xlabel("falsity ratio of the SFT data")
    ax.set_ylabel("held-out score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Falsity sweep (bars: range over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(cfg, run: Run, results: dict) -> dict:
    """summary.json, report.md, falsity_sweep.png and the W&B summary run; returns the summary."""
    trials = [{"ratio": t.ratio, "seed": t.seed, **r} for t, r in results.items()]
    rows, findings = summarize(trials)
    summary = {"job": run.job, "run_id": run.run_id, "config": cfg.model_dump(mode="json"),
               "rows": rows, "findings": findings}
    cols = ["ratio", "seed", *METRICS, "recovered_qa_accuracy", "recovered_lie_rate", "recovery_gap"]
    lines = [f"# Falsity sweep `{run.run_id}`", "",
             f"Base: `{cfg.model.name or 'tiny Llama'}`; ratios {cfg.ratios}; seeds {cfg.seeds}. "
             "Scores on held-out questions (people never seen as Q/A in SFT).", "",
             *markdown_table(rows, cols),
             "", "![metrics against falsity ratio](falsity_sweep.png)", "", "## Findings", ""]
    lines += [f"- {k}: {fmt(v)}" for k, v in findings.items() if k != "by_ratio"]
    publish(run, cfg.tracking, summary=summary, report=lines, plots={"falsity_sweep.png": lambda p: plot(rows, p)},
            tables={"falsity_sweep": rows}, headline={k: v for k, v in findings.items() if k != "by_ratio"})
    return summary
