"""Falsity sweep: what false answers in synthetic SFT data do to a model (FACO, Cho 2024).

Method, as in "Unveiling Imitation Learning: Exploring the Impact of Data Falsity to Large
Language Model" (Findings of ACL 2024, arXiv 2404.09717):

1. A base student that *knows* facts: on the tiny preset, a small Llama pretrained on the
   synthetic world's knowledge corpus; on the cluster preset, a hub model as it is.
2. A FACO table: every question with a true response (reasoning + answer) and a false one (wrong
   answer, reasoning fabricated to support it).
3. For each falsity ratio r and seed: SFT the base on the mixture at r (same questions at every r,
   nested false sets), evaluate; then *recovery*: continue the ratio-r model on clean (r = 0) data
   for as many steps as the SFT phase took, evaluated at `eval.recovery_points` points along the
   way. The r = 0 trial continues too: it is the model trained clean for the same total steps.
4. Optionally (`budget_study`), SFT alone at half and double the budget at a few ratios: does
   more training make up for worse data?
5. Compare: accuracy against r; what the model knows against what it says (lie rate) and which
   answer it *chooses* against chance; how far recovery gets, step by step, against the clean
   model at the same total steps.

Stages under `<storage>/falsity_sweep/<run_id>/` (a re-run skips finished ones; a changed option
redoes exactly the stages downstream of it): `world`, `tokenizer`, `base_init`, `pretrain`,
`base_eval` (what the base student knows, per fact), `mixtures`, `trials` (a Ray Tune grid; Ray's
state under `ray/`), `harness` (lm-eval on every phase's model, when `eval.harness` is set) and the
report files (`jobs/falsity_report.py`). From table data (a FACO table file, or a hub QA set whose
reasoning a generator writes) each question is shown with its choices and is its own "fact".

Metrics (exact, on held-out people; definitions in `evals/qa.py`):
  qa_accuracy        exact-match accuracy on held-out single-hop questions,
  reasoning_accuracy exact-match accuracy on held-out two-hop (friend-of) questions,
  answered_rate      share of generations with a parseable "Answer:"; valid_rate: share whose
                     answer is a value of the asked attribute,
  knows_rate         share of facts whose true statement (unseen wording) beats every alternative
                     by `eval.knows_margin` nats; knows_own_rate: the same in the answers' wording,
  choice_accuracy    share of facts whose true *answer* the model ranks first among the options;
                     chance is 1 / options (FACO: a model that learned to lie falls below it),
  lie_rate           P(valid wrong answer | knows); lie_share: P(valid wrong answer),
  accuracy_if_known / accuracy_if_unknown: P(correct | knows) and P(correct | does not know),
  *_base             the same conditioned on what the base model knew before SFT.

summary.json: {"job", "run_id", "config", "world", "rows", "curve", "budget_rows", "findings"}.
`rows`: one per ratio x seed, the metrics after SFT, `recovered_<metric>` after recovery,
`clean_qa_accuracy` (the r = 0 model after as many steps) and `recovery_gap`, plus trial_id,
started_at, ended_at (unix seconds) and `harness/<task>/<metric>` columns when `eval.harness` is
set. `curve`: per ratio x seed x recovery step, the metrics, `clean_qa_accuracy` and `gap`.
`budget_rows`: the budget study's trials (budget 1 included). `findings.base`: the base model.
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
from cluster.models import ModelSpec
from cluster.runtime import init_ray
from cluster.stages import JobOptions, Run, Stage, open_run
from cluster.sweep import train_stage
from evals.harness import HarnessOptions
from jobs.world_student import world_and_student
from synth.falsity import DataOptions

JOB = "falsity_sweep"


class EvalOptions(Options):
    """How each trial's model is judged."""

    max_new_tokens: int = Field(40, gt=0, description="generation budget per answer")
    knows_margin: float = Field(1.0, ge=0, description="nats by which the true statement must beat every alternative for the model to 'know' a fact")
    recovery_points: int = Field(4, ge=1, description="evaluations along the recovery phase (a curve; the last at its end)")
    harness: HarnessOptions | None = Field(None, description="lm-evaluation-harness benchmarks (cluster presets); null: none")
    device: str = Field("cpu", description="device the rank-0 evaluation runs on (cuda on GPU presets)")


