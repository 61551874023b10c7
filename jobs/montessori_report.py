"""The comparison a Montessori-Instruct run ends with: summary.json, report.md, montessori.png and
the W&B summary run (probe table, head-to-head tables, plot), through `cluster.reports.publish`.

`summarize` turns the iterations' stages into the summary's rows, probe rows and findings (their
keys are documented in `jobs.montessori`'s docstring).
"""

from __future__ import annotations

import json

from cluster.reports import fmt, markdown_table, publish
from cluster.stages import Run
from jobs.montessori import JOB, MONTESSORI, RANDOM, UNTRAINED, Arm, Iteration
from jobs.montessori_options import MontessoriOptions

STUDENT_COLUMNS = ("seed", "iteration", "teacher", "examples", "distinct", "accuracy", "heldout_loss", "win_rate",
                   "acc_win_rate", "share_single", "share_guess", "share_multi", "share_bio", "share_unknown",
                   "share_correct")


def summarize(cfg: MontessoriOptions, iterations: list[Iteration]) -> tuple[list[dict], list[dict], dict, list[dict]]:
    """(rows, probe rows, findings, probe table: one row per scored candidate)."""
    world = _world(cfg)
    untrained = {s: iterations[0].evals[Arm(s, UNTRAINED)] for s in cfg.seeds}
    rows, probes, probe_table = [], [], []
    for it in iterations:
        for arm in sorted(it.evals, key=lambda a: a.key):
            e, set_rows, base = it.evals[arm], it.final.rows(arm.key), untrained[arm.seed]
            row = {"seed": arm.seed, "iteration": it.number, "teacher": arm.teacher, "examples": len(set_rows),
                   "distinct": len({r["instruction"] for r in set_rows}),
                   "accuracy": e["accuracy"], "heldout_loss": e["heldout_loss"], "answered_rate": e["answered_rate"],
                   "win_rate": win_rate(base["item_loss"], e["item_loss"], lower_wins=True),
                   "acc_win_rate": win_rate(base["item_correct"], e["item_correct"]) if e["item_correct"] else None}
            if world is not None:
                row.update(_composition(world, set_rows))
            if e.get("harness"):
                row.update({f"harness/{k}": v for k, v in json.loads(e["harness"]).items()})
            rows.append(row)
        for s in cfg.seeds:
            cands = it.candidates.rows(f"s{s}")
            scores = {r["id"]: r["influence"] for r in it.influence.rows(f"s{s}/scores")}
            vals = [scores[c["id"]] for c in cands if c["id"] in scores]
            counts = it.pairs.result
            row = {"seed": s, "iteration": it.number, "candidates": len(cands), "kept": len(vals),
                   "positive_share": sum(v > 0 for v in vals) / max(len(vals), 1),
                   "mean_influence": sum(vals) / max(len(vals), 1),
                   "pairs": counts.get(Arm(s, MONTESSORI).key, {}).get("pairs"),
                   "prompts_with_pairs": counts.get(Arm(s, MONTESSORI).key, {}).get("prompts"),
                   "random_pairs": counts.get(Arm(s, RANDOM).key, {}).get("pairs"),
                   **it.influence.result[f"s{s}"]}  # warm_L0, probe_seconds
            dpo = it.dpo.get(Arm(s, MONTESSORI))
            row["dpo_train_loss"] = dpo.metrics.get("dpo/train_loss") if dpo else None
            by_kind: dict[str, list[float]] = {}
            for c in cands:
                if c["id"] not in scores:
                    continue
                kind = _classify(world, c)["kind"] if world is not None else None
                probe_table.append({"seed": s, "iteration": it.number, "id": c["id"], "instruction": c["instruction"],
                                    "response": c["response"], "kind": kind, "influence": scores[c["id"]]})
                if kind:
                    by_kind.setdefault(kind, []).append(scores[c["id"]])
            row.update({f"influence_{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())})
            probes.append(row)
    return rows, probes, findings(cfg, rows), probe_table


def findings(cfg: MontessoriOptions, rows: list[dict]) -> dict:
    """Per iteration, Montessori vs untrained over seeds; with the ablation, influence vs random pairs."""
    def get(s, it, teacher, key):
        return next((r[key] for r in rows if r["seed"] == s and r["iteration"] == it and r["teacher"] == teacher), None)

    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    f: dict = {"by_iteration": {}}
    for it in sorted({r["iteration"] for r in rows}):
        acc = [get(s, it, MONTESSORI, "accuracy") - get(s, 1, UNTRAINED, "accuracy") for s in cfg.seeds
               if get(s, it, MONTESSORI, "accuracy") is not None]
        loss = [get(s, 1, UNTRAINED, "heldout_loss") - get(s, it, MONTESSORI, "heldout_loss") for s in cfg.seeds]
        f["by_iteration"][str(it)] = {
            # no exact answers (datasets): the accuracy keys are null, as influence_vs_random_accuracy
            "accuracy_gain": mean(acc) if acc else None, "loss_gain": mean(loss), "min_loss_gain": min(loss),
            "min_accuracy_gain": min(acc) if acc else None,
            "seeds_better_loss": sum(x > 0 for x in loss), "seeds_better_accuracy": sum(x > 0 for x in acc) if acc else None,
            "win_rate": mean([get(s, it, MONTESSORI, "win_rate") for s in cfg.seeds]),
        }
    last = f["by_iteration"][str(max(r["iteration"] for r in rows))]
    f.update({"accuracy_gain": last["accuracy_gain"], "loss_gain": last["loss_gain"], "seeds": len(cfg.seeds)})
    if any(r["teacher"] == RANDOM for r in rows):
        acc = [get(s, 1, MONTESSORI, "accuracy") - get(s, 1, RANDOM, "accuracy") for s in cfg.seeds
               if get(s, 1, RANDOM, "accuracy") is not None]
        loss = [get(s, 1, RANDOM, "heldout_loss") - get(s, 1, MONTESSORI, "heldout_loss") for s in cfg.seeds]
        f.update({"influence_vs_random_accuracy": mean(acc) if acc else None, "influence_vs_random_loss": mean(loss),
                  "random_vs_untrained_loss": mean([get(s, 1, UNTRAINED, "heldout_loss") - get(s, 1, RANDOM, "heldout_loss")
                                                    for s in cfg.seeds])})
    return f


def harness_columns(rows: list[dict]) -> list[str]:
    """The lm-eval columns (`harness/<task>/<metric>`) the rows have, sorted."""
    return sorted({k for r in rows for k in r if k.startswith("harness/")})


def win_rate(base: list, other: list, lower_wins: bool = False) -> float | None:
    """Share of items where `other` beats `base` (ties count half)."""
    if not base or len(base) != len(other):
        return None
    score = 0.0
    for a, b in zip(base, other):
        if a == b:
            score += 0.5
        elif (b < a) if lower_wins else (b > a):
            score += 1.0
    return score / len(base)


def _world(cfg: MontessoriOptions):
    if cfg.data.source != "world":
        return None
    from synth import world as W

    return W.build_world(cfg.data.world)


def _classify(world, c: dict) -> dict:
    from synth.teacher import classify

    return classify(world, c["instruction"], c.get("response") or c.get("completion", ""))


def _composition(world, set_rows: list[dict]) -> dict:
    from synth.teacher import KINDS

    kinds = [_classify(world, r) for r in set_rows]
    n = max(len(kinds), 1)
    out = {f"share_{k}": sum(x["kind"] == k for x in kinds) / n for k in (*KINDS, "other")}
    out["share_correct"] = sum(x["correct"] for x in kinds) / n
    return out


def plot(rows: list[dict], probe_table: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_acc = rows[0]["accuracy"] is not None
    panels = ["heldout_loss"] + (["accuracy"] if has_acc else [])
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4))
    seeds = sorted({r["seed"] for r in rows})
    iters = sorted({r["iteration"] for r in rows})
    for ax, key in zip(axes, panels):
        for s in seeds:
            base = next(r[key] for r in rows if r["seed"] == s and r["teacher"] == UNTRAINED)
            ys = [next(r[key] for r in rows if r["seed"] == s and r["iteration"] == i and r["teacher"] == MONTESSORI) for i in iters]
            line, = ax.plot([0] + iters, [base] + ys, "-o", label=f"seed {s}: Montessori teacher")
            rnd = [r[key] for r in rows if r["seed"] == s and r["teacher"] == RANDOM]
            if rnd:
                ax.plot([1], rnd, "x", color=line.get_color(), markersize=10, label=f"seed {s}: random pairs")
        ax.set_xticks([0] + iters, ["untrained"] + [f"it {i}" for i in iters])
        ax.set_title({"heldout_loss": "held-out loss (lower is better)", "accuracy": "held-out exact accuracy"}[key])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[-1]
    kinds = sorted({p["kind"] for p in probe_table if p["kind"]})
    if kinds:
        data = [[p["influence"] for p in probe_table if p["kind"] == k and p["iteration"] == 1] for k in kinds]
        ax.boxplot([d or [0.0] for d in data], tick_labels=kinds)
        ax.set_title("local data influence by candidate kind (it 1)")
        ax.axhline(0, color="gray", lw=0.8)
    else:
        ax.hist([p["influence"] for p in probe_table], bins=30)
        ax.set_title("local data influence of candidates")
        ax.axvline(0, color="gray", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_lines(cfg: MontessoriOptions, run_id: str, rows: list[dict], probes: list[dict], f: dict) -> list[str]:
    teacher = cfg.teacher.model or "tiny teacher (SFT'd from the student's base)"
    lines = [f"# Montessori-Instruct `{run_id}`", "",
             f"Student: `{cfg.student.name or 'tiny Llama'}`; teacher: `{teacher}`; seeds {cfg.seeds}; "
             f"{cfg.iterations} iteration(s); k = {cfg.teacher.k} candidates per prompt; final sets of "
             f"{cfg.final_size} examples. Scores on the evaluation set (disjoint from the reference set).", "",
             "## Students: trained teacher vs untrained teacher (and the random-pair ablation)", "",
             *markdown_table(rows, list(STUDENT_COLUMNS) + harness_columns(rows), digits=4), "",
             "`win_rate`: share of evaluation items where the student's loss is below the untrained-teacher "
             "student's (the paper's head-to-head, judged by loss instead of GPT-4).", "",
             "![results](montessori.png)", "", "## Probes and pairs", "",
             *markdown_table(probes, [c for c in probes[0] if c != "probe_seconds"], digits=4), "", "## Findings", ""]
    for it, x in f["by_iteration"].items():
        has_acc = x["accuracy_gain"] is not None
        lines.append(f"- iteration {it}: " + (f"accuracy gain {fmt(x['accuracy_gain'], 4)}, " if has_acc else "")
                     + f"loss gain {fmt(x['loss_gain'], 4)} (Montessori better on loss for {x['seeds_better_loss']}/"
                     f"{len(cfg.seeds)} seeds" + (f", on accuracy for {x['seeds_better_accuracy']}" if has_acc else "")
                     + f"), head-to-head win rate {fmt(x['win_rate'], 4)}")
    if "influence_vs_random_loss" in f:
        lines.append(f"- ablation (iteration 1): influence pairs vs random pairs: accuracy "
                     f"{fmt(f['influence_vs_random_accuracy'], 4)}, loss {fmt(f['influence_vs_random_loss'], 4)} "
                     "(positive: influence pairs better)")
    return lines


def report(cfg: MontessoriOptions, run: Run, iterations: list[Iteration]) -> dict:
    """Write summary.json, report.md, montessori.png and the W&B summary run; return the summary."""
    rows, probes, f, probe_table = summarize(cfg, iterations)
    summary = {"job": JOB, "run_id": run.run_id, "config": cfg.model_dump(mode="json"), "rows": rows, "probes": probes,
               "findings": f}
    tables = {"probes": probe_table, "probe_summary": probes,
              **{f"head_to_head/iteration_{it.number}": [r for r in rows if r["iteration"] == it.number]
                 for it in iterations}}
    publish(run, cfg.tracking, summary=summary, report=report_lines(cfg, run.run_id, rows, probes, f),
            plots={"montessori.png": lambda path: plot(rows, probe_table, path)}, tables=tables,
            headline={k: v for k, v in f.items() if k != "by_iteration"})
    return summary
