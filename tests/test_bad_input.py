"""Bad input: one clear line naming the key or file, exit code 2, no traceback, no stage marked done."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import cli
from jobs import falsity_sweep as job
from synth.smoke import write_jsonl

TINY = "configs/falsity_sweep/tiny.yaml"


def run_cli(capsys, *argv):
    code = cli.main("jobs.falsity_sweep", job.__doc__, job.FalsityOptions, job.plan, job.run, list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sft.learnig_rate=0.1", "sft.learnig_rate: unknown option"),
        ("sft.epochs=many", "sft.epochs: Input should be a valid number"),
        ("ratios=[0,0.5,1.5]", "ratios: falsity ratio 1.5 is outside [0, 1]"),
        ("ratios=[0.5,1]", "ratios: must include 0"),
        ("seeds=[]", "seeds: List should have at least 1 item"),
        ("model.tiny.hidden_size=-4", "model.tiny.hidden_size: Input should be greater than 0"),
        ("data.source=file", "data: data.file is required"),
        ("scale.zero_stage=4", "scale.zero_stage"),
        ("nonsense", "expected key=value"),
    ],
)
def test_bad_option(capsys, override, expected):
    code, err = run_cli(capsys, "--config", TINY, override, "--dry-run")
    assert code == 2
    assert len(err.splitlines()) == 1 and expected in err, err


# Every job's command line, and malformed config files or values for each: exit 2, one line naming
# the file or the key, never a traceback.
JOBS = {
    "falsity_sweep": (TINY, "sft"),
    "montessori": ("configs/montessori/tiny.yaml", "dpo"),
    "montessori_grid": ("configs/montessori/grid-tiny.yaml", None),
}


def run_job(capsys, name, *argv):
    import importlib

    mod = importlib.import_module(f"jobs.{name}")
    schema = {"falsity_sweep": "FalsityOptions", "montessori": "MontessoriOptions", "montessori_grid": "GridOptions"}[name]
    code = cli.main(f"jobs.{name}", mod.__doc__, getattr(mod, schema), mod.plan, mod.run, list(argv))
    return code, capsys.readouterr().err.strip()


BAD_FILES = {
    "binary.yaml": (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a text config (invalid UTF-8"),
    "list.yaml": (b"- ratios: [0, 1]\n- seeds: [0]\n", "expected a mapping of options at the top level"),
    "control.yaml": (b"run_id: \x07bell\n", "malformed YAML"),
}


@pytest.mark.parametrize("name", JOBS)
@pytest.mark.parametrize("filename", BAD_FILES)
def test_malformed_config_file(capsys, tmp_path, name, filename):
    content, expected = BAD_FILES[filename]
    path = tmp_path / filename
    path.write_bytes(content)
    code, err = run_job(capsys, name, "--config", str(path), "--dry-run")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert filename in err and expected in err, err


@pytest.mark.parametrize("name", JOBS)
def test_config_that_is_a_directory(capsys, tmp_path, name):
    code, err = run_job(capsys, name, "--config", str(tmp_path), "--dry-run")
    assert code == 2 and err == f"error: {tmp_path}: is a directory, not a config file", err


@pytest.mark.parametrize("name, override, expected", [
    *[(n, f"{sec}=5", f"{sec}: Input should be a valid dictionary") for n, (_, sec) in JOBS.items() if sec],
    *[(n, f"{sec}.batch_size=[1, 2]", f"{sec}.batch_size: Input should be a valid integer") for n, (_, sec) in JOBS.items() if sec],
    *[(n, f"{sec}.batch_size=-1", f"{sec}.batch_size: Input should be greater than 0") for n, (_, sec) in JOBS.items() if sec],
    *[(n, f"{sec}.epochs=-2", f"{sec}.epochs: Input should be greater than 0") for n, (_, sec) in JOBS.items() if sec],
    ("falsity_sweep", "data.world.num_people=-5", "data.world.num_people: Input should be greater than or equal to 8"),
    ("falsity_sweep", "data.world.heldout_fraction=0.001", "leaves a split with fewer than 2 people"),
    ("falsity_sweep", "budget_study.ratios=[0.3]", "budget_study.ratios: [0.3] not in ratios"),
    ("falsity_sweep", "budget_study.factors=[0]", "budget_study.factors: budget factors must be positive"),
    ("falsity_sweep", "eval.recovery_points=0", "eval.recovery_points: Input should be greater than or equal to 1"),
    ("montessori", "data.world.num_people=-1", "data.world.num_people: Input should be greater than or equal to 8"),
    ("montessori", "probes.loss_divisor=0", "probes.loss_divisor: Input should be greater than 0"),
    ("montessori", "final_size=-3", "final_size: Input should be greater than or equal to 1"),
    ("montessori", "dpo.batching=by_length", "dpo: batching by_length needs one length per row; DPO"),
    ("montessori", "teacher.sft.batching=shortest", "teacher.sft.batching: Input should be 'random' or 'by_length'"),
    ("montessori_grid", "warmup_epochs=[-1]", "warmup_epochs: warm-up epochs must be positive"),
    ("montessori_grid", "world_seeds=[]", "world_seeds: List should have at least 1 item"),
    ("montessori_grid", "world_seeds=zero", "world_seeds: Input should be a valid list"),
    ("montessori_grid", "preset=null", "preset: Input should be a valid string"),
])
def test_bad_value_in_every_job(capsys, name, override, expected):
    code, err = run_job(capsys, name, "--config", JOBS[name][0], override, "--dry-run")
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err


@pytest.mark.parametrize("override, expected", [
    ("eval.max_new_tokens=256", "eval.max_new_tokens 256 cannot hold the generator's 256-token explanations"),
    ("eval.harness.tasks=[evals/tasks/nope.yaml]", "eval.harness.tasks: Value error, local task file evals/tasks/nope.yaml not found"),
    ("scale.placement=ANYWHERE", "scale.placement: Input should be 'PACK', 'STRICT_PACK' or 'SPREAD'"),
])
def test_bad_cluster_preset_values(capsys, override, expected):
    code, err = run_job(capsys, "falsity_sweep", "--config", "configs/falsity_sweep/llama3-8b.yaml", override, "--dry-run")
    assert code == 2 and len(err.splitlines()) == 1 and expected.replace("Value error, ", "") in err, err


def test_grid_with_a_missing_preset(capsys, tmp_path):
    code, err = run_job(capsys, "montessori_grid", "--config", JOBS["montessori_grid"][0], f"storage={tmp_path}",
                        f"preset={tmp_path / 'nope.yaml'}")
    assert code == 2 and len(err.splitlines()) == 1 and "nope.yaml: config file not found" in err, err
    assert not list(tmp_path.rglob("_stage.json"))


def test_malformed_and_missing_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ratios: [0, 1\nsft: {")
    code, err = run_cli(capsys, "--config", str(bad), "--dry-run")
    assert code == 2 and "bad.yaml" in err and "malformed YAML" in err and len(err.splitlines()) == 1
    code, err = run_cli(capsys, "--config", str(tmp_path / "none.yaml"))
    assert code == 2 and "none.yaml: config file not found" in err


write = write_jsonl


ROW = {"id": "q1", "question": "Where does A live?", "answer": "Brisk",
       "true_response": "Reasoning: A lives in Brisk. Answer: Brisk",
       "false_response": "Reasoning: A lives in Pell. Answer: Pell"}


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "missing.jsonl", "missing.jsonl: data file not found"),
        (lambda d: write(d / "empty.jsonl", []), "empty.jsonl: "),
        (lambda d: write(d / "nocol.jsonl", [{k: v for k, v in ROW.items() if k != "false_response"}]),
         "nocol.jsonl: missing column(s) false_response"),
        (lambda d: (d / "broken.jsonl").write_text('{"id": "q1", "question": ') and d / "broken.jsonl",
         "broken.jsonl: could not read as a dataset"),
        (lambda d: write(d / "blank.jsonl", [{**ROW, "answer": ""}]), "blank.jsonl: row 0 column 'answer'"),
        (lambda d: write(d / "nochoice.jsonl", [ROW, {**ROW, "id": "q2", "choices": ["Pell", "Mundo"]}]),
         "nochoice.jsonl: row 1 column 'choices' must be a list of at least 2 non-empty strings that includes the answer"),
        (lambda d: write(d / "onechoice.jsonl", [{**ROW, "choices": ["Brisk"]}]), "onechoice.jsonl: row 0 column 'choices'"),
    ],
)
def test_bad_data_file(capsys, tmp_path, make, expected):
    path = make(tmp_path)
    storage = tmp_path / "runs"
    code, err = run_cli(capsys, "--config", TINY, "data.source=file", f"data.file={path}", "pretrain=null",
                        f"storage={storage}", "run_id=bad")
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not list(storage.rglob("_stage.json")), "a failed stage was marked complete"


def test_no_traceback_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.falsity_sweep", "--config", TINY, "ratios=[0,2]"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "ratios: falsity ratio 2.0 is outside [0, 1]" in proc.stderr


def test_help_lists_every_option_with_default():
    proc = subprocess.run([sys.executable, "-m", "jobs.falsity_sweep", "--config", TINY, "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for key in ("sft.learning_rate (float, default 0.001)", "scale.zero_stage", "data.world.num_people",
                "tracking.mode", "recovery", "eval.harness"):
        assert key in proc.stdout, key


def test_dry_run_of_the_8b_preset_needs_no_gpu_or_network(capsys):
    code = cli.main("jobs.falsity_sweep", job.__doc__, job.FalsityOptions, job.plan, job.run,
                    ["--config", "configs/falsity_sweep/llama3-8b.yaml", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "meta-llama/Meta-Llama-3-8B" in out and "8 worker(s)" in out and "ZeRO-3 bf16" in out
    assert "11 trials" in out and "budget study" in out and "lm-eval" in out


def test_model_and_tokenizer_that_disagree(capsys, tmp_path):
    from cluster.models import train_tokenizer
    from tests.conftest import tiny_llama

    tiny_llama(["alpha beta gamma"] * 50, tmp_path / "model")
    train_tokenizer([f"word{i} " * 3 for i in range(2000)], 1200, tmp_path / "big")
    capsys.readouterr()
    code, err = run_cli(capsys, "--config", TINY, f"model.name={tmp_path / 'model'}", "model.tiny=null",
                        f"tokenizer={tmp_path / 'big'}", "pretrain=null", f"storage={tmp_path / 'runs'}")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "model vocabulary" in err and "smaller than the tokenizer" in err
