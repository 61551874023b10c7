"""Trust: what `ray job submit --working-dir .` uploads, and pickles where weights are expected.

- The package Ray builds from the checkout (Ray's own packager, reading `.gitignore` and
  `.rayignore` as `ray job submit` does) holds the code and presets, never `.git`, local runs,
  W&B files, caches, tests or weight files.
- A pickled checkpoint where a model is expected is refused with one line and exit code 2, and is
  never unpickled (its payload would write a marker file); DeepSpeed's own checkpoint reads are
  `weights_only` (a pickle in a ZeRO shard fails instead of running).
"""

import pickle
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ray_package(src: Path, out: Path) -> list[str]:
    """The names in the zip Ray uploads for `--working-dir src`."""
    from ray._private.runtime_env.packaging import create_package

    create_package(str(src), out, include_gitignore=True)
    with zipfile.ZipFile(out) as z:
        return z.namelist()


def test_the_job_package_leaves_out_history_runs_caches_tests_and_weights(tmp_path):
    # a copy of the checkout's tracked files, plus what a user's checkout accumulates
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "checkout"
    for name in tracked:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    planted = {".git/objects/pack/big.pack": 1 << 20, "runs/falsity_sweep/x/model.safetensors": 1 << 20,
               "wandb/offline-run/run.wandb": 1000, ".venv/bin/python": 10, "cluster/__pycache__/x.pyc": 10,
               "checkpoint/pytorch_model.bin": 1000, "datalab.egg-info/PKG-INFO": 10}
    for name, size in planted.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(b"x" * size)
    names = ray_package(src, tmp_path / "pkg.zip")
    top = {n.split("/")[0] for n in names if n.strip("/")}
    assert {"cluster", "jobs", "synth", "influence", "evals", "configs", "pyproject.toml"} <= top, top
    assert "cluster/learners.py" in names and "configs/falsity_sweep/smoke.yaml" in names
    assert not top & {".git", "runs", "wandb", ".venv", "tests", "benchmarks", "checkpoint", "datalab.egg-info"}, top
    assert not [n for n in names if n.endswith((".pyc", ".bin", ".safetensors", ".pack"))]
    # and the real checkout (with its .git and whatever runs it holds) packs small
    ray_package(ROOT, tmp_path / "real.zip")
    size = (tmp_path / "real.zip").stat().st_size
    print(f"package for --working-dir .: {size / 1e6:.2f} MB")
    assert size < 5e6


class Bomb:
    """Unpickling this runs `Path(marker).write_text(...)`: the stand-in for any code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def plant_bomb(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(Bomb(marker), f)


@pytest.mark.parametrize("job", ["falsity_sweep", "montessori"])
def test_a_pickled_model_is_refused_at_the_door_and_never_loaded(capsys, tmp_path, job):
    import importlib

    from cluster import cli
    from synth.smoke import write_jsonl
    from tests.conftest import tiny_llama

    model = tmp_path / "model"
    tiny_llama(["alpha beta gamma"] * 50, model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    plant_bomb(model / "pytorch_model.bin", marker)
    storage = tmp_path / "runs"
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(200)]
    write_jsonl(tmp_path / "instructions.jsonl", rows)
    config, schema, argv = {
        "falsity_sweep": ("tiny", "FalsityOptions", [f"model.name={model}", "model.tiny=null", "pretrain=null"]),
        "montessori": ("smoke", "MontessoriOptions", [f"student.name={model}", f"teacher.model={model}",
                                                       f"data.dataset={tmp_path / 'instructions.jsonl'}"]),
    }[job]
    mod = importlib.import_module(f"jobs.{job}")
    capsys.readouterr()
    code = cli.main(f"jobs.{job}", mod.__doc__, getattr(mod, schema), mod.plan, mod.run,
                    ["--config", str(ROOT / f"configs/{job}/{config}.yaml"), *argv, f"storage={storage}", "run_id=bomb"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "weights only as pickles (pytorch_model.bin)" in err and "safetensors only" in err, err
    assert not marker.exists()
    # only what needs no model may be committed (the falsity sweep's world is built first)
    committed = {p.parent.name for p in storage.rglob("_stage.json")}
    assert {c.split("-")[0] for c in committed} <= {"world"}, committed


def test_the_loader_itself_refuses_pickles(tmp_path):
    from cluster.models import load_model
    from tests.conftest import tiny_llama

    tiny_llama(["alpha beta gamma"] * 50, tmp_path / "m")
    (tmp_path / "m/model.safetensors").unlink()
    plant_bomb(tmp_path / "m/pytorch_model.bin", tmp_path / "PWNED")
    with pytest.raises(OSError):
        load_model(tmp_path / "m")
    assert not (tmp_path / "PWNED").exists()


def test_deepspeed_checkpoint_reads_are_weights_only(tmp_path):
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from cluster.learners import _weights_only_deepspeed_loads

    _weights_only_deepspeed_loads()
    shard = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    # what a real ZeRO-3 shard holds loads
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.weights,
                                         "fp32": torch.ones(3)}, "ds_version": "0"}, shard)
    sd = TorchCheckpointEngine.load(None, str(shard), map_location="cpu")
    assert sd["optimizer_state_dict"]["zero_stage"] == ZeroStageEnum.weights
    # a pickle payload in a shard fails the load instead of running
    marker = tmp_path / "PWNED"
    torch.save({"optimizer_state_dict": Bomb(marker)}, shard)
    with pytest.raises(pickle.UnpicklingError):
        TorchCheckpointEngine.load(None, str(shard), map_location="cpu")
    assert not marker.exists()
