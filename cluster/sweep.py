"""Learner runs as stages: one run in the driver, or many side by side as a Ray Tune grid.

`train_stage(stage, runs)` is how every job trains: each run is named after the stage, its key and
the stage's fingerprint (a changed input never resumes a stale run or restores a stale Tune
experiment; a re-run of the same stage resumes its own), and its phases' models are written to
`<stage>/<key>/<phase>` on the run's storage. The stage's result records, per key, the metrics,
the model URI and the trial's timing.

A run's scale (workers, ZeRO stage, GPUs) is part of its fingerprint: the global batch and the
ZeRO shards' layout depend on it. A stage re-submitted at another size while one of its runs has
an unfinished checkpoint at the old size is refused with a line that says what to do
(`_refuse_another_size`): re-submit at the old size to resume, or start anew at the new one.

Ray 2.60 runs Train V2, which rejects `Tuner(trainer)`: a trial is a function that builds and fits
a `TorchTrainer` (`cluster.learners.fit`) and reports its result to Tune once, at the end (no
per-step forwarding: no queue actor per trial). The trial's driver holds a small CPU
share; its workers hold the learner's resources. On CPU, `max_concurrent_trials` is derived from
what one trial needs and what the cluster has, so trials never wait on each other's workers; GPU
trials are all handed to Tune, which queues them while the autoscaler adds nodes. Every run's schedule is
checked against its tables first (`check_schedules`). A sweep whose
driver died is restored from its experiment directory (`Tuner.restore`): finished trials are
kept, unfinished ones rerun (their Train runs resume from their own checkpoints). A grid leaves
no placement group of its driver's job behind (`_remove_leftover_placement_groups`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass

from cluster import storage
from cluster.config import UserError
from cluster.learners import FitResult, LearnerRun, check_schedules, fit
from cluster.stages import Artifact, Stage, canonical, fingerprint

TRIAL_DRIVER_CPU = 0.25


@dataclass
class Trained:
    """One learner run of a stage, finished."""

    metrics: dict[str, float]
    model: Artifact | str  # URI of its last phase's model
    started_at: float
    ended_at: float
    trial_id: str | None = None


def max_concurrent(cluster: dict[str, float], num_trials: int, num_workers: int, cpus_per_worker: float,
                   use_gpu: bool, limit: int | None = None) -> int:
    """How many trials may run side by side.

    GPU trials: all of them (or `limit`): Tune queues them, a trial's workers wait for their GPUs
    and an autoscaling cluster grows for them. Counting the GPUs the cluster has when the sweep
    starts would be 0 on a cluster whose GPU nodes scale from zero: one trial at a time forever.
    CPU trials: as many as the cluster's CPUs hold (their drivers hold CPUs too: more would
    deadlock, each driver waiting on workers that cannot be placed)."""
    if use_gpu:
        n = num_trials
    else:
        n = max(math.floor(cluster.get("CPU", 0) / (num_workers * cpus_per_worker + TRIAL_DRIVER_CPU)), 1)
    return min(n, limit) if limit else n


def run_name(stage: Stage, key: str) -> str:
    """The Ray Train run (and checkpoint folder, and W&B id) of run `key` of `stage`."""
    return f"{stage.run.run_id}-{stage.name}-{key}-{stage.hash}"


def train_stage(stage: Stage, runs: dict[str, LearnerRun], *, max_concurrent_trials: int | None = None,
                grid: bool | None = None) -> dict[str, Trained]:
    """Train every run of `runs` (key -> run) as stage `stage`; returns key -> `Trained`.

    One run trains in the driver process (no Tune); several, or `grid=True`, as a Tune grid."""
    def build(st: Stage) -> dict:
        for run in runs.values():  # a schedule that cannot work on this data stops here, before any worker starts
            check_schedules(run)
        named = {k: dataclasses.replace(r, name=run_name(st, k), output=st.path(k))
                 for k, r in runs.items()}
        for key, run in named.items():  # what a later submit at another size compares itself with
            storage.write_bytes(_size_marker(st, run.name), json.dumps(
                {"key": key, "learner": _learner_at_any_size(run), "scale": canonical(run.scale)}).encode())
        if len(named) == 1 and not grid:
            (key, run), = named.items()
            t0 = time.time()
            res = fit(run, st.run.ray_storage)
            return {key: _record(Trained(res.metrics, res.model, t0, time.time()))}
        return _grid(st, named, max_concurrent_trials)

    if not stage.done():
        _refuse_another_size(stage, runs)
    result = stage.ensure(build)
    # the model as an artifact of this stage (a downstream stage's input counts its fingerprint),
    # rebuilt from the stage's place rather than stored: a moved run directory stays valid
    return {k: Trained(**v, model=stage.path(k, runs[k].phases[-1].name)) for k, v in result.items()}


def _size_marker(stage: Stage, name: str) -> str:
    """Beside Ray's folder of run `name`: its scale and what it trains (kept when the stage's
    fingerprint changes and the stage's own folder is wiped)."""
    return storage.join(stage.run.ray_storage, f"{name}.learner.json")


def _learner_at_any_size(run: LearnerRun) -> str:
    return fingerprint("learner", {"run": dataclasses.replace(run, scale=None)})


