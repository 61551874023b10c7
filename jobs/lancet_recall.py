"""LANCET's recall phase, fanned out over Ray: the influence of every training example on the
influence queries, by LinFAC and by the comparison arms, and how well each ranking finds the
examples behind the behaviour.

LinFAC (`influence.linfac`) runs as four kinds of Ray task over contiguous data partitions:
`cov` (pass 1: the factor covariances), `lambda` (pass 2: the eigenvalue correction, given the
eigenbases), `query` (the queries' preconditioned pseudo-gradient) and `scores` (each training
example's score). Every task writes its result as a safetensors file under the recall stage on
storage and the driver adds them up once all partitions exist; a re-run (or a retry after a lost
worker) redoes only the partitions whose file is missing. Label draws are seeded by partition
name, so a redone partition gives the same sums.

Comparison arms on the same examples and queries, each one Ray task: EK-FAC over every linear
module (kronfluence, `influence.ekfac`), the gradient dot product (`influence.baselines.grad_dot`),
BM25 (`influence.baselines.bm25`, on the texts). Every arm measures the same thing: the queries'
unsafe answer's loss, minus the safe answer's on the same prompts when `contrast` is on.
"""

from __future__ import annotations

import math
import time
from typing import Any

from pydantic import Field

from cluster import storage
from cluster.config import Options, UserError
from cluster.stages import Stage
from influence import linfac as L

ARMS = ("linfac", "ekfac", "grad_dot", "bm25")


class RecallOptions(Options):
    """How influence is measured and where it runs."""

    damping: float = Field(L.DAMPING, gt=0, description="lambda, as a multiple of the mean corrected eigenvalue per "
                           "sublayer (per module for EK-FAC); must be > 0")
    contrast: bool = Field(True, description="measure the unsafe answer's loss minus the safe answer's on the same "
                           "prompts (what decides the behaviour); false: the unsafe answer's loss alone")
    samples: int = Field(1, ge=1, description="label draws per example in LinFAC's factor passes")
    partitions: int = Field(4, ge=1, description="data partitions of the LinFAC passes (one Ray task each, per pass)")
    batch_size: int = Field(16, ge=1, description="examples per forward pass")
    max_length: int = Field(128, gt=0, description="tokens per example (as the SFT's)")
    arms: list[str] = Field(list(ARMS), min_length=1, description=f"rankings computed: linfac first, then any of {', '.join(ARMS[1:])}")
    num_cpus: float = Field(1, gt=0, description="logical CPUs per recall task")
    num_gpus: float = Field(0, ge=0, description="GPUs per recall task")
    device: str = Field("cpu", description="device of the recall tasks (cuda with num_gpus)")

    def model_post_init(self, _ctx) -> None:
        if unknown := [a for a in self.arms if a not in ARMS]:
            raise ValueError(f"recall.arms: unknown arm {unknown[0]!r} (known: {', '.join(ARMS)})")
        if self.arms[0] != "linfac":
            raise ValueError("recall.arms: linfac comes first (the correction uses its ranking)")


# ----------------------------------------------------------------------------- inside the tasks


def _load(model: str, tokenizer: str, device: str):
    """Eager attention: LinFAC's attention input state reads the attention weights."""
    from cluster.models import load_model, load_tokenizer
    from cluster.stages import fetch

    m = load_model(fetch(model), attn_implementation="eager").to(device)
    return m.eval(), load_tokenizer(fetch(tokenizer))


def examples(tokenizer, rows: list[dict], max_length: int, completion: str = "completion") -> list[dict]:
    """Rows -> tokenised examples as TRL's SFT sees them (loss on the response only)."""
    from influence.warmup import tokenize_sft

    return [tokenize_sft(tokenizer, r["prompt"], r[completion], max_length) for r in rows]


def _batches(tokenizer, rows, opts: RecallOptions, completion: str = "completion"):
    from influence.lookahead import batched

    return batched(examples(tokenizer, rows, opts.max_length, completion), opts.batch_size, tokenizer.pad_token_id or 0)


def _save(uri: str, tensors: dict) -> None:
    from safetensors.torch import save

    storage.write_bytes(uri, save({k: v.contiguous() for k, v in tensors.items()}))


