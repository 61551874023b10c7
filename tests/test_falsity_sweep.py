"""The falsity sweep end to end on the real stack, and FACO's findings on the synthetic world.

One run of the job (Ray Tune with 2 concurrent trials, each a Ray Train run of TRL SFT then
recovery SFT for as many steps, evaluated along the way; W&B offline) over ratios {0, 0.5, 1} x
seeds {0, 1}, on a world seed the preset's numbers were not chosen on. Its driver is a
`python -m jobs.falsity_sweep` process, SIGKILLed mid-sweep (a trial finished, another checkpointed
mid-run); the same command is then run again to the end. The tests read what it left:
summary.json, report.md, the plot, the offline W&B runs, a re-run that skips every stage, and an
uninterrupted twin of a trial the kill interrupted.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.tracking import OfflineRunError, find_offline_runs, read_offline_run
from jobs import falsity_sweep as job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

CONFIG = "configs/falsity_sweep/tiny.yaml"
WORLD_SEED = 1  # the preset was tuned on world 0
OVERRIDES = ["ratios=[0.0,0.5,1.0]", "seeds=[0,1]", "max_concurrent_trials=2", f"data.world.seed={WORLD_SEED}",
             "budget_study=null"]
SECRETS = {"WANDB_API_KEY": "fake-wandb-key-7f3a9c1e", "HF_TOKEN": "hf_fakeTokenDoNotLog42"}


def trial_key(run_name: str) -> str:
    """`<run id>-trials-<key>-<fingerprint>` (cluster.sweep) -> key."""
    return run_name.split("-trials-")[1].rsplit("-", 1)[0]


def latest_checkpoints(storage: Path) -> dict[str, dict]:
    """Each trial's Ray Train run (by trial key) -> the metrics of its latest registered checkpoint."""
    out = {}
    for snap in storage.glob("falsity_sweep/*/ray/*-trials-*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
        except json.JSONDecodeError:  # being written
            continue
        if latest:
            out[trial_key(snap.parent.name)] = latest["metrics"]
    return out


def finished(metrics: dict) -> bool:
    return metrics.get("phase") == 1 and bool(metrics.get("phase_done"))


def kill_driver_mid_sweep(storage: Path, args: list[str], log: Path) -> dict:
    """Run the job's command; SIGKILL its driver once one trial has finished and another has a
    registered checkpoint but is not done. Returns what the storage held at that moment."""
    import ray

    env = {**os.environ, **SECRETS, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "jobs.falsity_sweep", "--config", CONFIG, *args], env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    while True:
        ckpts = latest_checkpoints(storage)
        if any(map(finished, ckpts.values())) and not all(map(finished, ckpts.values())):
            break
        assert driver.poll() is None and time.time() < deadline, f"the sweep never reached the kill point:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    at = time.time()
    driver.wait()
    (run,) = storage.glob("falsity_sweep/*")
    return {"at": at, "checkpoints": ckpts, "manifests": {p: p.stat().st_mtime for p in run.glob("*/_stage.json")},
            "experiments": {d.name.split("_")[2] for d in run.glob("ray/trials-*/_trial_*") if d.is_dir()}}


@pytest.fixture(scope="module")
def sweep(ray_local, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    args = [*OVERRIDES, f"storage={storage}"]
    killed = kill_driver_mid_sweep(storage, args, storage.parent / "killed-driver.log")
    cfg = load_config(job.FalsityOptions, CONFIG, args)
    saved = {k: os.environ.get(k) for k in SECRETS}
    os.environ.update(SECRETS)  # as a user's shell would have them; none may reach any file
    try:
        summary = job.run(cfg)  # the same command again, in this process
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.update({k: v})
    return cfg, summary, Path(storage) / "falsity_sweep" / summary["run_id"], killed


def rows(summary, seed):
    return {r["ratio"]: r for r in summary["rows"] if r["seed"] == seed}


def test_outputs(sweep):
    _, summary, run, _ = sweep
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

    _, _, run, _ = sweep
    held = {r["person"] for r in read_rows(str(run / "world" / "heldout.parquet"))}
    assert len(held) == 36
    text = " ".join(r["question"] + r["true_response"] + r["false_response"]
                    for r in read_rows(str(run / "world" / "sft.parquet")))
    assert not [n for n in held if n in text]


def test_trials_ran_concurrently(sweep):
    """Measured inside the Train workers: some two trials' SFT loops overlapped in time."""
    _, summary, _, _ = sweep
    spans = sorted((r["sft_started_at"], r["sft_ended_at"]) for r in summary["rows"])
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), f"no two trials trained at once: {spans}"


# Findings are asserted on the mean over the two seeds; each margin is half the effect measured on
# world 0 (docs/findings.md), where the preset was tuned: a finding must keep at least half its size.
def mean(summary, ratio, key):
    return sum(rows(summary, s)[ratio][key] for s in (0, 1)) / 2


def test_accuracy_falls_with_falsity(sweep):
    _, summary, _, _ = sweep
    qa = {r: mean(summary, r, "qa_accuracy") for r in (0.0, 0.5, 1.0)}
    assert qa[0.0] - qa[1.0] >= 0.22 and qa[0.0] > qa[0.5] > qa[1.0], qa  # world 0: 0.74 > 0.53 > 0.29


def test_model_learns_to_lie(sweep):
    """A lie is a valid wrong answer to a question whose fact the model knows (by a margin): the
    lie rate rises with r while what the model knows falls much less than what it says."""
    _, summary, _, _ = sweep
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
    _, summary, _, _ = sweep
    assert mean(summary, 0.0, "choice_accuracy") - mean(summary, 1.0, "choice_accuracy") >= 0.18  # world 0: 0.37
    assert mean(summary, 1.0, "chance") == pytest.approx(0.25)


def test_base_model_knows_before_any_sft(sweep):
    _, summary, _, _ = sweep
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
    _, summary, _, _ = sweep
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
    # level (or ahead) at equal total steps, on the mean over seeds as every finding here: one seed's
    # gap between two accuracies on 144 questions has a standard deviation of about 0.05
    assert sum(rows(summary, s)[1.0]["recovery_gap"] for s in (0, 1)) / 2 <= 0.05
    assert sum(lift) / 2 >= 0.19, lift  # world 0: 0.38
    assert sum(decline) / 2 >= 0.17, decline  # world 0: 0.34
    assert sum(late) / 2 >= 0.035, late  # world 0: 0.07


def resume_step(checkpoint: dict, sft_steps: int) -> int:
    """Where on a trial's step axis (SFT's steps, then recovery's) its checkpoint stands."""
    return (checkpoint["phase"] + 1) * sft_steps if checkpoint.get("phase_done") else checkpoint["phase"] * sft_steps + checkpoint["step"]


def test_wandb_offline_runs_read_back_and_hold_no_secret(sweep):
    _, summary, run, killed = sweep
    segments: dict[str, list[dict]] = {}
    unwritten = []  # a worker killed with the driver while wandb.init was still writing its run record
    for p in find_offline_runs(run):  # sorted by start time: a run's segments in the order they were written
        try:
            r = read_offline_run(p)
        except OfflineRunError:
            unwritten.append(p.name.split("-", 3)[-1])  # offline-run-<time>-<run id>
            continue
        segments.setdefault(r["id"], []).append(r)
    trials = {trial_key(i): segs for i, segs in segments.items() if "ratio" in segs[0]["config"]}
    # such a segment's trial had no checkpoint yet; the restored sweep ran it again, in full
    assert all(trial_key(i) in trials and trial_key(i) not in killed["checkpoints"]
               and trials[trial_key(i)][-1]["complete"] for i in unwritten), unwritten
    assert len(trials) == 6  # one W&B run per trial, SFT and recovery in it, under one id across the kill
    assert {r["group"] for segs in segments.values() for r in segs} == {f"falsity_sweep-{summary['run_id']}"}
    sft_steps = int(summary["rows"][0]["sft_steps"])
    for key, segs in trials.items():
        # the killed driver's part, then the part that finished the trial. (The killed part may have
        # an exit record too: its workers can finish the trial in the second or two before Ray
        # stops a dead driver's actors; the restored sweep then resumes it from its last checkpoint.)
        assert segs[-1]["complete"], key
        for s in segs:  # one step axis: recovery's losses after SFT's, steps strictly increasing
            losses = [(h["_step"], h["phase"]) for h in s["history"] if "loss" in h]
            assert losses == sorted(losses) and len({st for st, _ in losses}) == len(losses), (key, losses)
        if len(segs) > 1 and key in killed["checkpoints"]:  # it continued from its checkpoint, not from step 0
            after = [h["_step"] for h in segs[-1]["history"] if "loss" in h]
            assert all(st > resume_step(killed["checkpoints"][key], sft_steps) for st in after), (key, after)
    interrupted = {k for k, m in killed["checkpoints"].items() if not finished(m)}
    assert interrupted and all(len(trials[k]) == 2 for k in interrupted), {k: len(v) for k, v in trials.items()}
    one = next(segs[0] for key, segs in sorted(trials.items()) if len(segs) == 1)  # a trial tracked in one part
    row = next(r for r in summary["rows"] if r["ratio"] == one["config"]["ratio"] and r["seed"] == one["config"]["seed"])
    assert one["summary"]["sft/qa_accuracy"] == pytest.approx(row["qa_accuracy"])
    assert one["summary"]["recovery/qa_accuracy"] == pytest.approx(row["recovered_qa_accuracy"])
    assert {h["phase"] for h in one["history"] if "loss" in h} == {0, 1}
    assert one["config"]["phases"]["sft"]["learning_rate"] == 1e-3 and one["config"]["commit"]
    final = segments[f"{summary['run_id']}-summary"][-1]
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
    cfg, summary, run, _ = sweep
    manifests = {p: p.stat().st_mtime for p in run.glob("*/_stage.json")}
    assert {p.parent.name for p in manifests} == {"world", "tokenizer", "base_init", "pretrain", "base_eval", "mixtures",
                                                   "trials"}
    again = job.run(cfg)
    assert again["rows"] == summary["rows"]
    assert {p: p.stat().st_mtime for p in run.glob("*/_stage.json")} == manifests


# how long, not what: a resumed run's timing, its loss average and token count cover only its own steps
NOT_RESULTS = {"started_at", "ended_at", "train_runtime_s", "steady_tokens_per_s", "resumed_from_step", "train_loss",
               "train_tokens"}  # HF counts the tokens this process trained on


def test_a_killed_driver_resumes_the_sweep_and_loses_nothing(sweep, tmp_path):
    """The driver SIGKILLed mid-sweep, then the same command: the stages done before the kill are
    not redone, the Tune experiment is restored (its trials keep their ids), no finished phase
    trains again, an interrupted trial resumes from its checkpoint and ends where an uninterrupted
    run of the same trial ends."""
    from cluster.learners import fit
    from cluster.stages import open_run

    cfg, summary, run, killed = sweep
    assert {p.parent.name for p in killed["manifests"]} == {"world", "tokenizer", "base_init", "pretrain", "base_eval",
                                                             "mixtures"}
    assert {p: p.stat().st_mtime for p in killed["manifests"]} == killed["manifests"]
    # restored, not a new experiment: every trial id is of the experiment the killed driver started
    assert {r["trial_id"].split("_")[0] for r in summary["rows"]} == killed["experiments"], killed["experiments"]
    result = json.loads((run / "trials" / "_stage.json").read_text())["result"]
    assert sorted(result) == sorted(job.Trial(r, s).key for r in (0.0, 0.5, 1.0) for s in (0, 1))
    at = killed["at"]
    for key, ckpt in killed["checkpoints"].items():
        m = result[key]["metrics"]
        if finished(ckpt):
            assert m["recovery/ended_at"] < at, key  # kept, not trained again
        elif ckpt.get("phase_done"):  # SFT done: recovery from its start, SFT not again
            assert m["sft/ended_at"] < at < m["recovery/started_at"], key
        else:
            phase = ("sft", "recovery")[ckpt["phase"]]
            assert m[f"{phase}/resumed_from_step"] >= ckpt["step"] > 0 and m[f"{phase}/started_at"] > at, (key, m)
    # an uninterrupted twin of an interrupted trial (mid-phase, where one was caught) ends alike
    interrupted = sorted((not ckpt.get("phase_done"), key) for key, ckpt in killed["checkpoints"].items()
                         if not finished(ckpt))
    key = interrupted[-1][1]
    r = open_run(job.JOB, cfg)
    world, base = job.world_and_student(cfg, r)
    runs = job.learner_runs(cfg, r, world, job.build_mixtures(cfg, r, world), base, job.evaluate_base(cfg, r, world, base))
    twin = next(lr for t, lr in runs.items() if t.key == key)
    res = fit(dataclasses.replace(twin, name="twin", output=str(tmp_path / "twin"), tracking=None), str(tmp_path))
    resumed = result[key]["metrics"]
    compared = {k: (resumed[k], v) for k, v in res.metrics.items() if k.rsplit("/", 1)[-1] not in NOT_RESULTS}
    assert len(compared) > 20 and any("qa_accuracy" in k for k in compared), sorted(compared)
    differ = {k: ab for k, ab in compared.items() if abs(ab[0] - ab[1]) > 1e-6 * max(1.0, abs(ab[1]))}
    assert not differ, f"{key} resumed after the kill ended away from its uninterrupted twin: {differ}"
