"""Held-out scores of one student (Montessori-Instruct's comparison of students).

Per evaluation item, the token-mean NLL of the reference answer (and the mean over every answer
token of the set); where the data has exact answers (the synthetic world), whether the student's
generated answer is exactly right; and lm-evaluation-harness benchmarks when configured. Runs as a
Ray task on any node: the model, tokenizer and evaluation table come in as URIs.
"""

from __future__ import annotations

import json

from pydantic import Field

from cluster.config import Options
from evals.harness import HarnessOptions


class EvalOptions(Options):
    """How each final student is judged."""

    max_new_tokens: int = Field(40, gt=0, description="generation budget per answer (world)")
    batch_size: int = Field(32, gt=0, description="evaluation batch size")
    num_cpus: float = Field(1, gt=0, description="logical CPUs per evaluation task")
    num_gpus: float = Field(0, ge=0, description="GPUs per evaluation task")
    device: str = Field("cpu", description="device evaluation runs on (auto: spread over the task's GPUs)")
    dtype: str | None = Field(None, description="torch dtype the students are evaluated in; null: as saved")
    harness: HarnessOptions | None = Field(None, description="lm-evaluation-harness benchmarks (cluster presets); null: none")


def evaluate_student(model: str, tokenizer: str, evaluation: str, opts: EvalOptions, max_length: int) -> dict:
    """Scores of the student at `model` on the prompt-completion table at `evaluation` (URIs):
    heldout_loss, item_loss, and (exact answers) accuracy, answered_rate, item_correct; harness
    results as a JSON string under `harness` when configured."""
    import torch

    from cluster.models import load_model, load_tokenizer
    from cluster.stages import fetch, read_rows
    from evals.qa import generate
    from influence.lookahead import batched, n_tokens, to_device, token_nll
    from influence.warmup import tokenize_sft
    from synth.world import parse_answer

    model_dir = fetch(model)
    rows = read_rows(evaluation)
    tok = load_tokenizer(fetch(tokenizer))
    student = load_model(model_dir, dtype=opts.dtype, device=opts.device).eval()
    examples = [tokenize_sft(tok, r["prompt"], r["completion"], max_length) for r in rows]
    item_loss, total, count = [], 0.0, 0
    with torch.no_grad():
        for b in batched(examples, opts.batch_size, tok.pad_token_id):
            b = to_device(b, student)
            nll = token_nll(student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
            per = (b["labels"][:, 1:] != -100).sum(1).clamp(min=1)
            item_loss += (nll.sum(1) / per).double().cpu().tolist()
            total += float(nll.double().sum())
            count += n_tokens(b)
    out = {"heldout_loss": total / count, "item_loss": item_loss, "accuracy": None, "answered_rate": None,
           "item_correct": []}
    if rows and rows[0].get("answer") is not None:
        answers = [parse_answer(t) for t in generate(student, tok, [r["prompt"] for r in rows], opts.max_new_tokens,
                                                     opts.batch_size)]
        correct = [a == r["answer"] for a, r in zip(answers, rows)]
        out.update(accuracy=sum(correct) / len(correct), answered_rate=sum(a is not None for a in answers) / len(answers),
                   item_correct=correct)
    if opts.harness is not None:
        from evals.harness import evaluate_with_harness

        out["harness"] = json.dumps(evaluate_with_harness(model_dir, opts.harness, opts.device))
    return out
