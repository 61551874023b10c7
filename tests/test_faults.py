"""A shared cluster's faults, on simulated nodes (`ray.cluster_utils.Cluster` on loopback) with
every input, checkpoint and result on the local S3 server.

- Node loss under a probe stage: Montessori's influence probes (the warm-up's student and AdamW
  state on the bucket, `influence.warmup.warm_scorer` on a `cluster.probes.ProbePool` of 3 actors)
  lose the node of one actor mid-stage; every candidate's score is on the bucket exactly once and
  equals an undisturbed run's.
- Node loss under a sweep, which is also the load test: 16 learner runs (8 settings, each twice)
  queued by Tune against 3 nodes' CPUs. Once a worker on a node other than the head trains a run
  with a registered checkpoint, that node is killed (raylet and all its processes, as a lost
  instance) and a fresh node joins, as an autoscaler would add one. Every run finishes, that run
  resumes from its checkpoint, the twins' final weights agree, and nothing the sweep started
  (placement groups, actors) outlives it.

The figures (wall time, start latencies, resumed runs, leaks) are printed for benchmarks/RESULTS.md.
Driver loss is tried in tests/test_falsity_sweep.py, a killed training worker in
tests/test_learners.py, a dead probe actor in tests/test_probes.py, untrusted checkpoints in
tests/test_trust.py.
"""

from __future__ import annotations

import functools
import io
import statistics
import sys
import threading
import time
from pathlib import Path

import ray
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray import cloudpickle

from cluster import storage
from cluster.learners import LearnerOptions, LearnerRun, Phase, ScaleOptions
from cluster.probes import ProbePool
from cluster.stages import Run, fetch
from cluster.sweep import run_name, train_stage
from influence.warmup import WarmupOptions, tokenize_sft, warm_scorer, warm_up_student
from synth import world as W
from tests.conftest import registered_checkpoint, tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this file

SETTINGS, TWINS = 8, ("a", "b")
NODE_CPUS = 2


def weights_checksum(model_dir: str, phase: str) -> dict:
    """Evaluation hook (rank 0): two sums over the final weights, enough to tell runs apart."""
    from safetensors.torch import load_file

    w = load_file(str(Path(model_dir) / "model.safetensors"))
    return {"abs_sum": float(sum(t.double().abs().sum() for t in w.values())),
            "sq_sum": float(sum(t.double().square().sum() for t in w.values()))}


@pytest.fixture(scope="module")
def on_s3(s3_server, tmp_path_factory):
    """A tiny Llama, its tokenizer and an SFT table, uploaded to the bucket."""
    local = tmp_path_factory.mktemp("faults")
    world = W.build_world(W.WorldOptions(num_people=20, bios_per_person=2))
    tiny_llama(W.all_text(world), local / "model", vocab_size=300, hidden_size=32, layers=1)
    rows = [{"prompt": W.format_prompt(r["question"]), "completion": r["true_response"]}
            for r in W.questions(world, world.people, "all")]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    root = f"{s3_server}/faults-{int(time.time())}"
    storage.upload(local / "model", f"{root}/inputs/model")
    storage.write_bytes(f"{root}/inputs/sft.parquet", buf.getvalue())
    return root


# Ray's own cluster-wide singletons (named, detached, created by the first run that needs one and
# kept for every later one): Ray Data's and Train's autoscaling coordinator
CLUSTER_SINGLETONS = {"AutoscalingCoordinator"}


def alive_actors(gcs: str) -> dict[str, str]:
    from ray.util.state import list_actors

    return {a.actor_id: a.class_name for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")], limit=10000)
            if a.name not in CLUSTER_SINGLETONS}


def live_placement_groups(gcs: str) -> dict[str, str]:
    """Every placement group not removed: its id and what it is (state, name, bundles)."""
    from ray.util.state import list_placement_groups

    return {p.placement_group_id: f"{p.state} {p.name!r} bundles={[b.get('unit_resources') for b in p.bundles or []]}"
            for p in list_placement_groups(address=gcs, limit=10000, detail=True) if p.state != "REMOVED"}


