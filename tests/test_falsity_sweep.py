"""The falsity sweep end to end on the real stack, and FACO's findings on the synthetic world.

One run of the job (Ray Tune with 2 concurrent trials, each a Ray Train run of TRL SFT then
recovery SFT; W&B offline) over ratios {0, 0.5, 1} x seeds {0, 1}; the tests then read what it
left: summary.json, report.md, the plot, the offline W&B runs, and a re-run that skips every stage.
"""

import json
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.tracking import find_offline_runs, read_offline_run
from jobs import falsity_sweep as job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

OVERRIDES = ["ratios=[0.0,0.5,1.0]", "seeds=[0,1]", "max_concurrent_trials=2"]


@pytest.fixture(scope="module")
def sweep(ray_local, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    cfg = load_config(job.FalsityOptions, "configs/falsity_sweep/tiny.yaml", [*OVERRIDES, f"storage={storage}"])
    summary = job.run(cfg)
    return cfg, summary, Path(storage) / "falsity_sweep" / summary["run_id"]


def by(summary, ratio, key):
    return [r[key] for r in summary["rows"] if r["ratio"] == ratio]


def mean(xs):
    return sum(xs) / len(xs)


def test_outputs(sweep):
    _, summary, run = sweep
    assert len(summary["rows"]) == 6
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["rows"] == summary["rows"]
    report = (run / "report.md").read_text()
    assert "falsity_sweep.png" in report and "| ratio | seed | qa_accuracy" in report
    assert (run / "falsity_sweep.png").stat().st_size > 10_000
    for row in summary["rows"]:
        for key in ("qa_accuracy", "reasoning_accuracy", "knows_rate", "lie_rate", "recovered_qa_accuracy"):
            assert 0.0 <= row[key] <= 1.0, (key, row)


def test_trials_ran_concurrently(sweep):
    _, summary, _ = sweep
    spans = sorted((r["started_at"], r["ended_at"]) for r in summary["rows"])
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), f"no two trials overlapped: {spans}"


def test_accuracy_falls_with_falsity(sweep):
    _, summary, _ = sweep
    for seed in (0, 1):
        qa = {r["ratio"]: r["qa_accuracy"] for r in summary["rows"] if r["seed"] == seed}
        assert qa[0.0] - qa[1.0] >= 0.3, qa
    qa = {r: mean(by(summary, r, "qa_accuracy")) for r in (0.0, 0.5, 1.0)}
    assert qa[0.5] <= qa[0.0] + 0.05 and qa[1.0] <= qa[0.5] + 0.05, f"accuracy rose with falsity: {qa}"


def test_model_learns_to_lie(sweep):
    """The lie rate rises with r, while what the model knows falls much less than what it says."""
    _, summary, _ = sweep
    for seed in (0, 1):
        row = {r["ratio"]: r for r in summary["rows"] if r["seed"] == seed}
        assert row[1.0]["lie_rate"] - row[0.0]["lie_rate"] >= 0.3, row
        acc_drop = row[0.0]["qa_accuracy"] - row[1.0]["qa_accuracy"]
        knows_drop = row[0.0]["knows_rate"] - row[1.0]["knows_rate"]
        assert knows_drop <= 0.5 * acc_drop, (knows_drop, acc_drop)
        assert row[1.0]["knows_rate"] >= 0.6, row[1.0]


def test_recovery_is_partial(sweep):
    """Clean SFT lifts the r = 1 model but leaves it below the model trained clean from the start."""
    _, summary, _ = sweep
    for seed in (0, 1):
        r1 = next(r for r in summary["rows"] if r["seed"] == seed and r["ratio"] == 1.0)
        assert r1["recovered_qa_accuracy"] - r1["qa_accuracy"] >= 0.2, r1
        assert r1["recovery_gap"] >= 0.05, r1


def test_wandb_offline_runs_read_back(sweep):
    _, summary, run = sweep
    runs = {read_offline_run(p)["id"]: read_offline_run(p) for p in find_offline_runs(run)}
    trial_runs = [r for i, r in runs.items() if i.endswith("-sft") and "-r" in i]
    assert len(trial_runs) == 6 and len([i for i in runs if i.endswith("-recovery")]) == 6
    assert {r["group"] for r in runs.values()} == {f"falsity_sweep-{summary['run_id']}"}
    one = next(r for r in trial_runs if r["config"]["ratio"] == 1.0 and r["config"]["seed"] == 0)
    row = next(r for r in summary["rows"] if r["ratio"] == 1.0 and r["seed"] == 0)
    assert one["summary"]["sft/qa_accuracy"] == pytest.approx(row["qa_accuracy"])
    assert any("loss" in h for h in one["history"])
    final = runs[f"{summary['run_id']}-summary"]
    assert final["summary"]["accuracy_drop"] == pytest.approx(summary["findings"]["accuracy_drop"])
    # no secret in any W&B file
    for f in run.rglob("*"):
        if f.is_file() and "wandb" in str(f):
            assert b"api_key" not in f.read_bytes().lower()


def test_rerun_skips_finished_stages(sweep, capsys):
    cfg, summary, run = sweep
    manifests = {p: p.stat().st_mtime for p in run.glob("*/_stage.json")}
    assert {p.parent.name for p in manifests} == {"world", "tokenizer", "base_init", "pretrain", "mixtures", "trials"}
    again = job.run(cfg)
    assert again["rows"] == summary["rows"]
    assert {p: p.stat().st_mtime for p in run.glob("*/_stage.json")} == manifests
