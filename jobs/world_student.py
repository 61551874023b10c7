"""The first two steps the falsity sweep and the robust fine-tuning job share: a question table
(the synthetic world, a FACO table file, or a hub QA set) and a base student that knows its facts.

Both take a job's options with the fields these read: `data` (synth.falsity.DataOptions), `model`,
`tokenizer`, `model_seed`, `pretrain`, `pretrain_scale`, `tracking` and `ray`. Same options, same
stage fingerprints: the two jobs' stages hold the same world and the same pretrained student.
"""

from __future__ import annotations

from cluster.learners import LearnerRun, Phase
from cluster.models import base_model
from cluster.runtime import init_ray
from cluster.stages import Run, Stage
from cluster.sweep import train_stage


def build_world(cfg, run: Run) -> Stage:
    """Stage `world`: tables corpus, sft (the FACO table), heldout, probes, tokenizer_text. From a
    hub QA set, a generator pool first writes the true and false reasoning (resumable shards)."""
    from synth.falsity import faco_tables

    def build(st: Stage) -> dict[str, int]:
        if cfg.data.source == "hub":
            init_ray(cfg.ray)
        tables = faco_tables(cfg.data, generation=st.path("generation"))
        for name, rows in tables.items():
            st.save_rows(name, rows)
        return {name: len(rows) for name, rows in tables.items()}

    world = run.stage("world", shared=True, data=cfg.data)
    print(f"[world] {world.ensure(build)}", flush=True)
    return world


def pretrain(cfg, run: Run, world: Stage) -> tuple[str, str]:
    """Stages `tokenizer`, `base_init`, `pretrain`: the student learns the world's facts from its
    knowledge corpus (a one-phase learner run); (model, tokenizer) the job starts from."""
    model, tok = base_model(run, cfg.model, tokenizer=cfg.tokenizer, texts=world, seed=cfg.model_seed)
    if cfg.pretrain is None:
        return model, tok
    init_ray(cfg.ray)
    learner = LearnerRun(model=model, tokenizer=tok, phases=[Phase("pretrain", world.path("corpus.parquet"), cfg.pretrain)],
                         scale=cfg.pretrain_scale, seed=cfg.model_seed, tracking=cfg.tracking.for_run(run),
                         tracking_group=run.group, trust_remote_code=cfg.model.trust_remote_code)
    stage = run.stage("pretrain", shared=True, run=learner)
    return train_stage(stage, {"base": learner})["base"].model, tok




def world_and_student(cfg, run: Run) -> tuple[Stage, tuple[str, str]] | None:
    """Both steps, honouring `cfg.stop_after` ("world", "pretrain"): (world stage, (model,
    tokenizer)), or None when the run stops at one of them."""
    world = build_world(cfg, run)
    if cfg.stop_after == "world":
        return None
    base = pretrain(cfg, run, world)
    if cfg.stop_after == "pretrain":
        return None
    return world, base
