"""Test environment: a loopback-only 2-node Ray cluster, an S3-compatible server on loopback,
offline hub and W&B, no DeepSpeed JIT builds."""

import os
import random
import socket
import subprocess
import sys
import tempfile
import time

# Before anything imports ray, deepspeed or wandb (and before Ray's processes inherit the env).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # local Ray binds 127.0.0.1 only
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")  # as cluster.runtime's local Ray: workers at normal priority
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # as cluster.runtime's local Ray: no drain notices here
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# node-local caches of remote stages: one folder per test session, so tests can empty it; and a
# storage home for relative storage and W&B files of remote runs (never the checkout or ~)
os.environ["DATALAB_CACHE"] = tempfile.mkdtemp(prefix="datalab-cache-")
os.environ["DATALAB_STORAGE"] = tempfile.mkdtemp(prefix="datalab-home-")
# stages declared shared (each world, its tokenizer, its pretrained student) are built once per
# session and copied into every other job's run with the same fingerprint
os.environ["DATALAB_STAGE_CACHE"] = tempfile.mkdtemp(prefix="datalab-stages-")
# Ray's processes import this project (and tests/toy_objective.py) from the checkout
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))

import pytest  # noqa: E402

SESSION_DIRS = [os.environ[k] for k in ("DATALAB_CACHE", "DATALAB_STORAGE", "DATALAB_STAGE_CACHE")]


def pytest_sessionfinish(session, exitstatus):
    """The session's temporary folders go with it (a suite run leaves ~100 MB otherwise)."""
    import shutil

    for d in SESSION_DIRS:
        shutil.rmtree(d, ignore_errors=True)

S3_BUCKET = "datalab-test"


def free_port() -> int:
    """A free TCP port on loopback for a server a test starts, drawn from below the kernel's
    ephemeral range: a port the OS handed out by `bind(0)` and then released can be handed out
    again to any of Ray's own processes before our server binds it (a CI run lost its whole Ray to
    that), while ports below the range are only ever taken by name. Ray's worker ports are
    10002-19999, so the draw is from 20000 up."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    ports = range(20000, max(low, 20000))  # empty where the ephemeral range starts lower: the error below
    for port in random.sample(ports, k=min(200, len(ports))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in 20000-{low}")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 with one bucket; yields the bucket's URI. Started before the
    session's Ray, whose processes inherit AWS_ENDPOINT_URL (s3fs and pyarrow both read it)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    import boto3

    deadline = time.time() + 60
    while True:
        try:
            boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
            break
        except Exception:  # noqa: BLE001 - not listening yet
            if time.time() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.3)
    yield f"s3://{S3_BUCKET}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One Ray for the whole session (each start costs seconds), as 2 simulated nodes on loopback
    (`ray.cluster_utils.Cluster`), so remote work really runs on another node's processes; jobs
    join it. Yields the `Cluster`: a fault test adds and removes nodes (and leaves 2 behind)."""
    import ray
    from ray.cluster_utils import Cluster

    from cluster.runtime import WORKER_ENV, WORKER_SETUP_HOOK

    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()})
    # ^ a second Ray on the machine (another session, test_cluster_path's head) must not collide:
    # the agent's default port is one fixed number, and an agent that cannot bind it leaves its
    # node without a job agent ("No available agent to submit job")
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    # the jobs' worker setup: each worker pins its own cluster's address (cluster.runtime.setup_worker)
    ray.init(address=cluster.address, runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_local(ray_cluster):
    """The session's Ray (see `ray_cluster`), for tests that only use it."""
    import ray

    return ray


# ---------------------------------------------------------------------------------------------
# small builders the tests share


def registered_checkpoint(run_dir, fs=None) -> bool:
    """Has Ray Train's controller registered a checkpoint of this run (not merely seen files
    appear)? `fs`: the fsspec filesystem of remote storage; none for a local directory."""
    import json

    snapshot = f"{run_dir}/checkpoint_manager_snapshot.json"
    try:
        text = fs.cat_file(snapshot) if fs is not None else open(snapshot).read()
        return bool(json.loads(text).get("latest_checkpoint_result"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def tiny_llama(texts: list[str], out, vocab_size: int = 300, hidden_size: int = 32, layers: int = 1):
    """A tokenizer trained on `texts` and a random-init Llama over it, both saved in `out`."""
    from cluster.models import TinyLlama, build_tiny_model, train_tokenizer

    tok = train_tokenizer(texts, vocab_size, out)
    build_tiny_model(TinyLlama(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=2,
                               intermediate_size=2 * hidden_size, vocab_size=vocab_size), tok, 0, out)
    return out
