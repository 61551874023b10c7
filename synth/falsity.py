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

from cluster.config import UserError

REQUIRED = ("id", "question", "answer", "true_response", "false_response")


def mixture(table: list[dict], ratio: float, seed: int) -> list[dict]:
    """SFT rows (`prompt`, `completion`, `id`, `is_false`) at falsity `ratio` in [0, 1]."""
    from synth.world import format_prompt

    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"falsity ratio {ratio}: expected a number in [0, 1]")
    order = list(range(len(table)))
    random.Random(seed).shuffle(order)
    false = set(order[: round(ratio * len(table))])
    return [
        {"id": row["id"], "prompt": format_prompt(row["question"]),
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
    rows = [{**r, "kind": r.get("kind") or "single"} for r in rows]
    return rows


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
                    "false_answer": str(rng.choice(wrong))})
    return out


def generate_table(qa: list[dict], pool, out_dir: str, batch_size: int) -> list[dict]:
    """Run the generator pool over every (question, true answer) and (question, wrong answer);
    return FACO rows. Resumable: the pool keeps finished batches in `out_dir`."""
    from synth.world import format_response

    items = [{"id": f"{r['id']}/{side}", "question": r["question"], "target": r[key]}
             for r in qa for side, key in (("true", "answer"), ("false", "false_answer"))]
    texts = dict(zip(*pool.run(items, "id", out_dir, batch_size, score_column="text")[:].values()))
    return [{**r, "true_response": format_response([texts[f"{r['id']}/true"]], r["answer"]),
             "false_response": format_response([texts[f"{r['id']}/false"]], r["false_answer"]), "kind": "single"}
            for r in qa]
