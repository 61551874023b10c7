"""The warm student that local data influence is measured against (Montessori-Instruct, step 1).

`warm_up_student` trains the student with AdamW on the warm-up set, the learning rate ramped
linearly to its peak over the whole warm-up (the paper's warmup_ratio 1.0), and stores the weights
*and* the optimizer state: a probe step continues exactly where the warm-up stopped. It runs as a
Ray task on any node: models come in as URIs (`cluster.stages.fetch`), and what it writes goes to
storage from a local temporary directory. `warm_scorer` is the probe actor's factory: the warm
state and the reference set, loaded once per actor (`influence.lookahead.ExactScorer`).

`tokenize_sft` is the one tokenization of a prompt-completion row (warm-up, probes, reference set,
evaluation), the same as TRL's SFT.
"""

from __future__ import annotations

import math
import random
import tempfile

from pydantic import Field

from cluster.config import Options


class WarmupOptions(Options):
    """Student warm-up (AdamW, linear ramp to the peak over the whole warm-up)."""

    learning_rate: float = Field(1e-3, gt=0, description="peak learning rate, reached at the last step (paper: 5e-6)")
    epochs: int = Field(6, ge=1, description="passes over the warm-up set")
    batch_size: int = Field(8, ge=1, description="examples per forward (micro-batch)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step: a step sees batch_size x grad_accum examples (paper: 32)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (paper: 0)")
    max_length: int = Field(128, gt=0, description="tokens per example")
    num_cpus: float = Field(1, gt=0, description="logical CPUs of the warm-up task")
    num_gpus: float = Field(0, ge=0, description="GPUs of the warm-up task (a student larger than one GPU: several, with device auto)")
    device: str = Field("cpu", description="cpu, cuda, or auto: the student's layers spread over the task's GPUs")
    dtype: str | None = Field(None, description="torch dtype of the student and its AdamW state (bfloat16 at 8B, as the paper); null: as saved")


def tokenize_sft(tokenizer, prompt: str, completion: str, max_length: int) -> dict:
    """As TRL's SFT tokenizes a prompt-completion row: prompt + completion + EOS, truncated, with
    the loss on completion tokens only (labels -100 on the prompt)."""
    ids = tokenizer(prompt + completion)["input_ids"]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    n = min(len(tokenizer(prompt)["input_ids"]), len(ids))
    return {"input_ids": ids, "labels": [-100] * n + ids[n:]}


def warm_up_student(model: str, tokenizer: str, rows: str, opts: WarmupOptions, seed: int, out: str) -> dict:
    """Warm up the student at `model` (URI, local dir or hub id) on the prompt-completion table at
    `rows` (a Parquet URI); store weights, AdamW state and tokenizer at `out` (a storage URI).
    Returns the steps, peak lr and first/last training loss."""
    import torch

    from cluster import storage
    from cluster.models import load_model, load_tokenizer
    from cluster.stages import fetch, read_rows
    from influence.lookahead import candidate_loss, collate, save_warm

    torch.manual_seed(seed)
    tok = load_tokenizer(fetch(tokenizer))
    student = load_model(fetch(model), attn_implementation="eager", dtype=opts.dtype, device=opts.device)
    examples = [tokenize_sft(tok, r["prompt"], r["completion"], opts.max_length) for r in read_rows(rows)]
    opt = torch.optim.AdamW(student.parameters(), lr=opts.learning_rate, weight_decay=opts.weight_decay)
    per_step = opts.batch_size * opts.grad_accum
    steps = opts.epochs * math.ceil(len(examples) / per_step)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / steps))
    rng, losses = random.Random(seed), []
    student.train()
    for _ in range(opts.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), per_step):
            step = order[i : i + per_step]
            micro = [step[j : j + opts.batch_size] for j in range(0, len(step), opts.batch_size)]
            total = 0.0
            for idx in micro:  # each micro-batch's token-mean loss, weighted by its share of the step's examples
                loss = candidate_loss(student, collate([examples[j] for j in idx], tok.pad_token_id)) * (len(idx) / len(step))
                loss.backward()
                total += loss.item()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total)
    with tempfile.TemporaryDirectory() as tmp:
        save_warm(tmp, student, opt)
        tok.save_pretrained(tmp)
        storage.upload(tmp, out)
    return {"steps": steps, "peak_lr": opt.param_groups[0]["lr"], "first_loss": losses[0], "last_loss": losses[-1]}


def warm_scorer(warm: str, reference: str, max_length: int, batch_size: int, device: str, loss_divisor: float = 1.0,
                at_once: int = 1):
    """A probe actor's scorer: the warm student and its AdamW state stored at `warm` (a URI, read
    once per node) and the reference table at `reference` (a Parquet URI), loaded into memory;
    `at_once` candidates scored together."""
    from cluster.models import load_tokenizer
    from cluster.stages import fetch, read_rows
    from influence.lookahead import ExactScorer, batched, load_warm

    local = fetch(warm)
    tok = load_tokenizer(local)
    state = load_warm(local, device=device, loss_divisor=loss_divisor, snapshot=False)  # in the dtype the warm-up saved
    ref = [tokenize_sft(tok, r["prompt"], r["completion"], max_length) for r in read_rows(reference)]
    ref.sort(key=lambda e: len(e["input_ids"]))  # batches of like lengths: little padding (the loss is a token sum)
    return ExactScorer(state, batched(ref, batch_size, tok.pad_token_id), at_once)
