"""Stages: the resumable, content-addressed steps of a job run, on any storage.

A job run lives at `<storage>/<job>/<run_id>/`; each stage at `<run>/<stage>/`. A job declares a
stage by its name and its inputs, options and upstream stages:

    mix = run.stage("mixtures", table=world, ratios=cfg.ratios, seeds=cfg.seeds)
    mix.ensure(lambda st: ...)        # build it unless it is already done

The stage's fingerprint is derived from those inputs (an upstream stage counts by its own
fingerprint), never passed by hand: change an option and exactly the stages downstream of it are
redone. Whoever produces a stage (the driver, a Train worker, a Ray task or actor on any node)
writes to its URI; the driver commits it by writing the manifest (`_stage.json`) last, so a stage
is either complete or not done at all. An unfinished stage keeps what its producers wrote (probe
shards, say) for a retry with the same fingerprint, and is wiped first when the fingerprint differs.

Tables are Parquet files inside a stage (`save_rows` / `rows`); models and other directories are
read through `local(...)`, a node-local copy downloaded once per node and fingerprint.

A stage declared `shared=True` (the synthetic world, the tiny tokenizer, the pretrained student:
what several jobs build alike) is also kept, when `DATALAB_STAGE_CACHE` names a directory, in
`<cache>/<stage>-<fingerprint>/`: another run, of any job, whose stage has the same fingerprint
copies it from there instead of building it again (the test suite pretrains each world's student
once). The fingerprint covers every input, so a copy is exactly what a build would have made.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field

from cluster import storage
from cluster.config import Options, fingerprinted
from cluster.runtime import RayOptions
from cluster.tracking import TrackingOptions

MANIFEST = "_stage.json"
PENDING = "_pending.json"
CACHE_ENV = "DATALAB_STAGE_CACHE"


class Artifact(str):
    """Something a stage produced (a model, a tokenizer, a table), or that came from outside (a hub
    id, a local directory): its URI, usable wherever a string is, and, as a stage input, counted by
    the producing stage's fingerprint rather than its location."""

    stage: Stage | None

    def __new__(cls, uri: str, stage: Stage | None = None):
        obj = super().__new__(cls, uri)
        obj.stage = stage
        return obj

    def __reduce__(self):
        return (Artifact, (str(self), self.stage))


def canonical(value: Any) -> Any:
    """Inputs as plain JSON: options by value, stages and their artifacts by identity (name and
    fingerprint), so a fingerprint never depends on where the run is stored."""
    if isinstance(value, Artifact):
        if value.stage is None:
            return str(value)
        return f"<stage {value.stage.name}@{value.stage.hash}>{str(value)[len(value.stage.uri):]}"
    if isinstance(value, Stage):
        return f"<stage {value.name}@{value.hash}>"
    if isinstance(value, BaseModel):
        return fingerprinted(value)  # without its operational fields (cluster.config.Operational)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # fields marked `metadata={"fingerprint": False}` (tracking, names) do not decide results
        return canonical({f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                           if f.metadata.get("fingerprint", True)})
    if isinstance(value, functools.partial):
        return {"fn": canonical(value.func), "args": canonical(value.args), "kw": canonical(value.keywords)}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"stage input of type {type(value).__name__} has no canonical form")


def fingerprint(name: str, inputs: dict[str, Any]) -> str:
    data = json.dumps({"stage": name, "inputs": canonical(inputs)}, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:12]