def leftovers(gcs: str, actors_before: dict, pgs_before: dict, wait_s: float = 60) -> tuple[dict, dict, float]:
    """The sweep's actors and placement groups still alive after it: a lost node's placement
    groups are removed by Ray asynchronously (Train's PlacementGroupCleaner polls whether their
    controller still lives; Tune frees a dead trial's), so what remains after `wait_s` leaked.
    Also returns how long the cleanup took."""
    t0 = time.time()
    while True:
        actors = {i: c for i, c in alive_actors(gcs).items() if i not in actors_before}
        pgs = {i: d for i, d in live_placement_groups(gcs).items() if i not in pgs_before}
        if (not actors and not pgs) or time.time() > t0 + wait_s:
            return actors, pgs, time.time() - t0
        time.sleep(2)


def lose_a_node(cluster, pick, fault: dict, deadline_s: float = 600) -> None:
    """As soon as `pick()` names a node, kill it without a graceful stop (its raylet and processes
    are SIGKILLed, as a lost instance) and add a fresh node. Fills `fault` (runs in a thread: an
    error goes there too, for the test's assertion on it)."""
    try:
        deadline = time.time() + deadline_s
        while time.time() < deadline:
            node_id = pick()
            node = next((n for n in cluster.worker_nodes if n.node_id == node_id), None)
            if node is not None:
                fault.update(node=node_id, at=time.time())
                cluster.remove_node(node, allow_graceful=False)
                cluster.add_node(num_cpus=NODE_CPUS, node_ip_address="127.0.0.1")
                return
            time.sleep(0.5)
        fault["error"] = f"no node to lose within {deadline_s:.0f} s"
    except Exception as exc:  # noqa: BLE001
        fault["error"] = repr(exc)


def actors_by_node(gcs: str, class_name: str) -> list[tuple[str, int]]:
    from ray.util.state import list_actors

    return [(a.node_id, a.pid) for a in list_actors(address=gcs, filters=[("class_name", "=", class_name),
                                                                          ("state", "=", "ALIVE")], limit=1000)]


@pytest.fixture
def three_nodes(ray_cluster):
    """The session's 2 nodes plus one; afterwards the session is left with 2 nodes again."""
    ray_cluster.add_node(num_cpus=NODE_CPUS, node_ip_address="127.0.0.1")
    ray_cluster.wait_for_nodes()
    yield ray_cluster
    for node in list(ray_cluster.worker_nodes)[1:]:
        ray_cluster.remove_node(node)
    ray_cluster.wait_for_nodes()


