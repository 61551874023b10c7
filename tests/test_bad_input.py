"""Bad input: one clear line naming the key or file, exit code 2, no traceback, no stage marked done."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import cli
from jobs import falsity_sweep as job

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


def test_malformed_and_missing_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ratios: [0, 1\nsft: {")
    code, err = run_cli(capsys, "--config", str(bad), "--dry-run")
    assert code == 2 and "bad.yaml" in err and "malformed YAML" in err and len(err.splitlines()) == 1
    code, err = run_cli(capsys, "--config", str(tmp_path / "none.yaml"))
    assert code == 2 and "none.yaml: config file not found" in err


def write(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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
    assert "5 trials" in out and "lm-eval" in out


def test_model_and_tokenizer_that_disagree(capsys, tmp_path):
    from cluster.models import TinyLlama, build_tiny_model, train_tokenizer

    small = train_tokenizer(["alpha beta gamma"] * 50, 300, tmp_path / "small")
    build_tiny_model(TinyLlama(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
                     small, 0, tmp_path / "model")
    train_tokenizer([f"word{i} " * 3 for i in range(2000)], 1200, tmp_path / "big")
    capsys.readouterr()
    code, err = run_cli(capsys, "--config", TINY, f"model.name={tmp_path / 'model'}", "model.tiny=null",
                        f"tokenizer={tmp_path / 'big'}", "pretrain=null", f"storage={tmp_path / 'runs'}")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "model vocabulary" in err and "smaller than the tokenizer" in err
