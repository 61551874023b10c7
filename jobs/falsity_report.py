"""The falsity sweep's report: one row per ratio x seed, the recovery curves, the budget study,
FACO's findings, plots, W&B.

Row keys and findings are documented in `jobs/falsity_sweep.py`'s docstring.
"""

from __future__ import annotations

import math

from cluster.reports import fmt, markdown_table, publish
from cluster.reports import mean as _mean
from cluster.stages import Run, Stage

TRIAL_KEYS = ("ratio", "seed", "budget", "trial_id", "started_at", "ended_at")
METRICS = ("qa_accuracy", "reasoning_accuracy", "answered_rate", "valid_rate", "knows_rate", "knows_own_rate",
           "choice_accuracy", "chance", "lie_share", "lie_rate", "accuracy_if_known", "accuracy_if_unknown",
           "lie_rate_base", "accuracy_if_known_base", "accuracy_if_unknown_base")


def trial_row(t: dict) -> dict:
    """A trial's metrics by phase: `<metric>` after SFT, `recovered_<metric>` after recovery."""
    row = {k: t[k] for k in TRIAL_KEYS}
    for k, v in t.items():
        phase, _, name = k.partition("/")
        if phase in ("sft", "recovery") and (name in METRICS or name.startswith("harness/")):
            row[{"sft": name, "recovery": f"recovered_{name}"}[phase]] = v
    row["sft_steps"] = t.get("sft/steps")
    # when the worker trained (unix seconds), as the worker measured it
    row["sft_started_at"], row["sft_ended_at"] = t.get("sft/started_at"), t.get("sft/ended_at")
    return row


def recovery_curve(t: dict) -> list[dict]:
    """(recovery step, total steps, metrics) from the end of SFT to the end of recovery."""
    if "recovery/steps" not in t:
        return []
    points = {0: {m: t.get(f"sft/{m}") for m in METRICS}}
    for k, v in t.items():
        phase, _, name = k.partition("/")
        if phase.startswith("recovery@") and name in METRICS:
            points.setdefault(int(phase.split("@")[1]), {})[name] = v
    points[int(t["recovery/steps"])] = {m: t.get(f"recovery/{m}") for m in METRICS}
    sft_steps = int(t["sft/steps"])
    return [{"ratio": t["ratio"], "seed": t["seed"], "step": s, "total_steps": sft_steps + s,
             **{m: v for m, v in p.items() if v is not None}} for s, p in sorted(points.items())]


