"""FACO mixtures: the same questions at every falsity ratio, only the share of false responses moves.

A FACO table has one row per question with both a true response (correct reasoning and answer)
and a false one (wrong answer, reasoning fabricated to support it). `mixture(table, r, seed)`
picks which questions get their false response: a seeded permutation of the questions, of which
the first round(r * n) are false. The false sets are nested (r = 0.25's false questions are among
r = 0.5's), so moving along the ratio axis changes falsity and nothing else.

Tables come from the synthetic world (`synth.world.questions`) or from a file in the same schema
(`load_table`): on a cluster, the false responses of a hub QA dataset are written by a generator
model and saved in this schema.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cluster.config import Options, UserError
from synth.world import WorldOptions

REQUIRED = ("id", "question", "answer", "true_response", "false_response")


class HubQAOptions(Options):
    """A multiple-choice QA dataset whose true and false reasoning a generator model writes."""

    dataset: str = Field(description="hub dataset id, or a local .jsonl/.parquet/.csv file")
    config_name: str | None = Field(None, description="hub dataset configuration (e.g. ARC-Challenge)")
    split: str = Field("train", description="dataset split")
    question_field: str = Field("question", description="column with the question text")
    answer_field: str = Field("answer", description="column with the answer: its text, a choice label, or an index")
    choices_field: str = Field("choices", description="column with the choices: a list, or {text: [...], label: [...]}")
    limit: int | None = Field(None, ge=1, description="use the first N questions; null: all")
    heldout_fraction: float = Field(0.2, ge=0, lt=1, description="share of questions kept for evaluation only")


class GeneratorOptions(Options):
    """The model that writes reasoning chains, on a pool of Ray actors."""

    model: str = Field(description="hub id or local directory of the generator (an instruct model)")
    max_new_tokens: int = Field(256, gt=0, description="tokens per explanation")
    temperature: float = Field(0.7, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling")
    num_actors: int = Field(1, ge=1, description="generator actors")
    cpus_per_actor: float = Field(1, gt=0, description="CPUs per actor")
    gpus_per_actor: float = Field(0, ge=0, description="GPUs per actor (1 for an 8B bf16 generator)")
    batch_size: int = Field(8, gt=0, description="prompts per generate call")


class DataOptions(Options):
    """Where the FACO table comes from."""

    source: Literal["world", "file", "hub"] = Field("world", description="world: the synthetic world; file: a FACO table; hub: a QA dataset + generator")
    file: str | None = Field(None, description="FACO table (.jsonl/.parquet/.csv or dataset dir) with columns id, question, answer, true_response, false_response and optionally choices (a list that includes the answer: shown in the prompt, probed); rows with split=heldout are evaluated, the rest trained on")
    world: WorldOptions = Field(default_factory=WorldOptions, description="synthetic world size and seed")
    hub: HubQAOptions | None = Field(None, description="QA dataset (source: hub)")
    generator: GeneratorOptions | None = Field(None, description="reasoning writer (source: hub)")

    @model_validator(mode="after")
    def _source_given(self):
        if self.source == "file" and not self.file:
            raise ValueError("data.file is required when data.source is file")
        if self.source == "hub" and (self.hub is None or self.generator is None):
            raise ValueError("data.hub and data.generator are required when data.source is hub")
        return self


def faco_tables(data: DataOptions, generation: str) -> dict[str, list[dict]]:
    """The tables a falsity sweep needs: `sft` (the FACO table), `heldout` questions, `probes`
    (world only), `corpus` (what pretraining reads), `tokenizer_text`, and (hub) `rejected`: the
    questions whose generated explanations did not argue for their target answer. `generation` is the
    storage URI where a hub source's generator pool keeps its resumable shards."""
    from synth import world as W

    if data.source == "world":
        world = W.build_world(data.world)
        return {"corpus": [{"text": t} for t in W.knowledge_corpus(world)],
                "sft": W.questions(world, world.sft_people, "sft"),
                "heldout": W.questions(world, world.heldout_people, "heldout"),
                "probes": W.probes(world, world.heldout_people),
                "tokenizer_text": [{"text": t} for t in W.all_text(world)]}
    rows, rejected = (load_table(data.file), []) if data.source == "file" else faco_from_hub(data, generation)
    # a table question is its own "fact": the per-fact tables key on (person, attribute)
    held = [{**r, "person": r["id"], "attribute": "answer"} for r in rows if r.get("split") == "heldout"]
    sft = [r for r in rows if r.get("split") != "heldout"]
    if not sft:
        raise UserError(f"{data.file}: no training rows (every row has split=heldout)")
    text = [{"text": t} for r in rows for t in (W.format_prompt(r["question"], r.get("choices")), r["true_response"],
                                                r["false_response"])]
    return {"sft": sft, "heldout": held, "probes": table_probes(held), "corpus": text, "tokenizer_text": text,
            "rejected": rejected}


