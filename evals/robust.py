"""A model on the perturbed evaluation suite (`synth.robust.evaluation_suite`): exact-match accuracy
on the clean questions and per perturbation family and strength."""

from __future__ import annotations

from collections import defaultdict


def cell(family: str, strength: float) -> str:
    """The metric name of one suite cell: `clean`, or `<family>@<strength>` (typo@0.2)."""
    return "clean" if family == "clean" else f"{family}@{strength:g}"


def score_suite(model, tokenizer, suite: list[dict], max_new_tokens: int = 40, batch_size: int = 64) -> dict[str, float]:
    """Accuracy per suite cell. A prompt the perturbation left unchanged is generated once."""
    from evals.qa import generate, same
    from synth.world import parse_answer

    prompts = list(dict.fromkeys(r["prompt"] for r in suite))
    answers = dict(zip(prompts, generate(model, tokenizer, prompts, max_new_tokens, batch_size)))
    hits: dict[str, list[bool]] = defaultdict(list)
    for r in suite:
        hits[cell(r["family"], r["strength"])].append(same(parse_answer(answers[r["prompt"]]), r["answer"]))
    return {k: sum(v) / len(v) for k, v in hits.items()}


def evaluate_robust(model_dir: str, phase: str, *, suite: str, max_new_tokens: int, device: str,
                    batch_size: int = 64) -> dict[str, float]:
    """A learner run's evaluation after a phase (on rank 0): `score_suite` on the suite table (URI)."""
    from cluster.models import load_model, load_tokenizer
    from cluster.stages import fetch, read_rows

    local = fetch(model_dir)
    model = load_model(local).to(device)
    return score_suite(model, load_tokenizer(local), read_rows(suite), max_new_tokens, batch_size)
