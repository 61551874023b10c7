"""GRADMM: readable synthetic text by gradient matching with ADMM (Nguyen, Li et al., ICML 2025).

Method (the authors' code, BigML-CS-UCLA/GRADMM; the algorithm in `synth/gradmatch.py`):

1. A student and a labelled task, classification as next-token prediction (`synth/classify.py`):
   on the tiny preset, a small Llama pretrained on the synthetic world (the falsity sweep's first
   two steps, `jobs/world_student.py`) and short texts about the world's towns, "Oskar has a
   lizard.", whose class is the town's flag (white or black: a property the student never saw);
   on the cluster presets, a hub model and SST-2-style table data. Splits: `real` (per class, the
   few real examples), `dev` (selection), `test` (reported only).
2. Target: per class, the real examples' mean gradient of the label's loss with respect to the
   output layer; distance 1 - cosine.
3. Generation, per class in rounds of `batch` sequences, one Ray Tune trial per method and ρ:
   full GRADMM (ADMM: Adam X-updates on f + ρ/2 ||X - Z + Λ/ρ||², the LM's most probable token among
   the top-k nearest as the Z-update, Λ += ρ (X - Z)), GRADMM with DP (the Gaussian mechanism on
   the target), and project-once (f alone, then one projection; its X is the continuous upper
   bound). Every class x round is a file on storage as soon as it is done: a re-run resumes.
   ρ is selected per method by the cosine of the synthetic set's gradient to the *dev* examples'
   gradient (never the test split).
4. Baselines of the same size: zero-shot generation (the LM's own samples: the tiny LM follows no
   instruction, so they are class-blind), few-shot generation (continuations of `few_shot` real
   examples of the class) and a random subset of the real examples.
5. Each text arm fine-tunes the student (TRL SFT: prompt = text + suffix, completion = the
   verbalizer) over `finetune.seeds`, as a Ray Tune grid of learner runs; test accuracy compares
   the verbalizers' logits. Per arm also: the gradient cosine to the real and dev gradients, the
   texts' perplexity under the student, example texts.

Stages under `<storage>/gradmatch/<run_id>/`: `world`, `tokenizer`, `base_init`, `pretrain` (tiny),
`task`, `generation` (units under `generation/<trial>/`), `baselines`, `arms` (each arm's texts,
scores and SFT table), `finetune` (the Tune grid) and the report (`jobs/gradmatch_report.py`):
summary.json {"job", "run_id", "config", "task", "generation", "selected", "arms", "rows", "trials",
"filter_agreement", "curves", "examples", "texts", "findings"}.
"""

from __future__ import annotations

import functools
import random
from typing import Literal

from pydantic import Field, model_validator

from cluster import cli, storage
from cluster.config import Options, UserError
from cluster.learners import LearnerOptions, LearnerRun, Phase, ScaleOptions
from cluster.models import ModelSpec, base_model
from cluster.reports import mean
from cluster.runtime import init_ray
from cluster.stages import JobOptions, Run, Stage, open_run
from cluster.sweep import train_stage
from evals.harness import HarnessOptions, harness_stage
from jobs.world_student import world_and_student
from synth.classify import TaskOptions
from synth.falsity import DataOptions
from synth.gradmatch import GenOptions, Trial

JOB = "gradmatch"
TEXT_ARMS = ("zero_shot", "few_shot", "real_subset", "project_once", "gradmm", "gradmm_dp")
ARMS = (*TEXT_ARMS, "continuous")  # continuous: embeddings, not text (cosine only)


class FinetuneOptions(Options):
    """How every arm's synthetic set fine-tunes the student."""

    sft: LearnerOptions = Field(description="the SFT every arm shares")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="fine-tuning seeds (data order)")
    arms: list[Literal[TEXT_ARMS]] = Field(list(TEXT_ARMS), min_length=1, description="text arms fine-tuned (all are scored)")


class EvalOptions(Options):
    """How every fine-tuned model is judged: test accuracy, and optionally lm-eval benchmarks."""

    device: str = Field("cpu", description="where rank 0 evaluates the fine-tuned model (cuda on GPU presets)")
    harness: HarnessOptions | None = Field(None, description="lm-evaluation-harness benchmarks on every fine-tuned model; null: none")


