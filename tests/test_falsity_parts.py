"""The falsity sweep's grid and report arithmetic, in-process (no training)."""

import pytest

from cluster.config import load_config
from jobs import falsity_sweep as job
from jobs.falsity_report import summarize

TINY = "configs/falsity_sweep/tiny.yaml"


def test_budget_study_adds_sft_only_trials_on_the_same_mixtures():
    cfg = load_config(job.FalsityOptions, TINY, ["ratios=[0,0.5,1]", "seeds=[0,1]", "budget_study.ratios=[0,1]",
                                                 "budget_study.factors=[0.5,1,2]"])
    ts = job.trials(cfg)
    extra = [t for t in ts if t.budget != 1.0]
    assert len(ts) == 6 + 2 * 2 * 2 and {t.budget for t in extra} == {0.5, 2.0}  # factor 1 is the main grid
    assert len({t.key for t in ts}) == len(ts) and {t.mixture for t in ts} == {t.mixture for t in ts if t.budget == 1.0}
    assert job.Trial(1.0, 0, 0.5).key == "r1-s0-b0.5" and job.Trial(1.0, 0).key == "r1-s0"


def trial(ratio, seed, budget=1.0, sft=0.5, curve=(), steps=10):
    t = {"ratio": ratio, "seed": seed, "budget": budget, "trial_id": None, "started_at": 0, "ended_at": 1,
         "sft/qa_accuracy": sft, "sft/steps": steps}
    if curve:
        for step, acc in curve[:-1]:
            t[f"recovery@{step}/qa_accuracy"] = acc
        t["recovery/qa_accuracy"], t["recovery/steps"] = curve[-1][1], curve[-1][0]
    return t


def test_recovery_is_compared_with_the_clean_model_at_the_same_steps():
    trials = [trial(0.0, 0, sft=0.8, curve=((5, 0.82), (10, 0.84))), trial(1.0, 0, sft=0.2, curve=((5, 0.5), (10, 0.7))),
              trial(0.0, 0, budget=2.0, sft=0.85), trial(1.0, 0, budget=2.0, sft=0.1)]
    s = summarize(trials)
    r1 = next(r for r in s["rows"] if r["ratio"] == 1.0)
    assert r1["clean_qa_accuracy"] == 0.84 and r1["recovery_gap"] == pytest.approx(0.14)  # r=0 after 10 more steps
    pts = [(p["step"], p["total_steps"], p["qa_accuracy"], p["gap"]) for p in s["curve"] if p["ratio"] == 1.0]
    assert pts == [(0, 10, 0.2, pytest.approx(0.6)), (5, 15, 0.5, pytest.approx(0.32)), (10, 20, 0.7, pytest.approx(0.14))]
    assert s["findings"]["recovery_lift"] == pytest.approx(0.5)
    assert s["findings"]["by_budget"] == {"0.0": {"1.0": 0.8, "2.0": 0.85}, "1.0": {"1.0": 0.2, "2.0": 0.1}}
    assert len(s["rows"]) == 2  # the budget trials are not main-grid rows
