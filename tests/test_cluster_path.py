"""The cluster path, run as a cluster user runs it: `ray start --head`, then each job's `smoke`
preset through `ray job submit --working-dir .` exactly as docs/OPERATIONS.md says, followed with
`ray job logs`; its results are then looked for where the user would look: the configured storage.

The smoke presets take the 8B presets' code path at tiny size (a hub-style model directory loaded
by path, table data, ZeRO-3 across 2 workers, lm-eval on a local task in its own Ray task). Keys
are delivered the documented way (a secrets file on the node, never the job's runtime env): the
fake values must appear in no file under the run's storage, Ray's session directory or the job's
logs.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
SECRETS = {"WANDB_API_KEY": "fake-wandb-key-5d1e0b77c2", "HF_TOKEN": "hf_fakeSmokeTokenNeverLogged9"}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head on loopback, its own session directory, the smoke inputs, a secrets file."""
    from synth.smoke import write_assets

    tmp = tmp_path_factory.mktemp("cluster")
    assets = write_assets(tmp / "smoke")
    secrets = tmp / "secrets.env"
    secrets.write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items()))
    secrets.chmod(0o600)
    # What a node's setup gives the raylet (ray_config.yaml): loopback, no GPU, no hub, where
    # relative storage goes and where the keys are. The job's code comes from --working-dir.
    env = {k: v for k, v in os.environ.items() if k not in SECRETS and k != "PYTHONPATH"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               DATALAB_STORAGE=str(tmp / "home"), DATALAB_SECRETS_FILE=str(secrets), RAY_AUTH_MODE="disabled",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))  # `python` is this env's
    port, dashboard, agent = free_port(), free_port(), free_port()  # the agent's default port is fixed: the session's Ray may hold it
    session = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    log = open(tmp / "ray-start.log", "w")
    proc = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                             "--dashboard-agent-listen-port", str(agent), "--num-cpus", "6",
                             "--temp-dir", str(session), "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 180
    while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode != 0:
        assert proc.poll() is None and time.time() < deadline, (tmp / "ray-start.log").read_text()[-3000:]
        time.sleep(2)
    yield {"address": address, "gcs": f"127.0.0.1:{port}", "env": env, "assets": assets, "home": tmp / "home",
           "session": session}
    # `ray stop` would stop every Ray on the machine. Ray's graceful stop takes about 30 s here;
    # nothing of this throwaway head needs it, so after 5 s the whole process group is killed.
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    shutil.rmtree(session, ignore_errors=True)


