"""Falsity sweep: what false answers in synthetic SFT data do to a model (FACO, Cho 2024).

Method, as in "Unveiling Imitation Learning: Exploring the Impact of Data Falsity to Large
Language Model" (Findings of ACL 2024, arXiv 2404.09717):

1. A base student that *knows* facts: on the tiny preset, a small Llama pretrained on the
   synthetic world's knowledge corpus; on the cluster preset, a hub model as it is.
2. A FACO table: every question with a true response (reasoning + answer) and a false one (wrong
   answer, reasoning fabricated to support it).
3. For each falsity ratio r and seed: SFT the base on the mixture at r (same questions at every r,
   nested false sets), evaluate; then *recovery*: continue the ratio-r model on clean (r = 0) data
   and evaluate again.
4. Compare: accuracy against r, what the model knows against what it says (lie rate), and how
   far recovery gets against the model trained clean from the start.

Stages under `<storage>/falsity_sweep/<run_id>/` (a re-run skips finished ones; a changed option
redoes exactly the stages downstream of it): `world`, `tokenizer`, `base_init`, `pretrain`,
`mixtures`, `trials` (a Ray Tune grid; Ray's state under `ray/`), and the report files
(`jobs/falsity_report.py`).

summary.json: {"job", "run_id", "config", "rows": [...], "findings": {...}}. One row per
ratio x seed, with keys
  ratio, seed, trial_id, started_at, ended_at (unix seconds),
  qa_accuracy        exact-match accuracy on held-out single-hop questions after SFT at r,
  reasoning_accuracy exact-match accuracy on held-out two-hop (friend-of) questions,
  knows_rate         share of held-out facts whose multiple-choice probe ranks the truth first,
  lie_rate           P(answer false | model knows the fact), held-out single-hop questions,
  answered_rate      share of generations with a parseable "Answer:",
  recovered_<metric> the same metrics after the recovery phase on clean data,
  clean_qa_accuracy  qa_accuracy of the r = 0 model with the same seed (the recovery target),
  recovery_gap       clean_qa_accuracy - recovered_qa_accuracy,
plus `harness/<task>/<metric>` columns when `eval.harness` is set (cluster presets).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cluster import cli, storage
from cluster.config import Options
from cluster.learners import LearnerOptions, LearnerRun, Phase, ScaleOptions
from cluster.models import ModelSpec, base_model
from cluster.runtime import init_ray
from cluster.stages import JobOptions, Run, Stage, open_run
from cluster.sweep import train_stage
from evals.harness import HarnessOptions
from synth.falsity import DataOptions

JOB = "falsity_sweep"


class EvalOptions(Options):
    """How each trial's model is judged."""

    max_new_tokens: int = Field(40, gt=0, description="generation budget per answer")
    harness: HarnessOptions | None = Field(None, description="lm-evaluation-harness benchmarks (cluster presets); null: none")
    device: str = Field("cpu", description="device the rank-0 evaluation runs on (cuda on GPU presets)")


class FalsityOptions(JobOptions):
    """Falsity sweep preset."""

    model: ModelSpec = Field(description="student model: hub name or a tiny Llama built here")
    tokenizer: str | None = Field(None, description="hub tokenizer (hub models); null: the model's, or trained offline for tiny")
    model_seed: int = Field(0, description="seed of the tiny model's random init")
    ratios: list[float] = Field(description="falsity ratios, each in [0, 1]; must include 0 (the clean reference)")
    seeds: list[int] = Field([0], min_length=1, description="SFT seeds (mixture draw and data order)")
    pretrain: LearnerOptions | None = Field(None, description="pretraining on the knowledge corpus; null: use the model as it is")
    pretrain_scale: ScaleOptions = Field(default_factory=ScaleOptions, description="workers and DeepSpeed for pretraining")
    sft: LearnerOptions = Field(description="SFT on each falsity mixture")
    recovery: LearnerOptions | None = Field(None, description="continued SFT on clean data after each mixture; null: skip")
    scale: ScaleOptions = Field(default_factory=ScaleOptions, description="workers and DeepSpeed per trial")
    stop_after: Literal["world", "pretrain", "mixtures"] | None = Field(None, description="stop once this stage is done (inspect a partial run); null: run everything")
    data: DataOptions = Field(default_factory=DataOptions, description="FACO table source")
    eval: EvalOptions = Field(default_factory=EvalOptions, description="evaluation")

    @field_validator("ratios")
    @classmethod
    def _ratios_in_unit_interval(cls, v: list[float]) -> list[float]:
        bad = [r for r in v if not 0.0 <= r <= 1.0]
        if bad:
            raise ValueError(f"falsity ratio {bad[0]} is outside [0, 1]")
        if 0.0 not in v:
            raise ValueError("must include 0 (the clean model recovery is compared against)")
        if len(set(v)) != len(v):
            raise ValueError("ratios must be distinct")
        return sorted(v)

    @model_validator(mode="after")
    def _consistent(self):
        if self.model.tiny is None and self.pretrain is not None and self.data.source != "world":
            raise ValueError("pretrain: only the synthetic world has a knowledge corpus; set pretrain: null")
        return self


