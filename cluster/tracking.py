"""W&B tracking: one run per trial or stage, grouped per job run, offline by default.

Why this module and not `report_to="wandb"` / `setup_wandb()`:
- explicit ids: every run gets its id, name and group from the caller (trial id, stage name), so
  concurrent Tune trials never share a run, and a restarted stage can be found again;
- rank 0 only: on a Ray Train worker whose world rank is not 0, `start_run` returns None and every
  helper here is a no-op for None;
- offline by default: `mode="online"` takes effect only when a key is configured (WANDB_API_KEY or
  a netrc login); otherwise runs are written under the run directory and can be `wandb sync`ed
  later. wandb's own usage analytics are switched off (wandb 0.31 sends them even for runs started
  with `mode="offline"` unless WANDB_MODE is set in the environment);
- no secret is ever logged: config keys that look like credentials are dropped before wandb sees
  them, and the API key is read by wandb from its usual places, never passed through our code.

`read_offline_run` reads a finished (or crashed) offline run back: wandb 0.31 writes no
`wandb-summary.json` or `config.yaml` offline and ships no reader for its `.wandb` log.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Literal

import transformers
import wandb
from pydantic import Field
from wandb.proto import wandb_internal_pb2 as pb

from cluster.config import Options

log = logging.getLogger(__name__)


class TrackingOptions(Options):
    """W&B tracking: project, mode and where run files go."""

    project: str = Field("datalab", description="W&B project name")
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="online needs WANDB_API_KEY or a wandb netrc login, else offline"
    )
    entity: str | None = Field(None, description="W&B entity (team or user); null: the default")
    dir: str | None = Field(None, description="where wandb files go; null: the job's run directory")

    def for_run(self, run) -> "TrackingOptions":
        """These options with W&B files under the run directory (`cluster.stages.Run.wandb_dir`)."""
        return self.model_copy(update={"dir": run.wandb_dir(self.dir)})


# ---------------------------------------------------------------------------------------------
# starting runs

_SECRET_PARTS = ("secret", "password", "passwd", "credential", "apikey", "api_key")


def is_secret_name(name: str) -> bool:
    """True for config keys that may hold a credential (api_key, hf_token, db_password, ...).

    `key`/`token` count as whole words or suffixes only, so `tokenizer`, `max_new_tokens`,
    `keyword` and `sort_keys` stay in the config.
    """
    n = str(name).lower()
    words = "".join(c if c.isalnum() else " " for c in n).split()
    return (
        any(p in n for p in _SECRET_PARTS)
        or n.endswith(("key", "token"))
        or any(w in ("key", "token") for w in words)
    )


def scrub(config: Any) -> Any:
    """Copy of a config with every secret-looking key dropped, recursively (dicts and lists)."""
    if isinstance(config, dict):
        return {k: scrub(v) for k, v in config.items() if not is_secret_name(k)}
    if isinstance(config, (list, tuple)):
        return [scrub(v) for v in config]
    return config


def key_configured() -> bool:
    """Whether a W&B API key is available (env var or netrc), without any network call."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        from wandb.sdk.lib.urls import DEFAULT_BASE_URL
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return bool(read_netrc_auth(host=os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL))
    except Exception:  # noqa: BLE001 - an unreadable netrc means no key
        return False


def resolve_mode(opts: TrackingOptions) -> str:
    """The mode a run really uses: online falls back to offline when no key is configured."""
    if opts.mode == "online" and not key_configured():
        log.warning("tracking.mode=online but no W&B key is configured: logging offline")
        return "offline"
    return opts.mode


CODE_DIRS = ("cluster", "jobs", "synth", "influence", "evals", "configs")