def _read(uri: str) -> dict:
    from safetensors.torch import load

    return load(storage.read_bytes(uri))


def linfac_task(kind: str, model: str, tokenizer: str, rows: list[dict], key: str, out: str, opts: RecallOptions,
                inputs: str | None = None) -> float:
    """One LinFAC task over a partition (`rows`); writes its result to `out`; returns its seconds."""
    import torch

    t0 = time.perf_counter()
    torch.manual_seed(0)
    m, tok = _load(model, tokenizer, opts.device)
    if kind == "cov":
        result = L.add_partials([L.covariance_sums(m, _batches(tok, rows, opts), f"{key}-s{i}") for i in range(opts.samples)])
    elif kind == "lambda":
        f = L.Factors.from_tensors(_read(inputs))
        result = L.add_partials([L.lambda_sums(m, _batches(tok, rows, opts), f, f"{key}-s{i}") for i in range(opts.samples)])
    elif kind == "query":  # rows: the influence queries
        g = L.pseudo_gradient(m, _batches(tok, rows, opts))
        if opts.contrast:
            c = L.pseudo_gradient(m, _batches(tok, rows, opts, "contrast"))
            g = {k: v - c[k] for k, v in g.items()}
        result = L.precondition(g, L.Factors.from_tensors(_read(inputs)), opts.damping)
    elif kind == "scores":
        result = {"scores": L.scores(m, _batches(tok, rows, opts), _read(inputs)).double()}
    else:
        raise ValueError(kind)
    _save(out, result)
    return time.perf_counter() - t0


def arm_task(arm: str, model: str, tokenizer: str, train: list[dict], iqs: list[dict], opts: RecallOptions) -> dict:
    """One comparison arm over the whole training set: {"scores": [...], "seconds": ..., ...}."""
    import torch

    from influence import baselines

    t0 = time.perf_counter()
    if arm == "bm25":
        from synth.lancet import texts

        scores = baselines.bm25(texts(train), [q["prompt"] + q["completion"] for q in iqs])
        return {"scores": scores.tolist(), "seconds": time.perf_counter() - t0}
    torch.manual_seed(0)
    m, tok = _load(model, tokenizer, opts.device)
    contrast = examples(tok, iqs, opts.max_length, "contrast") if opts.contrast else []
    if arm == "ekfac":
        from influence.ekfac import ekfac_influence

        scores, info = ekfac_influence(m, examples(tok, train, opts.max_length), examples(tok, iqs, opts.max_length),
                                       contrast=contrast, damping=opts.damping, batch_size=opts.batch_size)
        return {"scores": scores.tolist(), "seconds": time.perf_counter() - t0, **info}
    if arm == "grad_dot":
        from influence.lookahead import batched

        pad = tok.pad_token_id or 0
        scores = baselines.grad_dot(m, _batches(tok, train, opts), _batches(tok, iqs, opts),
                                    batched(contrast, opts.batch_size, pad) if contrast else ())
        return {"scores": scores.tolist(), "seconds": time.perf_counter() - t0}
    raise ValueError(arm)


# ----------------------------------------------------------------------------- the driver


def _remote(fn, opts: RecallOptions):
    import ray

    return ray.remote(num_cpus=opts.num_cpus, num_gpus=opts.num_gpus, max_retries=2)(fn)


