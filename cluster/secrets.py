"""Keys a job needs (W&B, Hugging Face) from a file only its owner can read; never through Ray.

A job's keys must not travel in a Ray runtime env: Ray writes a job's runtime env, env vars and
all, to `runtime_env_agent.log` on every node and returns it from the job API and the dashboard.
Instead each node holds the keys in a file of `KEY=value` lines, mode 600, owned by the login
user: `~/.datalab/secrets.env`, or the path in `$DATALAB_SECRETS_FILE`. On the AWS cluster a setup
command writes it from AWS Secrets Manager (`python -m cluster.secrets fetch ...`, see
ray_config.yaml); on a laptop you write it by hand.

- `load_secrets()` reads the file and sets, in `os.environ`, the names this project reads
  (`ALLOWED`) that are not set already (a non-empty value in the environment wins). Other names
  are ignored (a warning lists their names). Missing file: nothing to do. A file that its group or
  others may read or write, or that someone else owns, is refused the way ssh refuses such a key,
  and so is a malformed line: one-line `UserError`s that name the file and line, never a value.
- `ensure_secrets()` is the same, once per process (later calls cost nothing): for the entry
  points of Ray processes (Train workers, tasks, actors). `cluster.runtime.init_ray` also names it
  as every worker process's setup hook, so a job's workers load their node's file on start.

Why not AWS keys: on AWS every process (Ray's own Train controller and Tune's experiment syncing,
which write to `s3://` storage too, included) gets S3 credentials from the node's instance profile.
A key in this file would reach only this project's processes, so `AWS_*` names are not read here.

Values are never printed or logged, here or by the callers: only names are.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import sys
import threading
from pathlib import Path

from cluster.config import UserError

log = logging.getLogger(__name__)

# W&B's key; Hugging Face's token for gated hub models (Llama 3), under its current and its legacy name.
ALLOWED = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
PATH_ENV = "DATALAB_SECRETS_FILE"
DEFAULT_PATH = "~/.datalab/secrets.env"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_lock = threading.Lock()
_loaded: dict[str, list[str]] = {}  # path -> names set by this process's first successful load


def secrets_path(path: str | os.PathLike | None = None) -> Path:
    """The secrets file: `path`, else `$DATALAB_SECRETS_FILE`, else `~/.datalab/secrets.env`."""
    return Path(path or os.environ.get(PATH_ENV) or DEFAULT_PATH).expanduser()


def _check_private(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: not a regular file")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise UserError(f"{path}: owned by uid {st.st_uid}, not by this user (uid {os.getuid()}); "
                        "refusing to read keys from it")
    if st.st_mode & 0o077:
        raise UserError(f"{path}: permissions {stat.S_IMODE(st.st_mode):04o} are too open: a secrets file must be "
                        f"readable by its owner only (chmod 600 {path})")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def parse(text: str, source: str) -> dict[str, str]:
    """`KEY=value` lines -> {name: value}. Blank lines and `#` comments are skipped, an `export `
    prefix and one pair of quotes around the value are allowed. Errors name the line, never its text."""
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not _NAME.fullmatch(name):
            raise UserError(f"{source}: line {n}: expected NAME=value (NAME of letters, digits and _)")
        value = _unquote(value.strip())
        if not value:
            raise UserError(f"{source}: line {n}: {name} has an empty value")
        if name in out:
            raise UserError(f"{source}: line {n}: {name} is given twice")
        out[name] = value
    return out


def load_secrets(path: str | os.PathLike | None = None) -> list[str]:
    """Set the allowed keys from the secrets file that the environment lacks; return their names.

    Missing file: returns []. Too open, someone else's, not UTF-8, or malformed: `UserError`."""
    p = secrets_path(path)
    try:
        f = open(p, "rb")  # noqa: SIM115 - fstat on the open file: no swap between check and read
    except FileNotFoundError:
        return []
    except IsADirectoryError:
        raise UserError(f"{p}: not a regular file") from None
    except OSError as exc:
        raise UserError(f"{p}: cannot read ({exc.strerror})") from None
    with f:
        _check_private(p, os.fstat(f.fileno()))
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: not a text file (invalid UTF-8 at byte {exc.start})") from None
    values = parse(text, str(p))
    ignored = [k for k in values if k not in ALLOWED]
    if ignored:
        log.warning("%s: ignored %s (this project reads only %s)", p, ", ".join(ignored), ", ".join(ALLOWED))
    names = []
    for name in ALLOWED:
        if name in values and not os.environ.get(name):
            os.environ[name] = values[name]
            names.append(name)
    return names


