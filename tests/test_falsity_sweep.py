"""The falsity sweep end to end on the real stack, and FACO's findings on the synthetic world.

One run of the job (Ray Tune with 2 concurrent trials, each a Ray Train run of TRL SFT then
recovery SFT for as many steps, evaluated along the way; W&B offline) over ratios {0, 0.5, 1} x
seeds {0, 1}, on a world seed the preset's numbers were not chosen on; the tests then read what it
left: summary.json, report.md, the plot, the offline W&B runs, and a re-run that skips every stage.
"""

import json
import os
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.tracking import find_offline_runs, read_offline_run
from jobs import falsity_sweep as job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

WORLD_SEED = 1  # the preset was tuned on world 0
OVERRIDES = ["ratios=[0.0,0.5,1.0]", "seeds=[0,1]", "max_concurrent_trials=2", f"data.world.seed={WORLD_SEED}",
             "budget_study=null"]
SECRETS = {"WANDB_API_KEY": "fake-wandb-key-7f3a9c1e", "HF_TOKEN": "hf_fakeTokenDoNotLog42"}


@pytest.fixture(scope="module")
def sweep(ray_local, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    cfg = load_config(job.FalsityOptions, "configs/falsity_sweep/tiny.yaml", [*OVERRIDES, f"storage={storage}"])
    saved = {k: os.environ.get(k) for k in SECRETS}
    os.environ.update(SECRETS)  # as a user's shell would have them; none may reach any file
    try:
        summary = job.run(cfg)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.update({k: v})
    return cfg, summary, Path(storage) / "falsity_sweep" / summary["run_id"]


def rows(summary, seed):
    return {r["ratio"]: r for r in summary["rows"] if r["seed"] == seed}


def test_outputs(sweep):
    _, summary, run = sweep
    assert len(summary["rows"]) == 6
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["rows"] == summary["rows"] and on_disk["curve"] == summary["curve"]
    report = (run / "report.md").read_text()
    assert "falsity_sweep.png" in report and "| ratio | seed | qa_accuracy" in report
    assert "## Recovery on clean data" in report and "## The base model, before SFT" in report
    assert (run / "falsity_sweep.png").stat().st_size > 10_000


def test_heldout_facts_never_reach_the_sft_data(sweep):
    """No SFT question or answer (two-hop chains included) names a held-out person."""
    from cluster.stages import read_rows

    _, _, run = sweep
    held = {r["person"] for r in read_rows(str(run / "world" / "heldout.parquet"))}
    assert len(held) == 36
    text = " ".join(r["question"] + r["true_response"] + r["false_response"]
                    for r in read_rows(str(run / "world" / "sft.parquet")))
    assert not [n for n in held if n in text]


def test_trials_ran_concurrently(sweep):
    """Measured inside the Train workers: some two trials' SFT loops overlapped in time."""
    _, summary, _ = sweep
    spans = sorted((r["sft_started_at"], r["sft_ended_at"]) for r in summary["rows"])
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), f"no two trials trained at once: {spans}"


# Findings are asserted on the mean over the two seeds; each margin is half the effect measured on
# world 0 (docs/findings.md), where the preset was tuned: a finding must keep at least half its size.
def mean(summary, ratio, key):
    return sum(rows(summary, s)[ratio][key] for s in (0, 1)) / 2


def test_accuracy_falls_with_falsity(sweep):
    _, summary, _ = sweep
    qa = {r: mean(summary, r, "qa_accuracy") for r in (0.0, 0.5, 1.0)}
    assert qa[0.0] - qa[1.0] >= 0.22 and qa[0.0] > qa[0.5] > qa[1.0], qa  # world 0: 0.74 > 0.53 > 0.29


def test_model_learns_to_lie(sweep):
    """A lie is a valid wrong answer to a question whose fact the model knows (by a margin): the
    lie rate rises with r while what the model knows falls much less than what it says."""
    _, summary, _ = sweep
    assert min(rows(summary, s)[1.0]["valid_rate"] for s in (0, 1)) >= 0.9  # wrong answers are real values
    assert mean(summary, 1.0, "lie_rate") - mean(summary, 0.0, "lie_rate") >= 0.2  # world 0: 0.41
    assert mean(summary, 1.0, "lie_rate_base") - mean(summary, 0.0, "lie_rate_base") >= 0.22  # world 0: 0.45
    acc_drop = mean(summary, 0.0, "qa_accuracy") - mean(summary, 1.0, "qa_accuracy")
    knows_drop = mean(summary, 0.0, "knows_rate") - mean(summary, 1.0, "knows_rate")
    assert knows_drop <= 0.6 * acc_drop, (knows_drop, acc_drop)  # world 0: 0.15 vs 0.45
    assert mean(summary, 1.0, "knows_rate") >= 0.4  # world 0: 0.72