@functools.cache
def code_version() -> str:
    """Which code the job runs: `DATALAB_COMMIT` when a driver recorded it for its workers, else
    the git commit (`+dirty` with uncommitted changes), else (a `ray job submit` copy of the
    project has no .git) `tree-<hash>`, a hash of the project's code and presets. Once per
    process: every W&B run it starts records it."""
    if os.environ.get("DATALAB_COMMIT"):
        return os.environ["DATALAB_COMMIT"]
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parent.parent
    git = dict(cwd=root, capture_output=True, text=True, timeout=10)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], **git)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **git).stdout.strip()
            return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    digest = hashlib.sha256()
    for path in sorted(p for d in CODE_DIRS for p in (root / d).rglob("*") if p.suffix in (".py", ".yaml")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return f"tree-{digest.hexdigest()[:12]}"


def _world_rank() -> int:
    """Ray Train world rank of this process, 0 outside a Train worker."""
    try:
        import ray.train

        return ray.train.get_context().get_world_rank()
    except Exception:  # noqa: BLE001 - not in a Train session (RuntimeError) or no Ray
        return 0


def _disable_wandb_analytics() -> None:
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy

        opentelemetry_proxy.disable()
    except Exception:  # noqa: BLE001 - moved in a later wandb: nothing to disable
        pass


def start_run(
    opts: TrackingOptions,
    *,
    run_id: str,
    name: str,
    group: str,
    job_type: str,
    config: dict,
    dir: str | Path,
    resume: bool = False,
) -> wandb.Run | None:
    """Start a W&B run with an explicit id, or return None (mode disabled, or not rank 0).

    Several runs may be started one after another (or side by side) in one process; end each
    with `finish_run(run)`. Files go to `<opts.dir or dir>/wandb/`. `resume`: a run with this id
    that already exists (a restarted trial) is continued rather than refused or overwritten.
    System metrics (CPU, GPU, memory) and run metadata are recorded; wandb's own git probe is off
    (a remote URL can carry a token): jobs put the commit in the config themselves.
    """
    if opts.mode == "disabled" or _world_rank() != 0:
        return None
    _disable_wandb_analytics()
    root = Path(opts.dir or dir)
    root.mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(
        silent=True,
        console="off",
        x_save_requirements=False,
        disable_git=True,
        save_code=False,
    )
    return wandb.init(
        project=opts.project,
        entity=opts.entity,
        id=run_id,
        name=name,
        group=group,
        job_type=job_type,
        config=scrub({**config, "commit": code_version()}),
        dir=str(root),
        mode=resolve_mode(opts),
        reinit="create_new",
        resume="allow" if resume else None,
        settings=settings,
    )


def finish_run(run: wandb.Run | None, timeout_s: float = 30.0) -> None:
    """`run.finish()`, then wait until the run's `.wandb` log is complete on disk.

    wandb 0.31 returns from `finish()` before its writer has flushed the log (about 1 ms later,
    about half the time): a run read right after a bare `finish()` can hold only the file header.
    """
    if run is None:
        return
    run.finish()
    path = Path(run.settings.sync_file)
    deadline = time.monotonic() + timeout_s
    while not _log_complete(path):
        if time.monotonic() > deadline:
            log.warning("%s: wandb has not finished the run log after %.0f s", path, timeout_s)
            return
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# logging helpers


class WandbTrainerCallback(transformers.TrainerCallback):
    """Send a HF/TRL Trainer's `on_log` metrics to our run, at `global_step`; no-op without one.

    Use instead of `report_to="wandb"`, which starts its own run with its own id.
    """

    def __init__(self, run: wandb.Run | None, offset: int = 0, phase: int | None = None) -> None:
        self.run, self.offset, self.phase = run, offset, phase

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - HF signature
        """At `offset + global_step`: a later phase of the same run continues the step axis."""
        if self.run is None or not logs or not state.is_world_process_zero:
            return
        metrics = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
        if metrics:
            self.run.log({**metrics, **({"phase": self.phase} if self.phase is not None else {})},
                         step=self.offset + state.global_step)


def log_table(run: wandb.Run | None, key: str, rows: list[dict]) -> None:
    """Log rows (dicts; columns are the union of their keys, in first-seen order) as a table."""
    if run is None:
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    run.log({key: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})


def log_image(run: wandb.Run | None, key: str, png_path: str | Path) -> None:
    """Log a PNG file (a plot) as an image."""
    if run is None:
        return
    run.log({key: wandb.Image(str(png_path))})


# ---------------------------------------------------------------------------------------------
# reading offline runs back

# The `.wandb` file is a LevelDB-style log: a 7-byte file header (":W&B", magic 0xBEE1, version
# 0), then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type); a record is
# one FULL chunk or FIRST, MIDDLE..., LAST; a block tail shorter than a header is zero padding.
# Each record is a serialized `wandb_internal_pb2.Record`.
_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class OfflineRunError(ValueError):
    """An offline run directory or `.wandb` file that this reader does not understand."""


def _records(path: Path):
    """Yield the `Record`s in a `.wandb` file; a truncated last record (crash) ends the scan."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER].ljust(_HEADER, b"\0"))
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise OfflineRunError(f"{path}: not a W&B log this reader understands ({data[:7]!r})")
    pos, parts = _HEADER, []
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and crc == 0 and length == 0:  # zeros after the last record: the end
            break
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if len(chunk) < length:
            break
        if crc != zlib.crc32(chunk, zlib.crc32(bytes([kind]))) or kind not in (1, 2, 3, 4):
            raise OfflineRunError(f"{path}: corrupt or unknown chunk at byte {pos}")
        pos += _HEADER + length
        parts = [chunk] if kind in (_FULL, _FIRST) else parts + [chunk]
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            yield record


def _log_complete(path: Path) -> bool:
    try:
        return path.is_file() and any(r.WhichOneof("record_type") == "exit" for r in _records(path))
    except OfflineRunError:
        return False


def _item_path(item) -> list[str]:
    return list(item.nested_key) or [item.key]


def _item_value(item) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    which = item.WhichOneof("value") if isinstance(item, pb.HistoryItem) else None
    if which == "json":
        return json.loads(item.json)
    if which in ("boolean", "integer", "number", "text"):
        return getattr(item, which)
    return None


def _set(target: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = value


def _remove(target: dict, path: list[str]) -> None:
    for part in path[:-1]:
        target = target.get(part, {})
    target.pop(path[-1], None)


def read_offline_run(run_dir: str | Path) -> dict:
    """Read an `offline-run-*` directory: {"config", "history", "summary", "id", "group", "name",
    "complete"}.

    `history` has one dict per logged step (with `_step`, `_runtime`, `_timestamp`); `summary`
    holds the last value of each key (and explicit `run.summary` writes). wandb's internal
    `_wandb` entries are left out. Nested keys become nested dicts; tables and images appear as
    their wandb JSON descriptors (`{"_type": "table-file", "path": ...}`, relative to `files/`).
    `complete` is False for a run that crashed or is still being written (no exit record).
    """
    run_dir = Path(run_dir)
    logs = sorted(run_dir.glob("run-*.wandb"))
    if len(logs) != 1:
        raise OfflineRunError(f"{run_dir}: expected one run-*.wandb file, found {len(logs)}")
    out: dict = {"config": {}, "history": [], "summary": {}, "complete": False}
    out.update(id=None, group=None, name=None)
    for record in _records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(id=run.run_id, group=run.run_group or None, name=run.display_name or None)
            for item in run.config.update:
                _set(out["config"], _item_path(item), _item_value(item))
        elif kind in ("config", "summary"):
            target = out[kind]
            for item in getattr(record, kind).update:
                _set(target, _item_path(item), _item_value(item))
            for item in getattr(record, kind).remove:
                _remove(target, _item_path(item))
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                _set(row, _item_path(item), _item_value(item))
                _set(out["summary"], _item_path(item), _item_value(item))
            out["history"].append(row)
        elif kind == "exit":
            out["complete"] = True
    if out["id"] is None:
        raise OfflineRunError(
            f"{logs[0]}: no run record (still being written? end runs with finish_run; "
            "or not a W&B run log, or one from a newer wandb)"
        )
    for section in ("config", "summary"):
        out[section].pop("_wandb", None)
    for row in out["history"]:
        row.pop("_wandb", None)
    return out


def find_offline_runs(root: str | Path) -> list[Path]:
    """Every `offline-run-*` directory under root (recursively), sorted."""
    return sorted(p for p in Path(root).rglob("offline-run-*") if p.is_dir() and not p.is_symlink())
