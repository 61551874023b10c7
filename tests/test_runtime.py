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
init_ray(RayOptions(num_cpus=1))

@ray.remote(num_cpus=1)
def where():
    return ray.util.get_node_ip_address()

print("NODES", sorted({n["NodeManagerAddress"] for n in ray.nodes()}), "TASK", ray.get(where.remote()))
"""


def test_local_ray_binds_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("NODES"))
    assert line == "NODES ['127.0.0.1'] TASK 127.0.0.1", line
