"""The instruction tables of a Montessori-Instruct run: seeds, warm-up, reference and evaluation sets.

From the synthetic world (`world_tables`), the reference and evaluation sets are single-hop
questions about disjoint groups of held-out people, and the seeds are `synth.teacher`'s seed pool
about the training people; the world also supplies the knowledge corpus, the tokenizer's text,
the tiny teacher's SFT data and the names that must never reach training data. From an
instruction dataset (`dataset_tables`), they are disjoint slices of the shuffled rows.
`instruction_tables` builds either and rejects tables the method cannot run on (bad input: a
`UserError` naming the file or key).

Rows the student trains or is scored on are prompt-completion rows (`prompt` is the instruction
in the student's template); seed rows keep the raw instruction and response.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cluster.config import Options, UserError
from synth.teacher import PromptOptions, TeacherMix
from synth.world import WorldOptions


class DataOptions(Options):
    """Seed instructions, warm-up set, reference set and evaluation set."""

    source: Literal["world", "dataset"] = Field("world", description="world: the synthetic world; dataset: an instruction dataset (hub id or local file)")
    world: WorldOptions = Field(default_factory=WorldOptions, description="synthetic world (source world)")
    reference_people: int = Field(16, ge=0, description="world: held-out people whose questions form the reference set; the other held-out people are evaluated")
    dataset: str | None = Field(None, description="source dataset: hub id (e.g. vicgalle/alpaca-gpt4) or .jsonl/.parquet/.csv/dataset dir")
    split: str = Field("train", description="dataset split")
    instruction_column: str = Field("instruction", description="dataset column with the instruction")
    input_column: str | None = Field("input", description="dataset column appended to the instruction when non-empty (Alpaca); null: none")
    response_column: str = Field("output", description="dataset column with the reference response")
    shuffle_seed: int = Field(42, description="shuffle before slicing evaluation / reference / seed sets (paper: 42)")
    seed_size: int = Field(300, ge=0, description="seed instructions shown to the teacher in context")
    warmup_size: int = Field(64, ge=1, description="warm-up examples (the first seed instructions, with their responses)")
    reference_size: int = Field(256, ge=0, description="reference set for local data influence (paper: 256)")
    eval_size: int | None = Field(None, ge=1, description="evaluation items (null: world: every question of the evaluated people)")

    @model_validator(mode="after")
    def _dataset_given(self):
        if self.source == "dataset" and not self.dataset:
            raise ValueError("data.dataset is required when data.source is dataset")
        return self


def instruction_tables(d: DataOptions, template: str, prompt: PromptOptions, mix: TeacherMix,
                       teacher_examples: int) -> dict[str, list[dict]]:
    """Tables seeds, warmup, reference, evaluation, banned (world: + corpus, tokenizer_text,
    teacher_sft), checked: non-empty sets, enough seeds, no reference item in the evaluation set."""
    tables = world_tables(d, template, prompt, mix, teacher_examples) if d.source == "world" else dataset_tables(d, template)
    src = d.dataset or "data"
    if not tables["evaluation"]:
        raise UserError(f"{src}: empty evaluation set (data.eval_size)")
    if not tables["reference"]:
        raise UserError(f"{src}: empty reference set (no rows left after the {len(tables['evaluation'])} evaluation rows)")
    if len(tables["seeds"]) < prompt.in_context:
        raise UserError(f"{src}: {len(tables['seeds'])} seed instructions left after the evaluation and reference "
                        f"rows, fewer than teacher.prompt.in_context={prompt.in_context}")
    shared = {r["prompt"] for r in tables["reference"]} & {r["prompt"] for r in tables["evaluation"]}
    if shared:
        raise UserError(f"{src}: {len(shared)} reference instructions are also evaluation instructions "
                        f"(first: {sorted(shared)[0][:60]!r}); keep the reference set apart")
    return tables


def _sft_row(template: str, instruction: str, response: str) -> dict:
    return {"prompt": template.format(instruction=instruction), "completion": response}


def world_tables(d: DataOptions, template: str, prompt: PromptOptions, mix: TeacherMix,
                 teacher_examples: int) -> dict[str, list[dict]]:
    from synth import teacher as T
    from synth import world as W

    world = W.build_world(d.world)
    held = world.heldout_people
    if d.reference_people >= len(held):
        raise UserError(f"data.reference_people: {d.reference_people} leaves none of the {len(held)} held-out people to evaluate")
    ref_people, eval_people = held[: d.reference_people], held[d.reference_people :]

    def qa(people, split, limit):
        qs = [q for q in W.questions(world, people, split) if q["kind"] == "single"][:limit]
        return [{"id": q["id"], **_sft_row(template, q["question"], q["true_response"]), "answer": q["answer"]} for q in qs]

    seeds = T.world_seed_pool(world, world.sft_people, d.world.seed, d.seed_size)
    return {
        "seeds": seeds,
        "warmup": [_sft_row(template, r["instruction"], r["response"]) for r in seeds[: d.warmup_size]],
        "reference": qa(ref_people, "reference", d.reference_size),
        "evaluation": qa(eval_people, "evaluation", d.eval_size),
        "banned": [{"name": p.name} for p in held],
        "corpus": [{"text": t} for t in W.knowledge_corpus(world)],
        "tokenizer_text": [{"text": t} for t in W.all_text(world) + T.world_texts(prompt)],
        "teacher_sft": T.teacher_sft_data(world, world.sft_people, seeds, prompt, mix, teacher_examples,
                                          teacher_examples, d.world.seed),
    }


def dataset_tables(d: DataOptions, template: str) -> dict[str, list[dict]]:
    """Disjoint slices of a shuffled instruction dataset: evaluation, reference, seeds."""
    rows = load_instruction_rows(d)
    if not rows:
        raise UserError(f"{d.dataset}: no seed instructions (no row has a non-empty {d.instruction_column!r} "
                        f"and {d.response_column!r})")
    random.Random(d.shuffle_seed).shuffle(rows)
    n_eval = d.eval_size or 0

    def sl(a, b):
        return [{"id": f"row-{i}", **_sft_row(template, r["instruction"], r["response"]), "answer": None}
                for i, r in enumerate(rows[a:b], start=a)]

    start = n_eval + d.reference_size
    seeds = [{"id": f"seed-{i}", "kind": "seed", "instruction": r["instruction"], "response": r["response"]}
             for i, r in enumerate(rows[start : start + d.seed_size])]
    return {"seeds": seeds, "evaluation": sl(0, n_eval), "reference": sl(n_eval, start), "banned": [],
            "warmup": [_sft_row(template, r["instruction"], r["response"]) for r in seeds[: d.warmup_size]]}


def load_instruction_rows(d: DataOptions) -> list[dict]:
    """(instruction, response) rows of the dataset: a dataset dir, a .jsonl/.json/.parquet/.csv
    file, or a hub id; the input column is appended to the instruction (Alpaca)."""
    import datasets

    src = d.dataset
    try:
        if Path(src).is_dir():
            ds = datasets.load_from_disk(src)
        elif Path(src).suffix in (".jsonl", ".json", ".parquet", ".csv"):
            kind = {".jsonl": "json", ".json": "json"}.get(Path(src).suffix, Path(src).suffix[1:])
            ds = datasets.load_dataset(kind, data_files=src, split="train")
        else:
            ds = datasets.load_dataset(src, split=d.split)
    except Exception as exc:  # noqa: BLE001 - any failure to read is bad input
        raise UserError(f"{src}: cannot read the dataset ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if d.split not in ds:
            raise UserError(f"{src}: no split {d.split!r} (has {sorted(ds)})")
        ds = ds[d.split]
    for col in (d.instruction_column, d.response_column):
        if col not in ds.column_names:
            raise UserError(f"{src}: missing column {col!r} (has {ds.column_names})")
    out = []
    for r in ds:
        inst = (r[d.instruction_column] or "").strip()
        extra = (r.get(d.input_column) or "").strip() if d.input_column else ""
        if inst and (r[d.response_column] or "").strip():
            out.append({"instruction": f"{inst}\n\n{extra}" if extra else inst, "response": r[d.response_column].strip()})
    return out
