"""Recall baselines LinFAC is compared with (LANCET's question: do influence functions find the
examples behind a behaviour better than cheap alternatives?).

- `grad_dot`: TracIn at the final checkpoint = the gradient dot product grad L(Q) . grad L(z)
  over every parameter (no curvature). Per-example values come from one forward-mode pass per
  batch: the directional derivative of each example's loss along grad L(Q) is exactly its dot
  product with it, so no per-example gradient is ever stored.
- `bm25`: lexical retrieval (bm25s) of each training text against the queries' texts, scores
  summed over queries: what a practitioner would try first.
Both return one score per training example, higher = more responsible for the queries.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from influence.lookahead import Batch, to_device, token_nll


def _per_example_nll(logits: Tensor, labels: Tensor) -> Tensor:
    return token_nll(logits, labels).sum(1)


def grad_dot(model: nn.Module, train: Sequence[Batch], queries: Sequence[Batch], contrast: Sequence[Batch] = ()) -> Tensor:
    """grad M . grad L(z) for every training example (in order), M = L(Q) - L(contrast); losses
    summed over response tokens."""
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    for sign, batches in ((1.0, queries), (-1.0, contrast)):
        for q in batches:
            q = to_device(q, model)
            logits = model(input_ids=q["input_ids"], attention_mask=q["attention_mask"]).logits
            (sign * _per_example_nll(logits, q["labels"]).sum()).backward()
    direction = {n: p.grad.detach().clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    detached = {n: p.detach() for n, p in params.items()}
    out = []
    for b in train:
        b = to_device(b, model)

        def losses(p: dict[str, Tensor]) -> Tensor:
            logits = functional_call(model, p, kwargs=dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])).logits
            return _per_example_nll(logits, b["labels"])

        out.append(jvp(losses, (detached,), (direction,))[1].detach().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def bm25(train_texts: Sequence[str], query_texts: Sequence[str]) -> Tensor:
    """BM25 (bm25s, its default Lucene variant) of each training text, summed over the queries."""
    import bm25s

    index = bm25s.BM25()
    index.index([_words(t) for t in train_texts], show_progress=False)
    total = torch.zeros(len(train_texts), dtype=torch.float64)
    for q in query_texts:
        total += torch.as_tensor(index.get_scores(_words(q)), dtype=torch.float64)
    return total