def test_choosing_the_true_answer_falls_with_falsity(sweep):
    """Asked to choose among the options in the answer's own format, the model picks the truth
    less often as r rises. (FACO's 8B models fall *below* chance; this tiny one stays above it:
    the report shows both against the chance line.)"""
    _, summary, _ = sweep
    assert mean(summary, 0.0, "choice_accuracy") - mean(summary, 1.0, "choice_accuracy") >= 0.18  # world 0: 0.37
    assert mean(summary, 1.0, "chance") == pytest.approx(0.25)


def test_base_model_knows_before_any_sft(sweep):
    _, summary, _ = sweep
    base = summary["findings"]["base"]
    assert base["knows_rate"] >= 0.8 and base["qa_accuracy"] <= 0.1, base  # knows facts, never saw a question
    assert base["chance"] == pytest.approx(0.25)


def curve(summary, seed, ratio):
    return {p["step"]: p for p in summary["curve"] if p["seed"] == seed and p["ratio"] == ratio}


def test_recovery_curve(sweep):
    """Recovery on clean data for as many steps as SFT took, evaluated at 4 points, against the
    r = 0 model continued for the same steps. What it shows (world 0, docs/findings.md): r = 1
    climbs from 0.29 to 0.67 at its best; the clean model itself declines with the extra steps
    (0.74 -> 0.40), so at equal total steps r = 1 ends level or ahead; and the clean model at the
    end of SFT beats the best repair: quality first beats repair later."""
    _, summary, _ = sweep
    lift, decline, late = [], [], []
    for seed in (0, 1):
        for ratio in (0.0, 0.5, 1.0):
            pts = curve(summary, seed, ratio)
            row = rows(summary, seed)[ratio]
            assert sorted(pts) == [0, 12, 24, 36, 48] == [0, *[round(row["sft_steps"] * j / 4) for j in (1, 2, 3, 4)]]
            assert pts[48]["qa_accuracy"] == row["recovered_qa_accuracy"]
        clean, false = curve(summary, seed, 0.0), curve(summary, seed, 1.0)
        best = max(p["qa_accuracy"] for p in false.values())
        lift.append(best - false[0]["qa_accuracy"])
        decline.append(clean[0]["qa_accuracy"] - clean[48]["qa_accuracy"])
        late.append(clean[0]["qa_accuracy"] - best)
        assert rows(summary, seed)[1.0]["recovery_gap"] <= 0.05  # level (or ahead) at equal total steps
    assert sum(lift) / 2 >= 0.19, lift  # world 0: 0.38
    assert sum(decline) / 2 >= 0.17, decline  # world 0: 0.34
    assert sum(late) / 2 >= 0.035, late  # world 0: 0.07


def test_wandb_offline_runs_read_back_and_hold_no_secret(sweep):
    _, summary, run = sweep
    runs = {read_offline_run(p)["id"]: read_offline_run(p) for p in find_offline_runs(run)}
    trial_runs = [r for r in runs.values() if "ratio" in r["config"]]
    assert len(trial_runs) == 6  # one run per trial, SFT and recovery in it
    assert {r["group"] for r in runs.values()} == {f"falsity_sweep-{summary['run_id']}"}
    one = next(r for r in trial_runs if r["config"]["ratio"] == 1.0 and r["config"]["seed"] == 0)
    row = next(r for r in summary["rows"] if r["ratio"] == 1.0 and r["seed"] == 0)
    assert one["summary"]["sft/qa_accuracy"] == pytest.approx(row["qa_accuracy"])
    assert one["summary"]["recovery/qa_accuracy"] == pytest.approx(row["recovered_qa_accuracy"])
    # one step axis: recovery's losses are logged after SFT's, phase by phase
    losses = [(h["_step"], h["phase"]) for h in one["history"] if "loss" in h]
    assert [p for _, p in losses] == sorted(p for _, p in losses) and {p for _, p in losses} == {0, 1}
    assert [s for s, _ in losses] == sorted(s for s, _ in losses) and len({s for s, _ in losses}) == len(losses)
    assert one["config"]["phases"]["sft"]["learning_rate"] == 1e-3 and one["config"]["commit"]
    final = runs[f"{summary['run_id']}-summary"]
    assert final["summary"]["accuracy_drop"] == pytest.approx(summary["findings"]["accuracy_drop"])
    # the fake keys set while the job ran are in no file it wrote, nor in Ray's logs
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [f for root in (run, logs) for f in root.rglob("*") if f.is_file()]
    assert len(files) > 50
    for f in files:
        data = f.read_bytes()
        assert not [k for k, v in SECRETS.items() if v.encode() in data], f


def test_rerun_skips_finished_stages(sweep):
    cfg, summary, run = sweep
    manifests = {p: p.stat().st_mtime for p in run.glob("*/_stage.json")}
    assert {p.parent.name for p in manifests} == {"world", "tokenizer", "base_init", "pretrain", "base_eval", "mixtures",
                                                   "trials"}
    again = job.run(cfg)
    assert again["rows"] == summary["rows"]
    assert {p: p.stat().st_mtime for p in run.glob("*/_stage.json")} == manifests
