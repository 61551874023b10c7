"""The command line every job shares.

    python -m jobs.<name> --config configs/<name>/<preset>.yaml [key.sub=value ...] [--dry-run]

`--help` lists every option with its type and default; `--dry-run` prints the plan and starts
nothing. A `UserError` anywhere (bad preset, bad data file, a secrets file others can read) ends
the process with one line on stderr and exit code 2, never a traceback. Before the job runs, its
keys are read from the node's secrets file (`cluster.secrets`); only their names are printed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from cluster.config import Options, UserError, describe_options, load_config
from cluster.secrets import load_secrets, secrets_path


def main(
    prog: str,
    doc: str,
    schema: type[Options],
    plan: Callable[[Options], str],
    run: Callable[[Options], object],
    argv: list[str] | None = None,
) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {prog}",
        description=(doc or "").strip().split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="options (override any with key.sub=value):\n" + "\n".join(describe_options(schema)),
    )
    parser.add_argument("--config", required=True, help="preset YAML, e.g. configs/<job>/tiny.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and start nothing")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(schema, args.config, args.overrides)
        if args.dry_run:
            print(plan(cfg))
            return 0
        if names := load_secrets():  # keys never travel in Ray's runtime env: see cluster.secrets
            print(f"[secrets] {', '.join(names)} from {secrets_path()}", flush=True)
        run(cfg)
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; re-run the same command to resume", file=sys.stderr)
        return 130
