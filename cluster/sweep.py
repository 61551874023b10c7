"""Sweeps: Ray Tune over learner runs, one trial = one Ray Train run.

Ray 2.60 runs Train V2, which rejects `Tuner(trainer)`: a trial is a function that builds and fits
a `TorchTrainer` (`cluster.learners.fit(..., in_tune=True)`). The trial's driver holds a small
CPU share; its workers hold the learner's resources. `max_concurrent_trials` is derived from what
one trial needs and what the cluster has, so trials never wait on each other's workers.

A sweep whose driver died is restored from its experiment directory (`Tuner.restore`), finished
trials kept and unfinished ones rerun (their Train runs resume from their own checkpoints).
"""

from __future__ import annotations

import math
from typing import Any, Callable

TRIAL_DRIVER_CPU = 0.25


def max_concurrent(cluster: dict[str, float], num_workers: int, cpus_per_worker: float, use_gpu: bool,
                   limit: int | None = None) -> int:
    """How many trials fit side by side: by GPUs when trials use them, else by CPUs."""
    if use_gpu:
        fit = math.floor(cluster.get("GPU", 0) / num_workers)
    else:
        fit = math.floor(cluster.get("CPU", 0) / (num_workers * cpus_per_worker + TRIAL_DRIVER_CPU))
    fit = max(fit, 1)
    return min(fit, limit) if limit else fit


def run_sweep(trial: Callable[[dict], dict], param_space: dict[str, Any], *, name: str, storage_path: str,
              concurrency: int, metric: str | None = None, mode: str = "max", callbacks: list | None = None):
    """Run (or restore) a grid of function trials; returns Tune's `ResultGrid`."""
    import ray.tune as tune

    trainable = tune.with_resources(trial, {"cpu": TRIAL_DRIVER_CPU})
    path = f"{storage_path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        print(f"[sweep] restoring {path}: finished trials are kept", flush=True)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, metric=metric, mode=mode),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, callbacks=callbacks or [],
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=1),
        )
    return tuner.fit()
