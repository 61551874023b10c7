"""A pool of Ray actors that score many items against state each actor holds in memory.

Knows no science: a *scorer* is any object with `score(batch: list[dict]) -> list[float]`,
built once per actor by a zero-argument factory (so an expensive warm model is loaded once per
actor, never per item). Items stream to the actors in batches, at most `max_in_flight` batches
queued per actor; every finished batch is written at once as a small Parquet shard under
`<out>/shards/`, and the merged `(id, score)` table is written to `<out>/scores.parquet` when
complete. `<out>` is a storage URI (local path, NFS, s3://...): the shards are on shared storage,
so a run on another node, or after the driver died, resumes from them.

With `num_actors=0` the scorer runs in the calling process, through the same batching, shards and
resume (small models, tests, and generation a preset keeps in the driver).

Failure model:
- An actor that dies (node lost, OOM, a crash in native code: `RayActorError`) is replaced by a
  fresh one and every batch it held is re-queued; a batch is only ever written after `ray.get`
  returned its scores, so nothing is lost and nothing is counted twice. A batch that keeps
  killing actors fails the run after `max_retries` tries.
- An exception raised by the scorer itself is a bug or bad data: it propagates, unretried.
- A driver that dies loses only in-flight batches: re-running `run` with the same `out`
  reads the shards, skips ids already scored, and scores the rest. Merging keeps the first score
  seen per id, so even an overlap between shards cannot double-count.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections import deque
from typing import Any, Callable, Iterator, Protocol, Sequence

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.exceptions import RayActorError
from tqdm.auto import tqdm

from cluster import storage


class Scorer(Protocol):
    """Maps a batch of rows to one value per row: a score (float), or any Arrow-storable value
    such as a generated string (the same pool runs generators)."""

    def score(self, batch: list[dict]) -> list[Any]: ...


class _ProbeActor:
    """Holds one scorer for its lifetime (Ray runs its calls one at a time)."""

    def __init__(self, make_scorer: Callable[[], Scorer]):
        self._scorer = make_scorer()

    def ready(self) -> int:
        return os.getpid()

    def cpu_seconds(self) -> float:
        """CPU time this actor's process has used: with wall time, the cores it actually got."""
        return time.process_time()

    def score(self, batch: list[dict]) -> list[Any]:
        out = list(self._scorer.score(batch))
        if len(out) != len(batch):
            raise ValueError(f"scorer returned {len(out)} scores for a batch of {len(batch)}")
        return out


def _rows(items: datasets.Dataset | Sequence[dict], chunk: int = 1024) -> Iterator[dict]:
    """Rows as dicts, reading a Dataset a chunk at a time (no full materialization)."""
    if isinstance(items, datasets.Dataset):
        for cols in items.iter(batch_size=chunk):
            keys = list(cols)
            for vals in zip(*cols.values()):
                yield dict(zip(keys, vals))
    else:
        yield from items


def _read_shards(shard_uri: str, id_column: str, score_column: str) -> dict[Any, Any]:
    """Scores already on storage (first seen wins); unfinished `.tmp` files are ignored."""
    fs, root = storage.filesystem(shard_uri)
    done: dict[Any, Any] = {}
    for f in sorted(fs.glob(f"{root}/*.parquet")):
        with fs.open(f, "rb") as fh:
            t = pq.read_table(fh, columns=[id_column, score_column])
        for i, s in zip(t.column(id_column).to_pylist(), t.column(score_column).to_pylist()):
            done.setdefault(i, s)
    return done


def _write_table(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())  # whole or not at all