# ---------------------------------------------------------------------------------------------
# the grid: one trial per falsity ratio and seed


@dataclass(frozen=True)
class Trial:
    """One cell of the sweep; `key` names its mixture table, its learner run and its folders."""

    ratio: float
    seed: int

    @property
    def key(self) -> str:
        return f"r{self.ratio:g}-s{self.seed}"


def trials(cfg: FalsityOptions) -> list[Trial]:
    return [Trial(r, s) for r, s in itertools.product(cfg.ratios, cfg.seeds)]


# ---------------------------------------------------------------------------------------------
# 1-2. a FACO table and a base student that knows facts


def build_world(cfg: FalsityOptions, run: Run) -> Stage:
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

    world = run.stage("world", data=cfg.data)
    print(f"[world] {world.ensure(build)}", flush=True)
    return world


def pretrain(cfg: FalsityOptions, run: Run, world: Stage) -> tuple[str, str]:
    """Stages `tokenizer`, `base_init`, `pretrain`: the student learns the world's facts from its
    knowledge corpus (a one-phase learner run); (model, tokenizer) the sweep starts from."""
    model, tok = base_model(run, cfg.model, tokenizer=cfg.tokenizer, texts=world, seed=cfg.model_seed)
    if cfg.pretrain is None:
        return model, tok
    init_ray(cfg.ray)
    learner = LearnerRun(model=model, tokenizer=tok, phases=[Phase("pretrain", world.path("corpus.parquet"), cfg.pretrain)],
                         scale=cfg.pretrain_scale, seed=cfg.model_seed, tracking=cfg.tracking.for_run(run),
                         tracking_group=run.group, trust_remote_code=cfg.model.trust_remote_code)
    stage = run.stage("pretrain", run=learner)
    return train_stage(stage, {"base": learner})["base"].model, tok


# ---------------------------------------------------------------------------------------------
# 3. mixtures, and SFT at every ratio (then recovery on clean data) as a Tune grid


def build_mixtures(cfg: FalsityOptions, run: Run, world: Stage) -> Stage:
    """Stage `mixtures`: one SFT table per trial (nested false sets), clean ones included."""
    from synth.falsity import mixture

    def build(st: Stage) -> None:
        table = world.rows("sft")
        for t in trials(cfg):
            st.save_rows(t.key, mixture(table, t.ratio, t.seed))

    stage = run.stage("mixtures", world=world, ratios=cfg.ratios, seeds=cfg.seeds)
    stage.ensure(build)
    return stage


def sweep(cfg: FalsityOptions, run: Run, world: Stage, mixtures: Stage, base: tuple[str, str]) -> dict[Trial, dict]:
    """Stage `trials`: per trial, SFT on its mixture, evaluate, recovery SFT on clean data, evaluate."""
    from evals.qa import evaluate_faco

    evaluate = functools.partial(evaluate_faco, heldout=world.path("heldout.parquet"), probes=world.path("probes.parquet"),
                                 max_new_tokens=cfg.eval.max_new_tokens, device=cfg.eval.device, harness=cfg.eval.harness)
    runs = {}
    for t in trials(cfg):
        phases = [Phase("sft", mixtures.path(f"{t.key}.parquet"), cfg.sft)]
        if cfg.recovery is not None:
            phases.append(Phase("recovery", mixtures.path(f"{Trial(0.0, t.seed).key}.parquet"), cfg.recovery))
        runs[t] = LearnerRun(model=base[0], tokenizer=base[1], phases=phases, scale=cfg.scale, seed=t.seed,
                             evaluate=evaluate, tracking=cfg.tracking.for_run(run), tracking_group=run.group,
                             tracking_config={"ratio": t.ratio, "seed": t.seed},
                             trust_remote_code=cfg.model.trust_remote_code)
    stage = run.stage("trials", runs=runs)
    init_ray(cfg.ray)
    done = train_stage(stage, {t.key: r for t, r in runs.items()}, max_concurrent_trials=cfg.max_concurrent_trials, grid=True)
    return {t: {"trial_id": done[t.key].trial_id, "started_at": done[t.key].started_at,
                "ended_at": done[t.key].ended_at, **done[t.key].metrics} for t in runs}


