"""Robust fine-tuning data: perturbed training copies (the augmentation arm) and the perturbed
evaluation suite, both from `synth.perturb`'s families, deterministic by seed.

Only the question is perturbed: a person's name (`person`) and a table question's choices stay as
they are, so a perturbed question still has one right answer, the same as the clean one's.
"""

from __future__ import annotations

import random
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from cluster.config import Options
from synth.perturb import check_family, perturb
from synth.world import format_prompt


# a list of perturbation family names, each checked against synth.perturb.FAMILIES (config validation)
Families = Annotated[list[str], AfterValidator(lambda v: [check_family(f) for f in v])]


class AugmentOptions(Options):
    """Perturbed copies of the SFT questions, added to the clean table (every clean row stays)."""

    families: Families = Field(min_length=1, description="perturbation families the copies draw from (synth.perturb.FAMILIES)")
    share: float = Field(ge=0, le=1, description="share of the clean rows that get a perturbed copy")
    rate: tuple[float, float] = Field(description="each copy's rate is drawn uniformly from [low, high], within [0, 1]")

    @model_validator(mode="after")
    def _rate(self):
        lo, hi = self.rate
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"rate [{lo}, {hi}]: expected 0 <= low <= high <= 1")
        return self


def _keep(row: dict) -> tuple[str, ...]:
    return (row["person"],) if row.get("person") else ()


def _sft_row(row: dict, question: str) -> dict:
    return {"id": row["id"], "prompt": format_prompt(question, row.get("choices")), "completion": row["true_response"]}


def clean_rows(table: list[dict]) -> list[dict]:
    """The plain SFT table: every question with its true response."""
    return [_sft_row(r, r["question"]) | {"family": "clean"} for r in table]


def augmented_rows(table: list[dict], opts: AugmentOptions, seed: int) -> list[dict]:
    """The clean table plus perturbed copies of `share` of its rows (family and rate drawn per row)."""
    rng = random.Random(f"augment:{seed}")
    out = clean_rows(table)
    for i, r in enumerate(table):
        family, rate = rng.choice(opts.families), rng.uniform(*opts.rate)
        if rng.random() < opts.share:
            q = perturb(r["question"], family, rate, seed * 1_000_003 + i, keep=_keep(r))
            out.append(_sft_row(r, q) | {"id": f"{r['id']}~{family}", "family": family})
    rng.shuffle(out)
    return out


def evaluation_suite(heldout: list[dict], families: list[str], strengths: list[float], seed: int) -> list[dict]:
    """Every held-out question clean and under every family at every strength: rows qid (the
    question's id), family ("clean" for the clean copy), strength, prompt, answer. The same suite
    scores every arm."""
    cells = [("clean", 0.0), *((f, s) for f in families for s in strengths)]
    return [{"qid": r["id"], "family": f, "strength": s, "answer": r["answer"],
             "prompt": format_prompt(r["question"] if f == "clean" else
                                     perturb(r["question"], f, s, seed * 1_000_003 + i, keep=_keep(r)), r.get("choices"))}
            for f, s in cells for i, r in enumerate(heldout)]