class BudgetStudy(Options):
    """Extra SFT-only trials at other training budgets: does more training make up for worse data?"""

    ratios: list[float] = Field([0.0, 0.5, 1.0], min_length=1, description="falsity ratios studied (each must be in `ratios`)")
    factors: list[float] = Field([0.5, 2.0], min_length=1, description="SFT budget multipliers (epochs x factor); 1 is the main grid")

    @field_validator("factors")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(f <= 0 for f in v):
            raise ValueError("budget factors must be positive")
        return sorted(set(v) - {1.0})


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
    budget_study: BudgetStudy | None = Field(None, description="SFT budget halved/doubled at a few ratios; null: skip")
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
        g = self.data.generator
        if self.data.source == "hub" and g is not None and self.eval.max_new_tokens < g.max_new_tokens + 32:
            raise ValueError(f"eval.max_new_tokens {self.eval.max_new_tokens} cannot hold the generator's "
                             f"{g.max_new_tokens}-token explanations and the answer after them; use at least "
                             f"{g.max_new_tokens + 32}")
        if self.budget_study is not None and (missing := set(self.budget_study.ratios) - set(self.ratios)):
            raise ValueError(f"budget_study.ratios: {sorted(missing)} not in ratios")
        return self


# ---------------------------------------------------------------------------------------------
# the grid: one trial per falsity ratio and seed


@dataclass(frozen=True)
class Trial:
    """One cell of the sweep; `key` names its learner run and its folders, `mixture` its table."""

    ratio: float
    seed: int
    budget: float = 1.0  # SFT epochs x budget; the main grid (with recovery) is budget 1

    @property
    def mixture(self) -> str:
        return f"r{self.ratio:g}-s{self.seed}"

    @property
    def key(self) -> str:
        return self.mixture + (f"-b{self.budget:g}" if self.budget != 1.0 else "")


def trials(cfg: FalsityOptions) -> list[Trial]:
    main = [Trial(r, s) for r, s in itertools.product(cfg.ratios, cfg.seeds)]
    b = cfg.budget_study
    return main + ([Trial(r, s, f) for r, f, s in itertools.product(b.ratios, b.factors, cfg.seeds)] if b else [])


# ---------------------------------------------------------------------------------------------
# 1-2. a FACO table and a base student that knows facts: jobs/world_student.py


# ---------------------------------------------------------------------------------------------
# 3. mixtures, and SFT at every ratio (then recovery on clean data) as a Tune grid


def build_mixtures(cfg: FalsityOptions, run: Run, world: Stage) -> Stage:
    """Stage `mixtures`: one SFT table per trial (nested false sets), clean ones included."""
    from synth.falsity import mixture

    def build(st: Stage) -> None:
        table = world.rows("sft")
        for key, t in {t.mixture: t for t in trials(cfg)}.items():
            st.save_rows(key, mixture(table, t.ratio, t.seed))

    stage = run.stage("mixtures", world=world, ratios=cfg.ratios, seeds=cfg.seeds)
    stage.ensure(build)
    return stage