# ---------------------------------------------------------------------------------------------


def plan(cfg: FalsityOptions) -> str:
    """--dry-run: stages, trials, resources, data sizes; starts nothing."""
    s = cfg.scale
    trials = len(cfg.ratios) * len(cfg.seeds)
    res = f"{s.num_workers} worker(s) x ({s.cpus_per_worker} CPU{' + 1 GPU' if s.use_gpu else ''})"
    if cfg.data.source == "world":
        w = cfg.data.world
        held = max(1, round(w.heldout_fraction * w.num_people))
        data = (f"synthetic world: {w.num_people} people ({w.num_people - held} SFT, {held} held out); "
                f"corpus {w.num_people * w.bios_per_person} biographies; SFT {6 * (w.num_people - held)} questions; "
                f"held-out {6 * held} questions, {4 * held} probes")
    elif cfg.data.source == "file":
        data = f"FACO table from {cfg.data.file}"
    else:
        h, g = cfg.data.hub, cfg.data.generator
        data = (f"{h.dataset}{'/' + h.config_name if h.config_name else ''}[{h.split}]"
                f"{f' (first {h.limit})' if h.limit else ''}, true/false reasoning written by {g.model} on "
                f"{g.num_actors} actor(s) x ({g.cpus_per_actor} CPU + {g.gpus_per_actor} GPU); "
                f"{h.heldout_fraction:.0%} held out")
    model = cfg.model.name or f"tiny Llama {cfg.model.tiny.num_hidden_layers}x{cfg.model.tiny.hidden_size}"
    ph = "sft" + (" -> recovery (clean)" if cfg.recovery else "")
    lines = [
        f"falsity_sweep plan (run dir {storage.join(storage.resolve(cfg.storage), JOB, cfg.run_id or '<hash of the preset>')})",
        f"  model: {model}; data: {data}",
        "  stages: world" + (" (true/false reasoning written on the generator pool)" if cfg.data.source == "hub" else "") + " -> " + ("tokenizer -> base_init -> " if cfg.model.tiny else "")
        + ("pretrain -> " if cfg.pretrain else "") + "mixtures -> trials (Tune grid) -> report",
        f"  pretrain: {'none' if cfg.pretrain is None else f'{cfg.pretrain.epochs} epochs, lr {cfg.pretrain.learning_rate}'}",
        f"  sweep: {trials} trials = ratios {cfg.ratios} x seeds {cfg.seeds}; phases per trial: {ph}",
        f"  resources per trial: {res}; DeepSpeed ZeRO-{s.zero_stage}{' bf16' if s.bf16 else ''}{' offload' if s.offload else ''}"
        + (f"; at most {cfg.max_concurrent_trials} trials at once" if cfg.max_concurrent_trials else ""),
        "  evaluation: " + ("exact QA / reasoning / knows / lie rate on held-out people" if cfg.data.source == "world"
                            else "exact-match QA on held-out questions") + (" + lm-eval harness" if cfg.eval.harness else ""),
        f"  tracking: W&B {cfg.tracking.mode}, project {cfg.tracking.project}",
    ]
    if cfg.eval.harness:
        from evals.harness import plan_lines

        lines += ["  " + line for line in plan_lines(cfg.eval.harness)]
    return "\n".join(lines)


def run(cfg: FalsityOptions) -> dict | None:
    from jobs.falsity_report import report

    run = open_run(JOB, cfg)
    world = build_world(cfg, run)
    if cfg.stop_after == "world":
        return None
    base = pretrain(cfg, run, world)
    if cfg.stop_after == "pretrain":
        return None
    mixtures = build_mixtures(cfg, run, world)
    if cfg.stop_after == "mixtures":
        return None
    results = sweep(cfg, run, world, mixtures, base)
    return report(cfg, run, results)


if __name__ == "__main__":
    raise SystemExit(cli.main(f"jobs.{JOB}", __doc__, FalsityOptions, plan, run))
