"""The learner on the real stack: Ray Train, 2 CPU workers, DeepSpeed ZeRO-3, TRL SFT and DPO.

One SFT run has a worker killed mid-run (SIGKILL, from outside) and must resume from its last
checkpoint and finish; one DPO run checks the teacher learner trains against an explicit reference;
one run trains an objective registered outside `cluster/` (tests/toy_objective.py) with 2 ZeRO-3
workers, its second phase starting from the first phase's model on storage; one run that stopped
with a checkpoint is re-submitted at another size and refused with a line that says what to do.
"""

import functools
import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.config import UserError
from cluster.learners import DPOOptions, LearnerOptions, LearnerRun, Phase, ScaleOptions, fit
from cluster.models import TinyLlama, build_tiny_model, train_tokenizer
from cluster.stages import Run
from cluster.sweep import train_stage
from synth import world as W
from tests.conftest import registered_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("learner")
    world = W.build_world(W.WorldOptions(num_people=40, bios_per_person=2))
    tok = train_tokenizer(W.all_text(world), 400, root / "tok")
    build_tiny_model(TinyLlama(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                               vocab_size=400), tok, 0, root / "model")
    rows = W.questions(world, world.people, "all")
    pq.write_table(pa.Table.from_pylist([{"prompt": W.format_prompt(r["question"]), "completion": r["true_response"]}
                                         for r in rows]), root / "sft.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": W.format_prompt(r["question"]), "chosen": r["true_response"],
                                          "rejected": r["false_response"]} for r in rows]), root / "dpo.parquet")
    return root


def moved_from(init_dir: str, model_dir: str, phase: str) -> dict:
    """Evaluation hook run on rank 0: the gathered (ZeRO-3) weights load as a plain HF model with
    the initial model's shapes, and how far they moved from it (sum of absolute differences)."""
    import torch

    from cluster.models import load_model

    before, after = load_model(init_dir).state_dict(), load_model(model_dir).state_dict()
    assert before.keys() == after.keys() and all(before[k].shape == after[k].shape for k in before)
    return {"moved": float(sum((after[k].double() - before[k].double()).abs().sum() for k in before)),
            "checksum": float(sum(after[k].double().abs().sum() for k in after))}


def kill_a_worker_after_first_checkpoint(storage: Path, name: str, killed: list):
    """From outside the run: wait for a registered checkpoint, then SIGKILL one of the two workers.

    The local Ray this session started is a child of this process, so its Train workers are too.
    """
    import psutil

    deadline = time.time() + 300
    while time.time() < deadline and not killed:
        if registered_checkpoint(storage / name):
            workers = [p for p in psutil.Process().children(recursive=True)
                       if p.is_running() and "RayTrainWorker" in " ".join(p.cmdline())]
            if len(workers) == 2:
                victim = max(workers, key=lambda p: p.pid)
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(victim.pid)
                return
        time.sleep(0.2)


