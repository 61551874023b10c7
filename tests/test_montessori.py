"""Montessori-Instruct: the parts in-process (seconds), bad input (exit code 2, one line), and the
whole job on the tiny world (slow: real Ray, Train, TRL DPO, probe pool, W&B offline).

The slow test asserts the paper's finding on world 4 (the preset was chosen on worlds 0-3,
docs/montessori_grid.md), 2 seeds, with a margin: the student SFT'd on data from the DPO-trained
teacher beats the student SFT'd on as many examples from the untrained teacher on held-out loss,
and influence pairs beat random pairs. (Held-out exact accuracy is reported, not asserted: on
128 items it moves by more than the teachers' difference.) Then the same run again skips every
stage. (A changed DPO option redoing exactly the DPO stage is tested at small size, with storage
on S3, in tests/test_storage.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import cli
from cluster.stages import read_rows
from influence.warmup import tokenize_sft
from jobs import montessori as job
from synth import teacher as T
from synth import world as W
from synth.smoke import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/montessori/tiny.yaml")

# The tiny preset with one iteration (the preset runs two): 2 seeds, the random-pair ablation.
# World 4: the preset's numbers were chosen on worlds 0-3 (configs/montessori/grid-tiny.yaml).
TEST_OVERRIDES = ["iterations=1", "seeds=[0,1]", "ablation=true", "max_concurrent_trials=2", "data.world.seed=4"]
RUN_ID = "e2e"

# Margins the slow test asserts (held-out loss is the token-mean NLL of the evaluation answers).
# The grid's warm-up-14 cells on worlds 0-3 gained 0.036 to 0.055 (docs/montessori_grid.md): the
# mean gain must keep about half of that.
LOSS_MARGIN = 0.02      # mean over seeds: Montessori-teacher student below the untrained-teacher student
ABLATION_MARGIN = 0.02  # mean over seeds: influence pairs below random pairs


# ---------------------------------------------------------------------------------------------
# the parts


def cand(pid: str, j: int, raw: str) -> dict:
    return {"id": f"{pid}-{j}", "prompt_id": pid, "prompt": f"prompt {pid}", "raw": raw, "instruction": raw,
            "response": "r", "kept": True}


def test_pairs_are_every_positive_times_negative_within_a_prompt():
    cands = [cand("a", j, f"a{j}") for j in range(4)] + [cand("b", j, f"b{j}") for j in range(4)]
    infl = {"a-0": 0.3, "a-1": 0.1, "a-2": -0.2, "a-3": -0.1,  # 2 x 2 = 4 pairs
            "b-0": 0.1, "b-1": 0.2, "b-2": 0.0, "b-3": 0.4}    # no negative: dropped
    pairs = T.preference_pairs(cands, infl)
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {("a0", "a2"), ("a0", "a3"), ("a1", "a2"), ("a1", "a3")}
    assert all(p["prompt"] == "prompt a" and p["margin"] > 0 for p in pairs)
    rnd = T.random_pairs(cands, infl, seed=0)
    assert len(rnd) == 4 and {p["prompt_id"] for p in rnd} == {"a"}
    assert all(p["chosen"] != p["rejected"] for p in rnd)


def test_prompts_show_distinct_seeds_and_parsing_filters():
    opts = T.PromptOptions()
    seeds = [f"Where does P{i} live?" for i in range(20)]
    rows = T.teacher_prompts(seeds, 5, opts, seed=0)
    assert len(rows) == 5 and len({r["prompt_id"] for r in rows}) == 5
    for r in rows:
        assert len(set(r["examples"])) == 8 and all(f"- {e}\n" in r["prompt"] for e in r["examples"])
        assert r["prompt"].endswith("New question:\n")
    with pytest.raises(ValueError, match="no seed instructions"):
        T.teacher_prompts([], 1, opts, seed=0)
    assert T.extract_instruction("\n  Where does A live?\nmore", opts) == "Where does A live?"
    tagged = opts.model_copy(update={"instruction_pattern": r"<instruction>(.*?)</instruction>"})
    assert T.extract_instruction("why: x <instruction> Sum 2+2. </instruction>", tagged) == "Sum 2+2."
    assert T.extract_instruction("no tags", tagged) is None
    assert T.keep_instruction("Where does A live?", opts)
    assert not T.keep_instruction("Draw a map of A.", opts)  # paper's keyword filter
    assert not T.keep_instruction("Hi", opts)  # shorter than 5 characters
    assert not T.keep_instruction("Where does Vorla Quen live?", opts, banned_names=["Vorla Quen"])


def test_world_teacher_data_and_classifier():
    world = W.build_world(W.WorldOptions(num_people=40))
    pool = T.world_seed_pool(world, world.sft_people, 0, 30)
    assert {r["kind"] for r in pool} == {"single", "multi", "bio"}
    assert all(T.classify(world, r["instruction"], r["response"])["kind"] == r["kind"] for r in pool)
    assert all(T.classify(world, r["instruction"], r["response"])["correct"] for r in pool)
    rows = T.teacher_sft_data(world, world.sft_people, pool, T.PromptOptions(), T.TeacherMix(), 200, 200, 0)
    assert len(rows) == 400
    held = {p.name for p in world.heldout_people}
    assert not any(n in r["prompt"] + r["completion"] for r in rows for n in held), "held-out people leaked"
    kinds = [T.classify(world, r["completion"], "")["kind"] for r in rows if r["prompt"].startswith("Write")]
    mix = T.TeacherMix()  # the instruction kinds follow the mix (200 draws: within 0.1)
    for kind in T.KINDS:
        assert abs(kinds.count(kind) / len(kinds) - getattr(mix, kind)) < 0.1, (kind, kinds.count(kind))
    assert kinds.count("unknown") > 0
    p = world.sft_people[0]
    q = W.QUESTIONS["city"].format(n=p.name)
    good = W.format_response([W.fact(p.name, "city", p.facts["city"])], p.facts["city"])
    assert T.classify(world, q, good) == {"kind": "single", "correct": True, "attribute": "city"}
    assert T.classify(world, q, good.replace(p.facts["city"], "Nowhere"))["correct"] is False


def test_tokenize_sft_matches_trl(tmp_path):
    from cluster.models import train_tokenizer

    world = W.build_world(W.WorldOptions(num_people=20, bios_per_person=2))
    tok = train_tokenizer(W.all_text(world), 400, tmp_path)
    ex = tokenize_sft(tok, "Question: Where does A live?\n", "Reasoning: A lives in Brisk. Answer: Brisk", 128)
    n = len(tok("Question: Where does A live?\n")["input_ids"])
    assert ex["labels"][:n] == [-100] * n and ex["labels"][n:] == ex["input_ids"][n:]
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["input_ids"][0] == tok.bos_token_id
    assert len(tokenize_sft(tok, "Q\n", "x " * 200, 32)["input_ids"]) == 32


def test_warm_up_accumulates_micro_batches_into_one_step(tmp_path):
    """The 8B preset reaches the paper's 32 examples per warm-up step with micro-batches in one
    process: batch 4 x accumulation 2 steps as batch 8 does (same steps, nearly the same weights;
    micro-batches weigh by examples, not tokens), and unlike batch 4 alone (twice the steps)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from influence.warmup import WarmupOptions, warm_up_student
    from tests.conftest import tiny_llama

    world = W.build_world(W.WorldOptions(num_people=20, bios_per_person=2))
    model = tiny_llama(W.all_text(world), tmp_path / "m", vocab_size=400)
    p = world.sft_people
    rows = [{"prompt": f"Question: Where does {x.name} live?\n", "completion": f"Answer: {x.facts['city']}"} for x in p[:16]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")

    def warm(batch: int, accum: int) -> tuple[int, dict]:
        out = tmp_path / f"w{batch}x{accum}"
        stats = warm_up_student(str(model), str(model), str(tmp_path / "rows.parquet"),
                                WarmupOptions(learning_rate=1e-2, epochs=2, batch_size=batch, grad_accum=accum), 0, str(out))
        return stats["steps"], load_file(out / "model.safetensors")

    def dist(a: dict, b: dict) -> float:
        return float(sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5)

    (s8, w8), (s42, w42), (s4, w4) = warm(8, 1), warm(4, 2), warm(4, 1)
    assert (s8, s42, s4) == (4, 4, 8)
    assert dist(w42, w8) < 0.05 * dist(w4, w8), (dist(w42, w8), dist(w4, w8))

def test_generation_on_actors_equals_in_process(ray_local, tmp_path):
    """The teacher writes the same candidates on a pool of Ray actors as in one process (every
    prompt batch carries its own sampling seed), a resumed pool gives them again from its shards,
    and the paper's filters apply to both passes."""
    import functools

    from cluster.probes import ProbePool
    from tests.conftest import tiny_llama

    world = W.build_world(W.WorldOptions(num_people=20, bios_per_person=2))
    tiny_llama(W.all_text(world) + T.world_texts(T.PromptOptions()), tmp_path / "teacher", vocab_size=400)
    seeds = [q["question"] for q in W.questions(world, world.sft_people, "seed")][:20]
    prompts = T.teacher_prompts(seeds, 6, T.PromptOptions(), seed=0)
    short = T.SamplingOptions(temperature=1.0, top_p=0.9, max_new_tokens=8)
    make = functools.partial(T.TeacherGenerator, str(tmp_path / "teacher"), str(tmp_path / "teacher"), T.PromptOptions(),
                             short, short, banned_names=["Qxq"], batch_size=8)

    def write(num_actors: int, out: str) -> list[dict]:
        with ProbePool(make, num_actors=num_actors) as pool:
            return T.pool_writer(pool, str(tmp_path / out), k=3, batch_size=2)(prompts, 7)

    local, pooled = write(0, "local"), write(2, "pooled")
    assert local == pooled and len(local) == 18
    assert write(0, "pooled") == pooled  # every batch read back from the shards
    assert [r["id"] for r in local] == [f"{p['prompt_id']}-{j}" for p in prompts for j in range(3)]
    for r in local:
        assert r["kept"] == (T.keep_instruction(r["instruction"] or None, T.PromptOptions(), ["Qxq"])
                             and bool(r["response"]))


# ---------------------------------------------------------------------------------------------
# bad input: exit code 2, one line, no traceback, no stage marked done


def run_cli(capsys, *argv):
    code = cli.main("jobs.montessori", job.__doc__, job.MontessoriOptions, job.plan, job.run, list(argv))
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("override, expected", [
    ("data.seed_size=0", "data.seed_size: no seed instructions"),
    ("teacher.k=1", "teacher.k: Input should be greater than or equal to 2"),
    ("data.reference_size=0", "data.reference_size: empty reference set"),
    ("data.reference_people=0", "data.reference_size: empty reference set"),
    ("dpo.beta=-1", "dpo.beta: Input should be greater than 0"),
    ("stop_after=it3-dpo", "stop_after: this preset has no stage 'it3-dpo'"),
    ("probes.at_once=4 probes.device=auto", "needs the student on one device"),
    ("teacher.instruction_sampling.top_p=1.5", "teacher.instruction_sampling.top_p"),
])
def test_bad_option(capsys, override, expected):
    code, err = run_cli(capsys, "--config", TINY, *override.split(), "--dry-run")
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err


def test_dry_run_of_the_8b_preset_needs_no_gpu_or_network(capsys):
    code = cli.main("jobs.montessori", job.__doc__, job.MontessoriOptions, job.plan, job.run,
                    ["--config", str(ROOT / "configs/montessori/llama3-8b.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "meta-llama/Meta-Llama-3-8B-Instruct" in out and "vicgalle/alpaca-gpt4" in out
    assert "500 prompts x k=4 = 2000 candidates" in out and "probed on 4 actor(s)" in out and "ZeRO-3" in out


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "jobs.montessori", "--config", TINY, "teacher.k=1",
                           f"storage={tmp_path}"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "teacher.k" in proc.stderr


def test_a_teacher_that_keeps_no_candidate_is_named_before_probing():
    """A teacher whose outputs never match the preset's pattern (a random-init one has no
    <instruction> tags): the candidates stage says so, instead of probing nothing and the pairs
    stage blaming the warm-up."""
    from cluster.config import load_config

    cfg = load_config(job.MontessoriOptions, str(ROOT / "configs/montessori/llama3-8b.yaml"), [])
    msg = job.nothing_kept(cfg, 1, 0, [{"raw": "Sure, here is one: Name three birds.", "instruction": "",
                                        "kept": False}] * 4)
    assert "kept none of its 4 candidates" in msg and "<instruction>(.*?)</instruction>" in msg
    assert "no output had an instruction" in msg and "Name three birds" in msg


def test_python_m_runs_the_module_the_report_imports(monkeypatch):
    """`python -m jobs.montessori` runs `jobs.montessori.run`, not its `__main__` copy: the report
    looks the iterations' arms up with `jobs.montessori.Arm`, which never equals `__main__.Arm`
    (a KeyError after the whole run)."""
    import runpy
    import warnings

    seen = {}
    monkeypatch.setattr(cli, "main", lambda prog, doc, schema, plan, run, argv=None: seen.update(run=run) or 0)
    with warnings.catch_warnings(), pytest.raises(SystemExit):
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: jobs.montessori is imported already
        runpy.run_module("jobs.montessori", run_name="__main__")
    assert seen["run"] is job.run


def test_tokenizers_that_disagree(capsys, tmp_path):
    from cluster.models import train_tokenizer

    other = tmp_path / "other_tok"
    train_tokenizer(["a completely different corpus of words"] * 50, 300, other)
    code, err = run_cli(capsys, "--config", TINY, f"storage={tmp_path}", f"teacher.tokenizer={other}")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "teacher.tokenizer" in err and "disagrees with the student's" in err
    run_dirs = list((tmp_path / "montessori").iterdir())
    assert not list(run_dirs[0].glob("tokenizer/_stage.json")), "a stage was marked complete on bad input"


@pytest.mark.parametrize("rows, expected", [
    ([{"instruction": " ", "output": "y"}] * 5, "no seed instructions"),
    ([{"instruction": f"Do {i}.", "output": f"Done {i}."} for i in range(4)], "empty reference set"),
    ([{"instruction": f"Do {i}.", "output": f"Done {i}."} for i in range(70)], "2 seed instructions left"),
    ([{"prompt": "x", "output": "y"}] * 5, "missing column 'instruction'"),
])
def test_bad_dataset_file(capsys, tmp_path, rows, expected):
    from cluster.models import train_tokenizer

    tok = tmp_path / "tok"  # a hub-style student and teacher sharing one tokenizer (never loaded as models here)
    train_tokenizer(["some words to train on"] * 20, 300, tok)
    f = write_jsonl(tmp_path / "seeds.jsonl", rows)
    code, err = run_cli(capsys, "--config", TINY, f"storage={tmp_path}", "data.source=dataset", f"data.dataset={f}",
                        "data.eval_size=4", "data.reference_size=64", "data.seed_size=8", "data.warmup_size=4",
                        f"teacher.model={tok}", "student.tiny=null", f"student.name={tok}", "pretrain=null")
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err


# ---------------------------------------------------------------------------------------------
# the whole job on the tiny world (real Ray, Train, TRL SFT + DPO, the probe pool, W&B offline)


@pytest.fixture(scope="module")
def montessori_run(ray_local, tmp_path_factory):
    from cluster.config import load_config

    storage = tmp_path_factory.mktemp("runs")
    cfg = load_config(job.MontessoriOptions, TINY, [*TEST_OVERRIDES, f"storage={storage}", f"run_id={RUN_ID}"])
    summary = job.run(cfg)
    assert summary["run_id"] == RUN_ID
    return cfg, summary, Path(storage) / "montessori" / RUN_ID


def row(summary, seed, teacher, key):
    return next(r[key] for r in summary["rows"] if r["seed"] == seed and r["teacher"] == teacher)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_outputs_and_probes(montessori_run):
    _, summary, run = montessori_run
    assert {(r["seed"], r["teacher"]) for r in summary["rows"]} == {
        (s, t) for s in (0, 1) for t in (job.UNTRAINED, job.MONTESSORI, job.RANDOM)}
    assert all(r["examples"] == 128 for r in summary["rows"])
    report = (run / "report.md").read_text()
    assert "montessori.png" in report and "| seed | iteration | teacher |" in report and "random pairs" in report
    assert (run / "montessori.png").stat().st_size > 10_000
    for p in summary["probes"]:
        # every kept candidate scored exactly once; both signs present, so pairs were formed
        cands = read_rows(str(run / "it1-candidates" / f"s{p['seed']}.parquet"))
        scores = read_rows(str(run / "it1-influence" / f"s{p['seed']}" / "scores.parquet"))
        assert sorted(r["id"] for r in scores) == sorted(c["id"] for c in cands if c["kept"])
        assert 0.05 < p["positive_share"] < 0.95 and p["pairs"] > 50
        # influence pairs put the higher-influence candidate first; random pairs do so about half the time
        infl = {r["id"]: r["influence"] for r in scores}
        for teacher, lo, hi in ((job.MONTESSORI, 1.0, 1.0), (job.RANDOM, 0.3, 0.7)):
            ids = read_rows(str(run / "it1-pairs" / f"s{p['seed']}-{teacher}-ids.parquet"))
            ordered = sum(infl[r["chosen_id"]] > infl[r["rejected_id"]] for r in ids) / len(ids)
            assert lo <= ordered <= hi, (teacher, ordered)
        # the reference set's people never reach the teacher's data or the final sets
    banned = {r["name"] for r in read_rows(str(run / "data" / "banned.parquet"))}
    finals = sorted((run / "it1-final").glob("*.parquet"))
    assert len(finals) == 6
    for f in finals:
        text = " ".join(r["prompt"] + r["completion"] for r in read_rows(str(f)))
        assert not any(n in text for n in banned), f.name


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_trained_teacher_beats_untrained_teacher(montessori_run):
    """The paper's finding: the student SFT'd on the DPO-trained teacher's data has a lower
    held-out loss than the student SFT'd on as many examples from the untrained teacher."""
    _, summary, _ = montessori_run
    gains = [row(summary, s, job.UNTRAINED, "heldout_loss") - row(summary, s, job.MONTESSORI, "heldout_loss")
             for s in (0, 1)]
    # The mean over seeds, as the paper reports it. Per seed it does not hold everywhere: world 4
    # gave 0.053 and 0.058 where the preset was chosen, and 0.108 and -0.037 on the 2026-12-02
    # machine with the same code and library versions (the run is deterministic on one machine,
    # twice the same numbers; presumably the CPU's floating-point kernels differ between machines
    # and move seed 1's DPO'd teacher). docs/findings.md keeps both.
    assert sum(gains) / 2 > LOSS_MARGIN, f"held-out loss gains by seed: {gains}"
    assert sum(row(summary, s, job.MONTESSORI, "win_rate") for s in (0, 1)) / 2 > 0.5


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_influence_pairs_beat_random_pairs(montessori_run):
    """The ablation, on the mean over seeds (world 4: 0.057; seed by seed it does not hold: on
    seed 0 the random-pair teacher's student came out ahead, 0.468 against 0.493)."""
    _, summary, _ = montessori_run
    gain = summary["findings"]["influence_vs_random_loss"]
    assert gain > ABLATION_MARGIN, summary["findings"]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_wandb_has_probe_table_and_dpo_curves(montessori_run):
    from cluster.tracking import find_offline_runs, read_offline_run

    _, summary, run = montessori_run
    runs = {r["id"]: r for r in map(read_offline_run, find_offline_runs(run))}
    assert {r["group"] for r in runs.values()} == {f"montessori-{summary['run_id']}"}
    dpo = [r for i, r in runs.items() if "-dpo-" in i]
    assert len(dpo) == 4 and all(any("loss" in k for h in r["history"] for k in h) for r in dpo)
    # each DPO run logged its reward margin (chosen over rejected, against the frozen reference);
    # on influence pairs the last is positive: the teacher moved toward the chosen instructions
    # (on random pairs "chosen" means nothing, and the margin hovers around zero)
    for r in dpo:
        margins = [h["rewards/margins"] for h in r["history"] if "rewards/margins" in h]
        assert margins, r["id"]
        if f"-{job.MONTESSORI}-" in r["id"]:
            assert margins[-1] > 0, (r["id"], margins)
    final = runs[f"{summary['run_id']}-summary"]
    assert final["summary"]["probes"]["_type"] == "table-file"  # the probe table: candidate, kind, influence
    assert final["summary"]["head_to_head/iteration_1"]["_type"] == "table-file"  # W&B keeps "/" keys flat


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_rerun_skips_finished_stages(montessori_run):
    cfg, summary, run = montessori_run
    manifests = {p: p.stat().st_mtime for p in run.glob("*/_stage.json")}
    assert {"data", "tokenizer", "base_init", "pretrain", "teacher", "warmup", "it1-candidates", "it1-influence",
            "it1-pairs", "it1-dpo", "it1-final", "it1-sft", "it1-students"} == {p.parent.name for p in manifests}
    assert job.run(cfg)["rows"] == summary["rows"]
    assert {p: p.stat().st_mtime for p in run.glob("*/_stage.json")} == manifests
