"""Robust fine-tuning: which cheap training arm keeps a model working on noisy inputs, and at what cost.

Method (the arms as published; their losses in `jobs/robust_objectives.py`):

1. A base student that knows facts and a question table: the falsity sweep's first two steps
   (`jobs/world_student.py`): on the tiny preset, a small Llama pretrained on the synthetic world;
   on the cluster presets, a hub model as it is with a question table.
2. Training arms, each an SFT of the base on the same clean questions (true responses):
   - plain         TRL's SFT, the reference every other arm is measured against;
   - augmentation  the clean table plus perturbed copies of its questions (EDA / TextAttack-style
                   typos, swaps, ... from `synth.perturb`, families and rate per arm);
   - neftune       NEFTune (Jain et al. 2023): noise on the input embeddings, TRL's own option;
   - r3f           R3F (Aghajanyan et al. 2021): symmetric KL between clean and noisy-embedding outputs;
   - adversarial   one-step embedding-space adversarial training (FreeLB / SMART style).
   Arms x seeds run as a Ray Tune grid of learner runs (Ray Train + DeepSpeed; ZeRO-3 on a cluster).
3. Evaluation on held-out questions, clean and under every perturbation family at several
   strengths (`synth.robust.evaluation_suite`: the same perturbed inputs for every arm). Families no
   arm trained on are *held out*: they show what robustness generalises beyond what was trained.
4. Cost: each arm's training time against plain SFT's, in wall clock and per token seen.

Stages under `<storage>/robust/<run_id>/` (a re-run skips finished ones; a changed option redoes
exactly the stages downstream of it): `world`, `tokenizer`, `base_init`, `pretrain` (as the falsity
sweep's), `tables` (each arm's SFT table), `suite` (the perturbed evaluation inputs), `arms` (the
Tune grid; Ray's state under `ray/`), `harness` (lm-eval on every arm's model, when `eval.harness` is
set) and the report files (`jobs/robust_report.py`).

Metrics (exact-match accuracy on held-out single-hop questions): `clean`, `<family>@<strength>`,
`trained` and `heldout` (means over the trained and held-out families' cells), per arm x seed.
summary.json: {"job", "run_id", "config", "families", "rows", "arms", "findings"}.
"""

from __future__ import annotations

import functools
import itertools
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cluster import cli, storage
from cluster.config import Options, UserError
from cluster.learners import LearnerOptions, LearnerRun, ScaleOptions, schedule
from cluster.models import ModelSpec
from cluster.runtime import init_ray
from cluster.stages import JobOptions, Run, Stage, open_run
from cluster.sweep import train_stage
from evals.harness import HarnessOptions, harness_stage
from jobs import robust_objectives as R
from jobs.world_student import world_and_student
from synth.falsity import DataOptions
from synth.perturb import FAMILIES
from synth.robust import AugmentOptions, Families

JOB = "robust"
OPTIONS = {name: cls for cls, name in R.ARMS.items()}  # objective -> its options class
REQUIRED = {"sft": (), "neftune": ("neftune_alpha",), "r3f": ("r3f_lambda", "noise_eps"),
            "adversarial": ("adv_eps", "adv_step")}


class Arm(Options):
    """One training arm: an objective, its parameters (on top of `sft`), and optionally augmentation."""

    objective: Literal["sft", "neftune", "r3f", "adversarial"] = Field(description="the learner objective (jobs/robust_objectives.py)")
    params: dict[str, float] = Field({}, description="the objective's parameters, every one given (neftune: neftune_alpha; "
                                     "r3f: r3f_lambda, noise_eps; adversarial: adv_eps, adv_step, optionally adv_init, adv_weight)")
    augment: AugmentOptions | None = Field(None, description="perturbed copies added to the clean table; null: the clean table")

    @model_validator(mode="after")
    def _params(self):
        cls = OPTIONS[self.objective]
        if missing := [p for p in REQUIRED[self.objective] if p not in self.params]:
            raise ValueError(f"objective {self.objective} needs {', '.join(missing)} in params")
        if unknown := sorted(set(self.params) - (set(cls.model_fields) - set(LearnerOptions.model_fields))):
            raise ValueError(f"objective {self.objective} takes no parameter {unknown[0]}")
        cls(**self.params)  # ranges (adv_eps > 0, ...) checked now, not on a worker
        return self

    def options(self, sft: LearnerOptions, steps: int | None = None) -> LearnerOptions:
        """The learner options of this arm: the shared SFT options plus the objective's parameters;
        `steps`: train exactly this many optimizer steps (an augmenting arm takes plain SFT's)."""
        opts = {**sft.model_dump(), **self.params, **({"max_steps": steps} if steps else {})}
        return OPTIONS[self.objective](**opts)


