"""EK-FAC influence with factors for every linear module, by kronfluence (Grosse et al. 2023):
LinFAC's comparison arm, through kronfluence's own `Task` and `Analyzer`, not a re-implementation.

The task matches influence.linfac's definitions so the two differ only in their curvature:
training loss = the summed response-token NLL of each example (labels sampled from the model when
kronfluence fits the Fisher), measurement f(q) = the summed response-token NLL of the queries, so
a positive score means training on z lowers the queries' loss (supports the behaviour). Tracked
modules: every nn.Linear inside the attention and feed-forward blocks (q, k, v, o, gate, up, down),
the part of the network LinFAC covers; damping, as LinFAC's, is `damping` x the mean corrected
eigenvalue, per module.

kronfluence is installed without its declared dependencies (Makefile): it names torchvision,
whose PyPI wheels replace this project's torch; it never imports it.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from typing import Sequence

import torch
from torch import Tensor, nn

from influence import linfac as L
from influence.lookahead import Example, collate


def _task(model: nn.Module):
    from kronfluence.task import Task

    tracked = [n for n, _ in L.sublayer_linears(model)]

    class ResponseLoss(Task):
        def compute_train_loss(self, batch, model, sample: bool = False) -> Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = L.sampled_labels(logits, batch["labels"], None) if sample else batch["labels"]
            return L._summed_nll(logits, labels)

        def compute_measurement(self, batch, model) -> Tensor:
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return ResponseLoss(), tracked


class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


@contextlib.contextmanager
def _relative_damping(factor: float):
    """kronfluence damps by an absolute value or, with `damping_factor=None`, by its constant 0.1
    x each module's mean corrected eigenvalue: set that constant to ours for the scoring call."""
    from kronfluence.factor import config

    old, config.HEURISTIC_DAMPING_SCALE = config.HEURISTIC_DAMPING_SCALE, factor
    try:
        yield
    finally:
        config.HEURISTIC_DAMPING_SCALE = old


def ekfac_influence(model: nn.Module, train: Sequence[Example], queries: Sequence[Example], *,
                    contrast: Sequence[Example] = (), damping: float = L.DAMPING, batch_size: int = 32,
                    seed: int = 0) -> tuple[Tensor, dict]:
    """I(z, Q) for every training example (queries summed; minus the same for `contrast`: scores
    are linear in the measurement's gradient), and {"fit_s", "score_s", "factor_numbers", "modules"}."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    if not damping > 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    torch.manual_seed(seed)  # kronfluence's label sampling draws from torch's global RNG
    task, tracked = _task(model)
    model = prepare_model(model.eval(), task)
    loader = DataLoaderKwargs(collate_fn=collate, num_workers=0)
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as out:
        an = Analyzer("ekfac", model, task, cpu=True, disable_tqdm=True, output_dir=out)
        an.set_dataloader_kwargs(loader)
        t0 = time.perf_counter()
        an.fit_all_factors("f", _Examples(train), per_device_batch_size=batch_size,
                           factor_args=FactorArguments(strategy="ekfac"))
        t1 = time.perf_counter()
        with _relative_damping(damping):
            measured = [*queries, *contrast]
            an.compute_pairwise_scores("s", "f", _Examples(measured), _Examples(train), per_device_query_batch_size=len(measured),
                                       per_device_train_batch_size=batch_size, score_args=ScoreArguments(damping_factor=None))
        t2 = time.perf_counter()
        pairwise = an.load_pairwise_scores("s")["all_modules"]  # [queries + contrast, train]
        scores = pairwise[: len(queries)].sum(0) - pairwise[len(queries) :].sum(0)
        factors = an.load_all_factors("f")
        numbers = sum(v.numel() for name in ("activation_eigenvectors", "gradient_eigenvectors")
                      for v in factors[name].values())
    return scores.double(), {"fit_s": t1 - t0, "score_s": t2 - t1, "factor_numbers": numbers, "modules": len(tracked)}
