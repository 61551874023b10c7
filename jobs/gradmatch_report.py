"""The GRADMM report: per arm the gradient cosine to the real and dev gradients, perplexity, test
accuracy over fine-tuning seeds and example texts; per generation trial its cosines and the ADMM
curve; plots; W&B. Keys of summary.json are documented in `jobs/gradmatch.py`'s docstring.

Findings (differences of means, positive = the first arm ahead):
`acc/gradmm-zero_shot`, `acc/gradmm-few_shot`, `acc/gradmm-real_subset`, `cos/gradmm-zero_shot`,
`cos/gradmm-few_shot`, `cos/gradmm-project_once`, `cos/continuous-gradmm`.
"""

from __future__ import annotations

import statistics

from cluster.reports import fmt, markdown_table, mean, publish
from cluster.stages import Run, Stage

ORDER = ("zero_shot", "few_shot", "real_subset", "continuous", "project_once", "gradmm", "gradmm_dp")


def arm_rows(arms: dict, results: dict) -> list[dict]:
    """Per arm: cosines and perplexity (means over classes), accuracy mean and spread over seeds."""
    out = []
    for arm in [a for a in ORDER if a in arms]:
        per = arms[arm].values()
        accs = [m["sft/accuracy"] for (a, _), m in results.items() if a == arm and "sft/accuracy" in m]
        out.append({"arm": arm, "cos_real": mean([p["cos_real"] for p in per]), "cos_dev": mean([p["cos_dev"] for p in per]),
                    "perplexity": mean([p.get("perplexity") for p in per]) if arm != "continuous" else None,
                    "accuracy": mean(accs) if accs else None, "accuracy_sd": statistics.pstdev(accs) if len(accs) > 1 else None,
                    "seeds": len(accs)})
    return out


def findings(rows: list[dict]) -> dict:
    by = {r["arm"]: r for r in rows}
    out = {}
    for other in ("zero_shot", "few_shot", "real_subset"):
        if "gradmm" in by and other in by and by["gradmm"]["accuracy"] is not None and by[other]["accuracy"] is not None:
            out[f"acc/gradmm-{other}"] = by["gradmm"]["accuracy"] - by[other]["accuracy"]
    for other in ("zero_shot", "few_shot", "project_once"):
        if "gradmm" in by and other in by:
            out[f"cos/gradmm-{other}"] = by["gradmm"]["cos_real"] - by[other]["cos_real"]
    if "continuous" in by and "gradmm" in by:
        out["cos/continuous-gradmm"] = by["continuous"]["cos_real"] - by["gradmm"]["cos_real"]
    return out