class EvalOptions(Options):
    """The perturbed evaluation suite and how each arm's model is judged."""

    families: Families = Field(list(FAMILIES), min_length=1, description="perturbation families evaluated (synth.perturb.FAMILIES)")
    strengths: list[float] = Field([0.1, 0.2, 0.4], min_length=1, description="perturbation rates evaluated, each in (0, 1]")
    seed: int = Field(0, description="seed of the evaluation perturbations (the same inputs for every arm)")
    max_new_tokens: int = Field(40, gt=0, description="generation budget per answer")
    batch_size: int = Field(64, gt=0, description="prompts per generate call")
    harness: HarnessOptions | None = Field(None, description="lm-evaluation-harness benchmarks on every arm's model (clean); null: none")
    device: str = Field("cpu", description="device the rank-0 evaluation runs on (cuda on GPU presets)")

    @field_validator("strengths")
    @classmethod
    def _rates(cls, v: list[float]) -> list[float]:
        if bad := [s for s in v if not 0.0 < s <= 1.0]:
            raise ValueError(f"perturbation strength {bad[0]} is outside (0, 1]")
        return sorted(set(v))


class RobustOptions(JobOptions):
    """Robust fine-tuning preset."""

    model: ModelSpec = Field(description="student model: hub name or a tiny Llama built here")
    tokenizer: str | None = Field(None, description="hub tokenizer (hub models); null: the model's, or trained offline for tiny")
    model_seed: int = Field(0, description="seed of the tiny model's random init")
    data: DataOptions = Field(default_factory=DataOptions, description="question table source (as the falsity sweep's)")
    pretrain: LearnerOptions | None = Field(None, description="pretraining on the knowledge corpus; null: use the model as it is")
    pretrain_scale: ScaleOptions = Field(default_factory=ScaleOptions, description="workers and DeepSpeed for pretraining")
    sft: LearnerOptions = Field(description="the SFT every arm shares (learning rate, epochs, batch, ...)")
    arms: dict[str, Arm] = Field(description="arm name -> objective, parameters, augmentation; must include `plain` (objective sft, nothing else)")
    seeds: list[int] = Field([0], min_length=1, description="SFT seeds (augmentation draw and data order)")
    scale: ScaleOptions = Field(default_factory=ScaleOptions, description="workers and DeepSpeed per arm run")
    eval: EvalOptions = Field(default_factory=EvalOptions, description="evaluation")
    stop_after: Literal["world", "pretrain", "suite"] | None = Field(None, description="stop once this stage is done; null: run everything")

    @field_validator("arms", mode="before")
    @classmethod
    def _dropped(cls, v):
        """`arms.<name>=null` on the command line leaves that arm out."""
        return {k: a for k, a in v.items() if a is not None} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _consistent(self):
        plain = self.arms.get("plain")
        if plain is None or plain.objective != "sft" or plain.params or plain.augment is not None:
            raise ValueError("arms: needs `plain: {objective: sft}`, the reference every arm is measured against")
        if self.model.tiny is None and self.pretrain is not None and self.data.source != "world":
            raise ValueError("pretrain: only the synthetic world has a knowledge corpus; set pretrain: null")
        return self

    @property
    def trained_families(self) -> list[str]:
        return sorted({f for a in self.arms.values() if a.augment for f in a.augment.families})

    @property
    def heldout_families(self) -> list[str]:
        return [f for f in self.eval.families if f not in self.trained_families]