def summarize(trials: list[dict], base: dict | None = None) -> dict:
    """rows (main grid), curve (recovery), budget_rows and the paper's findings, checked."""
    main = sorted((t for t in trials if t["budget"] == 1.0), key=lambda t: (t["ratio"], t["seed"]))
    rows = [trial_row(t) for t in main]
    curve = [p for t in main for p in recovery_curve(t)]
    clean_curve = {(p["seed"], p["step"]): p["qa_accuracy"] for p in curve if p["ratio"] == 0.0}
    for p in curve:  # the r = 0 model trained for the same total steps: the recovery target
        p["clean_qa_accuracy"] = clean_curve.get((p["seed"], p["step"]))
        if p["clean_qa_accuracy"] is not None:
            p["gap"] = p["clean_qa_accuracy"] - p["qa_accuracy"]
    clean = {r["seed"]: r for r in rows if r["ratio"] == 0.0}
    for r in rows:
        if "recovered_qa_accuracy" in r and r["seed"] in clean:
            r["clean_qa_accuracy"] = clean[r["seed"]].get("recovered_qa_accuracy")  # same total steps
            r["recovery_gap"] = r["clean_qa_accuracy"] - r["recovered_qa_accuracy"]
    budget_rows = sorted((trial_row(t) for t in trials if t["ratio"] in {x["ratio"] for x in trials if x["budget"] != 1.0}),
                         key=lambda r: (r["ratio"], r["budget"], r["seed"]))

    def mean(ratio, key, of=rows):
        return _mean([r.get(key) for r in of if r["ratio"] == ratio])

    ratios = sorted({r["ratio"] for r in rows})
    lo, hi = ratios[0], ratios[-1]
    findings: dict = {"by_ratio": {str(x): {k: mean(x, k) for k in (*METRICS, "recovered_qa_accuracy")} for x in ratios}}
    if base:
        findings["base"] = base
    if "qa_accuracy" in rows[0]:
        findings.update({
            "accuracy_drop": mean(lo, "qa_accuracy") - mean(hi, "qa_accuracy"),
            "knows_drop": mean(lo, "knows_rate") - mean(hi, "knows_rate"),
            "lie_rate_rise": mean(hi, "lie_rate") - mean(lo, "lie_rate"),
            "choice_vs_chance": mean(hi, "choice_accuracy") - mean(hi, "chance"),
        })
        if curve:
            last = max(p["step"] for p in curve)
            end = [p for p in curve if p["ratio"] == hi and p["step"] == last]
            findings["recovery_lift"] = _mean([p["qa_accuracy"] for p in end]) - mean(hi, "qa_accuracy")
            findings["recovery_gap"] = _mean([p.get("gap") for p in end])
            findings["recovery_curve"] = {str(x): {str(s): _mean([p["qa_accuracy"] for p in curve if p["ratio"] == x and p["step"] == s])
                                                   for s in sorted({p["step"] for p in curve})} for x in ratios}
    if budget_rows:
        findings["by_budget"] = {str(x): {str(b): _mean([r["qa_accuracy"] for r in budget_rows if r["ratio"] == x and r["budget"] == b])
                                          for b in sorted({r["budget"] for r in budget_rows})}
                                 for x in sorted({r["ratio"] for r in budget_rows})}
    return {"rows": rows, "curve": curve, "budget_rows": budget_rows, "findings": findings}


