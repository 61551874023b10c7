"""Robust fine-tuning: the data parts in-process, bad input (exit code 2, one line), the 8B preset's
plan, and the job end to end on the tiny world (slow: real Ray Tune, Train, TRL, W&B offline).

The slow test runs plain SFT, augmentation and R3F on world seed 5 (the preset was chosen on worlds
0 and 1) and asserts what holds on every world tried: the evaluation suite's perturbations hurt
plain SFT, more at higher strength; every arm trains the same number of steps; the report, the plot
and one W&B run per arm; a re-run skips every stage. It does not assert issue 10's finding
(augmentation +10 points on trained families, clean down at most 2): it held on worlds 0, 1 and 5,
while on worlds 2, 3 and 4 augmentation cost 4 to 8 clean points (docs/robust.md), so a test of it
would fail on fresh worlds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import cli
from cluster.config import load_config
from jobs import robust as job
from synth import world as W
from synth.perturb import changed_fraction
from synth.robust import AugmentOptions, augmented_rows, clean_rows, evaluation_suite

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/robust/tiny.yaml")

WORLD = 5  # the preset's numbers were chosen on worlds 0 and 1; world 5 is gradmatch's and lancet's too (one cached pretrain)
E2E = ["arms.neftune=null", "arms.adversarial=null", "seeds=[0]", "max_concurrent_trials=2",
       f"data.world.seed={WORLD}", "eval.families=[typo,swap,casing,dropout]"]


def table():
    world = W.build_world(W.WorldOptions(num_people=30, bios_per_person=2))
    return W.questions(world, world.people, "all")


def test_augmented_table_keeps_every_clean_row_and_adds_perturbed_copies_at_the_share():
    rows = table()
    opts = AugmentOptions(families=["typo", "swap"], share=0.5, rate=(0.2, 0.3))
    aug = augmented_rows(rows, opts, seed=0)
    assert aug == augmented_rows(rows, opts, seed=0) and aug != augmented_rows(rows, opts, seed=1)
    clean = {(r["prompt"], r["completion"]) for r in clean_rows(rows)}
    assert clean <= {(r["prompt"], r["completion"]) for r in aug}
    copies = [r for r in aug if r["family"] != "clean"]
    assert abs(len(copies) / len(rows) - 0.5) < 0.12 and {r["family"] for r in copies} == {"typo", "swap"}
    by_id = {r["id"]: r for r in rows}
    for c in copies:
        src = by_id[c["id"].split("~")[0]]
        assert src["person"] in c["prompt"] and c["completion"] == src["true_response"]  # names and answers kept
    changed = [changed_fraction(W.format_prompt(by_id[c["id"].split("~")[0]]["question"]), c["prompt"], "char") for c in copies]
    assert sum(x > 0 for x in changed) / len(changed) > 0.9
    assert len(augmented_rows(rows, opts.model_copy(update={"share": 0.0}), 0)) == len(rows)


def test_evaluation_suite_is_the_same_inputs_for_every_arm():
    held = [r for r in table() if r["kind"] == "single"][:20]
    suite = evaluation_suite(held, ["typo", "casing"], [0.1, 0.4], seed=0)
    assert suite == evaluation_suite(held, ["typo", "casing"], [0.1, 0.4], seed=0)
    assert len(suite) == 20 * (1 + 2 * 2)
    weak = [r["prompt"] for r in suite if r["family"] == "typo" and r["strength"] == 0.1]
    strong = [r["prompt"] for r in suite if r["family"] == "typo" and r["strength"] == 0.4]
    clean = [r["prompt"] for r in suite if r["family"] == "clean"]
    dist = lambda xs: sum(changed_fraction(a, b, "char") for a, b in zip(clean, xs)) / len(xs)  # noqa: E731
    assert 0 < dist(weak) < dist(strong)


def test_an_augmenting_arm_trains_as_many_steps_as_plain_sft():
    cfg = load_config(job.RobustOptions, TINY, [])
    sft, arm = cfg.sft, cfg.arms["augmentation"]
    assert arm.options(sft, steps=70).max_steps == 70 and arm.options(sft).max_steps == sft.max_steps
    r3f = cfg.arms["r3f"].options(sft)
    assert type(r3f).__name__ == "R3FOptions" and r3f.noise_eps == 1e-5 and r3f.learning_rate == sft.learning_rate
    assert cfg.trained_families == ["swap", "typo"] and "typo" not in cfg.heldout_families


def run_cli(capsys, *argv):
    code = cli.main("jobs.robust", job.__doc__, job.RobustOptions, job.plan, job.run, list(argv))
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("override, expected", [
    ("arms.augmentation.augment.families=[typos]", "unknown perturbation family 'typos'"),
    ("eval.families=[typo,leet]", "unknown perturbation family 'leet'"),
    ("arms.augmentation.augment.rate=[0.1,1.5]", "rate [0.1, 1.5]: expected 0 <= low <= high <= 1"),
    ("eval.strengths=[0.2,1.5]", "perturbation strength 1.5 is outside (0, 1]"),
    ("arms.r3f.params={r3f_lambda: 1.0}", "objective r3f needs noise_eps in params"),
    ("arms.adversarial.params={adv_eps: 0.1}", "objective adversarial needs adv_step in params"),
    ("arms.neftune.params={neftune_alpha: 5, alpha: 1}", "objective neftune takes no parameter alpha"),
    ("arms.augmentation.augment={families: [typo], share: 1.0}", "arms.augmentation.augment.rate: required option is missing"),
    ("arms.plain=null", "needs `plain: {objective: sft}`"),
])
def test_bad_option(capsys, override, expected):
    code, err = run_cli(capsys, "--config", TINY, override, "--dry-run")
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "jobs.robust", "--config", TINY, "eval.families=[typo,leet]",
                           f"storage={tmp_path}"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "leet" in proc.stderr and not list(tmp_path.iterdir())  # nothing started


def test_dry_run_of_the_8b_preset_needs_no_gpu_or_network(capsys):
    code = cli.main("jobs.robust", job.__doc__, job.RobustOptions, job.plan, job.run,
                    ["--config", str(ROOT / "configs/robust/llama3-8b.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "meta-llama/Meta-Llama-3-8B" in out and "5 learner runs" in out and "ZeRO-3 bf16" in out
    assert "held out: dropout, shuffle, synonym, distractor, casing, whitespace" in out


# ---------------------------------------------------------------------------------------------
# the job, end to end


@pytest.fixture(scope="module")
def robust_run(ray_local, tmp_path_factory):
    storage = tmp_path_factory.mktemp("robust")
    cfg = load_config(job.RobustOptions, TINY, [*E2E, f"storage={storage}", "run_id=e2e"])
    return cfg, job.run(cfg), storage / "robust" / "e2e"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_perturbations_hurt_plain_sft_and_every_arm_trains_one_budget(robust_run):
    cfg, summary, _ = robust_run
    rows = {r["arm"]: r for r in summary["rows"]}
    assert set(rows) == {"plain", "augmentation", "r3f"}
    plain = rows["plain"]
    for family in ("typo", "swap", "casing", "dropout"):
        acc = [plain["clean"], *(plain[f"{family}@{s:g}"] for s in cfg.eval.strengths)]
        assert acc[0] > acc[-1] + 0.05 and acc[1] >= acc[-1], (family, acc)  # more noise, fewer right
    assert plain["clean"] > plain["trained"] + 0.1 and plain["clean"] > plain["heldout"] + 0.05, plain
    assert len({r["steps"] for r in rows.values()}) == 1, rows  # one training budget
    arms = {a["arm"]: a for a in summary["arms"]}
    assert all(math.isfinite(a[k]) for a in arms.values() for k in ("overhead_wall", "overhead_per_token"))  # costs
    for name in ("augmentation", "r3f"):  # every change against plain, reported (not NaN)
        assert all(arms[name][k] == arms[name][k] for k in ("clean_change", "trained_change", "heldout_change"))


@pytest.mark.slow
def test_report_plot_wandb_and_a_rerun_that_skips_everything(robust_run):
    from cluster.tracking import find_offline_runs, read_offline_run

    cfg, summary, run = robust_run
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["rows"] == summary["rows"] and on_disk["findings"] == summary["findings"]
    report = (run / "report.md").read_text()
    assert "robust.png" in report and "| arm | seeds | clean | clean_change |" in report and "typo@0.4" in report
    assert (run / "robust.png").stat().st_size > 10_000
    wb = [read_offline_run(p) for p in find_offline_runs(run)]
    arms = [r for r in wb if "arm" in r["config"]]
    assert sorted(r["config"]["arm"] for r in arms) == ["augmentation", "plain", "r3f"]
    r3f = next(r for r in arms if r["config"]["arm"] == "r3f")
    assert {"r3f/kl", "r3f/ce"} <= {k for h in r3f["history"] for k in h}  # the objective's own logs
    manifests = {p.parent.name: p.stat().st_mtime for p in run.glob("*/_stage.json")}
    assert {"world", "pretrain", "tables", "suite", "arms"} <= set(manifests)
    again = job.run(cfg)
    assert again["rows"] == summary["rows"]
    assert {p.parent.name: p.stat().st_mtime for p in run.glob("*/_stage.json")} == manifests