def submit(head, job: str, overrides: list[str]) -> str:
    """`ray job submit --no-wait`, then `ray job logs --follow`; returns the logs."""
    env, address = head["env"], head["address"]
    sid = f"{job}-smoke-{int(time.time())}"
    deadline = time.time() + 120
    while True:  # a fresh head takes a while to register its job agent ("try again later")
        out = subprocess.run([RAY, "job", "submit", "--address", address, "--submission-id", sid, "--working-dir", ".",
                              "--no-wait", "--", "python", "-m", f"jobs.{job}", "--config", f"configs/{job}/smoke.yaml",
                              *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        if out.returncode == 0 or "No available agent" not in out.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stderr[-2000:]
    logs = subprocess.run([RAY, "job", "logs", "--address", address, "--follow", sid], env=env,
                          capture_output=True, text=True, timeout=900).stdout
    (head["home"].parent / f"{job}-job.log").write_text(logs)  # kept with the test's tmp dir, for a failure
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(address).get_job_status(sid) == JobStatus.SUCCEEDED, logs[-4000:]
    return logs


def run_dir(head, job: str, logs: str) -> Path:
    """Where the job said its results are (it prints the run directory at start and end)."""
    runs = sorted((head["home"] / "runs" / job).glob("*/summary.json"))
    assert len(runs) == 1, runs
    assert str(runs[0].parent) in logs
    return runs[0].parent


def no_secret_anywhere(head, run: Path, logs: str) -> None:
    files = [f for root in (run, head["session"]) for f in root.rglob("*") if f.is_file() and not f.is_symlink()
             and "working_dir_files" not in f.parts]  # Ray's copy of this checkout: its tests name the fakes
    assert len(files) > 50
    leaks = [str(f) for f in files for v in SECRETS.values() if v.encode() in f.read_bytes()]
    assert not leaks and not [v for v in SECRETS.values() if v in logs], leaks


def test_a_worker_asks_its_own_ray_while_another_runs_on_the_machine(ray_local, head):
    """With this head as the machine's newest Ray in the default temp dir (where a `ray start`, a
    second test session or a local job on the machine would have written it), an actor of the
    session's Ray finds itself through Ray's state API, as Train V2's placement-group cleaner looks
    up its run's controller. Asked of the other Ray it is not found, and the cleaner removes a live
    run's placement group: each worker pins its own cluster (cluster.runtime.setup_worker)."""
    import ray
    from ray._private.utils import get_ray_address_file

    @ray.remote(num_cpus=0)
    class LooksItselfUp:
        def found(self) -> bool:
            from ray.util.state import get_actor

            state = get_actor(ray.get_runtime_context().get_actor_id(), timeout=20)
            return state is not None and state.state == "ALIVE"

    newest = Path(get_ray_address_file(None))
    before = newest.read_text() if newest.exists() else None
    newest.write_text(head["gcs"])
    actor = LooksItselfUp.remote()
    try:
        assert ray.get(actor.found.remote(), timeout=60)
    finally:
        ray.kill(actor)
        newest.write_text(before) if before is not None else newest.unlink()


def test_falsity_smoke_through_ray_job_submit(head):
    a = head["assets"]
    # the budget study's extra trial is left out here (the tiny sweep's test covers it)
    logs = submit(head, "falsity_sweep", [f"model.name={a['model']}", f"data.file={a['faco']}", "budget_study=null"])
    run = run_dir(head, "falsity_sweep", logs)
    summary = json.loads((run / "summary.json").read_text())
    assert {(r["ratio"], r["seed"]) for r in summary["rows"]} == {(0.0, 0), (1.0, 0)}
    row = summary["rows"][0]
    # table data is scored like the world: choices in the prompt, knows / choice over them
    assert {"qa_accuracy", "knows_rate", "choice_accuracy", "lie_rate", "recovered_qa_accuracy"} <= set(row)
    assert row["chance"] == pytest.approx(0.25)
    # lm-eval on the local task, for both phases of every trial, each in its own Ray task
    assert 0.0 <= row["harness/world_mc/acc"] <= 1.0 and "recovered_harness/world_mc/acc" in row
    assert "harness/world_mc/acc" in (run / "report.md").read_text()
    assert (run / "falsity_sweep.png").stat().st_size > 10_000
    assert summary["curve"]
    from cluster.tracking import find_offline_runs, read_offline_run

    wandb_runs = [read_offline_run(p) for p in find_offline_runs(run)]
    trials = [r for r in wandb_runs if "ratio" in r["config"]]
    # one W&B run per trial, both phases in it (a restarted worker group resumes the same id)
    assert len({r["id"] for r in trials}) == 2
    both = max(trials, key=lambda r: len(r["history"]))
    assert {"sft/qa_accuracy", "recovery/qa_accuracy"} <= set(both["summary"]) and both["config"]["commit"]
    assert both["config"]["sft_training_args"]["deepspeed"]["zero_optimization"]["stage"] == 3
    no_secret_anywhere(head, run, logs)
    # the package Ray unpacked for the job: the code, without .git or the tests (.rayignore)
    unpacked = [p for p in head["session"].rglob("working_dir_files/*") if p.is_dir()]
    assert unpacked and all((p / "cluster/learners.py").is_file() for p in unpacked), unpacked
    assert not [p for d in unpacked for p in (d / ".git", d / "tests") if p.exists()]


def test_montessori_smoke_through_ray_job_submit(head):
    a = head["assets"]
    logs = submit(head, "montessori", [f"student.name={a['model']}", f"teacher.model={a['model']}",
                                       f"data.dataset={a['instructions']}"])
    run = run_dir(head, "montessori", logs)
    summary = json.loads((run / "summary.json").read_text())
    teachers = {r["teacher"] for r in summary["rows"]}
    assert {"untrained", "montessori"} <= teachers and summary["probes"]
    # each student scored on the held-out loss and, in its own Ray task, on the local lm-eval task
    assert all(0.0 <= r["harness/world_mc/acc"] <= 1.0 and r["heldout_loss"] > 0 for r in summary["rows"])
    assert (run / "report.md").is_file() and (run / "montessori.png").stat().st_size > 5_000
    from cluster.tracking import find_offline_runs, read_offline_run

    dpo = [r for r in map(read_offline_run, find_offline_runs(run)) if "-dpo-" in r["id"]]
    assert dpo and all(r["config"]["scale"]["zero_stage"] == 3 and r["config"]["commit"] for r in dpo)
    assert any("rewards/margins" in h for r in dpo for h in r["history"])  # DPO under ZeRO-3, frozen reference
    no_secret_anywhere(head, run, logs)


def test_robust_smoke_through_ray_job_submit(head):
    """The robust arms that perturb embeddings inside the step (R3F, one-step adversarial) under
    ZeRO-3 across 2 workers, beside plain SFT; augmentation and NEFTune run the plain step."""
    a = head["assets"]
    logs = submit(head, "robust", [f"model.name={a['model']}", f"data.file={a['faco']}", "arms.augmentation=null",
                                   "arms.neftune=null"])
    run = run_dir(head, "robust", logs)
    summary = json.loads((run / "summary.json").read_text())
    assert {r["arm"] for r in summary["rows"]} == {"plain", "r3f", "adversarial"}
    assert all(0.0 <= r["harness/world_mc/acc"] <= 1.0 and 0.0 <= r["clean"] <= 1.0 for r in summary["rows"])
    assert (run / "report.md").is_file() and (run / "robust.png").stat().st_size > 5_000
    from cluster.tracking import find_offline_runs, read_offline_run

    arms = {r["config"]["arm"]: r for r in map(read_offline_run, find_offline_runs(run)) if "arm" in r["config"]}
    assert all(r["config"]["scale"]["zero_stage"] == 3 and r["config"]["scale"]["num_workers"] == 2 for r in arms.values())
    logged = lambda arm: {k for h in arms[arm]["history"] for k in h}  # noqa: E731
    assert {"r3f/kl", "r3f/noise_kept"} <= logged("r3f") and {"adversarial/adv_loss", "adversarial/delta_norm"} <= logged("adversarial")
    no_secret_anywhere(head, run, logs)