def evaluate_base(cfg: FalsityOptions, run: Run, world: Stage, base: tuple[str, str]) -> Stage:
    """Stage `base_eval`: what the student knows before any SFT. Its per-fact table (`facts`) lets
    every trial count a lie against what the base model knew, not only what the trial's model knows."""
    import ray

    from evals.qa import faco_facts

    def build(st: Stage) -> dict[str, float]:
        init_ray(cfg.ray)
        task = ray.remote(num_cpus=1, num_gpus=1 if cfg.eval.device.startswith("cuda") else 0)(faco_facts)
        metrics, facts = ray.get(task.remote(base[0], heldout=world.path("heldout.parquet"),
                                             probes=world.path("probes.parquet"), max_new_tokens=cfg.eval.max_new_tokens,
                                             device=cfg.eval.device, knows_margin=cfg.eval.knows_margin))
        if facts:
            st.save_rows("facts", facts)
        return metrics

    stage = run.stage("base_eval", model=base[0], world=world, max_new_tokens=cfg.eval.max_new_tokens,
                      knows_margin=cfg.eval.knows_margin)
    print(f"[base_eval] {stage.ensure(build)}", flush=True)
    return stage


def learner_runs(cfg: FalsityOptions, run: Run, world: Stage, mixtures: Stage, base: tuple[str, str],
                 base_eval: Stage) -> dict[Trial, LearnerRun]:
    """Per trial: SFT on its mixture, evaluate, recovery SFT on clean data for as many steps
    (evaluated at `eval.recovery_points` points), evaluate."""
    from evals.qa import evaluate_faco

    facts = base_eval.path("facts.parquet") if "knows_rate" in base_eval.result else None
    evaluate = functools.partial(evaluate_faco, heldout=world.path("heldout.parquet"), probes=world.path("probes.parquet"),
                                 max_new_tokens=cfg.eval.max_new_tokens, device=cfg.eval.device,
                                 knows_margin=cfg.eval.knows_margin, base_facts=facts)
    runs = {}
    for t in trials(cfg):
        sft = cfg.sft if t.budget == 1.0 else cfg.sft.model_copy(update={
            "epochs": cfg.sft.epochs * t.budget, "max_steps": round(cfg.sft.max_steps * t.budget) if cfg.sft.max_steps > 0 else -1})
        phases = [Phase("sft", mixtures.path(f"{t.mixture}.parquet"), sft)]
        if cfg.recovery is not None and t.budget == 1.0:
            phases.append(Phase("recovery", mixtures.path(f"{Trial(0.0, t.seed).mixture}.parquet"), cfg.recovery,
                                eval_points=cfg.eval.recovery_points))
        runs[t] = LearnerRun(model=base[0], tokenizer=base[1], phases=phases, scale=cfg.scale, seed=t.seed,
                             evaluate=evaluate, tracking=cfg.tracking.for_run(run), tracking_group=run.group,
                             tracking_config={"ratio": t.ratio, "seed": t.seed, "budget": t.budget},
                             trust_remote_code=cfg.model.trust_remote_code)
    return runs


def sweep(cfg: FalsityOptions, run: Run, world: Stage, mixtures: Stage, base: tuple[str, str],
          base_eval: Stage) -> dict[Trial, dict]:
    """Stage `trials`: every trial's learner run, side by side as a Tune grid."""
    runs = learner_runs(cfg, run, world, mixtures, base, base_eval)
    stage = run.stage("trials", runs=runs)
    init_ray(cfg.ray)
    done = train_stage(stage, {t.key: r for t, r in runs.items()}, max_concurrent_trials=cfg.max_concurrent_trials, grid=True)
    scores = benchmark(cfg, run, stage, runs)
    return {t: {"trial_id": done[t.key].trial_id, "started_at": done[t.key].started_at,
                "ended_at": done[t.key].ended_at, **done[t.key].metrics, **scores.get(t.key, {})} for t in runs}