class Run:
    """`<storage>/<job>/<run_id>`: one job run's stages and report files."""

    def __init__(self, storage_root: str, job: str, run_id: str):
        self.job, self.run_id = job, run_id
        self.uri = storage.join(storage.resolve(storage_root), job, run_id)
        self.fs, self.root = storage.filesystem(self.uri)
        self.fs.makedirs(self.root, exist_ok=True)

    @property
    def group(self) -> str:
        """The W&B group of every run this job run logs."""
        return f"{self.job}-{self.run_id}"

    @property
    def ray_storage(self) -> str:
        """Where Ray Train and Tune keep checkpoints and experiment state for this run."""
        return storage.join(self.uri, "ray")

    def stage(self, name: str, *, shared: bool = False, **inputs: Any) -> Stage:
        """Stage `name` of this run; `shared`: reuse a build of the same fingerprint from the
        cross-run cache (`DATALAB_STAGE_CACHE`), and keep this one's there."""
        return Stage(self, name, inputs, shared=shared)

    def wandb_dir(self, configured: str | None = None) -> str:
        """Where W&B's (local) files go: the preset's directory, else beside the stages, else (remote
        storage) under the storage home on this machine."""
        if configured:
            return configured
        if not storage.is_remote(self.uri):
            return self.root
        import os
        from pathlib import Path

        home = Path(os.environ.get("DATALAB_STORAGE") or storage.DEFAULT_HOME).expanduser()
        return str(home / "wandb" / self.job / self.run_id)

    def write_file(self, name: str, data: bytes) -> None:
        storage.write_bytes(storage.join(self.uri, name), data)

    def stages(self) -> dict[str, str]:
        """Every committed stage of this run: name -> fingerprint."""
        out = {}
        for path in self.fs.glob(f"{self.root}/*/{MANIFEST}"):
            m = json.loads(self.fs.cat_file(path))
            out[m["stage"]] = m["hash"]
        return out


class Stage:
    """One stage of a run: a URI, a fingerprint derived from its inputs, and a manifest."""

    def __init__(self, run: Run, name: str, inputs: dict[str, Any], shared: bool = False):
        self.run, self.name, self.shared = run, name, shared
        self.hash = fingerprint(name, inputs)
        self.uri = storage.join(run.uri, name)

    def __repr__(self) -> str:
        return f"Stage({self.name}@{self.hash})"

    def path(self, *parts: str) -> Artifact:
        """URI of something inside the stage (what remote producers are handed)."""
        return Artifact(storage.join(self.uri, *parts), self)

    def _own_manifest(self) -> dict | None:
        """The committed manifest, if it is this fingerprint's (one read: one request on S3)."""
        uri = storage.join(self.uri, MANIFEST)
        m = json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None
        return m if m is not None and m.get("hash") == self.hash else None

    def done(self) -> bool:
        return self._own_manifest() is not None

    @property
    def result(self) -> Any:
        """What the stage's build returned (JSON), kept in its manifest."""
        m = self._own_manifest()
        if m is None:
            raise RuntimeError(f"stage {self.name} is not done")
        return m.get("result")

    def ensure(self, build: Callable[[Stage], Any]) -> Any:
        """Build the stage unless it is done; return its result. The manifest is written last,
        after `build` returned, so a failure never leaves the stage marked complete."""
        if (m := self._own_manifest()) is not None:
            return m.get("result")
        self._begin()
        if (cached := self._cached()) is not None:
            print(f"[{self.name}] copied from the stage cache ({cached})", flush=True)
            storage.upload(cached, self.uri)
            storage.write_bytes(self.path(MANIFEST), Path(f"{cached}.json").read_bytes())  # last
            storage.remove(self.path(PENDING))
            return self.result
        t0 = time.time()
        result = build(self)
        manifest = {"stage": self.name, "hash": self.hash, "completed_at": time.time(),
                    "seconds": time.time() - t0, "result": result}
        storage.remove(self.path(PENDING))
        storage.write_bytes(self.path(MANIFEST), json.dumps(manifest, default=_json_default).encode())
        self._keep_in_cache()
        return json.loads(json.dumps(result, default=_json_default))

    def _cache_entry(self) -> Path | None:
        """Where this stage's copy lives in the cross-run cache (None: not shared, no cache): its
        files in `<cache>/<stage>-<hash>/`, its manifest in `<...>.json`, written last."""
        root = os.environ.get(CACHE_ENV)
        return Path(root) / f"{self.name}-{self.hash}" if self.shared and root else None

    def _cached(self) -> str | None:
        entry = self._cache_entry()
        return str(entry) if entry is not None and Path(f"{entry}.json").is_file() else None

    def _keep_in_cache(self) -> None:
        entry = self._cache_entry()
        if entry is None or Path(f"{entry}.json").is_file():
            return
        shutil.rmtree(entry, ignore_errors=True)
        shutil.copytree(storage.local_copy(self.uri, version=self.hash), entry,
                        ignore=shutil.ignore_patterns(MANIFEST, PENDING))
        Path(f"{entry}.json").write_bytes(storage.read_bytes(self.path(MANIFEST)))

    def _begin(self) -> None:
        """Keep an unfinished build of this fingerprint (its shards resume); wipe anything else."""
        fs, root = storage.filesystem(self.uri)
        if fs.exists(root):
            pending = self.path(PENDING)
            same = storage.exists(pending) and json.loads(storage.read_bytes(pending)).get("hash") == self.hash
            if not same:
                storage.remove(self.path(MANIFEST))  # never a manifest over half-removed content
                storage.remove(self.uri)
        storage.write_bytes(self.path(PENDING), json.dumps({"stage": self.name, "hash": self.hash}).encode())

    # -- tables and files -------------------------------------------------------------------

    def save_rows(self, name: str, rows: list[dict]) -> str:
        """Write rows as `<stage>/<name>.parquet`; returns its URI (a learner phase's data)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        uri = self.path(f"{name}.parquet")
        storage.write_bytes(uri, buf.getvalue())
        return uri

    def rows(self, name: str) -> list[dict]:
        return read_rows(self.path(f"{name}.parquet"))

    def local(self, *parts: str) -> str:
        """A local directory with the stage's files (or a part of them), cached once per node."""
        return storage.local_copy(self.path(*parts), version=self.hash)


