"""evals.harness: result flattening, options, the missing-package error, and a real lm-eval run
on the local task the smoke presets use."""

from __future__ import annotations

import sys

import pytest

from cluster.config import UserError
from evals.harness import HarnessOptions, evaluate_with_harness, flatten_results, plan_lines

# Shape of lm_eval.simple_evaluate(...) output (0.4.x), trimmed: groups and subtasks both appear
# under "results", stderr can be the string "N/A", gsm8k reports one entry per filter.
RESULTS = {
    "results": {
        "arc_challenge": {"alias": "arc_challenge", "sample_len": 1172, "acc,none": 0.5, "acc_stderr,none": 0.01,
                          "acc_norm,none": 0.55, "acc_norm_stderr,none": 0.012},
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.4, "exact_match_stderr,strict-match": 0.02,
                  "exact_match,flexible-extract": 0.45, "exact_match_stderr,flexible-extract": 0.02},
        "mmlu": {"alias": "mmlu", "acc,none": 0.6, "acc_stderr,none": "N/A"},
        "mmlu_anatomy": {"alias": "  - anatomy", "acc,none": 0.7, "acc_stderr,none": 0.04},
    },
    "groups": {"mmlu": {"alias": "mmlu", "acc,none": 0.6, "acc_stderr,none": "N/A"}},
    "configs": {"arc_challenge": {"num_fewshot": 25}},
    "versions": {"arc_challenge": 1.0},
    "n-shot": {"arc_challenge": 25},
}


def test_flatten_keeps_metrics_and_drops_stderr_and_text():
    assert flatten_results(RESULTS) == {
        "arc_challenge/acc": 0.5,
        "arc_challenge/acc_norm": 0.55,
        "gsm8k/exact_match,strict-match": 0.4,
        "gsm8k/exact_match,flexible-extract": 0.45,
        "mmlu/acc": 0.6,
        "mmlu_anatomy/acc": 0.7,
    }
    assert flatten_results(None) == {}


def test_missing_lm_eval_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(UserError, match=r"pip install -e \.\[cluster\]") as err:
        evaluate_with_harness("/models/m", HarnessOptions())
    assert "\n" not in str(err.value)


def test_options_and_plan():
    opts = HarnessOptions(tasks=["arc_challenge"], num_fewshot=25, limit=10)
    assert "arc_challenge" in plan_lines(opts)[0]
    for bad in ({"tasks": []}, {"batch_size": "big"}, {"batch_size": 0}, {"limit": 0}, {"tasks": ["nope/task.yaml"]}):
        with pytest.raises(ValueError):
            HarnessOptions(**bad)


def test_local_task_file_runs_through_lm_eval(tmp_path, monkeypatch):
    """The smoke presets' task (`evals/tasks/world_mc.yaml`, its data beside it) on a tiny model,
    from another working directory: lm-eval reads the data through the path the task file names."""
    from pathlib import Path

    from evals.harness import task_spec
    from tests.conftest import tiny_llama

    spec = task_spec("evals/tasks/world_mc.yaml")
    data = Path(spec["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and data.is_file()
    model = tiny_llama([line for line in data.read_text().splitlines()], tmp_path / "model", hidden_size=16)
    monkeypatch.chdir(tmp_path)
    scores = evaluate_with_harness(str(model), HarnessOptions(tasks=["evals/tasks/world_mc.yaml"], num_fewshot=0,
                                                              batch_size=8, limit=8), device="cpu")
    assert set(scores) == {"world_mc/acc"} and 0.0 <= scores["world_mc/acc"] <= 1.0
