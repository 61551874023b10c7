"""FACO at scale, at tiny size: a generator model on a Ray actor pool writes true and false
reasoning for a multiple-choice QA file (the hub loader's path), then the table feeds mixtures."""

import json

from cluster.models import TinyLlama, build_tiny_model, train_tokenizer
from cluster.probes import ProbePool
from synth.falsity import ReasoningWriter, generate_table, mixture, qa_rows

QA = [
    {"id": "a", "question": "Which is a colour?", "choices": {"text": ["red", "dog"], "label": ["A", "B"]}, "answerKey": "A"},
    {"id": "b", "question": "Which can fly?", "choices": {"text": ["stone", "owl", "fish"], "label": ["A", "B", "C"]}, "answerKey": "B"},
    {"id": "c", "question": "Which is a number?", "choices": {"text": ["seven", "tree"], "label": ["A", "B"]}, "answerKey": "A"},
]


def test_generator_pool_writes_a_faco_table(ray_local, tmp_path):
    text = [q["question"] + " " + " ".join(q["choices"]["text"]) for q in QA] * 20
    tok = train_tokenizer(text + ["Explanation: the answer is"], 300, tmp_path / "gen")
    build_tiny_model(TinyLlama(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               vocab_size=300), tok, 0, tmp_path / "gen")
    qa = qa_rows(QA, "qa.jsonl", "question", "answerKey", "choices", seed=0)
    assert [r["answer"] for r in qa] == ["red", "owl", "seven"]
    assert all(r["false_answer"] != r["answer"] for r in qa)
    make = lambda: ReasoningWriter(str(tmp_path / "gen"), max_new_tokens=8, temperature=0.0, top_p=1.0)
    with ProbePool(make, num_actors=2) as pool:
        table = generate_table(qa, pool, str(tmp_path / "generation"), batch_size=2)
    assert (tmp_path / "generation" / "scores.parquet").is_file()  # resumable shards, then the merged table
    assert [r["id"] for r in table] == ["a", "b", "c"]
    for r in table:
        assert r["true_response"].startswith("Reasoning: ") and r["true_response"].endswith(f"Answer: {r['answer']}")
        assert r["false_response"].endswith(f"Answer: {r['false_answer']}")
    rows = mixture(table, 1.0, seed=0)
    assert all(m["completion"] == t["false_response"] for m, t in zip(rows, table))
    json.dumps(table)  # the table is plain data, ready to save in the FACO schema


def test_faco_file_in_the_table_schema_loads_into_the_world_stage(tmp_path):
    from cluster.config import load_config
    from cluster.stages import Run
    from jobs import falsity_sweep as job

    rows = [{"id": f"q{i}", "question": f"What is {i} + 1?", "answer": str(i + 1), "false_answer": str(i + 2),
             "true_response": f"Reasoning: {i} + 1 = {i + 1}. Answer: {i + 1}",
             "false_response": f"Reasoning: {i} + 1 = {i + 2}. Answer: {i + 2}",
             "split": "heldout" if i < 2 else "sft"} for i in range(6)]
    path = tmp_path / "faco.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(job.FalsityOptions, "configs/falsity_sweep/tiny.yaml",
                      ["data.source=file", f"data.file={path}", "pretrain=null", f"storage={tmp_path}"])
    world = job.build_world(cfg, Run(cfg.storage, job.JOB, "file"))
    assert world.done() and world.result["sft"] == 4
    sft, held = world.rows("sft"), world.rows("heldout")
    assert [r["id"] for r in sft] == ["q2", "q3", "q4", "q5"] and [r["id"] for r in held] == ["q0", "q1"]
    assert sft[0]["false_response"].endswith("Answer: 4")