def cells(cfg: RobustOptions) -> list[tuple[str, int]]:
    """The grid: (arm, seed)."""
    return list(itertools.product(cfg.arms, cfg.seeds))


def key(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


# ---------------------------------------------------------------------------------------------
# 2. each arm's SFT table; 3. the perturbed evaluation suite


def build_tables(cfg: RobustOptions, run: Run, world: Stage) -> Stage:
    """Stage `tables`: `plain` (the clean questions) and `<arm>-s<seed>` for each augmenting arm."""
    from synth.robust import augmented_rows, clean_rows

    augmenting = {a: arm.augment for a, arm in cfg.arms.items() if arm.augment is not None}

    def build(st: Stage) -> dict[str, int]:
        table = world.rows("sft")
        st.save_rows("plain", clean_rows(table))
        sizes = {"plain": len(table)}
        for (a, opts), seed in itertools.product(augmenting.items(), cfg.seeds):
            rows = augmented_rows(table, opts, seed)
            st.save_rows(key(a, seed), rows)
            sizes[key(a, seed)] = len(rows)
        return sizes

    stage = run.stage("tables", world=world, augment=augmenting, seeds=cfg.seeds)
    print(f"[tables] {stage.ensure(build)}", flush=True)
    return stage


def table_of(tables: Stage, arm: str, seed: int, cfg: RobustOptions) -> str:
    return tables.path(f"{key(arm, seed) if cfg.arms[arm].augment else 'plain'}.parquet")


def build_suite(cfg: RobustOptions, run: Run, world: Stage) -> Stage:
    """Stage `suite`: held-out single-hop questions, clean and perturbed by every family x strength."""
    from synth.robust import evaluation_suite

    def build(st: Stage) -> dict[str, int]:
        heldout = [r for r in world.rows("heldout") if r.get("kind", "single") == "single"]
        if not heldout:
            raise UserError("data: no held-out single-hop questions to evaluate on")
        suite = evaluation_suite(heldout, cfg.eval.families, cfg.eval.strengths, cfg.eval.seed)
        st.save_rows("suite", suite)
        return {"questions": len(heldout), "prompts": len(suite)}

    stage = run.stage("suite", world=world, families=cfg.eval.families, strengths=cfg.eval.strengths, seed=cfg.eval.seed)
    print(f"[suite] {stage.ensure(build)}", flush=True)
    return stage


# ---------------------------------------------------------------------------------------------
# 2-3. every arm x seed as a Tune grid, each run evaluated on the suite


def train_arms(cfg: RobustOptions, run: Run, tables: Stage, suite: Stage, base: tuple[str, str]) -> dict[tuple[str, int], dict]:
    """Stage `arms`: per arm and seed, one learner run of the arm's objective on its table, then
    the suite. Every arm trains as many optimizer steps as plain SFT (an augmenting arm stops at
    plain SFT's step count, part-way through its larger table): one training budget.
    (arm, seed) -> metrics (`sft/clean`, `sft/typo@0.2`, ..., `sft/train_runtime_s`)."""
    from evals.robust import evaluate_robust

    evaluate = functools.partial(evaluate_robust, suite=suite.path("suite.parquet"), max_new_tokens=cfg.eval.max_new_tokens,
                                 device=cfg.eval.device, batch_size=cfg.eval.batch_size)
    plain_steps = schedule(cfg.sft, tables.result["plain"], cfg.scale.num_workers).steps
    steps = lambda a: plain_steps if cfg.arms[a].augment else None  # noqa: E731
    runs = {
        (a, s): LearnerRun(model=base[0], tokenizer=base[1],
                           phases=[R.phase("sft", table_of(tables, a, s, cfg), cfg.arms[a].options(cfg.sft, steps(a)))],
                           scale=cfg.scale, seed=s, evaluate=evaluate, tracking=cfg.tracking.for_run(run),
                           tracking_group=run.group, tracking_config={"arm": a, "seed": s},
                           trust_remote_code=cfg.model.trust_remote_code)
        for a, s in cells(cfg)
    }
    stage = run.stage("arms", runs=runs)
    init_ray(cfg.ray)
    done = train_stage(stage, {key(a, s): r for (a, s), r in runs.items()}, max_concurrent_trials=cfg.max_concurrent_trials,
                       grid=True)
    scores = harness_stage(run, {key(a, s): stage.path(key(a, s), "sft") for a, s in runs}, cfg.eval.harness,
                           cfg.eval.device, prefix="sft/harness")
    return {(a, s): {"trial_id": done[key(a, s)].trial_id, **done[key(a, s)].metrics, **scores.get(key(a, s), {})}
            for a, s in runs}


# ---------------------------------------------------------------------------------------------


def plan(cfg: RobustOptions) -> str:
    """--dry-run: stages, arms, resources, evaluation; starts nothing."""
    s = cfg.scale
    model = cfg.model.name or f"tiny Llama {cfg.model.tiny.num_hidden_layers}x{cfg.model.tiny.hidden_size}"
    data = (f"synthetic world seed {cfg.data.world.seed} ({cfg.data.world.num_people} people)" if cfg.data.source == "world"
            else f"table {cfg.data.file}" if cfg.data.source == "file" else f"hub QA set {cfg.data.hub.dataset}")

    def arm_line(name: str, a: Arm) -> str:
        extra = ", ".join(f"{k}={v:g}" for k, v in a.params.items())
        aug = (f"; + perturbed copies of {a.augment.share:.0%} of rows ({', '.join(a.augment.families)}, "
               f"rate {a.augment.rate[0]:g}-{a.augment.rate[1]:g})" if a.augment else "")
        return f"    {name}: {a.objective}{f' ({extra})' if extra else ''}{aug}"

    lines = [
        f"robust plan (run dir {storage.join(storage.resolve(cfg.storage), JOB, cfg.run_id or '<hash of the preset>')})",
        f"  model: {model}; data: {data}",
        "  stages: world -> " + ("tokenizer -> base_init -> " if cfg.model.tiny else "") + ("pretrain -> " if cfg.pretrain else "")
        + "tables -> suite -> arms (Tune grid) -> " + ("harness (lm-eval, a Ray task per model) -> " if cfg.eval.harness else "")
        + "report",
        f"  arms ({len(cfg.arms)}) x seeds {cfg.seeds} = {len(cells(cfg))} learner runs; SFT {cfg.sft.epochs:g} epochs, lr {cfg.sft.learning_rate:g}",
        *[arm_line(n, a) for n, a in cfg.arms.items()],
        f"  resources per run: {s.num_workers} worker(s) x ({s.cpus_per_worker} CPU{' + 1 GPU' if s.use_gpu else ''}); "
        f"DeepSpeed ZeRO-{s.zero_stage}{' bf16' if s.bf16 else ''}"
        + (f"; at most {cfg.max_concurrent_trials} runs at once" if cfg.max_concurrent_trials else ""),
        f"  evaluation: held-out questions clean and under {', '.join(cfg.eval.families)} at strengths "
        f"{', '.join(f'{x:g}' for x in cfg.eval.strengths)}; trained families: {', '.join(cfg.trained_families) or 'none'}; "
        f"held out: {', '.join(cfg.heldout_families) or 'none'}" + (" + lm-eval harness" if cfg.eval.harness else ""),
        f"  tracking: W&B {cfg.tracking.mode}, project {cfg.tracking.project}",
    ]
    if cfg.eval.harness:
        from evals.harness import plan_lines

        lines += ["  " + line for line in plan_lines(cfg.eval.harness)]
    return "\n".join(lines)


def run(cfg: RobustOptions) -> dict | None:
    from jobs.robust_report import report

    run = open_run(JOB, cfg)
    if (started := world_and_student(cfg, run)) is None:
        return None
    world, base = started
    tables = build_tables(cfg, run, world)
    suite = build_suite(cfg, run, world)
    if cfg.stop_after == "suite":
        return None
    results = train_arms(cfg, run, tables, suite, base)
    return report(cfg, run, suite, results)


if __name__ == "__main__":
    raise SystemExit(cli.main(f"jobs.{JOB}", __doc__, RobustOptions, plan, run))