def plot_arms(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    names = [r["arm"] for r in rows]
    axes[0].bar(names, [r["cos_real"] for r in rows], color="tab:blue", alpha=0.8, label="real (target)")
    axes[0].plot(names, [r["cos_dev"] for r in rows], "o", color="black", label="dev (selection)")
    axes[0].set_ylabel("gradient cosine (output layer)")
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    acc = [r for r in rows if r["accuracy"] is not None]
    axes[1].bar([r["arm"] for r in acc], [r["accuracy"] for r in acc], yerr=[r["accuracy_sd"] or 0 for r in acc],
                color="tab:green", alpha=0.8, capsize=4)
    axes[1].axhline(0.5, color="gray", ls=":", lw=1)
    axes[1].set_ylabel("test accuracy after fine-tuning (mean, sd over seeds)")
    axes[1].set_ylim(0, 1.02)
    for ax in axes:
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_admm(curve: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, pts in curve.items():
        steps = [p["step"] for p in pts]
        line = ax.plot(steps, [p["x_cosine"] for p in pts], ":", lw=1)[0]
        if key != "once":
            ax.plot(steps, [p["best"] for p in pts], "-", color=line.get_color(), lw=2, label=f"{key}: best projection")
        else:
            line.set_label("once: continuous X")
    ax.set_xlabel("outer step")
    ax.set_ylabel("gradient cosine to the real target")
    ax.set_title("ADMM per trial (dotted: continuous X)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(cfg, run: Run, task: Stage, arms: Stage, opts, results: dict) -> dict:
    """summary.json, report.md, arms.png, admm.png and the W&B summary run; returns the summary."""
    res = arms.result
    rows = arm_rows(res["arms"], results)
    found = findings(rows)
    runs = [{"arm": a, "seed": s, "accuracy": m.get("sft/accuracy"), "steps": m.get("sft/steps"),
             "train_s": m.get("sft/train_runtime_s"),
             **{k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("sft/harness/")}}
            for (a, s), m in sorted(results.items())]
    trials = [{"trial": k, "cos_real": mean([v["cos_real"] for v in per.values()]),
               "cos_dev": mean([v["cos_dev"] for v in per.values()]),
               "selected": k in res["selected"].values()} for k, per in res["trials"].items()]
    curve = res["curves"]
    examples = {a: {cfg.task.classes[int(c)]: v["texts"][:3] for c, v in per.items() if "texts" in v}
                for a, per in res["arms"].items()}
    summary = {"job": run.job, "run_id": run.run_id, "config": cfg.model_dump(mode="json"), "task": task.result,
               "generation": {**opts.model_dump(mode="json"), "init_size": res["init_size"]}, "selected": res["selected"], "arms": rows, "rows": runs,
               "trials": trials, "filter_agreement": res.get("filter_agreement", {}), "curves": curve,
               "examples": examples, "findings": found,
               "texts": {a: {c: v.get("ids") for c, v in per.items()} for a, per in res["arms"].items()}}
    t = cfg.task
    lines = [f"# GRADMM `{run.run_id}`", "",
             f"Student `{cfg.model.name or 'tiny Llama'}`; task: " + (f"'{t.template}', class = the town's flag"
                                                                       if t.source == "world" else f"table `{t.dataset}`")
             + f"; classes {t.classes} -> {t.verbalizers} after {t.suffix!r}. Splits: {task.result['real']} real, "
             f"{task.result['dev']} dev (ρ selection), {task.result['test']} test (reported only). "
             f"{opts.per_class} synthetic texts per class of {opts.length} tokens; {opts.outer_steps} outer x "
             f"{opts.inner_steps} inner steps, top-k {opts.top_k}. Selected: "
             + ", ".join(f"{a} = {k}" for a, k in res["selected"].items()) + ".", "",
             "## Arms", "",
             "Gradient cosine of each arm's set (its texts as decoded, re-tokenized; `continuous`: the embeddings) "
             "to the real examples' gradient (the target) and to the dev examples' gradient, per class then "
             "averaged; perplexity of the texts under the student; test accuracy after fine-tuning, mean and "
             "spread over seeds (`continuous` is not text: it has no fine-tuning).", "",
             *markdown_table(rows, ["arm", "cos_real", "cos_dev", "perplexity", "accuracy", "accuracy_sd", "seeds"]),
             "", "![arms](arms.png)", "", "## Generation trials", "",
             *markdown_table(trials, ["trial", "cos_real", "cos_dev", "selected"]),
             "", "![ADMM](admm.png)", ""]
    if res.get("filter_agreement"):
        lines += ["Filter: the share of each trial's candidates the model itself labels as their class, per class: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in res["filter_agreement"].items()), ""]
    lines += ["## Example texts", ""]
    for arm, per in examples.items():
        for cls, texts in per.items():
            lines += [f"- **{arm}** / {cls}: " + " · ".join(f"`{x}`" for x in texts)]
    bench = sorted({k for r in runs for k in r if k.startswith("harness/")})
    lines += ["", "## Every fine-tuning run", "", *markdown_table(runs, ["arm", "seed", "accuracy", "steps", "train_s", *bench]),
              "", "## Findings", "", *[f"- {k}: {fmt(v)}" for k, v in found.items()]]
    publish(run, cfg.tracking, summary=summary, report=lines,
            plots={"arms.png": lambda p: plot_arms(rows, p), "admm.png": lambda p: plot_admm(curve, p)},
            tables={"gradmatch_arms": rows, "gradmatch_runs": runs, "gradmatch_trials": trials}, headline=found)
    return summary
