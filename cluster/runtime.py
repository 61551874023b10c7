"""Start or join Ray, and the run directory every job writes to.

Locally, Ray is started on loopback (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` binds 127.0.0.1) with
more *logical* CPUs than cores: a Tune trial's driver holds a CPU while its Train workers hold
others, and with logical CPUs == cores concurrent trials deadlock (STACK.md). Under
`ray job submit` (RAY_ADDRESS set) or with `ray.address` in the preset, the job joins that cluster.

Run directory: `<storage>/<job>/<run_id>/<stage>/`. A stage is built in a temporary directory and
renamed into place with a manifest holding its config hash, so a re-run skips finished stages, and
redoes a stage whose config changed. Local paths and fsspec URIs (s3://, gs://) both work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from pydantic import Field

from cluster.config import Options, UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "_stage.json"

# Environment every Ray worker gets: quiet, offline-safe, no JIT builds on CPU.
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120",
    "WANDB_SILENT": "true",
    # Train V2 reroutes print() to a logger: lines then show twice, and libraries that capture
    # stdout to parse it (dill, inside datasets' fingerprinting) print bytecode listings instead.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


class RayOptions(Options):
    """Where the job runs."""

    address: str | None = Field(None, description="Ray cluster to join ('auto', ray://...); null: start a local Ray unless RAY_ADDRESS is set")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray (null: max(4, 2 x cores))")
    offline_hub: bool = Field(True, description="set HF_HUB_OFFLINE=1 on every worker (tiny presets need no hub)")


def init_ray(opts: RayOptions, storage: str) -> None:
    """Start a local Ray on loopback, or join the configured cluster; idempotent."""
    import ray

    if ray.is_initialized():
        return
    env = dict(WORKER_ENV)
    if opts.offline_hub:
        env["HF_HUB_OFFLINE"] = "1"
    if os.environ.get("DS_ACCELERATOR"):
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    for k, v in env.items():
        os.environ.setdefault(k, v)
    address = opts.address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": env}
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
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(
        num_cpus=opts.num_cpus or max(4, 2 * (os.cpu_count() or 1)),
        include_dashboard=True,  # Train's placement-group cleaner queries the state API it serves
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
        _temp_dir=os.environ.get("DATALAB_RAY_TMP"),
        log_to_driver=True,
    )


def cluster_resources() -> dict[str, float]:
    import ray

    return ray.cluster_resources()


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(storage: str) -> str:
    """Ray Train wants absolute local paths or URIs."""
    return storage if is_remote(storage) else str(Path(storage).expanduser().resolve())


def run_uri(storage: str, job: str, run_id: str) -> str:
    return f"{absolute(storage).rstrip('/')}/{job}/{run_id}"


class RunDir:
    """`<storage>/<job>/<run_id>`: stages written whole or not at all."""

    def __init__(self, storage: str, job: str, run_id: str):
        import fsspec

        self.job, self.run_id = job, run_id
        self.uri = run_uri(storage, job, run_id)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        except ImportError as exc:  # e.g. s3:// without s3fs installed
            raise UserError(f"storage {storage}: {exc}") from None
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, stage: str) -> str:
        return f"{self.root}/{stage}"

    @property
    def group(self) -> str:
        """The W&B group of every run this job run logs."""
        return f"{self.job}-{self.run_id}"

    def wandb_dir(self, configured: str | None = None) -> str:
        """Where W&B files go: the preset's directory, else beside the stages (remote storage: cwd)."""
        return configured or (self.root if not is_remote(self.uri) else ".")

    def done(self, stage: str, config_hash: str) -> bool:
        return self.stage_hash(stage) == config_hash

    @contextlib.contextmanager
    def write(self, stage: str, config_hash: str) -> Iterator[str]:
        """Yield a local temporary directory; on success it becomes the stage, manifest last."""
        tmp = tempfile.mkdtemp(prefix=f"datalab-{stage}-")
        try:
            yield tmp
            Path(tmp, MANIFEST).write_text(json.dumps({"stage": stage, "config_hash": config_hash, "completed_at": time.time()}))
            final, staging = self.path(stage), f"{self.path(stage)}.tmp-{os.getpid()}"
            if self.fs.exists(final):
                self.fs.rm(final, recursive=True)
            if is_remote(self.uri):
                self.fs.put(tmp, staging, recursive=True)
                self.fs.mv(staging, final, recursive=True)
            else:
                shutil.move(tmp, staging)
                os.replace(staging, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def local(self, stage: str) -> str:
        """A local path to a finished stage (remote storage: downloaded once per version of it)."""
        if not is_remote(self.uri):
            return self.path(stage)
        cache = Path(self._cache_root(), f"{stage}@{self.stage_hash(stage)}")
        if not cache.exists():
            self.fs.get(self.path(stage), f"{cache}.part", recursive=True)
            os.replace(f"{cache}.part", cache)
        return str(cache)

    def _cache_root(self) -> str:
        return str(Path(tempfile.gettempdir(), "datalab-cache", self.root.replace("/", "_")))

    def stage_hash(self, stage: str) -> str | None:
        """The config hash a finished stage was written with (None: not finished)."""
        manifest = f"{self.path(stage)}/{MANIFEST}"
        return json.loads(self.fs.cat_file(manifest)).get("config_hash") if self.fs.exists(manifest) else None

    def fingerprint(self, value):
        """`value` (str, list or dict of them) with every path into this run's stages replaced by
        the stage's name and hash. Hash a downstream stage's inputs through this: a redone stage
        keeps its path but not its hash, so whatever was built from the old one is redone too."""
        if isinstance(value, dict):
            return {k: self.fingerprint(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.fingerprint(v) for v in value]
        if isinstance(value, str):
            for prefix in (f"{self.root}/", f"{self._cache_root()}/"):
                if value.startswith(prefix):
                    stage, _, rest = value[len(prefix):].partition("/")
                    stage = stage.split("@")[0]
                    return f"<{stage}@{self.stage_hash(stage)}>/{rest}"
        return value

    def write_file(self, name: str, data: bytes) -> None:
        with self.fs.open(f"{self.root}/{name}", "wb") as f:
            f.write(data)
