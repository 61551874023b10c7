"""Stages on storage, in-process (seconds): fingerprints derived from declared inputs, commit
manifest-last, resume of an unfinished stage, node-local caching, and where relative storage goes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster import storage
from cluster.config import Added, Operational, Options
from cluster.stages import Run, fetch, fingerprint


class Opts(Options):
    lr: float = 0.1
    steps: int = 3


class Resources(Options):
    workers: int = 1
    timeout_s: float = Operational(60.0)
    opts: Opts = Opts()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs")
    return f"{request.getfixturevalue('s3_server')}/stages-{tmp_path.name}"


def test_fingerprints_follow_inputs_and_upstream_stages(root):
    run = Run(root, "job", "r1")
    data = run.stage("data", seed=0)
    model = run.stage("model", data=data, opts=Opts())
    assert run.stage("model", data=run.stage("data", seed=0), opts=Opts()).hash == model.hash
    assert run.stage("model", data=run.stage("data", seed=1), opts=Opts()).hash != model.hash  # upstream moved
    assert run.stage("model", data=data, opts=Opts(lr=0.2)).hash != model.hash  # an option moved
    # an artifact counts by its stage's fingerprint and its place in it, never by where the run lives
    other = Run(f"{root}-elsewhere", "job", "r2")
    here = run.stage("eval", model=model.path("s0", "model"))
    there = other.stage("eval", model=other.stage("model", data=other.stage("data", seed=0), opts=Opts()).path("s0", "model"))
    assert here.hash == there.hash
    assert run.stage("eval", model=model.path("s1", "model")).hash != here.hash
    assert fingerprint("eval", {"x": 1}) != fingerprint("other", {"x": 1})


def test_operational_fields_decide_no_fingerprint():
    """A longer timeout or more retries on a re-submit resumes the stage; more workers is another
    run (nested options included)."""
    base = fingerprint("train", {"scale": Resources()})
    assert fingerprint("train", {"scale": Resources(timeout_s=600)}) == base
    assert fingerprint("train", {"scale": Resources(workers=2)}) != base
    assert fingerprint("train", {"scale": Resources(opts=Opts(steps=4))}) != base


class OptsBefore(Options):
    lr: float = 0.1


class OptsAfter(Options):  # the same options once a field was added
    lr: float = 0.1
    batching: str = Added("random")


def test_an_added_field_at_its_default_keeps_the_fingerprints_of_earlier_runs():
    """Runs made before a field existed resume after the upgrade; setting it is another run."""
    before = fingerprint("train", {"opts": OptsBefore()})
    assert fingerprint("train", {"opts": OptsAfter()}) == before
    assert fingerprint("train", {"opts": OptsAfter(batching="by_length")}) != before
    assert fingerprint("train", {"opts": OptsAfter(lr=0.2)}) == fingerprint("train", {"opts": OptsBefore(lr=0.2)})
    # the learner's own: runs made before `batching` existed keep their stages
    from cluster.config import fingerprinted
    from cluster.learners import LearnerOptions

    assert "batching" not in fingerprinted(LearnerOptions())
    assert fingerprinted(LearnerOptions(batching="by_length"))["batching"] == "by_length"


def test_ensure_commits_last_and_resumes_an_unfinished_build(root):
    run = Run(root, "job", "r1")
    stage = run.stage("probe", n=2)
    calls = []

    def failing(st):
        storage.write_bytes(st.path("shards", "part-0"), b"scored")  # what a producer wrote before dying
        calls.append("fail")
        raise RuntimeError("driver died")

    with pytest.raises(RuntimeError):
        stage.ensure(failing)
    assert not stage.done() and "probe" not in run.stages()

    def resuming(st):
        calls.append("resume")
        assert storage.read_bytes(st.path("shards", "part-0")) == b"scored"  # kept for the same fingerprint
        st.save_rows("table", [{"a": 1}, {"a": 2}])
        return {"rows": 2}

    assert stage.ensure(resuming) == {"rows": 2}
    assert stage.done() and run.stages() == {"probe": stage.hash}
    assert stage.ensure(lambda st: calls.append("again")) == {"rows": 2} and calls == ["fail", "resume"]
    assert stage.rows("table") == [{"a": 1}, {"a": 2}]

    changed = run.stage("probe", n=3)  # same place, new inputs: the old content is wiped first
    assert not changed.done()

    def fresh(st):
        assert not storage.exists(st.path("shards", "part-0")) and not storage.exists(st.path("table.parquet"))
        return {"rows": 0}

    changed.ensure(fresh)
    assert changed.done() and not stage.done()


def test_remote_stages_are_downloaded_once_per_node_and_version(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("DATALAB_CACHE", str(tmp_path / "cache"))
    run = Run(f"{s3_server}/cache-{tmp_path.name}", "job", "r1")
    stage = run.stage("model", v=1)
    stage.ensure(lambda st: storage.write_bytes(st.path("weights", "w.bin"), b"one"))
    fs, _ = storage.filesystem(s3_server)
    gets = []
    monkeypatch.setattr(fs, "get_file", lambda src, dst, **kw: (gets.append(src), Path(dst).write_bytes(fs.cat_file(src))))
    first = fetch(stage.path("weights"))
    assert Path(first, "w.bin").read_bytes() == b"one" and fetch(stage.path("weights")) == first
    assert stage.local("weights") == first and len(gets) == 1
    redone = run.stage("model", v=2)  # same URI, new content: a new download, never the stale copy
    redone.ensure(lambda st: storage.write_bytes(st.path("weights", "w.bin"), b"two"))
    assert Path(fetch(redone.path("weights")), "w.bin").read_bytes() == b"two" and len(gets) == 2


def test_relative_storage_never_lands_in_a_ray_job_working_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("DATALAB_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("runs") == str(tmp_path / "runs")
    job_dir = tmp_path / "ray" / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.resolve("runs") == str(tmp_path / "home" / "datalab" / "runs")
    monkeypatch.setenv("DATALAB_STORAGE", str(tmp_path / "shared"))
    assert storage.resolve("runs") == str(tmp_path / "shared" / "runs")
    assert storage.resolve("s3://bucket/runs/") == "s3://bucket/runs" and storage.resolve("/abs") == "/abs"
    assert os.path.isabs(storage.resolve("file://rel"))


def test_a_shared_stage_is_built_once_across_runs_and_jobs(root, tmp_path, monkeypatch):
    """`shared=True` with DATALAB_STAGE_CACHE: another run (another job) with the same fingerprint
    copies the stage instead of building it; a different fingerprint, an unshared stage, or a cache
    entry whose manifest was never written (a copy cut short) builds."""
    from cluster.stages import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    built = []

    def build(st):
        built.append(st.run.run_id)
        storage.write_bytes(st.path("model", "weights.bin"), f"from {st.run.run_id}".encode())
        return {"by": st.run.run_id}

    assert Run(root, "job_a", "r1").stage("pretrain", shared=True, seed=0).ensure(build) == {"by": "r1"}
    other = Run(root, "job_b", "r2")
    assert other.stage("pretrain", shared=True, seed=0).ensure(build) == {"by": "r1"}  # copied, not built
    assert storage.read_bytes(other.stage("pretrain", shared=True, seed=0).path("model", "weights.bin")) == b"from r1"
    assert other.stage("pretrain", shared=True, seed=0).done() and built == ["r1"]
    assert Run(root, "job_b", "r3").stage("pretrain", shared=True, seed=1).ensure(build) == {"by": "r3"}
    assert Run(root, "job_b", "r4").stage("pretrain", seed=0).ensure(build) == {"by": "r4"}
    assert built == ["r1", "r3", "r4"]
    (tmp_path / "cache" / f"pretrain-{other.stage('pretrain', shared=True, seed=0).hash}.json").unlink()  # as if the copy into the cache had stopped before its manifest
    assert Run(root, "job_c", "r5").stage("pretrain", shared=True, seed=0).ensure(build) == {"by": "r5"}