def test_a_sixteen_run_sweep_loses_a_node_and_ends_as_undisturbed(three_nodes, on_s3, capsys):
    cluster, gcs = three_nodes, three_nodes.address
    run = Run(on_s3, "faults", "sweep")
    runs = {f"lr{i}-{twin}": LearnerRun(
        model=f"{on_s3}/inputs/model", tokenizer=f"{on_s3}/inputs/model",
        phases=[Phase("sft", f"{on_s3}/inputs/sft.parquet", LearnerOptions(
            learning_rate=1e-3 * (1 + i / 2), max_steps=16, batch_size=4, save_steps=4, logging_steps=4, max_length=64))],
        # as the cluster presets: a worker group that restarts while the lost node's work is being
        # cleaned up may wait for its CPUs longer than one start timeout (seen here: 120 s)
        scale=ScaleOptions(num_workers=1, cpus_per_worker=1, max_failures=2, start_timeout_s=60, start_retries=4),
        evaluate=weights_checksum)
        for i in range(SETTINGS) for twin in TWINS}
    stage = run.stage("sweep", runs=runs)
    names = {k: run_name(stage, k) for k in runs}
    fs, ray_root = storage.filesystem(run.ray_storage)
    actors_before, pgs_before = alive_actors(gcs), live_placement_groups(gcs)

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"  # every simulated node's

    def training_run(pid: int) -> str | None:
        """The run a training worker trains: its log names it (cluster.learners prints its steps)."""
        for f in logs.glob(f"worker-*-{pid}.out"):
            text = f.read_text(errors="ignore")
            return next((k for k, n in names.items() if f"[{n}:sft] step" in text), None)
        return None

    def pick() -> str | None:
        """The node of a training worker whose run has a registered checkpoint and has not ended
        (so the run must resume from it), not the head's."""
        fs.invalidate_cache()
        for node_id, pid in actors_by_node(gcs, "RayTrainWorker"):
            key = training_run(pid)
            if (node_id != cluster.head_node.node_id and key is not None
                    and registered_checkpoint(f"{ray_root}/{names[key]}", fs)
                    and not fs.exists(f"{stage.path(key, 'sft')}/model.safetensors")):
                fault["run"] = key
                return node_id
        return None

    fault: dict = {}
    t0 = time.time()
    killer = threading.Thread(target=lose_a_node, args=(cluster, pick, fault), daemon=True)
    killer.start()
    result = train_stage(stage, runs)
    wall = time.time() - t0
    removed = capsys.readouterr().out.count("removing placement group")  # what the sweep cleaned after Ray
    killer.join(timeout=5)
    assert "node" in fault, f"no node was lost (the test exercised no fault): {fault}"

    # every run finished, once; the lost node's runs went on from their checkpoints
    assert sorted(result) == sorted(runs)
    trial_ids = [t.trial_id for t in result.values()]
    assert len(set(trial_ids)) == len(trial_ids)
    assert all(t.metrics["sft/steps"] == 16 for t in result.values())
    resumed = {k: t.metrics["sft/resumed_from_step"] for k, t in result.items() if t.metrics["sft/resumed_from_step"] > 0}
    assert fault["run"] in resumed, f"{fault['run']} (its worker on the lost node) did not resume: {resumed}"
    # twins end with the same weights, lost node or not; settings differ (the sums see training)
    for i in range(SETTINGS):
        a, b = result[f"lr{i}-a"].metrics, result[f"lr{i}-b"].metrics
        for m in ("sft/abs_sum", "sft/sq_sum"):
            assert abs(a[m] - b[m]) <= 1e-6 * abs(a[m]), (i, m, a[m], b[m], resumed)
    first, last = result["lr0-a"].metrics["sft/sq_sum"], result[f"lr{SETTINGS - 1}-a"].metrics["sft/sq_sum"]
    assert abs(first - last) > 1e-4 * abs(first)
    # nothing the sweep started outlives it: the lost node's actors are dead, the rest were stopped
    leaked_actors, leaked_pgs, settled = leftovers(gcs, actors_before, pgs_before)
    assert not leaked_actors and not leaked_pgs, (leaked_actors, leaked_pgs)

    starts = sorted(t.metrics["sft/started_at"] - t.started_at for t in result.values())
    with capsys.disabled():
        print(f"\n[faults] {len(runs)} runs on 3 nodes x {NODE_CPUS} CPUs: wall {wall:.0f} s; node lost at "
              f"{fault['at'] - t0:.0f} s under {fault['run']}; {len(result)} finished, "
              f"0 lost, 0 duplicated; {len(resumed)} resumed from steps {sorted(resumed.values())}; trial start to "
              f"first step median {statistics.median(starts):.1f} s, max {starts[-1]:.1f} s; leaked placement groups "
              f"{len(leaked_pgs)}, actors {len(leaked_actors)} ({settled:.0f} s after the sweep; the sweep removed "
              f"{removed} placement group(s) Ray left)", flush=True)


class Paced:
    """Montessori's probe scorer (`warm_scorer`), slowed so that the stage outlasts a node loss."""

    def __init__(self, pace_s: float, *args):
        self.pace_s, self.inner = pace_s, warm_scorer(*args)

    def score(self, batch: list[dict]) -> list[float]:
        time.sleep(self.pace_s * len(batch))
        return self.inner.score(batch)


