"""Montessori-Instruct over a grid: where does the DPO'd teacher beat the untrained one?

The probe step is taken at the warm-up's last learning rate with its Adam momentum, so which
candidates come out positive moves with the warm-up's length as much as with the candidates.
One world and one warm-up length is an anecdote; this job runs the Montessori job (iteration 1)
for every world seed x warm-up length and tabulates, per cell, the positive share of the probes,
the pairs formed and the held-out loss gain of the Montessori student over the untrained
teacher's student (positive: the paper's finding holds in that cell).

    python -m jobs.montessori_grid --config configs/montessori/grid-tiny.yaml

Each world seed is one Montessori run (`<grid run id>-w<seed>`): its cells differ only in the
warm-up, so they share the world, tokenizer, pretrained student, teacher and candidates, and redo
the warm-up and everything after it. A finished cell is a stage (`cell-w<seed>-e<epochs>`); a
re-run skips it. Output: summary.json, report.md (the table), grid.png, under
`<storage>/montessori_grid/<run_id>/`.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from pydantic import Field, field_validator

from cluster import cli
from cluster.config import UserError, load_config
from cluster.reports import fmt, markdown_table, publish
from cluster.stages import JobOptions, Run, Stage, open_run
from jobs import montessori as job

JOB = "montessori_grid"
UNSEEN = ("run_id", "storage", "tracking", "ray", "max_concurrent_trials", "stop_after")


class GridOptions(JobOptions):
    """A grid of Montessori runs."""

    preset: str = Field(description="the Montessori preset every cell starts from (path to its YAML)")
    overrides: list[str] = Field(["iterations=1", "ablation=false"], description="key=value overrides for every cell")
    world_seeds: list[int] = Field(min_length=1, description="synthetic world seeds (rows of the grid)")
    warmup_epochs: list[float] = Field(min_length=1, description="warm-up lengths (columns of the grid)")

    @field_validator("warmup_epochs")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(e <= 0 for e in v):
            raise ValueError("warm-up epochs must be positive")
        return sorted(set(v))


def cell_config(cfg: GridOptions, run: Run, world_seed: int, epochs: float) -> job.MontessoriOptions:
    if not Path(cfg.preset).is_file():
        raise UserError(f"preset: {cfg.preset}: config file not found")
    return load_config(job.MontessoriOptions, cfg.preset, [
        *cfg.overrides, f"data.world.seed={world_seed}", f"warmup.epochs={epochs:g}", f"storage={cfg.storage}",
        f"run_id={run.run_id}-w{world_seed}", f"tracking.mode={cfg.tracking.mode}",
        *([f"max_concurrent_trials={cfg.max_concurrent_trials}"] if cfg.max_concurrent_trials else [])])


def cell(cfg: GridOptions, run: Run, world_seed: int, epochs: float) -> Stage:
    """Stage `cell-w<seed>-e<epochs>`: one Montessori run; per training seed, the probes' positive
    share and pairs, and the students' held-out loss and accuracy by teacher."""
    cell_cfg = cell_config(cfg, run, world_seed, epochs)

    def build(st: Stage) -> dict:
        summary = job.run(cell_cfg)
        rows = []
        for p in summary["probes"]:
            if p["iteration"] != 1:
                continue
            by = {r["teacher"]: r for r in summary["rows"] if r["seed"] == p["seed"] and r["iteration"] == 1}
            ours, base = by[job.MONTESSORI], by[job.UNTRAINED]
            rows.append({"world_seed": world_seed, "warmup_epochs": epochs, "seed": p["seed"],
                         "positive_share": p["positive_share"], "pairs": p["pairs"],
                         "untrained_loss": base["heldout_loss"], "montessori_loss": ours["heldout_loss"],
                         "loss_gain": base["heldout_loss"] - ours["heldout_loss"], "win_rate": ours["win_rate"],
                         "accuracy_gain": (ours["accuracy"] - base["accuracy"]) if ours["accuracy"] is not None else None})
        return {"rows": rows}

    stage = run.stage(f"cell-w{world_seed}-e{epochs:g}",
                      options=cell_cfg.model_dump(mode="json", exclude=set(UNSEEN)))
    stage.ensure(build)
    return stage


