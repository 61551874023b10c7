"""A text-classification task as next-token prediction: `text + suffix` -> one verbalizer token.

GRADMM's experiments are of this kind (SST-2: a review + " It was" -> " great" / " bad"). Two
sources:

- `world`: short texts about the synthetic world's towns, "Oskar has a lizard.", whose class is a
  hidden property of the town (its flag: white or black), drawn per town from the world seed. The
  truth is known exactly, and the pretrained student has seen every town but never the property:
  only fine-tuning on labelled texts can teach it.
- `table`: a labelled dataset (a local .jsonl/.parquet/.csv file or a hub id): `text_field`,
  `label_field` (an index into `classes`), a split to draw real and dev examples from and a split
  that is only ever tested on (SST-2: train and validation).

Splits (disjoint): `real` (per class `real_per_class`: the target gradient, the few-shot demos and
the random-real-subset arm), `dev` (ρ selection) and `test` (reported accuracy; never seen by
generation or selection: the authors' scripts report on the split they select on).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cluster.config import Options, UserError
from synth.world import ATTRIBUTES, WorldOptions



class TaskOptions(Options):
    """The labelled task: where its texts come from, its classes and verbalizers, its splits."""

    source: Literal["world", "table"] = Field("world", description="world: texts about the synthetic world's towns; table: a labelled dataset")
    template: str = Field("{city} has a {pet}.", description="world: a text, from {city} (decides the class) and {pet} (noise)")
    dataset: str | None = Field(None, description="table: hub dataset id or a local .jsonl/.parquet/.csv file")
    config_name: str | None = Field(None, description="table: hub dataset configuration")
    text_field: str = Field("text", description="table: column with the text")
    label_field: str = Field("label", description="table: column with the class index")
    train_split: str = Field("train", description="table: split the real and dev examples come from")
    test_split: str = Field("test", description="table: split only ever tested on")
    classes: list[str] = Field(["white", "black"], min_length=2, description="class names, in label order")
    verbalizers: list[str] = Field([" white", " black"], min_length=2, description="per class, the word the model answers with: one token each")
    suffix: str = Field(" Answer:", min_length=1, description="appended to every text; the label is predicted after it")
    real_per_class: int = Field(16, ge=1, description="real examples per class (the target gradient's)")
    dev_per_class: int = Field(12, ge=1, description="dev examples per class (ρ selection)")
    test_per_class: int = Field(32, ge=1, description="test examples per class (at most)")
    seed: int = Field(0, description="seed of the splits (and, world: of the towns' classes)")

    @model_validator(mode="after")
    def _consistent(self):
        if len(self.verbalizers) != len(self.classes):
            raise ValueError(f"{len(self.classes)} classes but {len(self.verbalizers)} verbalizers")
        if len(set(self.verbalizers)) != len(self.verbalizers):
            raise ValueError("two classes share a verbalizer")
        if self.source == "table" and not self.dataset:
            raise ValueError("task.dataset is required when task.source is table")
        if self.source == "world":
            if "{city}" not in self.template:
                raise ValueError("task.template must mention {city}: the town decides the class")
            if len(self.classes) > len(ATTRIBUTES["city"]):
                raise ValueError(f"the world has {len(ATTRIBUTES['city'])} towns: at most that many classes")
        return self


def town_classes(opts: TaskOptions, world_seed: int) -> dict[str, int]:
    """Each town's class (a balanced draw from the world seed): what the world's texts encode."""
    towns = list(ATTRIBUTES["city"])
    random.Random(f"{world_seed}-flags").shuffle(towns)
    return {t: i % len(opts.classes) for i, t in enumerate(towns)}


def world_rows(opts: TaskOptions, world: WorldOptions) -> list[dict]:
    """Every text of the template over the world's towns and pets, labelled by its town."""
    classes = town_classes(opts, world.seed)
    return [{"text": opts.template.format(city=c, pet=p), "label": classes[c], "town": c}
            for c, p in itertools.product(ATTRIBUTES["city"], ATTRIBUTES["pet"])]


def table_rows(opts: TaskOptions) -> dict[str, list[dict]]:
    """The dataset's train and test splits as {text, label} rows."""
    import datasets

    def load(split: str) -> list[dict]:
        path = Path(opts.dataset)
        try:
            if path.suffix in (".jsonl", ".json", ".parquet", ".csv"):
                if not path.is_file():
                    raise UserError(f"task.dataset: {opts.dataset} does not exist")
                ds = datasets.load_dataset(path.suffix.lstrip(".").replace("jsonl", "json"), data_files=str(path), split="train")
                ds = ds.filter(lambda r: r.get("split", split) == split) if "split" in ds.column_names else ds
            else:
                ds = datasets.load_dataset(opts.dataset, opts.config_name, split=split)
        except (FileNotFoundError, ValueError, ConnectionError) as e:
            raise UserError(f"task.dataset: cannot read {opts.dataset} split {split}: {e}") from None
        missing = {opts.text_field, opts.label_field} - set(ds.column_names)
        if missing:
            raise UserError(f"task.dataset: {opts.dataset} has no column {sorted(missing)[0]}")
        return [{"text": r[opts.text_field], "label": int(r[opts.label_field])} for r in ds]

    return {"train": load(opts.train_split), "test": load(opts.test_split)}


def split_rows(opts: TaskOptions, world: WorldOptions | None, pool: int = 0) -> list[dict]:
    """The task's rows with `split` (real | dev | test | pool) and `id`; refuses a class without
    enough real examples (its target gradient would be empty) or labels outside the classes.
    `pool`: up to that many more training examples per class (table data: a real subset the size of
    a synthetic set larger than the real examples is drawn from real + pool)."""
    rng = random.Random(opts.seed)
    if opts.source == "world":
        pool = world_rows(opts, world)
        rng.shuffle(pool)
        train, test = pool, None
    else:
        tables = table_rows(opts)
        train, test = tables["train"], tables["test"]
        rng.shuffle(train)
    bad = {r["label"] for r in train + (test or [])} - set(range(len(opts.classes)))
    if bad:
        raise UserError(f"task: label {sorted(bad)[0]} is not a class index (classes: {', '.join(opts.classes)})")
    out: list[dict] = []
    for c, name in enumerate(opts.classes):
        rows = [r for r in train if r["label"] == c]
        need = opts.real_per_class + opts.dev_per_class + (0 if test is not None else 1)
        if len(rows) < need:
            raise UserError(f"task: class {name} has {len(rows)} examples; it needs {opts.real_per_class} real + "
                            f"{opts.dev_per_class} dev" + ("" if test is not None else " + at least 1 test"))
        cut = opts.real_per_class + opts.dev_per_class
        parts = {"real": rows[: opts.real_per_class], "dev": rows[opts.real_per_class: cut]}
        parts["test"] = rows[cut: cut + opts.test_per_class] if test is None else \
            [r for r in test if r["label"] == c][: opts.test_per_class]
        if test is not None and pool:
            parts["pool"] = rows[cut: cut + pool]
        for split, part in parts.items():
            out += [{**r, "split": split, "id": f"{split}-{name}-{i}"} for i, r in enumerate(part)]
    return out