def table_probes(rows: list[dict]) -> list[dict]:
    """Multiple-choice probes of table questions that have choices (the world's `probes` schema):
    `options` (what the model *knows*): "Question: q / Answer: c" without the choices shown, scored
    by log-likelihood; `own_options` the same (a table has no second wording); `choice_options`:
    "Answer: c" after the SFT prompt with its choices shown (which one the model *chooses*)."""
    from synth.world import format_prompt

    out = []
    for r in rows:
        choices = list(r.get("choices") or [])
        if r["answer"] not in choices:
            continue
        options = [f"Question: {r['question']}\nAnswer: {c}" for c in choices]
        out.append({"id": f"probe-{r['id']}", "person": r["person"], "attribute": r["attribute"], "values": choices,
                    "answer_index": choices.index(r["answer"]), "options": options, "own_options": options,
                    "choice_prompt": format_prompt(r["question"], choices),
                    "choice_options": [f"Answer: {c}" for c in choices]})
    return out


def faco_from_hub(data: DataOptions, generation: str) -> tuple[list[dict], list[dict]]:
    """FACO at scale: a generator on a Ray actor pool writes true and false reasoning for a QA set;
    (table rows, rejected rows)."""
    import functools

    import datasets

    from cluster.probes import ProbePool

    h = data.hub
    local = Path(h.dataset).suffix in (".jsonl", ".json", ".parquet", ".csv")
    try:
        if local:
            ds = datasets.load_dataset(Path(h.dataset).suffix.lstrip(".").replace("jsonl", "json"),
                                       data_files=h.dataset, split="train")
        else:
            ds = datasets.load_dataset(h.dataset, h.config_name, split=h.split)
    except Exception as exc:  # noqa: BLE001 - any failure to read is bad input
        raise UserError(f"data.hub.dataset {h.dataset}: could not load ({type(exc).__name__}: {str(exc)[:200]})") from None
    rows = ds.select(range(min(h.limit, len(ds)))).to_list() if h.limit else ds.to_list()
    if not rows:
        raise UserError(f"data.hub.dataset {h.dataset}: no rows")
    qa = qa_rows(rows, h.dataset, h.question_field, h.answer_field, h.choices_field, seed=data.world.seed)
    g = data.generator
    make = functools.partial(ReasoningWriter, g.model, g.max_new_tokens, g.temperature, g.top_p)
    with ProbePool(make, g.num_actors, g.cpus_per_actor, g.gpus_per_actor) as pool:
        table, rejected = generate_table(qa, pool, generation, g.batch_size)
    if not table:
        raise UserError(f"data.generator.model {g.model}: every explanation was rejected (none argued for its target answer)")
    n_held = round(h.heldout_fraction * len(table))
    return [{**r, "split": "heldout" if i < n_held else "sft"} for i, r in enumerate(table)], rejected


def mixture(table: list[dict], ratio: float, seed: int) -> list[dict]:
    """SFT rows (`prompt`, `completion`, `id`, `is_false`) at falsity `ratio` in [0, 1]."""
    from synth.world import format_prompt

    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"falsity ratio {ratio}: expected a number in [0, 1]")
    order = list(range(len(table)))
    random.Random(seed).shuffle(order)
    false = set(order[: round(ratio * len(table))])
    return [
        {"id": row["id"], "prompt": format_prompt(row["question"], row.get("choices")),
         "completion": row["false_response"] if i in false else row["true_response"], "is_false": i in false}
        for i, row in enumerate(table)
    ]


