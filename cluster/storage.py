"""Storage URIs: where every stage, shard and checkpoint lives, and the node-local cache.

A location is a local path (one machine, or a shared NFS mount) or an fsspec URI (`s3://`,
`gs://`, `file://`). Whoever produces data (the driver, a Train worker, a Ray task or actor on any
node) writes it to its URI; whoever needs files on local disk (a model to load, a dataset to
memory-map) asks `local_copy(uri, version)`, which downloads once per node and version (a file lock
keeps the processes of one node from downloading the same thing side by side) and hands back the
cached path. For a local path it is the path itself.

S3-compatible servers other than AWS (MinIO, a test's moto server) are reached through the
standard `AWS_ENDPOINT_URL` variable, which fsspec (s3fs) and pyarrow (Ray Train's storage) both
read; credentials come from the usual AWS places and are never written by this project.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from cluster.config import UserError

DEFAULT_HOME = "~/datalab"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve(storage: str) -> str:
    """A storage root as every process on every node can use it: a URI, or an absolute path.

    A relative path means "under this job's storage home". Under `ray job submit` the working
    directory is Ray's temporary copy of the project, deleted with the job, so there (and wherever
    DATALAB_STORAGE is set) a relative path resolves under `$DATALAB_STORAGE` (default
    `~/datalab`), never under the working directory.
    """
    if is_remote(storage):
        return storage.rstrip("/")
    if storage.startswith("file://"):
        storage = storage[len("file://"):]
    path = Path(storage).expanduser()
    if not path.is_absolute():
        home = os.environ.get("DATALAB_STORAGE")
        if home is None and _in_ray_job_working_dir():
            home = DEFAULT_HOME
        base = Path(home).expanduser() if home else Path.cwd()
        path = base / path
    return str(path.resolve())


def _in_ray_job_working_dir() -> bool:
    """True under `ray job submit --working-dir`: Ray runs the entrypoint in its own temporary
    copy of the directory (`.../runtime_resources/working_dir_files/...`)."""
    return "runtime_resources" in Path.cwd().parts or "working_dir_files" in str(Path.cwd())


def filesystem(uri: str):
    """(fsspec filesystem, path within it) for a URI or local path. Remote listings are never
    cached: other nodes write shards and stages while this process looks."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri, **({"use_listings_cache": False} if is_remote(uri) else {}))
    except ImportError as exc:  # e.g. s3:// without s3fs installed
        raise UserError(f"storage {uri}: {exc}") from None


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write one file whole: object stores put atomically; local files go through a rename."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    Path(tmp).write_bytes(data)
    os.replace(tmp, path)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def upload(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory's contents to `uri` (created if missing, existing files replaced)."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        shutil.copytree(local_dir, path, dirs_exist_ok=True)
        return
    fs.makedirs(path, exist_ok=True)
    for f in sorted(Path(local_dir).rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{path}/{f.relative_to(local_dir).as_posix()}")


def cache_root() -> Path:
    return Path(os.environ.get("DATALAB_CACHE") or Path(tempfile.gettempdir(), "datalab-cache"))


def node_cached(key: str, fill: Callable[[str], None]) -> str:
    """A directory in this node's cache, filled once by `fill(directory)`: the node's other
    processes wait on a file lock and reuse it; a fill that fails leaves nothing behind."""
    from filelock import FileLock

    target = cache_root() / key
    if target.is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not target.is_dir():
            part = Path(f"{target}.part")
            shutil.rmtree(part, ignore_errors=True)
            fill(str(part))
            os.replace(part, target)
    return str(target)


def local_copy(uri: str, version: str) -> str:
    """A local directory with the files at `uri`: the path itself for local storage; for remote
    storage, a copy downloaded once per node and `version` (a stage hash, a run name): a new
    version of the same URI is a new download, never a stale one."""
    if not is_remote(uri):
        return filesystem(uri)[1]

    def download(part: str) -> None:
        fs, path = filesystem(uri)
        Path(part).mkdir(parents=True)
        for src in fs.find(path):
            rel = src[len(path.rstrip("/")) + 1:]
            (Path(part) / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(src, str(Path(part) / rel))

    key = hashlib.sha256(f"{uri}@{version}".encode()).hexdigest()[:16]
    return node_cached(f"{Path(uri.rstrip('/')).name}-{key}", download)