class GradmatchOptions(JobOptions):
    """GRADMM preset."""

    model: ModelSpec = Field(description="student model: hub name or a tiny Llama built here")
    tokenizer: str | None = Field(None, description="hub tokenizer; null: the model's, or trained offline for tiny")
    model_seed: int = Field(0, description="seed of the tiny model's random init")
    data: DataOptions = Field(default_factory=DataOptions, description="the synthetic world (task.source world; as the falsity sweep's)")
    pretrain: LearnerOptions | None = Field(None, description="pretraining on the world's knowledge corpus; null: the model as it is")
    pretrain_scale: ScaleOptions = Field(default_factory=ScaleOptions, description="workers and DeepSpeed for pretraining")
    task: TaskOptions = Field(default_factory=TaskOptions, description="the labelled task")
    generation: GenOptions = Field(default_factory=GenOptions, description="synthetic text generation")
    generation_device: str = Field("cpu", description="where each generation trial runs (cuda on GPU presets)")
    generation_gpus: float = Field(0, ge=0, description="GPUs per generation trial")
    finetune: FinetuneOptions = Field(description="fine-tuning every arm's set")
    eval: EvalOptions = Field(default_factory=EvalOptions, description="evaluation of the fine-tuned models")
    scale: ScaleOptions = Field(default_factory=ScaleOptions, description="workers and DeepSpeed per fine-tuning run")
    stop_after: Literal["world", "pretrain", "task", "generation"] | None = Field(None, description="stop once this stage is done")

    @model_validator(mode="after")
    def _consistent(self):
        if self.task.source == "world" and self.data.source != "world":
            raise ValueError("task.source world needs data.source world (the towns' texts come from the world)")
        if self.model.tiny is None and self.pretrain is not None:
            raise ValueError("pretrain: only the tiny model pretrains on the world; set pretrain: null")
        if self.task.source == "world" and self.task.real_per_class < self.generation.few_shot:
            raise ValueError(f"generation.few_shot {self.generation.few_shot} needs that many real examples per class")
        if self.task.source == "world" and self.generation.per_class > self.task.real_per_class:
            raise ValueError(f"generation.per_class {self.generation.per_class} > task.real_per_class "
                             f"{self.task.real_per_class}: the world task has no more real texts for the random "
                             "real subset of the same size")
        return self

    @property
    def trials(self) -> list[Trial]:
        g = self.generation
        return ([Trial("gradmm", r) for r in g.rhos] + ([Trial("dp", r) for r in g.rhos] if g.dp else [])
                + [Trial("once", None)])


def student(cfg: GradmatchOptions, run: Run) -> tuple[str, str] | None:
    """(model, tokenizer): the world's pretrained tiny student, or the named model as it is."""
    if cfg.task.source == "world":
        started = world_and_student(cfg, run)
        return None if started is None else started[1]
    return base_model(run, cfg.model, tokenizer=cfg.tokenizer, texts=None, seed=cfg.model_seed)


# ---------------------------------------------------------------------------------------------
# 1. the task; 3. generation trials; 4. baselines


def build_task(cfg: GradmatchOptions, run: Run, base: tuple[str, str]) -> Stage:
    """Stage `task`: the split rows (real / dev / test), after the checks that need the tokenizer:
    one-token verbalizers, top-k within the tokens a projection may choose."""
    from cluster.models import load_tokenizer
    from cluster.stages import fetch
    from synth.classify import split_rows
    from synth.gradmatch import allowed_tokens, verbalizer_ids

    def build(st: Stage) -> dict:
        tok = load_tokenizer(fetch(base[1]), cfg.model.trust_remote_code)
        verb = verbalizer_ids(tok, cfg.task.verbalizers)
        allowed = len(allowed_tokens(tok, cfg.generation.words_only))
        if cfg.generation.top_k > allowed:
            raise UserError(f"generation.top_k {cfg.generation.top_k} is larger than the {allowed} tokens a "
                            "projection may choose from")
        extra = max(0, cfg.generation.per_class - cfg.task.real_per_class)
        rows = split_rows(cfg.task, cfg.data.world if cfg.task.source == "world" else None, pool=extra)
        for c, name in enumerate(cfg.task.classes):
            if (have := sum(r["label"] == c and r["split"] in ("real", "pool") for r in rows)) < cfg.generation.per_class:
                raise UserError(f"task: class {name} has {have} training examples for the random real subset of "
                                f"generation.per_class {cfg.generation.per_class}")
        for split in ("real", "dev", "test", "pool"):
            st.save_rows(split, [r for r in rows if r["split"] == split])
        lengths = [len(tok(r["text"], add_special_tokens=False).input_ids) for r in rows if r["split"] == "real"]
        return {"real": sum(r["split"] == "real" for r in rows), "dev": sum(r["split"] == "dev" for r in rows),
                "test": sum(r["split"] == "test" for r in rows), "real_mean_tokens": sum(lengths) / len(lengths),
                "allowed_tokens": allowed, "verbalizer_ids": verb}

    stage = run.stage("task", tokenizer=base[1], task=cfg.task, data=cfg.data if cfg.task.source == "world" else None,
                      words_only=cfg.generation.words_only, per_class=cfg.generation.per_class)
    print(f"[task] {stage.ensure(build)}", flush=True)
    return stage