def test_zero3_two_workers_survive_a_killed_worker(ray_local, tiny, tmp_path):
    """A worker SIGKILLed after the first checkpoint: the group restarts, resumes from the
    checkpoint and ends with the very weights of the same run left alone."""
    import functools

    from safetensors.torch import load_file

    opts = LearnerOptions(learning_rate=1e-3, max_steps=24, batch_size=4, save_steps=6, logging_steps=6, max_length=64)
    scale = ScaleOptions(num_workers=2, cpus_per_worker=1, zero_stage=3, max_failures=1)
    evaluate = functools.partial(moved_from, str(tiny / "model"))

    def learner(name):
        return LearnerRun(name=name, model=str(tiny / "model"), tokenizer=str(tiny / "tok"),
                          phases=[Phase("sft", str(tiny / "sft.parquet"), opts)], scale=scale, evaluate=evaluate,
                          output=str(tmp_path / name))

    run = learner("zero3-kill")
    killed: list = []
    def killer_main():
        try:
            kill_a_worker_after_first_checkpoint(tmp_path, run.name, killed)
        except Exception as exc:  # surfaced by the assertion below
            killed.append(None)
            errors.append(repr(exc))

    errors: list = []
    killer = threading.Thread(target=killer_main, daemon=True)
    killer.start()
    res = fit(run, str(tmp_path))
    killer.join(timeout=1)
    assert killed and killed[0] is not None, f"no worker was killed (the test exercised no failure): {errors}"
    assert res.metrics["sft/steps"] == 24, res.metrics
    assert res.metrics["sft/resumed_from_step"] >= 6, "the restarted group did not resume from a checkpoint"
    assert res.metrics["sft/moved"] > 1.0, res.metrics  # the gathered weights trained
    assert res.model == str(tmp_path / "zero3-kill" / "sft") and (Path(res.model) / "model.safetensors").is_file()
    # the same run without a failure: resuming lost nor repeated any step (equal weights)
    whole = fit(learner("zero3-whole"), str(tmp_path))
    a, b = load_file(Path(res.model) / "model.safetensors"), load_file(Path(whole.model) / "model.safetensors")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5, f"resumed run ended {diff:.2e} away from the uninterrupted one (moved {res.metrics['sft/moved']:.1f})"


def test_dpo_learner_with_explicit_reference(ray_local, tiny, tmp_path):
    opts = DPOOptions(learning_rate=1e-3, max_steps=6, batch_size=4, save_steps=100, logging_steps=3,
                      max_length=64, beta=0.1)
    run = LearnerRun(name="dpo", model=str(tiny / "model"), tokenizer=str(tiny / "tok"),
                     phases=[Phase("dpo", str(tiny / "dpo.parquet"), opts, objective="dpo")],
                     scale=ScaleOptions(num_workers=1, cpus_per_worker=1), output=str(tmp_path / "models"),
                     evaluate=functools.partial(moved_from, str(tiny / "model")))
    res = fit(run, str(tmp_path))
    assert res.metrics["dpo/steps"] == 6 and res.metrics["dpo/moved"] > 1.0  # the policy trained
    assert res.metrics["dpo/reference/drift"] == 0.0  # the reference stayed frozen
    assert "dpo/rewards/margins" in res.metrics  # TRL's own namespaced logs reach the phase metrics
    assert (Path(res.model) / "model.safetensors").is_file()


def test_an_objective_registered_outside_cluster_trains_with_zero3(ray_local, tiny, tmp_path):
    """tests/toy_objective.py registers `sft_label_smoothing`; a 2-worker ZeRO-3 run trains a plain
    SFT phase, then the toy objective from the first phase's model on storage."""
    from tests.toy_objective import SmoothingOptions

    base = dict(learning_rate=1e-3, max_steps=4, batch_size=4, save_steps=100, logging_steps=2, max_length=64)
    run = LearnerRun(name="toy-objective", model=str(tiny / "model"), tokenizer=str(tiny / "tok"),
                     phases=[Phase("sft", str(tiny / "sft.parquet"), LearnerOptions(**base)),
                             Phase("smooth", str(tiny / "sft.parquet"), SmoothingOptions(**base, smoothing=0.5),
                                   objective="sft_label_smoothing")],
                     scale=ScaleOptions(num_workers=2, cpus_per_worker=1, zero_stage=3, max_failures=0),
                     output=str(tmp_path / "models"))
    res = fit(run, str(tmp_path))
    m = res.metrics
    assert m["smooth/steps"] == 4 and "sft/smoothing/ce" not in m
    # the toy trainer ran (its own metric) and its loss is the smoothed one, above the plain NLL
    assert m["smooth/smoothing/loss"] > m["smooth/smoothing/ce"] > 0, m
    assert (Path(tmp_path / "models" / "sft") / "model.safetensors").is_file() and Path(res.model).name == "smooth"


