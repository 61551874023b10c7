"""The Montessori grid's plumbing, in-process: each cell is the Montessori job on its world seed and
warm-up length (stubbed here: the job itself is tested in tests/test_montessori.py), finished
cells are stages a re-run skips, and the report tabulates every cell."""

from cluster.config import load_config
from jobs import montessori as job
from jobs import montessori_grid as grid

PRESET = "configs/montessori/grid-tiny.yaml"


def test_cells_run_the_preset_per_world_and_warmup_and_resume(tmp_path, monkeypatch):
    calls = []

    def fake_run(cfg):  # the Montessori job's summary, shaped as job.run returns it
        calls.append((cfg.data.world.seed, cfg.warmup.epochs, cfg.run_id, cfg.iterations, cfg.ablation, cfg.seeds))
        gain = 0.01 * cfg.data.world.seed - 0.001 * cfg.warmup.epochs
        return {"probes": [{"seed": 0, "iteration": 1, "positive_share": 0.2, "pairs": 10}],
                "rows": [{"seed": 0, "iteration": 1, "teacher": job.UNTRAINED, "heldout_loss": 0.5, "accuracy": 0.3, "win_rate": 0.5},
                         {"seed": 0, "iteration": 1, "teacher": job.MONTESSORI, "heldout_loss": 0.5 - gain, "accuracy": 0.3,
                          "win_rate": 0.6}]}

    monkeypatch.setattr(job, "run", fake_run)
    cfg = load_config(grid.GridOptions, PRESET, [f"storage={tmp_path}", "world_seeds=[0,3]", "warmup_epochs=[20,10]",
                                                 "run_id=g"])
    summary = grid.run(cfg)
    assert calls == [(ws, e, f"g-w{ws}", 1, False, [0]) for ws in (0, 3) for e in (10.0, 20.0)]
    assert [(r["world_seed"], r["warmup_epochs"], round(r["loss_gain"], 3)) for r in summary["rows"]] == [
        (0, 10.0, -0.01), (0, 20.0, -0.02), (3, 10.0, 0.02), (3, 20.0, 0.01)]
    assert summary["findings"]["montessori_better"] == 2
    run = tmp_path / "montessori_grid" / "g"
    assert "| world_seed | warmup_epochs |" in (run / "report.md").read_text() and (run / "grid.png").stat().st_size > 5000
    grid.run(cfg)  # every cell is a finished stage: nothing runs again
    assert len(calls) == 4