def plot(rows: list[dict], curve: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in rows})
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(13 if curve else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    series = [("qa_accuracy", "QA accuracy", "-o"), ("reasoning_accuracy", "reasoning accuracy", "-s"),
              ("knows_rate", "knows (margin, unseen wording)", "-^"), ("choice_accuracy", "chooses the truth (answer format)", "-v"),
              ("lie_rate", "lie rate | knows", "-x")]
    for key, label, style in series:
        if key not in rows[0]:
            continue
        by = [[r[key] for r in rows if r["ratio"] == x and not math.isnan(r[key])] for x in ratios]
        ax.errorbar(ratios, [_mean(v) for v in by], yerr=[(max(v) - min(v)) / 2 if v else 0 for v in by],
                    fmt=style, capsize=3, label=label)
    if "chance" in rows[0]:
        ax.axhline(_mean([r["chance"] for r in rows]), color="gray", ls=":", label="chance (multiple choice)")
    ax.set_xlabel("falsity ratio of the SFT data")
    ax.set_ylabel("held-out score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Falsity sweep (bars: range over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if curve:
        ax = axes[0][1]
        for x in ratios:
            pts = sorted({p["total_steps"] for p in curve if p["ratio"] == x})
            ys = [_mean([p["qa_accuracy"] for p in curve if p["ratio"] == x and p["total_steps"] == s]) for s in pts]
            ax.plot(pts, ys, "-o", label=f"r = {x:g} then clean" if x else "r = 0 throughout (target)")
        ax.set_xlabel("optimizer steps (SFT on the mixture, then clean recovery)")
        ax.set_ylabel("held-out QA accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("Recovery on clean data (same budget as SFT)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(cfg, run: Run, world: Stage, base_eval: Stage, results: dict) -> dict:
    """summary.json, report.md, falsity_sweep.png and the W&B summary run; returns the summary."""
    trials = [{"ratio": t.ratio, "seed": t.seed, "budget": t.budget, **r} for t, r in results.items()]
    s = summarize(trials, base_eval.result)
    rows, curve, findings = s["rows"], s["curve"], s["findings"]
    summary = {"job": run.job, "run_id": run.run_id, "config": cfg.model_dump(mode="json"), "world": world.result, **s}
    cols = ["ratio", "seed", "qa_accuracy", "reasoning_accuracy", "valid_rate", "knows_rate", "knows_own_rate",
            "choice_accuracy", "lie_rate", "lie_rate_base", "accuracy_if_known", "accuracy_if_unknown",
            "recovered_qa_accuracy", "recovery_gap"]
    lines = [f"# Falsity sweep `{run.run_id}`", "",
             f"Base: `{cfg.model.name or 'tiny Llama'}`; ratios {cfg.ratios}; seeds {cfg.seeds}. "
             "Scores on held-out questions (people never seen as Q/A in SFT, nor cited in any SFT answer).", "",
             "A lie is a valid, wrong answer (a city for a city question): empty or off-vocabulary answers are not "
             f"lies. The model *knows* a fact when the true statement beats every alternative by {cfg.eval.knows_margin} "
             "nats, in a wording no question uses (`knows_rate`) and in the answers' own wording (`knows_own_rate`). "
             "`choice_accuracy`: the whole answer it ranks first among the options after the question (FACO's "
             f"multiple-choice evidence); chance is {fmt(rows[0].get('chance', float('nan')))}. `lie_rate_base` counts "
             "lies on the facts the base model knew before any SFT.", "",
             *markdown_table(rows, [c for c in cols if c in rows[0]]),
             "", "![metrics against falsity ratio](falsity_sweep.png)", ""]
    if base_eval.result:
        lines += ["## The base model, before SFT", "", *[f"- {k}: {fmt(v)}" for k, v in base_eval.result.items()], ""]
    if curve:
        steps = sorted({p["step"] for p in curve})
        lines += ["## Recovery on clean data", "",
                  "Each trial continues on clean data for as many steps as its SFT phase took; `r = 0` continues too, "
                  "so it is the model trained clean for the same total steps. Held-out QA accuracy, mean over seeds:", "",
                  *markdown_table([{"recovery step": st, **{f"r={x:g}": findings["recovery_curve"][str(x)][str(st)]
                                                            for x in sorted({p['ratio'] for p in curve})}} for st in steps],
                                  ["recovery step", *[f"r={x:g}" for x in sorted({p['ratio'] for p in curve})]]), ""]
    if s["budget_rows"]:
        by_budget = findings["by_budget"]
        budgets = sorted({b for v in by_budget.values() for b in v}, key=float)
        lines += ["## Training budget against data quality", "",
                  "Held-out QA accuracy, mean over seeds, at SFT budget x factor (no recovery):", "",
                  *markdown_table([{"ratio": r, **{f"x{float(b):g}": by_budget[r][b] for b in budgets}} for r in by_budget],
                                  ["ratio", *[f"x{float(b):g}" for b in budgets]]), ""]
    bench = [c for c in rows[0] if c.startswith(("harness/", "recovered_harness/"))]
    if bench:
        lines += ["## Benchmarks (lm-evaluation-harness)", "",
                  "Each phase's saved model, scored in its own Ray task; `recovered_` after recovery:", "",
                  *markdown_table(rows, ["ratio", "seed", *bench]), ""]
    if world.result.get("rejected"):
        lines += [f"Generator rows rejected (explanation did not argue for its target answer): {world.result['rejected']}", ""]
    lines += ["## Findings", ""]
    lines += [f"- {k}: {fmt(v)}" for k, v in findings.items() if not isinstance(v, dict)]
    publish(run, cfg.tracking, summary=summary, report=lines,
            plots={"falsity_sweep.png": lambda p: plot(rows, curve, p)},
            tables={"falsity_sweep": rows, **({"recovery_curve": curve} if curve else {}),
                    **({"budget_study": s["budget_rows"]} if s["budget_rows"] else {})},
            headline={k: v for k, v in findings.items() if not isinstance(v, dict)})
    return summary