def resolved(cfg: GradmatchOptions, task: Stage) -> GenOptions:
    """The generation options with the length the data decides (null: the real texts' mean).
    A null `init_size` is resolved in each generation trial, where the model is loaded."""
    length = cfg.generation.length or max(1, round(task.result["real_mean_tokens"]))
    return cfg.generation.model_copy(update={"length": length})


def on_generation_device(cfg: GradmatchOptions, fn, *args):
    """`fn(*args)` in a Ray task holding what a generation trial holds (a GPU on the cluster
    presets): the driver's node may have none."""
    import ray

    init_ray(cfg.ray)
    return ray.get(ray.remote(num_cpus=1, num_gpus=cfg.generation_gpus)(fn).remote(*args))


def _generation_trial(config: dict) -> None:
    """One Tune trial: every class and round of one method at one ρ (`synth.gradmatch.run_trial`)."""
    import ray.tune
    import torch

    from cluster.stages import fetch, read_rows
    from synth.gradmatch import run_trial

    ctx = config["ctx"]
    torch.set_num_threads(max(1, int(ctx["threads"])))
    trial: Trial = config["trial"]
    out = run_trial(trial, model_dir=fetch(ctx["model"]), tokenizer_dir=fetch(ctx["tokenizer"]), real=read_rows(ctx["real"]),
                    suffix=ctx["suffix"], verbalizers=ctx["verbalizers"], opts=ctx["opts"],
                    out=storage.join(ctx["out"], trial.key), device=ctx["device"])
    ray.tune.report({"key": trial.key, **{f"cos/{c}": sum(u["cosine"] for u in us) / len(us) for c, us in out.items()}})


def generate(cfg: GradmatchOptions, run: Run, task: Stage, base: tuple[str, str], opts: GenOptions) -> Stage:
    """Stage `generation`: the trials side by side as a Ray Tune grid (one CPU, or `generation_gpus`,
    each); their units land under the stage as they finish, so a re-run resumes mid-trial."""
    import ray
    import ray.tune as tune

    def build(st: Stage) -> dict:
        init_ray(cfg.ray)
        cpus = ray.cluster_resources().get("CPU", 1)
        ctx = {"model": base[0], "tokenizer": base[1], "real": task.path("real.parquet"), "suffix": cfg.task.suffix,
               "verbalizers": cfg.task.verbalizers, "opts": opts, "out": st.uri, "device": cfg.generation_device,
               "threads": 1}
        trials = {t.key: t for t in cfg.trials}
        n = cfg.max_concurrent_trials or max(1, int(cpus))
        print(f"[generation] {len(trials)} trials ({', '.join(trials)}), {min(n, len(trials))} at a time; "
              f"{len(cfg.task.classes)} classes x {opts.rounds} rounds x {opts.outer_steps} outer steps each", flush=True)
        res = {"cpu": 1, **({"gpu": cfg.generation_gpus} if cfg.generation_gpus else {})}
        tuner = tune.Tuner(
            tune.with_resources(_generation_trial, res),
            param_space={"trial": tune.grid_search(list(trials.values())), "ctx": ctx},
            tune_config=tune.TuneConfig(max_concurrent_trials=n),
            run_config=tune.RunConfig(name=f"generation-{st.hash}", storage_path=run.ray_storage,
                                      failure_config=tune.FailureConfig(max_failures=1), verbose=1),
        )
        results = tuner.fit()
        if failed := [r for r in results if r.error]:
            raise RuntimeError(f"generation: {len(failed)} trial(s) failed, first: {failed[0].error}")
        return {r.metrics["key"]: {k: v for k, v in r.metrics.items() if k.startswith("cos/")} for r in results}

    stage = run.stage("generation", task=task, model=base[0], opts=opts, trials=[t.key for t in cfg.trials],
                      suffix=cfg.task.suffix, verbalizers=cfg.task.verbalizers)
    print(f"[generation] {stage.ensure(build)}", flush=True)
    return stage