def _refuse_another_size(stage: Stage, runs: dict[str, LearnerRun]) -> None:
    """A ZeRO checkpoint resumes only at the world size it was written at, and the global batch
    is per-device batch x workers: a run of this stage that has an unfinished checkpoint at
    another scale is neither resumed nor silently abandoned for a fresh start. The user is told
    how to do either."""
    fs, root = storage.filesystem(stage.run.ray_storage)
    if not fs.exists(root):
        return
    for key, run in runs.items():
        mine = run_name(stage, key)
        prefix = f"{stage.run.run_id}-{stage.name}-{key}-"
        for marker in sorted(fs.glob(f"{root}/{prefix}{'?' * 12}.learner.json")):
            name = marker.rsplit("/", 1)[-1].removesuffix(".learner.json")
            old = json.loads(fs.cat_file(marker))
            if name == mine or old["learner"] != _learner_at_any_size(run) or old["scale"] == canonical(run.scale):
                continue
            step = _unfinished_checkpoint(fs, f"{root}/{name}", len(run.phases))
            if step is None:
                continue
            was = ", ".join(f"{k}={v}" for k, v in old["scale"].items() if v != canonical(run.scale)[k])
            now = ", ".join(f"{k}={v}" for k, v in canonical(run.scale).items() if v != old["scale"][k])
            raise UserError(
                f"{stage.name}: run {key} has an unfinished checkpoint ({step}) trained at {was}, and this submit asks "
                f"for {now}; a checkpoint resumes only at its own scale. Re-submit with {was} to resume it, or remove "
                f"{storage.join(stage.run.ray_storage, name)} to start the run anew at {now}")


def _unfinished_checkpoint(fs, run_dir: str, phases: int) -> str | None:
    """Where a Ray Train run stopped, if it registered a checkpoint before its last phase ended."""
    try:
        latest = json.loads(fs.cat_file(f"{run_dir}/checkpoint_manager_snapshot.json")).get("latest_checkpoint_result")
    except FileNotFoundError:
        return None
    if not latest:
        return None
    m = latest.get("metrics", {})
    if m.get("phase_done") and m.get("phase", -1) >= phases - 1:
        return None  # finished: a new run at another size is a new experiment
    return f"phase {m.get('phase', 0)}, " + ("done" if m.get("phase_done") else f"step {m.get('step', '?')}")


def _record(t: Trained) -> dict:
    """What the stage's manifest keeps of a run: everything but where its model is."""
    return {k: v for k, v in dataclasses.asdict(t).items() if k != "model"}


def _trial(config: dict, runs: dict[str, LearnerRun], storage: str) -> None:
    """One Tune trial = one learner run. The runs travel beside the config (`tune.with_parameters`),
    never in it: Tune keeps a trial's config in its experiment state and a restored sweep gets it
    back as plain data (dataclasses turned into tuples)."""
    import ray.tune

    run = runs[config["key"]]
    started = time.time()
    res: FitResult = fit(run, storage)
    ray.tune.report({"key": config["key"], "model": res.model, "started_at": started, "ended_at": time.time(),
                     "trial_id": ray.tune.get_context().get_trial_id(), **res.metrics})


def _job_placement_groups() -> set[str]:
    """Placement groups of this driver's job that are not removed (a placement group's id ends with
    its creator's job id)."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    return {i for i, pg in ray.util.placement_group_table().items() if i.endswith(job) and pg["state"] != "REMOVED"}


def _remove_leftover_placement_groups(name: str, before: set[str]) -> None:
    """Once Tune is done, every placement group its trials made is done with. Ray 2.60 can leave one
    behind when a node is lost while Train waits for its worker group (seen in tests/test_faults.py:
    a 1-CPU worker-group placement group, CREATED, 60 s after the sweep, held until the driver
    exits); it would hold its CPUs from every later stage. The job's stages run one at a time, so
    what this job made during the grid and still holds is a leftover."""
    import ray
    from ray.util.placement_group import PlacementGroup

    for pg_id in sorted(_job_placement_groups() - before):
        print(f"[{name}] removing placement group {pg_id}, left behind by a finished trial", flush=True)
        try:
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
        except Exception as exc:  # noqa: BLE001 (removed meanwhile by Ray's own cleaner)
            print(f"[{name}] placement group {pg_id}: {exc}", flush=True)


def _grid(stage: Stage, runs: dict[str, LearnerRun], limit: int | None) -> dict:
    import ray
    import ray.tune as tune

    first = next(iter(runs.values())).scale
    n = max_concurrent(ray.cluster_resources(), len(runs), first.num_workers, first.cpus_per_worker, first.use_gpu, limit)
    print(f"[{stage.name}] {len(runs)} learner runs, {n} at a time", flush=True)
    space = {"key": tune.grid_search(sorted(runs))}
    trainable = tune.with_resources(tune.with_parameters(_trial, runs=runs, storage=stage.run.ray_storage),
                                    {"cpu": TRIAL_DRIVER_CPU})
    name = f"{stage.name}-{stage.hash}"
    path = f"{stage.run.ray_storage}/{name}"
    if tune.Tuner.can_restore(path):
        print(f"[{stage.name}] restoring {path}: finished trials are kept", flush=True)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            # a trial's process serves the next trial: its imports (torch, transformers, TRL: seconds
            # of CPU each) are paid once per slot, not once per trial
            tune_config=tune.TuneConfig(max_concurrent_trials=n, reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=stage.run.ray_storage,
                                      # a trial whose own process died (its node lost) runs again, and
                                      # its Train run resumes from its checkpoint
                                      failure_config=tune.FailureConfig(max_failures=first.max_failures), verbose=1),
        )
    before = _job_placement_groups()
    try:
        results = tuner.fit()
    finally:
        _remove_leftover_placement_groups(stage.name, before)
    failed = [r for r in results if r.error]
    if failed:
        raise RuntimeError(f"{stage.name}: {len(failed)} learner run(s) failed, first: {failed[0].error}")
    out = {}
    for res in results:
        m = res.metrics
        out[m["key"]] = _record(Trained(
            metrics={k: v for k, v in m.items() if "/" in k and isinstance(v, (int, float))},
            model=m["model"], started_at=m["started_at"], ended_at=m["ended_at"], trial_id=m["trial_id"]))
    return out
