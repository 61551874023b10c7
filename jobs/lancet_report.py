"""The LANCET report: recall of the planted examples per arm (AUPRC, recall curves), the
correction methods on the two axes (unsafe rate against utility) next to the impure model, W&B.

Row keys: `method`, `seed`, `unsafe_iq`, `unsafe_seen`, `unsafe_unseen`, `utility`, the drops
against the impure model (`iq_drop`, `unseen_drop`: 1 - rate / impure rate, so 0.5 = halved) and
`utility_change` (points, negative = lost), `steps`, `train_s`. Findings: per method the means over
seeds of the drops and the utility change; per recall arm its AUPRC, and LinFAC's against BM25.
"""

from __future__ import annotations

import math

from cluster.reports import fmt, markdown_table, mean, publish
from cluster.stages import Run, Stage
from jobs import lancet_recall as R
from jobs.lancet import IMPURE

AXES = ("unsafe_iq", "unsafe_seen", "unsafe_unseen", "utility")


def _drop(rate: float | None, before: float | None) -> float | None:
    if rate is None or before is None or not before > 0:
        return None
    return 1.0 - rate / before


def method_row(method: str, seed: int | None, metrics: dict, phase: str, impure: dict) -> dict:
    row = {"method": method, "seed": seed, **{k: metrics.get(f"{phase}/{k}") for k in AXES}}
    row["iq_drop"], row["unseen_drop"] = _drop(row["unsafe_iq"], impure["unsafe_iq"]), _drop(row["unsafe_unseen"], impure["unsafe_unseen"])
    row["utility_change"] = None if row["utility"] is None else row["utility"] - impure["utility"]
    row["steps"], row["train_s"] = metrics.get(f"{phase}/steps"), metrics.get(f"{phase}/train_runtime_s")
    row.update({k: v for k, v in metrics.items() if k.startswith("harness/")})
    return row


def summarize(rows: list[dict]) -> tuple[list[dict], dict]:
    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        out.append({"method": m, "seeds": len(mine), **{k: mean([r.get(k) for r in mine]) for k in
                    (*AXES, "iq_drop", "unseen_drop", "utility_change")}})
    findings = {f"{a['method']}/{k}": a[k] for a in out for k in ("iq_drop", "unseen_drop", "utility_change")
                if not math.isnan(a[k])}
    return out, findings


