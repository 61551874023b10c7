"""The robust fine-tuning report: per arm x seed the suite's accuracies, per arm the means, the
changes against plain SFT and the cost, a plot of accuracy against perturbation strength, W&B.

Row keys and findings are documented in `jobs/robust.py`'s docstring.
"""

from __future__ import annotations

import math

from cluster.reports import fmt, markdown_table, mean, publish
from cluster.stages import Run, Stage
from evals.robust import cell


def arm_row(arm: str, seed: int, t: dict, trained: list[str], heldout: list[str], strengths: list[float]) -> dict:
    """One learner run: its suite accuracies, the trained / held-out families' means, its cost."""
    acc = {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith("sft/") and ("@" in k or k == "sft/clean")}
    row = {"arm": arm, "seed": seed, "trial_id": t.get("trial_id"), **acc}
    row["trained"] = mean([acc.get(cell(f, s)) for f in trained for s in strengths]) if trained else None
    row["heldout"] = mean([acc.get(cell(f, s)) for f in heldout for s in strengths]) if heldout else None
    row["steps"], row["train_s"], row["tokens"] = t.get("sft/steps"), t.get("sft/train_runtime_s"), t.get("sft/train_tokens")
    row.update({k.split("/", 1)[1]: v for k, v in t.items() if k.startswith("sft/harness/")})
    return row


def summarize(rows: list[dict], trained: list[str], heldout: list[str]) -> tuple[list[dict], dict]:
    """Per arm (means over seeds): accuracies, the change against plain SFT on the same seeds, and
    the cost against plain SFT: wall clock of the training loop, and per token seen."""
    plain = {r["seed"]: r for r in rows if r["arm"] == "plain"}
    arms = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        out = {"arm": arm, "seeds": len(mine)}
        for k in ("clean", "trained", "heldout"):
            out[k] = mean([r.get(k) for r in mine])
            out[f"{k}_change"] = mean([r[k] - plain[r["seed"]][k] for r in mine
                                        if r.get(k) is not None and plain.get(r["seed"], {}).get(k) is not None])
        out["overhead_wall"] = mean([r["train_s"] / plain[r["seed"]]["train_s"] for r in mine if r["seed"] in plain])
        out["overhead_per_token"] = mean([(r["train_s"] / r["tokens"]) / (plain[r["seed"]]["train_s"] / plain[r["seed"]]["tokens"])
                                           for r in mine if r["seed"] in plain and r.get("tokens")])
        arms.append(out)
    findings = {}
    for a in arms:
        if a["arm"] != "plain":
            for k in ("clean_change", "trained_change", "heldout_change", "overhead_wall"):
                if not math.isnan(a[k]):
                    findings[f"{a['arm']}/{k}"] = a[k]
    return arms, findings


def plot(rows: list[dict], trained: list[str], heldout: list[str], strengths: list[float], path: str) -> None:
    """Accuracy against perturbation strength per arm (strength 0: clean), trained and held-out families."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, fams) for name, fams in (("families trained on (augmentation)", trained),
                                              ("held-out families", heldout)) if fams]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (title, fams) in zip(axes[0], panels):
        for arm in dict.fromkeys(r["arm"] for r in rows):
            mine = [r for r in rows if r["arm"] == arm]
            ys = [mean([r.get("clean") for r in mine])]
            ys += [mean([r.get(cell(f, s)) for r in mine for f in fams]) for s in strengths]
            ax.plot([0.0, *strengths], ys, "-o", label=arm, lw=2.5 if arm == "plain" else 1.5)
        ax.set_xlabel("perturbation strength (rate)")
        ax.set_ylabel("held-out exact accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{title}: {', '.join(fams)}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(cfg, run: Run, suite: Stage, results: dict) -> dict:
    """summary.json, report.md, robust.png and the W&B summary run; returns the summary."""
    trained, heldout, strengths = cfg.trained_families, cfg.heldout_families, cfg.eval.strengths
    rows = [arm_row(a, s, t, trained, heldout, strengths) for (a, s), t in sorted(results.items(), key=lambda x: x[0][1])]
    arms, findings = summarize(rows, trained, heldout)
    summary = {"job": run.job, "run_id": run.run_id, "config": cfg.model_dump(mode="json"),
               "families": {"trained": trained, "heldout": heldout, "strengths": strengths}, "suite": suite.result,
               "rows": rows, "arms": arms, "findings": findings}
    cells = ["clean", *[cell(f, s) for f in cfg.eval.families for s in strengths]]
    lines = [f"# Robust fine-tuning `{run.run_id}`", "",
             f"Base: `{cfg.model.name or 'tiny Llama'}`; arms {list(cfg.arms)}; seeds {cfg.seeds}. Exact-match accuracy on "
             f"{suite.result['questions']} held-out questions, clean and perturbed (names and choices untouched). "
             f"Trained families (some arm augments with them): {', '.join(trained) or 'none'}; held out: "
             f"{', '.join(heldout) or 'none'}; strengths {', '.join(f'{s:g}' for s in strengths)}.", "",
             "## Arms against plain SFT", "",
             "Means over seeds; `*_change` against plain SFT on the same seeds; `trained` / `heldout` average "
             "every strength of those families. Cost: the training loop's wall clock against plain SFT's "
             "(`overhead_wall`) and per token seen (`overhead_per_token`).", "",
             *markdown_table(arms, ["arm", "seeds", "clean", "clean_change", "trained", "trained_change", "heldout",
                                    "heldout_change", "overhead_wall", "overhead_per_token"]),
             "", "![accuracy against perturbation strength](robust.png)", "",
             "## Every run, every family and strength", "",
             *markdown_table(rows, ["arm", "seed", *cells, "steps", "train_s"]), ""]
    bench = [c for c in rows[0] if c.startswith("harness/")]
    if bench:
        lines += ["## Benchmarks (lm-evaluation-harness, clean inputs)", "", *markdown_table(rows, ["arm", "seed", *bench]), ""]
    lines += ["## Findings", "", *[f"- {k}: {fmt(v)}" for k, v in findings.items()]]
    publish(run, cfg.tracking, summary=summary, report=lines,
            plots={"robust.png": lambda p: plot(rows, trained, heldout, strengths, p)},
            tables={"robust_runs": rows, "robust_arms": arms}, headline=findings)
    return summary
