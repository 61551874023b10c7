"""Storage a cluster would use: every stage, checkpoint and probe shard in an S3 bucket (a moto
server on loopback), the work spread over 2 simulated Ray nodes (the session's cluster).

The tiny falsity sweep (shrunk: this tests where things go, tests/test_falsity_sweep.py tests the
finding) runs with `storage=s3://...`; then, from another working directory with the node caches
emptied, the same command skips every stage and writes the same summary.json; then a changed
option redoes exactly the stages downstream of it, and never restores a stale Tune experiment.
Montessori (shrunk the same way) runs up to its DPO stage on S3: warm-up task, probe actors, DPO
learner; a changed DPO option then redoes exactly that stage.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cluster import storage
from cluster.config import load_config
from jobs import falsity_sweep as falsity

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

# a few steps per phase, with warm-up and checkpoints that fit them (schedules are checked)
SMALL = ["ratios=[0.0,1.0]", "seeds=[0]", "data.world.num_people=24", "pretrain.max_steps=6", "pretrain.warmup_steps=1",
         "pretrain.save_steps=0.5", "sft.max_steps=4", "sft.warmup_steps=1", "recovery.max_steps=2",
         "eval.recovery_points=2", "budget_study=null", "max_concurrent_trials=2", "run_id=s3"]
FALSITY_STAGES = {"world", "tokenizer", "base_init", "pretrain", "base_eval", "mixtures", "trials"}


def manifests(fs, run: str) -> dict[str, dict]:
    """stage -> its manifest, read from the bucket."""
    return {Path(p).parent.name: json.loads(fs.cat_file(p)) for p in fs.glob(f"{run}/*/_stage.json")}


def empty_node_caches() -> None:
    cache = storage.cache_root()
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)


@pytest.fixture(scope="module")
def falsity_on_s3(ray_local, s3_server, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.chdir(tmp_path_factory.mktemp("first_cwd"))
    cfg = load_config(falsity.FalsityOptions, str(falsity_preset()), [*SMALL, f"storage={s3_server}/e2e"])
    summary = falsity.run(cfg)
    fs, root = storage.filesystem(f"{s3_server}/e2e/falsity_sweep/s3")
    return cfg, summary, fs, root


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def falsity_preset() -> Path:
    return Path(__file__).resolve().parents[1] / "configs/falsity_sweep/tiny.yaml"


def test_every_stage_checkpoint_and_report_lands_in_the_bucket(falsity_on_s3):
    cfg, summary, fs, root = falsity_on_s3
    assert set(manifests(fs, root)) == FALSITY_STAGES
    for key in ("r0-s0", "r1-s0"):  # each trial's models, written by a Train worker on some node
        for phase in ("sft", "recovery"):
            assert fs.exists(f"{root}/trials/{key}/{phase}/model.safetensors"), (key, phase)
    assert fs.exists(f"{root}/pretrain/base/pretrain/model.safetensors")
    assert fs.exists(f"{root}/mixtures/r1-s0.parquet") and fs.exists(f"{root}/world/heldout.parquet")
    assert fs.glob(f"{root}/ray/**/checkpoint_*"), "Ray Train's checkpoints are not in the bucket"
    assert fs.glob(f"{root}/ray/trials-*/tuner.pkl") or fs.glob(f"{root}/ray/trials-*/*"), "no Tune state in the bucket"
    for name in ("summary.json", "report.md", "falsity_sweep.png"):
        assert fs.exists(f"{root}/{name}"), name
    assert json.loads(fs.cat_file(f"{root}/summary.json"))["rows"] == summary["rows"]
    assert len(summary["rows"]) == 2 and all(0 <= r["qa_accuracy"] <= 1 for r in summary["rows"])
    assert not Path("runs").exists(), "a remote-storage run wrote results into the working directory"


def test_another_directory_with_empty_caches_skips_every_stage(falsity_on_s3, tmp_path, monkeypatch):
    cfg, summary, fs, root = falsity_on_s3
    before = manifests(fs, root)
    written = fs.cat_file(f"{root}/summary.json")
    monkeypatch.chdir(tmp_path)
    empty_node_caches()
    again = falsity.run(cfg)
    assert manifests(fs, root) == before  # same fingerprints, same completion times: nothing rebuilt
    assert fs.cat_file(f"{root}/summary.json") == written and again["rows"] == summary["rows"]


def test_a_changed_ratio_redoes_exactly_mixtures_and_trials(falsity_on_s3, tmp_path, monkeypatch):
    cfg, summary, fs, root = falsity_on_s3
    before = manifests(fs, root)
    monkeypatch.chdir(tmp_path)
    changed = cfg.model_copy(update={"ratios": [0.0, 0.5]})  # 2 trials: r0 and r0.5, a new Tune experiment
    out = falsity.run(changed)
    after = manifests(fs, root)
    redone = {s for s in FALSITY_STAGES if after[s] != before[s]}
    assert redone == {"mixtures", "trials"}, redone
    assert sorted(r["ratio"] for r in out["rows"]) == [0.0, 0.5]  # a new Tune experiment, not the stale one
    assert len(fs.glob(f"{root}/ray/trials-*/")) >= 2


def test_a_changed_world_seed_redoes_every_stage(falsity_on_s3, tmp_path, monkeypatch):
    """Every stage is downstream of the world; the run stops after `mixtures` (the trials stage's
    fingerprint follows the mixtures', tests/test_stages.py), which saves training the grid again."""
    cfg, summary, fs, root = falsity_on_s3
    before = manifests(fs, root)
    monkeypatch.chdir(tmp_path)
    data = cfg.data.model_copy(update={"world": cfg.data.world.model_copy(update={"seed": 1})})
    falsity.run(cfg.model_copy(update={"data": data, "ratios": [0.0, 0.5, 1.0], "stop_after": "mixtures"}))
    after = manifests(fs, root)
    assert all(after[s]["hash"] != before[s]["hash"] for s in FALSITY_STAGES - {"trials"}), (before, after)
    assert after["trials"] == before["trials"]  # not reached (stop_after), so not rebuilt either


MONTESSORI_SMALL = ["run_id=s3", "seeds=[0]", "ablation=false", "stop_after=it1-dpo", "data.world.num_people=40",
                    "data.reference_people=4", "data.seed_size=40", "data.warmup_size=16", "data.reference_size=16",
                    "pretrain.max_steps=4", "pretrain.warmup_steps=1", "pretrain.save_steps=0.5",
                    "teacher.sft.max_steps=4", "teacher.sft.warmup_steps=1", "teacher.sft_examples=64", "warmup.epochs=30",
                    "probes.prompts=8", "probes.num_actors=2", "probes.batch_size=4"]
MONTESSORI_STAGES = {"data", "tokenizer", "base_init", "pretrain", "teacher", "warmup", "it1-candidates", "it1-influence",
                     "it1-pairs", "it1-dpo"}


def test_montessori_warmup_probes_and_dpo_on_s3(ray_local, s3_server, tmp_path, monkeypatch):
    """The warm-up runs as a Ray task and the probes on 2 actors, each possibly on the other node:
    the warm student, the probe shards, the DPO'd teacher and every stage land in the bucket; a
    second run from another directory with emptied node caches skips every stage; a changed DPO
    option redoes exactly the DPO stage (nothing upstream of it)."""
    from jobs import montessori

    preset = Path(__file__).resolve().parents[1] / "configs/montessori/tiny.yaml"
    cfg = load_config(montessori.MontessoriOptions, str(preset), [*MONTESSORI_SMALL, f"storage={s3_server}/e2e"])
    monkeypatch.chdir(tmp_path)
    montessori.run(cfg)
    fs, root = storage.filesystem(f"{s3_server}/e2e/montessori/s3")
    first = manifests(fs, root)
    assert set(first) == MONTESSORI_STAGES
    assert fs.glob(f"{root}/warmup/s0/*.safetensors"), "the warm student is not in the bucket"
    assert fs.glob(f"{root}/it1-influence/**/shards/*.parquet") and fs.glob(f"{root}/it1-influence/**/scores.parquet")
    assert fs.glob(f"{root}/it1-candidates/**/shards/*.parquet"), "the generation shards are not in the bucket"
    assert fs.glob(f"{root}/it1-dpo/**/model.safetensors"), "the DPO'd teacher is not in the bucket"
    assert fs.glob(f"{root}/ray/**/checkpoint_*"), "Ray Train's checkpoints are not in the bucket"
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    empty_node_caches()
    montessori.run(cfg)
    assert manifests(fs, root) == first
    changed = load_config(montessori.MontessoriOptions, str(preset),
                          [*MONTESSORI_SMALL, f"storage={s3_server}/e2e", f"dpo.beta={cfg.dpo.beta * 2}"])
    montessori.run(changed)
    after = manifests(fs, root)
    assert {s for s in MONTESSORI_STAGES if after[s] != first[s]} == {"it1-dpo"}
    assert after["it1-dpo"]["hash"] != first["it1-dpo"]["hash"]