class ProbePool:
    """`num_actors` Ray actors, each with `num_cpus_per_actor` / `num_gpus_per_actor` (an actor
    may span several GPUs; the scorer decides how to use them), each holding one scorer."""

    def __init__(
        self,
        make_scorer: Callable[[], Scorer],
        num_actors: int = 1,
        num_cpus_per_actor: float = 1,
        num_gpus_per_actor: float = 0,
        max_in_flight: int = 2,
        max_retries: int = 3,
    ):
        if num_actors < 0 or max_in_flight < 1:
            raise ValueError("num_actors must be at least 0 and max_in_flight at least 1")
        self.make_scorer = make_scorer
        self.max_in_flight, self.max_retries = max_in_flight, max_retries
        self.local = _ProbeActor(make_scorer) if num_actors == 0 else None  # in this process
        self._cls = ray.remote(_ProbeActor).options(
            num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor, max_restarts=0, max_task_retries=0
        )
        self.actors = [self._cls.remote(make_scorer) for _ in range(num_actors)]
        self.replaced = 0  # actors replaced after dying, over the pool's life
        self.stats: dict[str, float] = {}  # of the last run: scored, seconds, per_second, retried, actor_cpu_seconds

    def wait_ready(self) -> None:
        """Block until every actor has built its scorer (so timings exclude start-up)."""
        ray.get([a.ready.remote() for a in self.actors])

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """`fn(scorer)` on the first actor's scorer (or the in-process one): read a value it holds."""
        if self.local is not None:
            return fn(self.local._scorer)
        return ray.get(self.actors[0].__ray_call__.remote(lambda actor: fn(actor._scorer)))

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self) -> ProbePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _replace(self, slot: int) -> None:
        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # already gone
            pass
        self.actors[slot] = self._cls.remote(self.make_scorer)
        self.replaced += 1

    def run(
        self,
        items: datasets.Dataset | Sequence[dict],
        id_column: str,
        out: str,
        batch_size: int = 8,
        score_column: str = "score",
        progress: bool = True,
        desc: str = "probes",
    ) -> datasets.Dataset:
        """Score every item once; return the `(id_column, score_column)` dataset in input order.

        Resumes from shards already under `out` (a storage URI). Ids must be unique.
        """
        out = str(out)
        shard_dir = storage.join(out, "shards")
        ids = list(items[id_column]) if isinstance(items, datasets.Dataset) else [r[id_column] for r in items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"column {id_column!r} has duplicate ids; every item needs its own")
        done = _read_shards(shard_dir, id_column, score_column)
        wanted = set(ids)
        todo = len(wanted - done.keys())

        def batches() -> Iterator[list[dict]]:
            buf: list[dict] = []
            for row in _rows(items):
                if row[id_column] not in done:
                    buf.append(row)
                    if len(buf) == batch_size:
                        yield buf
                        buf = []
            if buf:
                yield buf

        fresh = batches()
        retry: deque[tuple[list[dict], int]] = deque()
        pending: dict[ray.ObjectRef, tuple[int, Any, list[dict], int]] = {}  # ref -> slot, actor, batch, tries
        load = [0] * len(self.actors)
        seq, retried = 0, 0
        bar = tqdm(total=todo, unit="item", desc=desc, disable=not progress, smoothing=0.1)
        nonce = uuid.uuid4().hex[:8]

        def save(batch: list[dict], scores: list[Any], seq: int) -> None:
            new = [(r[id_column], s) for r, s in zip(batch, scores) if r[id_column] not in done]
            if new:
                _write_table(pa.table({id_column: [i for i, _ in new], score_column: [s for _, s in new]}),
                             storage.join(shard_dir, f"part-{nonce}-{seq:06d}.parquet"))
                done.update(new)
                bar.update(len(new))

        start = time.perf_counter()
        if self.local is not None:
            try:
                for seq, batch in enumerate(batches()):
                    save(batch, self.local.score(batch), seq)
            finally:
                bar.close()
            self.stats = {"scored": todo, "seconds": time.perf_counter() - start, "retried": 0}
            return self._merge(ids, done, id_column, score_column, out)
        cpu0 = dict(zip(map(id, self.actors), ray.get([a.cpu_seconds.remote() for a in self.actors])))
        try:
            while True:
                while load[slot := min(range(len(load)), key=load.__getitem__)] < self.max_in_flight:
                    if retry:
                        batch, tries = retry.popleft()
                    elif (batch := next(fresh, None)) is not None:
                        tries = 0
                    else:
                        break
                    actor = self.actors[slot]
                    pending[actor.score.remote(batch)] = (slot, actor, batch, tries)
                    load[slot] += 1
                if not pending:
                    break
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                slot, actor, batch, tries = pending.pop(ref)
                current = self.actors[slot] is actor  # False: this actor was already replaced
                try:
                    scores = ray.get(ref)
                except RayActorError as err:
                    if tries + 1 > self.max_retries:
                        raise RuntimeError(f"a batch lost {tries + 1} probe actors in a row; giving up") from err
                    if current:
                        self._replace(slot)
                        load[slot] = 0
                    retry.append((batch, tries + 1))
                    retried += 1
                    bar.set_postfix(replaced=self.replaced, retried=retried)
                    continue
                if current:
                    load[slot] -= 1
                save(batch, scores, seq)
                seq += 1
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        cpu = sum(c - cpu0.get(id(a), 0.0) for a, c in zip(self.actors, ray.get([a.cpu_seconds.remote() for a in self.actors])))
        self.stats = {
            "scored": todo, "seconds": seconds, "per_second": todo / seconds if seconds else 0.0,
            "retried": retried, "actor_cpu_seconds": cpu,  # replacements count from their start
        }

        return self._merge(ids, done, id_column, score_column, out)

    @staticmethod
    def _merge(ids: list, done: dict, id_column: str, score_column: str, out: str) -> datasets.Dataset:
        table = pa.table({id_column: ids, score_column: [done[i] for i in ids]})
        _write_table(table, storage.join(out, "scores.parquet"))
        return datasets.Dataset(table)
