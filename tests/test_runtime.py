"""A local Ray started by the project binds loopback only, even when `ray` was imported before
`init_ray` (Ray reads its bind setting once, at import) and the caller's environment lacks the
switch the Makefile and conftest set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import ray  # imported first, as a job module's imports do
from cluster.runtime import RayOptions, init_ray
init_ray(RayOptions(num_cpus=1), {storage!r})

@ray.remote(num_cpus=1)
def where():
    return ray.util.get_node_ip_address()

print("NODES", sorted({{n["NodeManagerAddress"] for n in ray.nodes()}}), "TASK", ray.get(where.remote()))
"""


def test_local_ray_binds_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(storage=str(tmp_path))], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("NODES"))
    assert line == "NODES ['127.0.0.1'] TASK 127.0.0.1", line


def test_a_redone_stage_changes_the_fingerprint_of_paths_into_it(tmp_path):
    from cluster.runtime import RunDir

    run = RunDir(str(tmp_path), "job", "r1")
    with run.write("warmup", "h1") as out:
        Path(out, "w.txt").write_text("1")
    inputs = {"warm": {0: f"{run.local('warmup')}/s0"}, "hub": "org/model", "n": 3}
    first = run.fingerprint(inputs)
    assert first == {"warm": {0: "<warmup@h1>/s0"}, "hub": "org/model", "n": 3}
    with run.write("warmup", "h2") as out:  # same path, new content
        Path(out, "w.txt").write_text("2")
    assert run.fingerprint(inputs)["warm"][0] == "<warmup@h2>/s0"
    assert run.stage_hash("warmup") == "h2" and run.stage_hash("missing") is None
