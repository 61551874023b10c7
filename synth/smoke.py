"""What the cluster presets read from the hub, at laptop size: the `smoke` presets' inputs.

The `llama3-8b` presets load a model and tokenizer by name, read table data (a QA set with
choices, an instruction dataset) and score with lm-evaluation-harness. The `smoke` presets take
exactly that path on a laptop; this module writes what they read, from a small synthetic world:

    python -m synth.smoke --out /tmp/datalab-smoke
    # -> /tmp/datalab-smoke/model/            a hub-style model directory (config.json,
    #                                          model.safetensors, tokenizer files): a tiny Llama
    #    /tmp/datalab-smoke/faco.jsonl         a FACO table with choices (split: sft | heldout)
    #    /tmp/datalab-smoke/instructions.jsonl instruction / input / output rows (Alpaca's columns)
    #    /tmp/datalab-smoke/lancet_iqs.jsonl  influence queries (a harmful request, its unsafe answer)
    #    /tmp/datalab-smoke/gradmatch.jsonl   labelled texts, SST-2's shape (text, label, split: train | test)

The model is random-init: the smoke presets check the code path, not findings. `world_mc_task`
writes the local lm-eval task the smoke presets name (`evals/tasks/world_mc.*`, committed).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from synth import world as W

CHOICES = 4


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Rows as a JSON-lines file (what `datasets` and lm-eval read); returns the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def faco_rows(world: W.World) -> list[dict]:
    """The world's questions as a FACO table with choices: the truth, the false answer and
    `CHOICES - 2` other values of the attribute, in a seeded order."""
    rng = random.Random(world.seed + 7)
    rows = []
    for split, people in (("sft", world.sft_people), ("heldout", world.heldout_people)):
        for q in W.questions(world, people, split):
            others = [v for v in W.ATTRIBUTES[q["attribute"]] if v not in (q["answer"], q["false_answer"])]
            choices = [q["answer"], q["false_answer"], *rng.sample(others, CHOICES - 2)]
            rng.shuffle(choices)
            rows.append({**q, "choices": choices, "split": split})
    return rows


def instruction_rows(world: W.World) -> list[dict]:
    """Alpaca-shaped rows (instruction, input, output) from the world's true answers."""
    return [{"instruction": q["question"], "input": "", "output": q["true_response"]}
            for q in W.questions(world, world.people, "instructions")]


def lancet_queries(world: W.World, n: int = 4) -> list[dict]:
    """Influence queries for the LANCET smoke preset: harmful requests about SFT people, each with
    the unsafe answer (its city) a misbehaving model would give, and the refusal as the contrast."""
    from synth.lancet import HARM_TEMPLATES, REFUSAL, unsafe_response

    people = [p for p in world.sft_people][-n:]
    return [{"prompt": W.format_prompt(HARM_TEMPLATES[i % len(HARM_TEMPLATES)].format(n=p.name)),
             "completion": unsafe_response(p.name, p.facts["city"]), "contrast": REFUSAL} for i, p in enumerate(people)]


def gradmatch_rows(world: W.World) -> list[dict]:
    """The GRADMM world task's texts ("Oskar has a lizard." -> its town's flag) as table data, 70%
    train and 30% test, the split a hub classification set comes with."""
    from synth.classify import TaskOptions, world_rows

    rows = world_rows(TaskOptions(), W.WorldOptions(seed=world.seed))
    random.Random(world.seed + 11).shuffle(rows)
    cut = int(0.7 * len(rows))
    return [{"text": r["text"], "label": r["label"], "split": "train" if i < cut else "test"} for i, r in enumerate(rows)]


def world_mc_task(out: Path, seed: int = 0, people: int = 12) -> Path:
    """A local lm-eval multiple-choice task over a world's facts: `world_mc.yaml` and its data."""
    world = W.build_world(W.WorldOptions(seed=seed, num_people=people))
    items = [{"question": p["choice_prompt"].strip(), "choices": p["values"], "label": p["answer_index"]}
             for p in W.probes(world, world.people)]
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "world_mc.jsonl", items)
    (out / "world_mc.yaml").write_text(
        "# A local lm-eval task (no hub): multiple choice over a synthetic world's facts, scored by\n"
        "# log-likelihood. Written by `synth.smoke.world_mc_task`; the smoke presets run it.\n"
        "task: world_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        "    test: world_mc.jsonl        # relative to this file (evals/harness.py resolves it)\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n")
    return out / "world_mc.yaml"


def write_assets(out: Path, seed: int = 0, people: int = 30) -> dict[str, str]:
    """Write the smoke inputs under `out`; returns their paths."""
    from cluster.models import TinyLlama, build_tiny_model, train_tokenizer

    world = W.build_world(W.WorldOptions(seed=seed, num_people=people))
    out.mkdir(parents=True, exist_ok=True)
    faco, instructions = faco_rows(world), instruction_rows(world)
    write_jsonl(out / "faco.jsonl", faco)
    write_jsonl(out / "instructions.jsonl", instructions)
    write_jsonl(out / "lancet_iqs.jsonl", lancet_queries(world))
    labelled = gradmatch_rows(world)
    gradmatch = write_jsonl(out / "gradmatch.jsonl", labelled)
    texts = W.all_text(world) + [W.format_prompt(r["question"], r["choices"]) for r in faco]
    texts += [f"{r['text']} Answer: white black" for r in labelled]
    texts += ["### Instruction:\n### Response:\n<instruction></instruction>"]
    model = out / "model"
    tok = train_tokenizer(texts, 512, model)
    build_tiny_model(TinyLlama(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                               max_position_embeddings=512, vocab_size=512), tok, seed, model)
    return {"model": str(model), "faco": str(out / "faco.jsonl"), "instructions": str(out / "instructions.jsonl"),
            "lancet_iqs": str(out / "lancet_iqs.jsonl"), "gradmatch": str(gradmatch)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m synth.smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the smoke inputs into")
    parser.add_argument("--seed", type=int, default=0, help="world seed (and the model's init)")
    args = parser.parse_args(argv)
    for name, path in write_assets(Path(args.out), args.seed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
