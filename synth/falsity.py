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