def read_rows(uri: str) -> list[dict]:
    """The rows of a Parquet table on any storage."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f).to_pylist()


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, BaseModel):
        return fingerprinted(value)  # without its operational fields (cluster.config.Operational)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


class JobOptions(Options):
    """What every job's preset has: where its run goes, which Ray, which W&B."""

    run_id: str | None = Field(None, description="run directory name; null: a hash of the config, so re-runs resume")
    storage: str = Field("runs", description="root of run directories: a local path, NFS, or an fsspec URI (s3://...); "
                                             "relative paths under ray job submit go to $DATALAB_STORAGE (~/datalab)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="cap on learner runs side by side; null: as many as resources allow")
    ray: RayOptions = Field(default_factory=RayOptions, description="Ray cluster")
    tracking: TrackingOptions = Field(default_factory=TrackingOptions, description="Weights & Biases")


def open_run(job: str, cfg: JobOptions) -> Run:
    """The run of a job's preset (`cfg.storage`, `cfg.run_id`), announced where a user sees it.

    The default run id is a hash of the options that decide results (not where they go, how
    they are tracked, how many trials run at once or where a partial run stops), so re-running a
    command resumes its run, also after a `stop_after`; an
    explicit `run_id` lets a changed preset reuse every stage its change does not reach."""
    import os

    import datasets
    import transformers

    from cluster.config import config_hash

    datasets.disable_progress_bars()  # per-file bars of small stages are noise; stages print a line
    transformers.utils.logging.disable_progress_bar()
    run_id = cfg.run_id or config_hash(cfg, exclude={"run_id", "storage", "tracking", "ray", "max_concurrent_trials",
                                                    "stop_after"})
    run = Run(cfg.storage, job, run_id)
    os.environ.setdefault("WANDB_DIR", run.wandb_dir(cfg.tracking.dir))
    print(f"[{job}] run {run_id}: results in {run.uri}", flush=True)
    return run


def fetch(ref: str) -> str:
    """A model, tokenizer or other directory on this node's disk. Storage URIs are downloaded once
    per node and version of the stage that holds them (its fingerprint, found in the nearest
    `_stage.json` or `_pending.json` above the URI); local paths and hub ids come back as they are
    (`from_pretrained` resolves hub ids itself)."""
    if not storage.is_remote(ref):
        return ref
    parts = ref.rstrip("/").split("/")
    for up in range(1, min(5, len(parts) - 3)):
        parent = "/".join(parts[: len(parts) - up + 1])
        for marker in (MANIFEST, PENDING):
            uri = storage.join(parent, marker)
            if storage.exists(uri):
                return storage.local_copy(ref, version=json.loads(storage.read_bytes(uri))["hash"])
    return storage.local_copy(ref, version="unversioned")