def plot(rows: list[dict], seeds: list[int], epochs: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean(ws, e, key):
        xs = [r[key] for r in rows if r["world_seed"] == ws and r["warmup_epochs"] == e and r[key] is not None]
        return sum(xs) / len(xs) if xs else math.nan

    fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 * len(seeds) + 2.5))
    for ax, key, title, cmap in ((axes[0], "loss_gain", "held-out loss gain (untrained - Montessori)", "RdYlGn"),
                                 (axes[1], "positive_share", "positive share of probes", "viridis")):
        grid = [[mean(ws, e, key) for e in epochs] for ws in seeds]
        lim = max((abs(v) for r in grid for v in r if not math.isnan(v)), default=1.0)
        im = ax.imshow(grid, cmap=cmap, vmin=-lim if key == "loss_gain" else 0, vmax=lim if key == "loss_gain" else 1)
        for i, r in enumerate(grid):
            for j, v in enumerate(r):
                ax.text(j, i, fmt(v), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(epochs)), [f"{e:g}" for e in epochs])
        ax.set_yticks(range(len(seeds)), [str(s) for s in seeds])
        ax.set_xlabel("warm-up epochs")
        ax.set_ylabel("world seed")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plan(cfg: GridOptions) -> str:
    n = len(cfg.world_seeds) * len(cfg.warmup_epochs)
    return (f"montessori_grid plan: {n} cells = world seeds {cfg.world_seeds} x warm-up epochs {cfg.warmup_epochs}, "
            f"each a Montessori run of {cfg.preset} with {' '.join(cfg.overrides)}")


def run(cfg: GridOptions) -> dict:
    run = open_run(JOB, cfg)
    rows = []
    for ws, e in itertools.product(cfg.world_seeds, cfg.warmup_epochs):
        rows += cell(cfg, run, ws, e).result["rows"]
        print(f"[{JOB}] cell world {ws} x warm-up {e:g}: done", flush=True)
    beats = [r for r in rows if r["loss_gain"] > 0]
    by_epochs = {f"{e:g}": {"cells": sum(r["warmup_epochs"] == e for r in rows),
                            "montessori_better": sum(r["warmup_epochs"] == e for r in beats),
                            "mean_loss_gain": _mean([r["loss_gain"] for r in rows if r["warmup_epochs"] == e]),
                            "mean_positive_share": _mean([r["positive_share"] for r in rows if r["warmup_epochs"] == e])}
                 for e in cfg.warmup_epochs}
    findings = {"cells": len(rows), "montessori_better": len(beats), "by_warmup_epochs": by_epochs}
    summary = {"job": JOB, "run_id": run.run_id, "config": cfg.model_dump(mode="json"), "rows": rows, "findings": findings}
    lines = [f"# Montessori-Instruct over world seeds x warm-up lengths `{run.run_id}`", "",
             f"Preset `{cfg.preset}` with `{' '.join(cfg.overrides)}`. One row per world seed x warm-up length x "
             "training seed. `loss_gain` = held-out loss of the untrained teacher's student minus the Montessori "
             "teacher's student's (positive: the DPO'd teacher's data helped more).", "",
             *markdown_table(rows, ["world_seed", "warmup_epochs", "seed", "positive_share", "pairs", "untrained_loss",
                                    "montessori_loss", "loss_gain", "win_rate", "accuracy_gain"]),
             "", "![loss gain and positive share over the grid](grid.png)", "",
             f"Montessori better in {len(beats)} of {len(rows)} cells.", "",
             *markdown_table([{"warmup_epochs": e, **v} for e, v in by_epochs.items()],
                             ["warmup_epochs", "cells", "montessori_better", "mean_loss_gain", "mean_positive_share"])]
    publish(run, cfg.tracking, summary=summary, report=lines,
            plots={"grid.png": lambda p: plot(rows, cfg.world_seeds, cfg.warmup_epochs, p)},
            tables={"grid": rows}, headline={"cells": len(rows), "montessori_better": len(beats)})
    return summary


def _mean(xs: list) -> float:
    return sum(xs) / len(xs) if xs else math.nan


if __name__ == "__main__":
    raise SystemExit(cli.main(f"jobs.{JOB}", __doc__, GridOptions, plan, run))