def build_baselines(cfg: GradmatchOptions, run: Run, task: Stage, base: tuple[str, str], opts: GenOptions) -> Stage:
    """Stage `baselines`: per class, `per_class` texts of the zero-shot and few-shot generation arms
    (the LM's samples of `length` allowed tokens) and of a random real subset."""
    stage = run.stage("baselines", task=task, model=base[0], opts=opts)
    stage.ensure(lambda st: on_generation_device(cfg, _baselines, st, cfg, task, base, opts))
    return stage


def _baselines(st: Stage, cfg: GradmatchOptions, task: Stage, base: tuple[str, str], opts: GenOptions) -> dict:
    """The build of `baselines`, in a Ray task on the generation device."""
    import torch

    from cluster.models import load_model, load_tokenizer
    from cluster.stages import fetch
    from synth.gradmatch import allowed_tokens, sample, text_ids

    tok = load_tokenizer(fetch(base[1]), cfg.model.trust_remote_code)
    model = load_model(fetch(base[0])).to(cfg.generation_device)
    allowed = allowed_tokens(tok, opts.words_only)
    real, pool = task.rows("real"), task.rows("pool")
    gen = torch.Generator().manual_seed(opts.seed)
    rng = random.Random(opts.seed)
    out = {}
    for c in range(len(cfg.task.classes)):
        mine = [r["text"] for r in real if r["label"] == c]
        demos = [" ".join(rng.sample(mine, opts.few_shot)) for _ in range(opts.per_class)]
        out[c] = {"zero_shot": sample(model, tok, [""] * opts.per_class, opts.length, allowed, gen),
                  "few_shot": sample(model, tok, demos, opts.length, allowed, gen),
                  "real_subset": text_ids(tok, rng.sample(mine + [r["text"] for r in pool if r["label"] == c],
                                                          opts.per_class))}
        print(f"[baselines] class {cfg.task.classes[c]}: {opts.per_class} texts per arm", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# 3. selection and each arm's scores; 5. fine-tuning


def score_arms(cfg: GradmatchOptions, run: Run, task: Stage, gen: Stage, baselines: Stage, base: tuple[str, str],
               opts: GenOptions) -> Stage:
    """Stage `arms`: ρ selected per method on the dev gradient; per arm and class the texts (as
    decoded: what fine-tuning reads), their gradient cosine to the real and dev gradients (for
    `continuous`, of the embeddings), perplexity under the student, and each arm's SFT table."""
    stage = run.stage("arms", task=task, generation=gen, baselines=baselines, model=base[0], suffix=cfg.task.suffix,
                      verbalizers=cfg.task.verbalizers)
    stage.ensure(lambda st: on_generation_device(cfg, _arms, st, cfg, task, gen, baselines, base, opts))
    return stage


def _arms(st: Stage, cfg: GradmatchOptions, task: Stage, gen: Stage, baselines: Stage, base: tuple[str, str],
          opts: GenOptions) -> dict:
    """The build of `arms`, in a Ray task on the generation device."""
    import torch

    from cluster.models import load_model, load_tokenizer
    from cluster.stages import fetch
    from synth import gradmatch as G

    tok = load_tokenizer(fetch(base[1]), cfg.model.trust_remote_code)
    model = load_model(fetch(base[0])).to(cfg.generation_device)
    m = G.matcher(model, tok, cfg.task.suffix, opts.words_only)
    verb = task.result["verbalizer_ids"]
    classes = range(len(cfg.task.classes))

    def grads(split: str):
        rows = task.rows(split)
        return G.class_gradients(m, G.text_ids(tok, [r["text"] for r in rows]), [r["label"] for r in rows], verb)

    real_t, dev_t = grads("real"), grads("dev")

    units = {t.key: {c: [G.read_unit(gen.path(t.key), c, r) for r in range(opts.rounds)] for c in classes}
             for t in cfg.trials}

    def retok(ids: list[list[int]]) -> tuple[list[str], list[list[int]]]:
        texts = [tok.decode(s) for s in ids]
        return texts, G.text_ids(tok, texts)

    def score(ids_by_class: dict[int, list[list[int]]]) -> dict:
        per = {}
        for c in classes:
            texts, ids = retok(ids_by_class[c])
            per[c] = {"texts": texts, "ids": ids_by_class[c], "cos_real": G.set_cosine(m, ids, verb[c], real_t[c]),
                      "cos_dev": G.set_cosine(m, ids, verb[c], dev_t[c]),
                      "perplexity": G.perplexity(model, ids, m.bos_id)}
        return per

    from evals.classify import fewshot_predict

    real_rows = task.rows("real")
    rng = random.Random(opts.seed)
    demos = [d for c in classes for d in rng.sample([r for r in real_rows if r["label"] == c], opts.few_shot)]
    rng.shuffle(demos)
    kept: dict[str, float] = {}

    def chosen(key: str, c: int) -> list[list[int]]:
        """The class's set: the candidates the filter keeps first (all, without the filter)."""
        cands = [s for u in units[key][c] for s in u["ids"]]
        if not opts.filter:
            return cands[: opts.per_class]
        labels = fewshot_predict(model, tok, [tok.decode(s) for s in cands], demos, cfg.task.suffix,
                                 cfg.task.verbalizers, verb)
        agree = [s for s, y in zip(cands, labels) if y == c]
        kept[f"{key}/{c}"] = len(agree) / len(cands)
        return (agree + [s for s, y in zip(cands, labels) if y != c])[: opts.per_class]

    trials = {}
    for t in cfg.trials:
        trials[t.key] = score({c: chosen(t.key, c) for c in classes})
    selected = {}
    for method, arm in (("gradmm", "gradmm"), ("dp", "gradmm_dp")):
        keys = [t.key for t in cfg.trials if t.method == method]
        if keys:
            selected[arm] = max(keys, key=lambda k: sum(trials[k][c]["cos_dev"] for c in classes))
    arms = {"zero_shot": score({c: baselines.result[str(c)]["zero_shot"] for c in classes}),
            "few_shot": score({c: baselines.result[str(c)]["few_shot"] for c in classes}),
            "real_subset": score({c: baselines.result[str(c)]["real_subset"] for c in classes}),
            "project_once": trials["once"], **{a: trials[k] for a, k in selected.items()}}
    # the continuous upper bound: project-once's embeddings, before the projection
    cont = {}
    for c in classes:
        xs = torch.cat([G.read_x(gen.path("once"), c, r) for r in range(opts.rounds)])
        with torch.no_grad():
            h = m.hidden(xs.to(m.device))
            lab = torch.full((h.shape[0],), verb[c], device=m.device)
            cont[c] = {"cos_real": float(G.gradient_cosine(h, m.head, lab, real_t[c])),
                       "cos_dev": float(G.gradient_cosine(h, m.head, lab, dev_t[c]))}
    arms["continuous"] = cont
    for arm in TEXT_ARMS:
        if arm in arms:
            st.save_rows(arm, [{"prompt": t + cfg.task.suffix, "completion": cfg.task.verbalizers[c]}
                               for c in classes for t in arms[arm][c]["texts"]])
    first = next(iter(units.values()))[0][0]  # every unit of the run starts at the same size
    return {"selected": selected, "arms": arms, "filter_agreement": kept, "init_size": first["init_size"],
            "trials": {k: {c: {x: v[c][x] for x in ("cos_real", "cos_dev")} for c in classes} for k, v in trials.items()},
            "curves": {k: curve([u["history"] for per in units[k].values() for u in per]) for k in units}}


def curve(histories: list[list[dict]]) -> list[dict]:
    """A trial's outer steps, each cosine averaged over its classes and rounds."""
    return [{"step": i + 1, **{k: mean([h[i].get(k) for h in histories]) for k in ("x_cosine", "z_cosine", "best")}}
            for i in range(len(histories[0]))]


def key(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


def finetune(cfg: GradmatchOptions, run: Run, task: Stage, arms: Stage, base: tuple[str, str]) -> dict[tuple[str, int], dict]:
    """Stage `finetune`: every text arm x seed, one learner run on the arm's table, evaluated on
    the test split; (arm, seed) -> metrics (`sft/accuracy`, ...)."""
    from evals.classify import evaluate_classifier

    evaluate = functools.partial(evaluate_classifier, test=task.path("test.parquet"), suffix=cfg.task.suffix,
                                 verbalizer_ids=task.result["verbalizer_ids"], device=cfg.eval.device)
    todo = [a for a in cfg.finetune.arms if a in arms.result["arms"]]
    runs = {(a, s): LearnerRun(model=base[0], tokenizer=base[1], phases=[Phase("sft", arms.path(f"{a}.parquet"), cfg.finetune.sft)],
                               scale=cfg.scale, seed=s, evaluate=evaluate, tracking=cfg.tracking.for_run(run),
                               tracking_group=run.group, tracking_config={"arm": a, "seed": s},
                               trust_remote_code=cfg.model.trust_remote_code)
            for a in todo for s in cfg.finetune.seeds}
    stage = run.stage("finetune", runs=runs)
    init_ray(cfg.ray)
    done = train_stage(stage, {key(a, s): r for (a, s), r in runs.items()}, max_concurrent_trials=cfg.max_concurrent_trials,
                       grid=True)
    scores = harness_stage(run, {key(a, s): stage.path(key(a, s), "sft") for a, s in runs}, cfg.eval.harness,
                           cfg.eval.device, prefix="sft/harness")
    return {(a, s): {**done[key(a, s)].metrics, **scores.get(key(a, s), {})} for a, s in runs}


# ---------------------------------------------------------------------------------------------


def plan(cfg: GradmatchOptions) -> str:
    """--dry-run: stages, trials, arms, resources; starts nothing."""
    g, t, s = cfg.generation, cfg.task, cfg.scale
    model = cfg.model.name or f"tiny Llama {cfg.model.tiny.num_hidden_layers}x{cfg.model.tiny.hidden_size}"
    data = (f"synthetic world seed {cfg.data.world.seed}: '{t.template}', class = the town's flag" if t.source == "world"
            else f"table {t.dataset} ({t.train_split} -> real/dev, {t.test_split} -> test)")
    return "\n".join([
        f"gradmatch plan (run dir {storage.join(storage.resolve(cfg.storage), JOB, cfg.run_id or '<hash of the preset>')})",
        f"  model: {model}; task: {data}",
        f"  classes {t.classes} -> verbalizers {t.verbalizers} after {t.suffix!r}; per class {t.real_per_class} real, "
        f"{t.dev_per_class} dev, <= {t.test_per_class} test",
        "  stages: " + ("world -> tokenizer -> base_init -> " if cfg.model.tiny else "") + ("pretrain -> " if cfg.pretrain else "")
        + "task -> generation (Tune trials) -> baselines -> arms -> finetune (Tune grid) -> report",
        f"  generation trials ({len(cfg.trials)}): {', '.join(x.key for x in cfg.trials)}; {g.per_class} texts per class in "
        f"{g.rounds} rounds of {g.batch}; {g.outer_steps} outer x {g.inner_steps} inner steps, top-k {g.top_k}"
        + (f"; DP epsilon {g.dp.epsilon:g}, delta {g.dp.delta:g}, clip {g.dp.clip:g}" if g.dp else "")
        + (f"; filter: the model's own few-shot label, from {g.oversample} x {g.per_class} candidates" if g.filter else "")
        + f"; on {cfg.generation_device}",
        f"  arms: {', '.join(ARMS)}; fine-tuned: {', '.join(cfg.finetune.arms)} x seeds {cfg.finetune.seeds} = "
        f"{len(cfg.finetune.arms) * len(cfg.finetune.seeds)} learner runs" + (" + lm-eval harness" if cfg.eval.harness else ""),
        f"  resources per run: {s.num_workers} worker(s) x ({s.cpus_per_worker} CPU{' + 1 GPU' if s.use_gpu else ''}); "
        f"DeepSpeed ZeRO-{s.zero_stage}{' bf16' if s.bf16 else ''}",
        f"  tracking: W&B {cfg.tracking.mode}, project {cfg.tracking.project}",
    ])


def run(cfg: GradmatchOptions) -> dict | None:
    from jobs.gradmatch_report import report

    run = open_run(JOB, cfg)
    if (base := student(cfg, run)) is None:
        return None
    task = build_task(cfg, run, base)
    if cfg.stop_after == "task":
        return None
    opts = resolved(cfg, task)
    gen = generate(cfg, run, task, base, opts)
    if cfg.stop_after == "generation":
        return None
    baselines = build_baselines(cfg, run, task, base, opts)
    arms = score_arms(cfg, run, task, gen, baselines, base, opts)
    results = finetune(cfg, run, task, arms, base)
    return report(cfg, run, task, arms, opts, results)


if __name__ == "__main__":
    raise SystemExit(cli.main(f"jobs.{JOB}", __doc__, GradmatchOptions, plan, run))