def benchmark(cfg: FalsityOptions, run: Run, trials_stage: Stage, runs: dict[Trial, LearnerRun]) -> dict[str, dict]:
    """Stage `harness` (when `eval.harness` is set): every phase's saved model on the lm-eval
    benchmarks, one Ray task per model (one GPU each on a cluster); key -> `<phase>/harness/...`."""
    if cfg.eval.harness is None:
        return {}
    from evals.harness import evaluate_models

    models = {f"{t.key}/{p.name}": trials_stage.path(t.key, p.name) for t, r in runs.items() for p in r.phases}

    def build(st: Stage) -> dict[str, dict]:
        scores = evaluate_models(models, cfg.eval.harness, cfg.eval.device)
        out: dict[str, dict] = {}
        for name, metrics in scores.items():
            key, phase = name.split("/")
            out.setdefault(key, {}).update({f"{phase}/harness/{k}": v for k, v in metrics.items()})
        return out

    stage = run.stage("harness", trials=trials_stage, harness=cfg.eval.harness, device=cfg.eval.device)
    return stage.ensure(build)


# ---------------------------------------------------------------------------------------------


def plan(cfg: FalsityOptions) -> str:
    """--dry-run: stages, trials, resources, data sizes; starts nothing."""
    s = cfg.scale
    n_trials = len(trials(cfg))
    res = f"{s.num_workers} worker(s) x ({s.cpus_per_worker} CPU{' + 1 GPU' if s.use_gpu else ''})"
    if cfg.data.source == "world":
        w = cfg.data.world
        held = w.num_heldout
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
    ph = "sft" + (f" -> recovery (clean, evaluated at {cfg.eval.recovery_points} points)" if cfg.recovery else "")
    b = cfg.budget_study
    lines = [
        f"falsity_sweep plan (run dir {storage.join(storage.resolve(cfg.storage), JOB, cfg.run_id or '<hash of the preset>')})",
        f"  model: {model}; data: {data}",
        "  stages: world" + (" (true/false reasoning written on the generator pool)" if cfg.data.source == "hub" else "") + " -> " + ("tokenizer -> base_init -> " if cfg.model.tiny else "")
        + ("pretrain -> " if cfg.pretrain else "") + "base_eval -> mixtures -> trials (Tune grid) -> "
        + ("harness (lm-eval, a Ray task per model) -> " if cfg.eval.harness else "") + "report",
        f"  pretrain: {'none' if cfg.pretrain is None else f'{cfg.pretrain.epochs} epochs, lr {cfg.pretrain.learning_rate}'}",
        f"  sweep: {n_trials} trials = ratios {cfg.ratios} x seeds {cfg.seeds}; phases per trial: {ph}"
        + (f"; budget study: ratios {b.ratios} x SFT budget x{b.factors} x seeds (SFT only)" if b else ""),
        f"  resources per trial: {res}; DeepSpeed ZeRO-{s.zero_stage}{' bf16' if s.bf16 else ''}{' offload' if s.offload else ''}"
        + (f"; at most {cfg.max_concurrent_trials} trials at once" if cfg.max_concurrent_trials else ""),
        "  evaluation: " + ("exact QA / reasoning / knows / lie rate on held-out people" if cfg.data.source == "world"
                            else "exact-match QA, knows / choice / lie rate over each held-out question's choices")
        + (" + lm-eval harness" if cfg.eval.harness else ""),
        f"  tracking: W&B {cfg.tracking.mode}, project {cfg.tracking.project}",
    ]
    if cfg.eval.harness:
        from evals.harness import plan_lines

        lines += ["  " + line for line in plan_lines(cfg.eval.harness)]
    return "\n".join(lines)


def run(cfg: FalsityOptions) -> dict | None:
    from jobs.falsity_report import report

    run = open_run(JOB, cfg)
    if (started := world_and_student(cfg, run)) is None:
        return None
    world, base = started
    base_eval = evaluate_base(cfg, run, world, base)
    mixtures = build_mixtures(cfg, run, world)
    if cfg.stop_after == "mixtures":
        return None
    results = sweep(cfg, run, world, mixtures, base, base_eval)
    return report(cfg, run, world, base_eval, results)


if __name__ == "__main__":
    raise SystemExit(cli.main(f"jobs.{JOB}", __doc__, FalsityOptions, plan, run))
