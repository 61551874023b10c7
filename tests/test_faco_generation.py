"""FACO at scale, at tiny size: a generator model on a Ray actor pool writes true and false
reasoning for a multiple-choice QA file (the hub loader's path), then the table feeds mixtures."""

import json

from cluster.probes import ProbePool
from synth.falsity import ReasoningWriter, argues_for, generate_table, mixture, qa_rows
from synth.smoke import write_jsonl
from tests.conftest import tiny_llama

QA = [
    {"id": "a", "question": "Which is a colour?", "choices": {"text": ["red", "dog"], "label": ["A", "B"]}, "answerKey": "A"},
    {"id": "b", "question": "Which can fly?", "choices": {"text": ["stone", "owl", "fish"], "label": ["A", "B", "C"]}, "answerKey": "B"},
    {"id": "c", "question": "Which is a number?", "choices": {"text": ["seven", "tree"], "label": ["A", "B"]}, "answerKey": "A"},
]


class EchoWriter:
    """A generator stand-in that argues for its target, except on question b's false side, where
    it argues for the true answer (a generator that would not lie): that row must be rejected."""

    def score(self, batch: list[dict]) -> list[str]:
        return ["owl is the answer, as owls fly." if r["question"] == "Which can fly?" and r["target"] != "owl"
                else f"Step by step, the answer is {r['target']}." for r in batch]


def test_generator_pool_writes_a_faco_table(ray_local, tmp_path):
    text = [q["question"] + " " + " ".join(q["choices"]["text"]) for q in QA] * 20
    tiny_llama(text + ["Explanation: the answer is"], tmp_path / "gen")
    qa = qa_rows(QA, "qa.jsonl", "question", "answerKey", "choices", seed=0)
    assert [r["answer"] for r in qa] == ["red", "owl", "seven"]
    assert [r["false_answer"] for r in qa] == ["dog", "fish", "tree"]
    # a real (tiny, untrained) generator on 2 actors: one explanation per (question, target)
    make = lambda: ReasoningWriter(str(tmp_path / "gen"), max_new_tokens=8, temperature=0.0, top_p=1.0)
    items = [{"id": f"{r['id']}/{side}", "question": r["question"], "target": r[k]}
             for r in qa for side, k in (("true", "answer"), ("false", "false_answer"))]
    with ProbePool(make, num_actors=2) as pool:
        texts = pool.run(items, "id", str(tmp_path / "real"), 2, score_column="text")
    assert (tmp_path / "real" / "scores.parquet").is_file()  # resumable shards, then the merged table
    texts = texts[:]
    assert sorted(texts["id"]) == sorted(i["id"] for i in items)
    assert all(isinstance(t, str) for t in texts["text"])
    # the table: rows whose explanations argue for their targets; the rest are counted out
    with ProbePool(EchoWriter, num_actors=2) as pool:
        table, rejected = generate_table(qa, pool, str(tmp_path / "echo"), batch_size=2)
    assert [r["id"] for r in table] == ["a", "c"] and [r["id"] for r in rejected] == ["b"]
    assert rejected[0]["sides"] == ["false"]
    for r in table:
        assert r["true_response"] == f"Reasoning: Step by step, the answer is {r['answer']}. Answer: {r['answer']}"
        assert r["false_response"].endswith(f"Answer: {r['false_answer']}")
    rows = mixture(table, 1.0, seed=0)
    assert all(m["completion"] == t["false_response"] for m, t in zip(rows, table))
    json.dumps(table)  # the table is plain data, ready to save in the FACO schema


def test_an_explanation_must_name_its_target_and_not_the_other():
    assert argues_for("So the answer is Paris.", "Paris", "Lyon")
    assert not argues_for("So the answer is Lyon.", "Paris", "Lyon")
    assert not argues_for("Paris or Lyon, hard to say.", "Paris", "Lyon")
    assert argues_for("It is 10.", "10", "1")  # whole words: "1" is not in "10"
    assert not argues_for("It is 1.", "10", "1")


def test_faco_file_in_the_table_schema_loads_into_the_world_stage(tmp_path):
    from cluster.config import load_config
    from cluster.stages import Run
    from jobs import falsity_sweep as job
    from jobs.world_student import build_world

    rows = [{"id": f"q{i}", "question": f"What is {i} + 1?", "answer": str(i + 1), "false_answer": str(i + 2),
             "true_response": f"Reasoning: {i} + 1 = {i + 1}. Answer: {i + 1}",
             "false_response": f"Reasoning: {i} + 1 = {i + 2}. Answer: {i + 2}",
             "split": "heldout" if i < 2 else "sft"} for i in range(6)]
    path = write_jsonl(tmp_path / "faco.jsonl", rows)
    cfg = load_config(job.FalsityOptions, "configs/falsity_sweep/tiny.yaml",
                      ["data.source=file", f"data.file={path}", "pretrain=null", f"storage={tmp_path}"])
    world = build_world(cfg, Run(cfg.storage, job.JOB, "file"))
    assert world.done() and world.result["sft"] == 4
    sft, held = world.rows("sft"), world.rows("heldout")
    assert [r["id"] for r in sft] == ["q2", "q3", "q4", "q5"] and [r["id"] for r in held] == ["q0", "q1"]
    assert sft[0]["false_response"].endswith("Answer: 4")
    assert world.rows("probes") == []
    # a table without probes evaluates (QA metrics only; no knows/lie rates without probes)
    from evals.qa import evaluate_faco

    tiny_llama([r["text"] for r in world.rows("tokenizer_text")] * 5, tmp_path / "model")
    metrics = evaluate_faco(str(tmp_path / "model"), "sft", heldout=world.path("heldout.parquet"),
                            probes=world.path("probes.parquet"), max_new_tokens=8, device="cpu")
    assert set(metrics) == {"qa_accuracy", "reasoning_accuracy", "answered_rate", "valid_rate"}
    assert 0.0 <= metrics["qa_accuracy"] <= 1.0