def ensure_secrets() -> list[str]:
    """`load_secrets()` once per process (and per secrets path); later calls return the names the
    first one set without reading the file. For Ray entry points: cheap and idempotent."""
    key = str(secrets_path())
    with _lock:
        if key not in _loaded:
            _loaded[key] = load_secrets()
        return list(_loaded[key])


def write_secrets(secret_json: str, path: str | os.PathLike | None = None) -> list[str]:
    """Write the allowed keys of a JSON object ({"HF_TOKEN": "...", ...}, as Secrets Manager keeps
    key/value secrets) to the secrets file, mode 600, atomically; return the names written."""
    p = secrets_path(path)
    try:
        values = json.loads(secret_json)
    except json.JSONDecodeError as exc:
        raise UserError(f"secret: not JSON (line {exc.lineno} column {exc.colno}); "
                        "expected an object of NAME: value") from None
    if not isinstance(values, dict):
        raise UserError("secret: expected a JSON object of NAME: value")
    ignored = [k for k in values if k not in ALLOWED]
    if ignored:
        log.warning("secret: ignored %s (this project reads only %s)",
                    ", ".join(k if _NAME.fullmatch(str(k)) else "<a non-name key>" for k in ignored),
                    ", ".join(ALLOWED))
    keep = {k: values[k] for k in ALLOWED if k in values}
    for k, v in keep.items():
        if not isinstance(v, str) or not v.strip() or any(c in v for c in "\r\n"):
            raise UserError(f"secret: {k} must be a non-empty one-line string")
    if not keep:
        raise UserError(f"secret: none of {', '.join(ALLOWED)} in it")
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask, and if a stale tmp file existed
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(f"{k}={v.strip()}\n" for k, v in keep.items()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return list(keep)


def fetch(secret_id: str, region: str, path: str | os.PathLike | None = None) -> list[str]:
    """Read a key/value secret from AWS Secrets Manager (credentials: the node's instance profile)
    and write it with `write_secrets`; return the names written."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        reply = boto3.client("secretsmanager", region_name=region).get_secret_value(SecretId=secret_id)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise UserError(f"secret {secret_id} in {region}: {code} (does the node's instance profile allow "
                        "secretsmanager:GetSecretValue on it?)") from None
    except BotoCoreError as exc:
        raise UserError(f"secret {secret_id} in {region}: {type(exc).__name__}") from None
    if "SecretString" not in reply:
        raise UserError(f"secret {secret_id}: binary secrets are not supported; store a key/value (JSON) secret")
    return write_secrets(reply["SecretString"], path)


def main(argv: list[str] | None = None) -> int:
    """`python -m cluster.secrets fetch --secret-id ID --region R` (a node's setup command) or
    `python -m cluster.secrets check` (which names the file would set). Prints names, never values."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cluster.secrets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", default=None, help=f"secrets file (default: ${PATH_ENV} or {DEFAULT_PATH})")
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="write the secrets file from an AWS Secrets Manager key/value secret")
    f.add_argument("--secret-id", required=True)
    f.add_argument("--region", required=True)
    sub.add_parser("check", help="check the secrets file and print the names it would set")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.command == "fetch":
            names = fetch(args.secret_id, args.region, args.file)
            print(f"wrote {', '.join(names)} to {secrets_path(args.file)} (mode 600)")
        else:
            for name in ALLOWED:  # report what the file would set, whatever this shell has
                os.environ.pop(name, None)
            names = load_secrets(args.file)
            print(f"{secrets_path(args.file)}: {', '.join(names) if names else 'no keys (or no file)'}")
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