def test_a_probe_stage_loses_a_node_and_loses_or_duplicates_no_score(three_nodes, on_s3, capsys):
    import torch

    cluster, gcs = three_nodes, three_nodes.address
    model = f"{on_s3}/inputs/model"
    warm, reference = f"{on_s3}/probes/warm", f"{on_s3}/probes/reference.parquet"
    # the warm-up stage's work: the student and its AdamW state, on the bucket
    warm_up_student(model, model, f"{on_s3}/inputs/sft.parquet", WarmupOptions(epochs=1, max_length=64), 0, warm)
    world = W.build_world(W.WorldOptions(num_people=20, bios_per_person=2, seed=1))
    rows = [{"prompt": W.format_prompt(r["question"]), "completion": r["true_response"]}
            for r in W.questions(world, world.people, "all")]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows[:16]), buf)
    storage.write_bytes(reference, buf.getvalue())
    from cluster.models import load_tokenizer

    tok = load_tokenizer(fetch(model))
    items = [{"id": f"c{i}", **tokenize_sft(tok, r["prompt"], r["completion"], 64)} for i, r in enumerate(rows[16:80])]
    scorer = (warm, reference, 64, 8, "cpu")

    # undisturbed: the same scorer in this process, one thread as on a 1-CPU actor
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ProbePool(functools.partial(Paced, 0.0, *scorer), num_actors=0) as pool:
            calm = pool.run(items, "id", f"{on_s3}/probes/undisturbed", batch_size=2, score_column="influence",
                            progress=False)
    finally:
        torch.set_num_threads(threads)
    expected = dict(zip(calm["id"], calm["influence"]))

    out = f"{on_s3}/probes/disturbed"
    fs, shards = storage.filesystem(f"{out}/shards")

    def pick() -> str | None:
        """The node of a probe actor, not the head's, once the stage is under way (shards stored)."""
        fs.invalidate_cache()
        if len(fs.glob(f"{shards}/*.parquet")) < 3:
            return None
        return next((n for n, _ in actors_by_node(gcs, "_ProbeActor") if n != cluster.head_node.node_id), None)

    actors_before, pgs_before = alive_actors(gcs), live_placement_groups(gcs)
    fault: dict = {}
    killer = threading.Thread(target=lose_a_node, args=(cluster, pick, fault, 300), daemon=True)
    t0 = time.time()
    killer.start()
    with ProbePool(functools.partial(Paced, 0.5, *scorer), num_actors=3, num_cpus_per_actor=1) as pool:
        got = pool.run(items, "id", out, batch_size=2, score_column="influence", progress=False)
        replaced, retried = pool.replaced, pool.stats["retried"]
    wall = time.time() - t0
    killer.join(timeout=5)
    assert "node" in fault, f"no node was lost (the test exercised no fault): {fault}"
    assert replaced >= 1 and retried >= 1, (replaced, retried)  # the lost actor held batches

    # every candidate once, in the merged table and across the shards on the bucket
    assert got["id"] == [it["id"] for it in items]
    stored = [i for f in fs.glob(f"{shards}/*.parquet") for i in pq.read_table(fs.open(f, "rb")).column("id").to_pylist()]
    assert sorted(stored) == sorted(expected), "a score was lost or stored twice"
    # each score equal to the undisturbed run's, well inside the smallest gap between two of them
    values = sorted(expected.values())
    gap = min(b - a for a, b in zip(values, values[1:]) if b > a)
    diff = max(abs(s - expected[i]) for i, s in zip(got["id"], got["influence"]))
    assert diff <= min(1e-7, gap / 10), (diff, gap)
    leaked_actors, leaked_pgs, _ = leftovers(gcs, actors_before, pgs_before)
    assert not leaked_actors and not leaked_pgs, (leaked_actors, leaked_pgs)
    with capsys.disabled():
        print(f"\n[faults] probe stage: {len(items)} candidates on 3 actors; node lost at {fault['at'] - t0:.0f} s; "
              f"{replaced} actor(s) replaced, {retried} batch(es) re-queued; {len(stored)} scores stored, 0 lost, "
              f"0 duplicated; largest difference from the undisturbed run {diff:.1e} (smallest gap {gap:.1e}); "
              f"wall {wall:.0f} s", flush=True)