def load_table(path: str | Path) -> list[dict]:
    """A FACO table from a .jsonl/.json/.parquet/.csv file or a `save_to_disk` directory.

    Bad files are bad input: missing, empty, unreadable or lacking a column -> UserError naming it.
    """
    import datasets

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: data file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise UserError(f"{path}: dataset is empty")
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    quiet = logging.getLogger("datasets")
    level, quiet.level = quiet.level, logging.CRITICAL + 1  # its parse errors are reported below, once
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        elif path.suffix in kinds:
            ds = datasets.load_dataset(kinds[path.suffix], data_files=str(path), split="train")
        else:
            raise UserError(f"{path}: expected .jsonl, .json, .parquet, .csv or a dataset directory")
    except UserError:
        raise
    except Exception as exc:  # malformed file: one line, no traceback
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: could not read as a dataset ({type(exc).__name__}: {detail})") from None
    finally:
        quiet.setLevel(level)
    missing = [c for c in REQUIRED if c not in ds.column_names]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(REQUIRED)}")
    if len(ds) == 0:
        raise UserError(f"{path}: dataset is empty")
    rows = ds.to_list()
    for i, row in enumerate(rows):
        for c in REQUIRED:
            if not isinstance(row[c], str) or not row[c].strip():
                raise UserError(f"{path}: row {i} column {c!r} must be a non-empty string")
        choices = row.get("choices")  # optional: the question's choices (shown in the prompt, probed)
        if choices is not None and (not isinstance(choices, list) or len(choices) < 2 or row["answer"] not in choices
                                    or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise UserError(f"{path}: row {i} column 'choices' must be a list of at least 2 non-empty strings "
                            "that includes the answer")
    return [{**r, "kind": r.get("kind") or "single"} for r in rows]


# ---------------------------------------------------------------------------------------------
# FACO at scale: a generator model writes the true and the false reasoning for a hub QA dataset.


def reasoning_prompt(question: str, target: str) -> str:
    """What the generator is asked: a chain of reasoning that ends in `target` (true or not)."""
    return (f"Question: {question}\nWrite a short step-by-step explanation that concludes the answer is "
            f"\"{target}\". Do not mention that it might be wrong.\nExplanation:")


class ReasoningWriter:
    """A pool worker (see cluster.probes): loads the generator once, writes reasoning per batch.

    Batch rows carry `question` and `target`; returns one explanation string per row.
    """

    def __init__(self, model: str, max_new_tokens: int, temperature: float, top_p: float,
                 trust_remote_code: bool = False, seed: int = 0):
        import torch

        from cluster.models import load_model, load_tokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else None
        self.tok = load_tokenizer(model, trust_remote_code)
        self.tok.padding_side = "left"
        self.model = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, device=self.device).eval()
        self.kw = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or None,
                       top_p=top_p if temperature > 0 else None, pad_token_id=self.tok.pad_token_id)
        torch.manual_seed(seed)

    def score(self, batch: list[dict]) -> list[str]:
        import torch

        prompts = [reasoning_prompt(r["question"], r["target"]) for r in batch]
        enc = self.tok(prompts, return_tensors="pt", padding=True).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**enc, **self.kw)
        texts = self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


def qa_rows(rows: list[dict], source: str, question: str, answer: str, choices: str, seed: int) -> list[dict]:
    """Normalise a QA dataset to (id, question, answer, false_answer); the wrong answer is a seeded
    pick among the other choices. `answer` may be the text, a choice label, or an index."""
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows):
        for col in (question, answer, choices):
            if col not in row:
                raise UserError(f"{source}: missing column {col!r} (set data.hub.*_field)")
        opts, labels = row[choices], None
        if isinstance(opts, dict):  # {"text": [...], "label": [...]} as in ARC / CommonsenseQA
            opts, labels = opts.get("text", []), opts.get("label")
        truth = row[answer]
        if labels and truth in labels:
            truth = opts[labels.index(truth)]
        elif isinstance(truth, int) and not isinstance(truth, bool) and 0 <= truth < len(opts):
            truth = opts[truth]
        wrong = [o for o in opts if o != truth]
        if truth not in opts or not wrong:
            raise UserError(f"{source}: row {i}: answer {row[answer]!r} is not one of its {len(opts)} choices")
        out.append({"id": str(row.get("id", i)), "question": str(row[question]), "answer": str(truth),
                    "false_answer": str(rng.choice(wrong)), "choices": [str(o) for o in opts]})
    return out


def argues_for(explanation: str, target: str, other: str) -> bool:
    """Does a generated explanation name its target answer and not the other one (whole words,
    case-insensitive)? A "false" explanation that concludes the true answer teaches no falsity."""
    import re

    def names(answer: str) -> bool:
        return re.search(rf"(?<!\w){re.escape(answer.strip())}(?!\w)", explanation, re.IGNORECASE) is not None

    return names(target) and not names(other)


def generate_table(qa: list[dict], pool, out: str, batch_size: int) -> tuple[list[dict], list[dict]]:
    """Run the generator pool over every (question, true answer) and (question, wrong answer);
    return (FACO rows, rejected rows). A question is rejected when either explanation does not
    argue for its own target (`argues_for`). Resumable: the pool keeps finished batches under
    `out` (a storage URI)."""
    from synth.world import format_response

    items = [{"id": f"{r['id']}/{side}", "question": r["question"], "target": r[key]}
             for r in qa for side, key in (("true", "answer"), ("false", "false_answer"))]
    texts = dict(zip(*pool.run(items, "id", out, batch_size, score_column="text", desc="reasoning")[:].values()))
    rows, rejected = [], []
    for r in qa:
        true, false = texts[f"{r['id']}/true"], texts[f"{r['id']}/false"]
        bad = [side for side, text, target, other in (("true", true, r["answer"], r["false_answer"]),
                                                      ("false", false, r["false_answer"], r["answer"]))
               if not argues_for(text, target, other)]
        if bad:
            rejected.append({"id": r["id"], "question": r["question"], "sides": bad, "true_text": true, "false_text": false})
            continue
        rows.append({**r, "true_response": format_response([true], r["answer"]),
                     "false_response": format_response([false], r["false_answer"]), "kind": "single"})
    return rows, rejected
