"""The probe pool on a real local Ray (loopback only): exact scores equal the in-process ones,
every id comes back exactly once, also when an actor dies mid-stream, and a re-run resumes."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import datasets
import pytest
import torch
from ray import cloudpickle
from transformers import LlamaConfig, LlamaForCausalLM

from cluster.probes import ProbePool
from influence.lookahead import ExactScorer, batched, candidate_loss, collate, load_warm, save_warm

VOCAB = 300
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this file


def make_example(g: torch.Generator, quality: float = 1.0) -> dict:
    """Reverse-and-shift the prompt, with noise on a share (1 - quality) of response tokens."""
    n = int(torch.randint(4, 13, (1,), generator=g))
    prompt = torch.randint(3, VOCAB // 2, (n,), generator=g)
    resp = prompt.flip(0) + VOCAB // 2 - 3
    resp = torch.where(torch.rand(n, generator=g) > quality, torch.randint(3, VOCAB, (n,), generator=g), resp)
    ids = torch.cat([torch.tensor([1]), prompt, torch.tensor([2]), resp, torch.tensor([2])])
    labels = ids.clone()
    labels[: n + 2] = -100
    return {"input_ids": ids.tolist(), "labels": labels.tolist()}


def make_scorer(warm_dir: str, ref: list[dict]) -> ExactScorer:
    """Runs on the actor, once: load the warm student and AdamW state into memory."""
    torch.set_num_threads(1)
    return ExactScorer(load_warm(warm_dir), batched(ref, 8))


class ExitOnce:
    """Scores like ExactScorer, but the first actor to see `kill_id` dies without a word."""

    def __init__(self, warm_dir: str, ref: list[dict], kill_id: int, marker: str):
        self.inner, self.kill_id, self.marker = make_scorer(warm_dir, ref), kill_id, Path(marker)

    def score(self, batch: list[dict]) -> list[float]:
        if any(r["id"] == self.kill_id for r in batch) and not self.marker.exists():
            self.marker.touch()
            os._exit(1)
        return self.inner.score(batch)


def plain_influence(warm_dir: str, ref: list[dict], cands: list[dict]) -> list[float]:
    """The paper's probe written plainly, sharing no code with influence.lookahead: per candidate
    a fresh model from disk and a fresh torch AdamW loaded with the warm state, one step on HF's
    own loss, the reference loss one item at a time (token-weighted)."""
    def fresh():
        model = LlamaForCausalLM.from_pretrained(warm_dir, attn_implementation="eager")
        opt = torch.optim.AdamW(model.parameters())  # default lr: load_state_dict must restore it
        opt.load_state_dict(torch.load(Path(warm_dir) / "optimizer.pt", weights_only=True))
        return model, opt

    def ref_loss(model) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for ex in ref:
                n = sum(x != -100 for x in ex["labels"][1:])
                total += float(model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss) * n
                count += n
        return total / count

    model, _ = fresh()
    L0 = ref_loss(model.eval())
    scores = []
    for c in cands:
        model, opt = fresh()
        model.train()
        model(input_ids=torch.tensor([c["input_ids"]]), labels=torch.tensor([c["labels"]])).loss.backward()
        opt.step()
        scores.append(L0 - ref_loss(model.eval()))
    return scores


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A tiny warm student on disk, its reference set, candidates (qualities spread evenly, so
    their scores are apart) and their scores by the plain loop."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    for _ in range(20):
        opt.zero_grad()
        candidate_loss(model, collate([make_example(g) for _ in range(4)])).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    warm_dir = tmp_path_factory.mktemp("warm")
    save_warm(warm_dir, model, opt)
    ref = [make_example(g) for _ in range(16)]
    cands = [{"id": i, **make_example(g, quality=i / 11)} for i in range(12)]  # smallest gap 3.6e-5, noise 3e-7
    expected = dict(zip((c["id"] for c in cands), plain_influence(str(warm_dir), ref, cands)))
    torch.set_num_threads(threads)
    return str(warm_dir), ref, cands, expected


def check(ds: datasets.Dataset, expected: dict[int, float]) -> None:
    """Each id exactly once, and each score nearer its own plain score than any other's: the
    tolerance is a third of the smallest gap between two scores."""
    assert sorted(ds["id"]) == sorted(expected)
    values = sorted(expected.values())
    gap = min(b - a for a, b in zip(values, values[1:]))
    assert gap > 3e-6, f"candidates too alike to tell apart ({gap:.1e})"
    for i, s in zip(ds["id"], ds["score"]):
        assert abs(s - expected[i]) < gap / 3, (i, s, expected[i], gap)


def test_pool_scores_equal_in_process_and_resume(ray_local, warm, tmp_path):
    warm_dir, ref, cands, expected = warm
    with ProbePool(functools.partial(make_scorer, warm_dir, ref), num_actors=2) as pool:
        # a first run that stops after 5 candidates, as if the driver had died there
        pool.run(cands[:5], id_column="id", out=str(tmp_path), batch_size=4, progress=False)
        ds = pool.run(cands, id_column="id", out=str(tmp_path), batch_size=4, progress=False)
        assert pool.stats["scored"] == len(cands) - 5  # the 5 on storage were not scored again
    check(ds, expected)
    assert ds["id"] == [c["id"] for c in cands]  # input order
    assert (tmp_path / "scores.parquet").is_file() and not list(tmp_path.rglob("*.tmp*"))


def test_actor_death_loses_and_duplicates_nothing(ray_local, warm, tmp_path):
    warm_dir, ref, cands, expected = warm
    make = functools.partial(ExitOnce, warm_dir, ref, kill_id=7, marker=str(tmp_path / "died"))
    items = datasets.Dataset.from_list(cands)
    with ProbePool(make, num_actors=2) as pool:
        ds = pool.run(items, id_column="id", out=str(tmp_path / "out"), batch_size=3, progress=False)
        assert (tmp_path / "died").exists() and pool.replaced == 1 and pool.stats["retried"] >= 1
    check(ds, expected)
    shards = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "shards" / "*.parquet"), split="train")
    assert sorted(shards["id"]) == sorted(expected)  # nothing written twice either
