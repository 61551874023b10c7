"""GRADMM: bad input (exit code 2, one line, nothing half-done), the 8B preset's plan, and the job
end to end on the tiny world (slow: Ray Tune trials for generation, Ray Tune + Train + TRL for the
fine-tuning, W&B offline).

The end-to-end test runs world seeds 1 and 5 (the preset was chosen on worlds 4 and 2: docs/gradmatch.md),
with two values of ρ and two fine-tuned arms, one seed each (world 5: no DP arm, GRADMM's set
fine-tuned alone; time), and asserts what the tiny world
reproduces of the paper: full GRADMM's synthetic set has a higher gradient cosine to the real
examples' gradient than both generation baselines and than project-once, and every text is made of
real, allowed tokens of the vocabulary. The paper's accuracy finding (GRADMM's set fine-tunes to a
higher test accuracy than zero-shot generation's) does not reproduce at this scale: the report shows
it, docs/gradmatch.md has the numbers, and no test claims it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import cli
from cluster.config import load_config
from jobs import gradmatch as job

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/gradmatch/tiny.yaml")
WORLDS = (1, 5)
E2E = ["generation.rhos=[0.0003,0.001]", "finetune.arms=[zero_shot,gradmm]", "finetune.seeds=[0]"]


def run_cli(capsys, *argv):
    code = cli.main("jobs.gradmatch", job.__doc__, job.GradmatchOptions, job.plan, job.run, list(argv))
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("override, expected", [
    ("generation.rhos=[0,1]", "rho 0 must be > 0"),
    ("generation.rhos=[-0.5]", "rho -0.5 must be > 0"),
    ("generation.per_class=12", "per_class 12 is not a multiple of batch 8"),
    ("task.verbalizers=[' white',' black',' red']", "2 classes but 3 verbalizers"),
    ("generation.per_class=24", "the world task has no more real texts"),
])
def test_bad_option(capsys, override, expected):
    code, err = run_cli(capsys, "--config", TINY, override, "--dry-run")
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err


@pytest.fixture(scope="module")
def table_model(tmp_path_factory):
    """A named (hub-style) tiny model whose tokenizer has ' white' and ' black' as tokens, and table
    files: both classes, and one where no text is of class black."""
    from tests.conftest import tiny_llama

    d = tmp_path_factory.mktemp("gm-table")
    texts = [f"{t} has a {p}." for t in ("Oskar", "Pell", "Dorn", "Hessa") for p in ("dog", "cat", "fox", "owl", "crow")]
    tiny_llama([f"{x} Answer: white black" for x in texts] * 3, d / "model")
    rows = [{"text": x, "label": i % 2, "split": "train" if i < 16 else "test"} for i, x in enumerate(texts)]
    (d / "both.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "one.jsonl").write_text("".join(json.dumps({**r, "label": 0}) + "\n" for r in rows))
    return d


def table_args(d: Path, tmp_path: Path, data: str = "both.jsonl") -> list[str]:
    return ["--config", TINY, f"model.name={d / 'model'}", "model.tiny=null", "pretrain=null", "task.source=table",
            f"task.dataset={d / data}", "task.train_split=train", "task.test_split=test", "task.real_per_class=2",
            "task.dev_per_class=2", "generation.per_class=4", "generation.batch=2", "generation.few_shot=2",
            f"storage={tmp_path}", "run_id=bad", "tracking.mode=disabled"]


@pytest.mark.parametrize("data, override, expected", [
    ("one.jsonl", "generation.top_k=5", "task: class black has 0 examples"),
    ("both.jsonl", "generation.top_k=100000", "generation.top_k 100000 is larger than the"),
    ("both.jsonl", "task.verbalizers=[' white',' blackish']", "' blackish' is 4 tokens for this tokenizer"),
])
def test_bad_input_found_against_the_data_and_tokenizer_ends_in_exit_2(capsys, table_model, tmp_path, data, override, expected):
    code, err = run_cli(capsys, *table_args(table_model, tmp_path, data), override)
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "gradmatch/bad/task/_stage.json").exists()  # the stage that found it is not committed


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "jobs.gradmatch", "--config", TINY, "generation.rhos=[0]",
                           f"storage={tmp_path}"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())  # nothing started


@pytest.mark.parametrize("preset, names", [("llama3-8b", ["meta-llama/Meta-Llama-3-8B", "ZeRO-3 bf16", "dp-rho5"]),
                                           ("phi-1_5", ["microsoft/phi-1_5", "stanfordnlp/sst2", "' It was'"])])
def test_dry_run_of_the_cluster_presets_needs_no_gpu_or_network(capsys, preset, names):
    code = cli.main("jobs.gradmatch", job.__doc__, job.GradmatchOptions, job.plan, job.run,
                    ["--config", str(ROOT / f"configs/gradmatch/{preset}.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert all(n in out for n in names), out


# ---------------------------------------------------------------------------------------------
# the job, end to end


@pytest.fixture(scope="module")
def gradmatch_runs(ray_local, tmp_path_factory):
    storage = tmp_path_factory.mktemp("gradmatch")
    out = {}
    for w in WORLDS:  # the second world without the DP arm, one fine-tuning of GRADMM's set (time)
        lean = [] if w == WORLDS[0] else ["generation.dp=null", "finetune.arms=[gradmm]", "finetune.seeds=[0]"]
        cfg = load_config(job.GradmatchOptions, TINY, [f"data.world.seed={w}", f"storage={storage}", f"run_id=w{w}", *E2E, *lean])
        out[w] = (cfg, job.run(cfg), storage / "gradmatch" / f"w{w}")
    return out


def arm(summary: dict, name: str) -> dict:
    return next(r for r in summary["arms"] if r["arm"] == name)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", WORLDS)
def test_gradmm_matches_the_real_gradient_better_than_generation_and_project_once(gradmatch_runs, world):
    _, summary, _ = gradmatch_runs[world]
    full = arm(summary, "gradmm")["cos_real"]
    assert full > arm(summary, "zero_shot")["cos_real"] + 0.1, summary["arms"]
    assert full > arm(summary, "few_shot")["cos_real"] + 0.1, summary["arms"]
    assert full > arm(summary, "project_once")["cos_real"] + 0.05, summary["arms"]
    assert arm(summary, "continuous")["cos_real"] > full  # the unconstrained optimum bounds it
    assert summary["selected"]["gradmm"] in {t["trial"] for t in summary["trials"]}


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_every_synthetic_text_is_allowed_tokens_of_the_vocabulary(gradmatch_runs, world):
    from cluster.models import load_tokenizer
    from synth.gradmatch import allowed_tokens

    cfg, summary, run = gradmatch_runs[world]
    tok = load_tokenizer(run / "tokenizer")
    allowed = set(allowed_tokens(tok).tolist())
    names = ["gradmm", "project_once", "zero_shot", "few_shot"] + (["gradmm_dp"] if cfg.generation.dp else [])
    for name in names:
        for c, ids in summary["texts"][name].items():
            assert len(ids) == cfg.generation.per_class and all(len(s) == summary["generation"]["length"] for s in ids)
            assert all(t in allowed for s in ids for t in s), (name, c)  # never a special or control token
            texts = [tok.decode(s) for s in ids]
            assert all(t.strip() and "\ufffd" not in t for t in texts), texts


@pytest.mark.slow
def test_report_plots_wandb_and_a_rerun_that_skips_everything(gradmatch_runs):
    from cluster.tracking import find_offline_runs, read_offline_run

    cfg, summary, run = gradmatch_runs[WORLDS[0]]
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["arms"] == summary["arms"] and on_disk["findings"] == summary["findings"]
    report = (run / "report.md").read_text()
    assert "arms.png" in report and "admm.png" in report and "| arm | cos_real | cos_dev |" in report
    assert all((run / p).stat().st_size > 10_000 for p in ("arms.png", "admm.png"))
    accs = [r for r in summary["rows"] if r["arm"] in ("gradmm", "zero_shot")]
    assert len(accs) == 2 and all(0 <= r["accuracy"] <= 1 for r in accs)
    units = sorted(p.name for p in (run / "generation").glob("*/*.json"))
    assert len(units) == len(cfg.trials) * 2 * cfg.generation.rounds  # every trial x class x round on storage
    steps = json.loads((run / "generation/gradmm-rho0.001/0-r0.json").read_text())["history"]
    assert [h["step"] for h in steps] == list(range(1, cfg.generation.outer_steps + 1))
    wb = [read_offline_run(p) for p in find_offline_runs(run)]
    assert sorted(r["config"].get("arm", "") for r in wb if "arm" in r["config"]) == ["gradmm", "zero_shot"]
    manifests = {p.parent.name: p.stat().st_mtime for p in run.glob("*/_stage.json")}
    assert {"world", "pretrain", "task", "generation", "baselines", "arms", "finetune"} <= set(manifests)
    again = job.run(cfg)
    assert again["arms"] == summary["arms"]
    assert {p.parent.name: p.stat().st_mtime for p in run.glob("*/_stage.json")} == manifests


@pytest.mark.slow
def test_a_generation_trial_resumes_from_its_finished_units(gradmatch_runs, tmp_path):
    """A unit on storage is not redone: a trial re-run over a copy with one unit removed rebuilds
    that unit only, to the same tokens (units are seeded by class and round)."""
    import shutil

    import torch

    from cluster.stages import read_rows
    from synth.gradmatch import Trial, run_trial

    cfg, summary, run = gradmatch_runs[WORLDS[0]]
    src = run / "generation/once"
    shutil.copytree(src, tmp_path / "once")
    (tmp_path / "once/1-r1.json").unlink()
    before = {p.name: p.stat().st_mtime for p in (tmp_path / "once").glob("*.json")}
    opts = cfg.generation.model_copy(update={"length": summary["generation"]["length"],
                                             "init_size": summary["generation"]["init_size"]})
    lines, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Tune trial: another thread count sums in another order
    out = run_trial(Trial("once", None), model_dir=str(run / "pretrain/base/pretrain"), tokenizer_dir=str(run / "tokenizer"),
                    real=read_rows(str(run / "task/real.parquet")), suffix=cfg.task.suffix, verbalizers=cfg.task.verbalizers,
                    opts=opts, out=str(tmp_path / "once"), log=lines.append)
    torch.set_num_threads(threads)
    assert all(line.startswith("[once] class 1 round 2/2") for line in lines) and len(lines) == cfg.generation.outer_steps
    assert {p.name: p.stat().st_mtime for p in (tmp_path / "once").glob("*.json") if p.name in before} == before
    assert out[1][1]["ids"] == json.loads((src / "1-r1.json").read_text())["ids"]
