"""Start or join Ray.

Locally, Ray is started on loopback (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` binds 127.0.0.1) with
more *logical* CPUs than cores: a Tune trial's driver holds a CPU while its Train workers hold
others, and with logical CPUs == cores concurrent trials deadlock (docs/STACK.md). Under
`ray job submit` (RAY_ADDRESS set) or with `ray.address` in the preset, the job joins that cluster.
Where results go is `cluster.stages`' business.

No key ever goes into the runtime env: Ray writes a job's runtime env (env vars included) to
`runtime_env_agent.log` on every node and serves it from the job API and the dashboard. Workers
read their node's secrets file instead (`cluster.secrets`): the runtime env names
`cluster.runtime.setup_worker` as every worker process's setup hook (a function path, no value).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from cluster.config import Options

REPO_ROOT = Path(__file__).resolve().parent.parent

# Environment every Ray worker gets: quiet, offline-safe, no JIT builds on CPU.
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "WANDB_SILENT": "true",
    # Train V2 reroutes print() to a logger: lines then show twice, and libraries that capture
    # stdout to parse it (dill, inside datasets' fingerprinting) print bytecode listings instead.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


# Run in every worker process of the job as it starts (a function path: no value travels).
WORKER_SETUP_HOOK = "cluster.runtime.setup_worker"


def setup_worker() -> None:
    """Every worker process of a job, as it starts: pin `RAY_ADDRESS` to the worker's own cluster,
    and load its node's secrets file, if any.

    Ray's state API finds its cluster by `RAY_ADDRESS`, else by the newest Ray on the machine. Train
    V2's placement-group cleaner polls it to see whether its run's controller lives: with two Rays
    on one machine (a test session beside a local job, two local jobs, a laptop's Ray beside a
    job's) a cleaner asks the other Ray, finds no controller there, and removes the placement
    group of a run that is still training."""
    import ray

    from cluster.secrets import ensure_secrets

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    ensure_secrets()


class RayOptions(Options):
    """Where the job runs."""

    address: str | None = Field(None, description="Ray cluster to join ('auto', ray://...); null: start a local Ray unless RAY_ADDRESS is set")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray (null: max(4, 2 x cores))")
    offline_hub: bool = Field(True, description="set HF_HUB_OFFLINE=1 on every worker (tiny presets need no hub)")


def init_ray(opts: RayOptions) -> None:
    """Start a local Ray on loopback, or join the configured cluster; idempotent."""
    import ray

    if ray.is_initialized():
        return
    env = dict(WORKER_ENV)
    if opts.offline_hub:
        env["HF_HUB_OFFLINE"] = "1"
    from cluster.tracking import code_version, is_secret_name

    env["DATALAB_COMMIT"] = code_version()  # workers may run a copy of the code without .git
    # A fixed list of settings, never a copy of the environment: keys stay out of the runtime env.
    for k in ("DS_ACCELERATOR", "DATALAB_STORAGE", "DATALAB_CACHE"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    for k, v in env.items():
        os.environ.setdefault(k, v)
    env = {k: v for k, v in env.items() if not is_secret_name(k)}  # a guard, should the list grow
    address = opts.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": env, "worker_process_setup_hook": WORKER_SETUP_HOOK}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    # bind 127.0.0.1 only: the env var for the processes Ray starts, the constant for this one
    # (Ray reads it once at import, which may have happened before this call), and the node IP
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts its workers at nice 15; on a laptop's few cores the training worker then yields to
    # Ray's own processes (learner at about 0.8x a bare loop at nice 15, 0.9x at nice 0:
    # benchmarks/RESULTS.md). A cluster's Ray is started by its operator and keeps its default.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Train V2 starts a preemption watcher actor beside every run (one more process, about 4 CPU-s
    # to start): it reacts to a cloud node's drain notice, which a local Ray never gets.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(
        address="local",  # a new local Ray, even when another one runs on this machine
        num_cpus=opts.num_cpus or max(4, 2 * (os.cpu_count() or 1)),
        include_dashboard=True,  # Train's placement-group cleaner queries the state API it serves
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        _temp_dir=os.environ.get("DATALAB_RAY_TMP"),
        log_to_driver=True,
    )