def plot_recall(scores: list[dict], arms: list[str], path: str) -> None:
    """Recall of the planted rows against the share of the training data inspected, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    planted = [bool(r["planted"]) for r in scores]
    n = len(scores)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for arm in arms:
        curve = R.recall_curve([r[arm] for r in scores], planted)
        ax.plot([(i + 1) / n for i in range(n)], curve, label=f"{arm} (AUPRC {R.average_precision([r[arm] for r in scores], planted):.2f})",
                lw=2.5 if arm == "linfac" else 1.5)
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="random")
    ax.set_xscale("log")
    ax.set_xlabel("share of training rows inspected (highest influence first)")
    ax.set_ylabel("recall of the planted rows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tradeoff(rows: list[dict], impure: dict, path: str) -> None:
    """Unsafe rate (IQ prompts, unseen prompts) against utility, per run; the impure model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title in ((axes[0], "unsafe_iq", "influence-query prompts"), (axes[1], "unsafe_unseen", "unseen prompts")):
        ax.scatter([impure["utility"]], [impure[key]], marker="*", s=200, c="k", label="impure")
        for m in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == m and r.get(key) is not None]
            ax.scatter([r["utility"] for r in mine], [r[key] for r in mine], s=60, label=m)
        ax.set_xlabel("utility (held-out exact match)")
        ax.set_ylabel("unsafe rate")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(cfg, run: Run, impure, iqs: Stage, rec: Stage, corr: Stage, results: dict) -> dict:
    """summary.json, report.md, recall.png, tradeoff.png and the W&B summary run; returns the summary."""
    queries = iqs.rows("queries")
    marked = [q for q in queries if q["iq"]]
    imp = {**{k: impure.metrics.get(f"sft/{k}") for k in AXES},
           "unsafe_iq": sum(q["unsafe"] for q in marked) / len(marked) if marked else None}
    results = dict(results)
    imp.update(results.pop((IMPURE, None), {}))  # its lm-eval scores, when the harness ran
    rows = [method_row(m, s, t, m, imp) for (m, s), t in results.items()]
    methods, findings = summarize(rows)
    arms = [{"arm": a, **{k: v for k, v in m.items() if isinstance(v, (int, float))}} for a, m in rec.result.items()]
    for a in arms:
        findings[f"recall/{a['arm']}/auprc"] = a["auprc"]
    if "bm25" in rec.result:
        findings["recall/linfac_minus_bm25"] = rec.result["linfac"]["auprc"] - rec.result["bm25"]["auprc"]
    if "ekfac" in rec.result:
        lin, ek = rec.result["linfac"], rec.result["ekfac"]
        findings["recall/linfac_time_over_ekfac"] = (lin["fit_s"] + lin["score_s"]) / ek["seconds"]
    summary = {"job": run.job, "run_id": run.run_id, "config": cfg.model_dump(mode="json"), "impure": imp,
               "iqs": iqs.result, "recall": rec.result, "corrections": corr.result, "rows": rows, "methods": methods,
               "findings": findings}
    scores = rec.rows("scores")
    t = rec.result["linfac"]
    lines = [f"# LANCET `{run.run_id}`", "",
             f"Impure model: SFT of `{cfg.model.name or 'tiny Llama'}` on {len(scores)} rows, "
             f"{sum(r['planted'] for r in scores)} of them planted unsafe answers; {iqs.result['iqs']} influence queries. "
             f"Unsafe rate before correction: IQ prompts {fmt(imp['unsafe_iq'])}, seen {fmt(imp['unsafe_seen'])}, "
             f"unseen {fmt(imp['unsafe_unseen'])}; utility {fmt(imp['utility'])}.", "",
             "## Recall of the planted examples", "",
             f"Measurement: {'the unsafe answer loss minus the refusal loss on the same prompts' if cfg.recall.contrast else 'the unsafe answer loss'}. "
             f"LinFAC: {t['factor_numbers']:,} curvature numbers, fit {t['fit_s']:.1f} s and score {t['score_s']:.1f} s "
             f"wall over {cfg.recall.partitions} partitions (Ray tasks, model loads included).", "",
             *markdown_table(arms, ["arm", "auprc", "random_auprc", "recall@planted", "recall@2x", "bottom_counteracting",
                                    "fit_s", "score_s", "seconds", "factor_numbers"]),
             "", "![recall curves](recall.png)", "",
             "## Correction", "",
             f"On LinFAC's top {cfg.correct.top_k} supporting rows ({fmt(corr.result['support_planted'])} of them planted) "
             f"and top {cfg.correct.top_k} counteracting rows ({fmt(corr.result['counter_refusals'])} refusals). "
             "Drops: 1 - unsafe rate / the impure model's (0.5 = halved); utility_change in accuracy points.", "",
             *markdown_table([{"method": IMPURE, **imp}, *methods],
                             ["method", "seeds", *AXES, "iq_drop", "unseen_drop", "utility_change"]),
             "", "![unsafe rate against utility](tradeoff.png)", "",
             "## Every run", "", *markdown_table(rows, ["method", "seed", *AXES, "iq_drop", "unseen_drop", "utility_change",
                                                        "steps", "train_s"]),
             ""]
    if bench := [c for c in rows[0] if c.startswith("harness/")] if rows else []:
        lines += ["## Benchmarks (lm-evaluation-harness)", "",
                  *markdown_table([{"method": IMPURE, **imp}, *rows], ["method", "seed", *bench]), ""]
    lines += ["## Findings", "", *[f"- {k}: {fmt(v)}" for k, v in findings.items()]]
    publish(run, cfg.tracking, summary=summary, report=lines,
            plots={"recall.png": lambda p: plot_recall(scores, list(rec.result), p),
                   "tradeoff.png": lambda p: plot_tradeoff(rows, imp, p)},
            tables={"lancet_recall": arms, "lancet_runs": rows, "lancet_methods": methods}, headline=findings)
    return summary