def _partitions(rows: list[dict], n: int) -> list[list[dict]]:
    size = math.ceil(len(rows) / n)
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def linfac_recall(st: Stage, model: str, tokenizer: str, train: list[dict], iqs: list[dict], opts: RecallOptions) -> dict:
    """LinFAC scores of every training row (in order), fanned out; partial results under
    `<stage>/linfac/`. Returns {"scores", "fit_s", "score_s", "task_s", "factor_numbers"}."""
    import ray
    import torch

    task = _remote(linfac_task, opts)
    parts = _partitions(train, opts.partitions)

    def fan(kind: str, inputs: str | None = None) -> tuple[list[dict], float]:
        outs = [st.path("linfac", f"{kind}-{i}.safetensors") for i in range(len(parts))]
        todo = [i for i, o in enumerate(outs) if not storage.exists(o)]
        if todo:
            print(f"[recall] linfac {kind}: {len(todo)} of {len(parts)} partitions to run", flush=True)
        secs = ray.get([task.remote(kind, model, tokenizer, parts[i], f"p{i}", outs[i], opts, inputs) for i in todo])
        return [_read(o) for o in outs], float(sum(secs))

    t0 = time.perf_counter()
    cov, s1 = fan("cov")
    eig_uri = st.path("linfac", "eigenbases.safetensors")
    _save(eig_uri, L.Factors.from_covariances(L.add_partials(cov)).tensors())
    lam, s2 = fan("lambda", eig_uri)
    factors_uri = st.path("linfac", "factors.safetensors")
    _save(factors_uri, L.Factors.from_tensors(_read(eig_uri)).with_lambda(L.add_partials(lam)).tensors())
    t1 = time.perf_counter()
    query_uri = st.path("linfac", "query.safetensors")
    s3 = ray.get(task.remote("query", model, tokenizer, iqs, "q", query_uri, opts, factors_uri)) if not storage.exists(query_uri) else 0.0
    got, s4 = fan("scores", query_uri)
    t2 = time.perf_counter()
    scores = torch.cat([g["scores"] for g in got])
    numbers = sum(v.numel() for k, v in _read(factors_uri).items() if not k.endswith(".Lambda"))
    return {"scores": scores.tolist(), "fit_s": t1 - t0, "score_s": t2 - t1, "task_s": s1 + s2 + s3 + s4,
            "factor_numbers": numbers}


def recall_arms(st: Stage, model: str, tokenizer: str, train: list[dict], iqs: list[dict], opts: RecallOptions) -> dict[str, dict]:
    """Every arm of `opts.arms`: arm -> {"scores": [...], "seconds" or "fit_s"/"score_s", ...}.
    The comparison arms run as Ray tasks beside each other once LinFAC's fan-out is done."""
    import importlib.util

    import ray

    if "ekfac" in opts.arms and importlib.util.find_spec("kronfluence") is None:
        raise UserError("recall.arms: ekfac needs kronfluence, installed without its declared dependencies: pip install "
                        "--no-deps kronfluence==1.0.1 einconv==0.1.0 opt_einsum==3.4.0 (or leave ekfac out)")
    out = {"linfac": linfac_recall(st, model, tokenizer, train, iqs, opts)}
    task = _remote(arm_task, opts)
    others = [a for a in opts.arms if a != "linfac"]
    for arm, res in zip(others, ray.get([task.remote(a, model, tokenizer, train, iqs, opts) for a in others])):
        out[arm] = res
    return out


# ----------------------------------------------------------------------------- how well a ranking recalls


def average_precision(scores: list[float], relevant: list[bool]) -> float:
    """Area under the precision-recall curve as average precision: the mean, over relevant rows,
    of the precision among the rows ranked at or above it (higher score = ranked first)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, total = 0, 0.0
    for rank, i in enumerate(order, 1):
        if relevant[i]:
            hits += 1
            total += hits / rank
    return total / hits if hits else float("nan")


def recall_at(scores: list[float], relevant: list[bool], k: int) -> float:
    """Share of the relevant rows among the top k."""
    top = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
    n = sum(relevant)
    return sum(relevant[i] for i in top) / n if n else float("nan")


def recall_curve(scores: list[float], relevant: list[bool]) -> list[float]:
    """Recall after inspecting the top 1, 2, ... rows."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    n, hits, out = max(sum(relevant), 1), 0, []
    for i in order:
        hits += relevant[i]
        out.append(hits / n)
    return out


def recall_metrics(scores: list[float], relevant: list[bool], counteracting: list[bool]) -> dict[str, Any]:
    """AUPRC of the planted rows, recall at as many rows as are planted (R-precision) and at twice
    that, and how many counteracting rows (refusals) the most negative ranks hold."""
    n = sum(relevant)
    bottom = sorted(range(len(scores)), key=lambda i: scores[i])[:n]
    return {"auprc": average_precision(scores, relevant), "random_auprc": n / len(relevant),
            "recall@planted": recall_at(scores, relevant, n), "recall@2x": recall_at(scores, relevant, 2 * n),
            "bottom_counteracting": sum(counteracting[i] for i in bottom) / max(n, 1)}