def test_lancet_ibo_trains_under_zero3_against_its_frozen_anchor(ray_local, tiny, tmp_path):
    """LANCET's IBO objective (jobs/lancet_objectives.py) on 2 ZeRO-3 workers: its anchor (the
    starting weights) is prepared as TRL prepares DPO's reference; the pairwise term moves the
    counteracting answers up against the supporting ones."""
    from jobs.lancet_objectives import IBOOptions

    rows = pq.read_table(tiny / "dpo.parquet").to_pylist()
    ibo = [{"chosen_prompt": a["prompt"], "chosen": a["chosen"], "rejected_prompt": b["prompt"], "rejected": b["rejected"],
            "retain_prompt": c["prompt"], "retain": c["chosen"]} for a, b, c in zip(rows, rows[1:], rows[2:])][:8] * 4
    # 8 pairs, each step all of them (2 workers x 4): the margin is measured on pairs it trains on
    pq.write_table(pa.Table.from_pylist(ibo), tmp_path / "ibo.parquet")
    opts = IBOOptions(learning_rate=3e-3, max_steps=4, batch_size=4, save_steps=100, logging_steps=1, max_length=64,
                      beta=0.5, gamma=1.0)
    run = LearnerRun(name="ibo", model=str(tiny / "model"), tokenizer=str(tiny / "tok"),
                     phases=[Phase("ibo", str(tmp_path / "ibo.parquet"), opts, objective="ibo")],
                     scale=ScaleOptions(num_workers=2, cpus_per_worker=1, zero_stage=3, max_failures=0),
                     output=str(tmp_path / "models"), evaluate=functools.partial(moved_from, str(tiny / "model")))
    res = fit(run, str(tmp_path))
    m = res.metrics
    assert m["ibo/steps"] == 4 and m["ibo/moved"] > 1.0, m
    assert m["ibo/ibo/margin"] > 0 and m["ibo/ibo/pair"] < 0.69, m  # log 2 at the start: the pairs moved apart


def fails_while(flag: str, model_dir: str, phase: str) -> dict:
    """Evaluation hook: a crash after the last phase trained, while `flag` exists (the run stops
    with checkpoints but unfinished, as a run whose cluster went away)."""
    if Path(flag).exists():
        raise RuntimeError("the run stops here")
    return {}


def test_a_run_with_a_checkpoint_resubmitted_at_another_size_is_refused(ray_local, tiny, tmp_path):
    flag = tmp_path / "stop"
    flag.touch()
    opts = LearnerOptions(learning_rate=1e-3, max_steps=4, batch_size=4, save_steps=2, logging_steps=2, max_length=64)

    def learner(workers: int, **scale) -> LearnerRun:
        return LearnerRun(model=str(tiny / "model"), tokenizer=str(tiny / "tok"),
                          phases=[Phase("sft", str(tiny / "sft.parquet"), opts)],
                          scale=ScaleOptions(num_workers=workers, cpus_per_worker=1, **{"max_failures": 0, **scale}),
                          evaluate=functools.partial(fails_while, str(flag)))

    run = Run(str(tmp_path / "runs"), "sizes", "r")
    with pytest.raises(Exception, match="the run stops here"):
        train_stage(run.stage("sft", run=learner(1)), {"base": learner(1)})
    # how the run copes with the cluster is no part of what it trains: the same stage, resumable
    assert run.stage("sft", run=learner(1, start_timeout_s=30, max_failures=3)).hash == run.stage("sft", run=learner(1)).hash
    bigger = learner(2, zero_stage=3)
    with pytest.raises(UserError) as refused:
        train_stage(run.stage("sft", run=bigger), {"base": bigger})
    line = str(refused.value)
    assert "\n" not in line and "run base has an unfinished checkpoint (phase 0, step 4)" in line, line
    assert "num_workers=1, zero_stage=0" in line and "Re-submit with num_workers=1, zero_stage=0 to resume" in line, line
    assert f"remove {tmp_path}/runs/sizes/r/ray/r-sft-base-" in line and "anew at num_workers=2, zero_stage=3" in line, line
    # refused before anything was touched: the stage still holds the stopped attempt's marker
    pending = json.loads((tmp_path / "runs/sizes/r/sft/_pending.json").read_text())
    assert pending["hash"] == run.stage("sft", run=learner(1)).hash
