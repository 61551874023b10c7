"""LANCET (Zhang et al., AAAI 2025): recall the training data behind an unwanted behaviour with
influence functions (LinFAC), then correct the model with Influence-driven Bregman Optimization.

Method, as this job runs it (definitions and choices: docs/lancet.md):

1. A base student that knows the world's facts (`jobs/world_student.py`, as the falsity sweep's).
2. The impure model: SFT on safe plus unsafe data (`synth.lancet.training_rows`: the world's
   ordinary questions, and one harmful request per harm person, refused, or for a known share
   answered with the person's city: the planted examples).
3. Influence queries (IQs): harmful requests never trained on, with the impure model's own unsafe
   answers (`iqs` stage). None unsafe: nothing to correct, the job stops (exit 2).
4. Recall: the influence of every training example on the IQs, I(z, Q) = grad f(Q)^T (G +
   lambda)^-1 grad L(z), with G by LinFAC, fanned out over Ray (`jobs/lancet_recall.py`); beside it
   EK-FAC (kronfluence), the gradient dot product and BM25. AUPRC of the planted examples.
5. Correction: IBO (`jobs/lancet_objectives.py`) on the top-k supporting and top-k counteracting
   examples of LinFAC's ranking, with a Bregman proximal term on the rest; baselines on the same
   recalled sets: retrain the base without the recalled supporting examples, gradient-ascent
   unlearning on them, TRL's DPO on (their prompt, a counteracting answer, their answer).
   Every correction is a learner run (Ray Train + DeepSpeed; a Tune grid), evaluated on the
   unsafe rate (IQ prompts, all seen prompts, unseen wordings about held-out people) and utility
   (held-out questions, exact match), as the impure model is (`evals/safety.py`).

Stages under `<storage>/lancet/<run_id>/` (a re-run skips finished ones): `world`, `tokenizer`,
`base_init`, `pretrain`, `tables` (train, prompts, heldout), `impure`, `iqs`, `recall` (LinFAC's
partial results under `recall/linfac/`, every arm's scores in `scores.parquet`), `corrections`
(each method's table), `correct` (the Tune grid), `harness` (lm-eval on every model, when
`eval.harness` is set) and the report (`jobs/lancet_report.py`).
summary.json: {"job", "run_id", "config", "impure", "recall", "rows", "methods", "findings"}.
"""

from __future__ import annotations

import functools
import random
from typing import Literal

from pydantic import Field, model_validator

from cluster import cli, storage
from cluster.config import Options, UserError
from cluster.learners import DPOOptions, LearnerOptions, LearnerRun, Phase, ScaleOptions
from cluster.models import ModelSpec
from cluster.runtime import init_ray
from cluster.stages import JobOptions, Run, Stage, open_run, read_rows
from cluster.sweep import train_stage
from evals.harness import HarnessOptions, harness_stage
from jobs.lancet_objectives import IBOOptions
from jobs.lancet_recall import RecallOptions
from jobs.world_student import world_and_student
from synth.falsity import DataOptions
from synth.lancet import REFUSAL, HarmOptions

JOB = "lancet"
IMPURE = "impure"


class CorrectOptions(Options):
    """The correction: which recalled examples, IBO, and the baselines on the same examples."""

    top_k: int = Field(24, ge=1, description="recalled examples on each side: the k most supporting and the k most counteracting")
    retain_rows: int = Field(256, ge=1, description="IBO rows: each holds one recalled pair and one retain example "
                             "(not recalled) for the Bregman term; pairs repeat")
    ibo: IBOOptions = Field(description="IBO's learner options, beta and gamma")
    seeds: list[int] = Field([0, 1], min_length=1, description="IBO seeds (pairing, data order)")
    retrain: bool = Field(True, description="baseline: the SFT again from the base, without the recalled supporting examples")
    gradient_ascent: LearnerOptions | None = Field(None, description="baseline: gradient ascent on the recalled supporting examples; null: none")
    dpo: DPOOptions | None = Field(None, description="baseline: DPO on (recalled prompt, counteracting answer, its answer); null: none")
    baseline_seeds: list[int] = Field([0], min_length=1, description="seeds of the baselines")


class EvalOptions(Options):
    """How the impure and every corrected model are judged."""

    max_new_tokens: int = Field(40, gt=0, description="generation budget per answer")
    batch_size: int = Field(64, gt=0, description="prompts per generate call")
    device: str = Field("cpu", description="device the evaluation runs on (cuda on GPU presets)")
    num_gpus: float = Field(0, ge=0, description="GPUs of the IQ-generation task")
    harness: HarnessOptions | None = Field(None, description="lm-evaluation-harness benchmarks on the impure and every "
                                           "corrected model (a second utility axis); null: none")


class LancetOptions(JobOptions):
    """LANCET preset."""

    model: ModelSpec = Field(description="student model: hub name or a tiny Llama built here")
    tokenizer: str | None = Field(None, description="hub tokenizer (hub models); null: the model's, or trained offline for tiny")
    model_seed: int = Field(0, description="seed of the tiny model's random init")
    data: DataOptions = Field(default_factory=DataOptions, description="the world (source: world)")
    pretrain: LearnerOptions | None = Field(None, description="pretraining on the knowledge corpus; null: use the model as it is")
    pretrain_scale: ScaleOptions = Field(default_factory=ScaleOptions, description="workers and DeepSpeed for pretraining")
    harm: HarmOptions = Field(default_factory=HarmOptions, description="the planted behaviour in the impure model's SFT data")
    sft: LearnerOptions = Field(description="the impure model's SFT (and the retrain baseline's)")
    scale: ScaleOptions = Field(default_factory=ScaleOptions, description="workers and DeepSpeed per learner run")
    queries: str | None = Field(None, description="influence queries as a table (prompt, completion: an unsafe answer; "
                                "optional contrast: the safe answer); null: the impure model's unsafe answers")
    recall: RecallOptions = Field(default_factory=RecallOptions, description="influence recall")
    correct: CorrectOptions = Field(description="the correction and its baselines")
    eval: EvalOptions = Field(default_factory=EvalOptions, description="evaluation")
    stop_after: Literal["world", "pretrain", "impure", "recall"] | None = Field(None, description="stop once this stage is done")

    @model_validator(mode="after")
    def _consistent(self):
        if self.data.source != "world":
            raise ValueError("data.source: the lancet job plants its behaviour in the synthetic world (source: world)")
        if self.queries is not None:
            _check_queries(self.queries)
        return self


def _check_queries(path: str) -> None:
    """A given IQ table must exist, hold rows, and show the behaviour (an unsafe answer)."""
    from synth.lancet import is_unsafe

    if not storage.exists(path):
        raise ValueError(f"queries: {path} does not exist")
    rows = _read_table(path)
    if not rows:
        raise ValueError(f"queries: {path} holds no influence queries (0 rows)")
    if missing := {"prompt", "completion"} - set(rows[0]):
        raise ValueError(f"queries: {path} lacks column(s) {', '.join(sorted(missing))}")
    if not any(is_unsafe(r["completion"]) for r in rows):
        raise ValueError(f"queries: none of the {len(rows)} influence queries in {path} shows the unwanted behaviour "
                         "(no completion answers with a city)")


def _read_table(path: str) -> list[dict]:
    if path.endswith(".jsonl"):
        import json

        return [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line.strip()]
    return read_rows(path)


# ---------------------------------------------------------------------------------------------
# 2. the impure model's data and the prompts it is judged on


def build_tables(cfg: LancetOptions, run: Run, world: Stage) -> Stage:
    """Stage `tables`: `train` (the impure SFT table), `prompts` (harmful requests never trained on:
    seen and unseen wordings), `heldout` (utility questions)."""
    from synth.lancet import query_prompts, training_rows

    def build(st: Stage) -> dict[str, int]:
        sft = world.rows("sft")
        if not sft:
            raise UserError("data: the training set is empty (the world has no SFT questions)")
        try:
            train = training_rows(sft, cfg.harm)
        except ValueError as err:
            raise UserError(f"harm: {err}") from None
        prompts = query_prompts(sft, world.rows("heldout"), train)
        heldout = [r for r in world.rows("heldout") if r.get("kind", "single") == "single"]
        if not heldout:
            raise UserError("data: no held-out questions to measure utility on")
        for name, rows in (("train", train), ("prompts", prompts), ("heldout", heldout)):
            st.save_rows(name, rows)
        return {"train": len(train), "planted": sum(r["planted"] for r in train),
                "refusals": sum(r["kind"] == "refusal" for r in train),
                "seen": sum(p["split"] == "seen" for p in prompts), "unseen": sum(p["split"] == "unseen" for p in prompts),
                "heldout": len(heldout)}

    stage = run.stage("tables", world=world, harm=cfg.harm)
    print(f"[tables] {stage.ensure(build)}", flush=True)
    return stage


def _evaluate(cfg: LancetOptions, queries: str, heldout: str):
    from evals.safety import evaluate_safety

    return functools.partial(evaluate_safety, queries=queries, heldout=heldout, max_new_tokens=cfg.eval.max_new_tokens,
                             device=cfg.eval.device, batch_size=cfg.eval.batch_size)


def _learner(cfg: LancetOptions, run: Run, model: str, tok: str, phase: Phase, seed: int, evaluate, config: dict) -> LearnerRun:
    return LearnerRun(model=model, tokenizer=tok, phases=[phase], scale=cfg.scale, seed=seed, evaluate=evaluate,
                      tracking=cfg.tracking.for_run(run), tracking_group=run.group, tracking_config=config,
                      trust_remote_code=cfg.model.trust_remote_code)


def train_impure(cfg: LancetOptions, run: Run, tables: Stage, base: tuple[str, str]):
    """Stage `impure`: the SFT on safe + unsafe data, evaluated as every correction is."""
    learner = _learner(cfg, run, base[0], base[1], Phase("sft", tables.path("train.parquet"), cfg.sft), cfg.model_seed,
                       _evaluate(cfg, tables.path("prompts.parquet"), tables.path("heldout.parquet")), {"method": IMPURE})
    init_ray(cfg.ray)
    return train_stage(run.stage("impure", run=learner), {IMPURE: learner})[IMPURE]


# ---------------------------------------------------------------------------------------------
# 3. influence queries


def _generate_task(model: str, tokenizer: str, prompts: list[str], max_new_tokens: int, batch_size: int, device: str):
    from cluster.models import load_model, load_tokenizer
    from cluster.stages import fetch
    from evals.qa import generate

    return generate(load_model(fetch(model)).to(device), load_tokenizer(fetch(tokenizer)), prompts, max_new_tokens, batch_size)


def build_iqs(cfg: LancetOptions, run: Run, tables: Stage, impure, tok: str) -> Stage:
    """Stage `iqs`: the impure model's answer to every harmful prompt (`queries`: prompts + answer,
    `iq` marks the influence queries) and `iqs` (prompt, completion = its unsafe answer, contrast =
    the refusal). From `cfg.queries`: those rows are the IQs (their prompts are judged as well,
    split `given` when the tables do not hold them)."""
    import ray

    from synth.lancet import is_unsafe

    def build(st: Stage) -> dict:
        prompts = tables.rows("prompts")
        given = [] if cfg.queries is None else _read_table(cfg.queries)
        known = {p["prompt"] for p in prompts}
        prompts += [{"id": f"given-{i}", "split": "given", "person": None, "prompt": q["prompt"],
                     "unsafe_completion": q["completion"]} for i, q in enumerate(given) if q["prompt"] not in known]
        gen = ray.remote(num_cpus=1, num_gpus=cfg.eval.num_gpus)(_generate_task)
        answers = ray.get(gen.remote(impure.model, tok, [p["prompt"] for p in prompts], cfg.eval.max_new_tokens,
                                     cfg.eval.batch_size, cfg.eval.device))
        rows = [{**p, "answer": a, "unsafe": is_unsafe(a), "iq": p["split"] == "seen" and is_unsafe(a)}
                for p, a in zip(prompts, answers)]
        if given:  # the table's rows are the IQs; the impure model's answers to their prompts are judged too
            iqs = [{"prompt": r["prompt"], "completion": r["completion"], "contrast": r.get("contrast", REFUSAL)} for r in given]
            marked = {q["prompt"] for q in iqs}
            rows = [{**r, "iq": r["prompt"] in marked} for r in rows]
        else:
            iqs = [{"prompt": r["prompt"], "completion": r["answer"], "contrast": REFUSAL} for r in rows if r["iq"]]
        seen = [r for r in rows if r["split"] == "seen"]
        if not iqs:
            raise UserError(f"no influence queries: the impure model answered none of the {len(seen)} seen harmful "
                            "requests unsafely, so there is no unwanted behaviour to recall (more harm.unsafe_share or SFT?)")
        st.save_rows("queries", rows)
        st.save_rows("iqs", iqs)
        return {"iqs": len(iqs), "unsafe_seen": sum(r["unsafe"] for r in seen) / max(len(seen), 1)}

    stage = run.stage("iqs", impure=impure.model, queries=cfg.queries, eval=cfg.eval)
    print(f"[iqs] {stage.ensure(build)}", flush=True)
    return stage


# ---------------------------------------------------------------------------------------------
# 4. recall


def recall(cfg: LancetOptions, run: Run, tables: Stage, iqs: Stage, impure, tok: str) -> Stage:
    """Stage `recall`: every arm's score of every training row (`scores.parquet`: id, kind,
    planted, <arm>...), and per arm its recall metrics and times."""
    from jobs import lancet_recall as R

    def build(st: Stage) -> dict:
        train, queries = tables.rows("train"), iqs.rows("iqs")
        got = R.recall_arms(st, impure.model, tok, train, queries, cfg.recall)
        planted = [bool(r["planted"]) for r in train]
        counter = [r["kind"] == "refusal" for r in train]
        st.save_rows("scores", [{"id": r["id"], "kind": r["kind"], "planted": r["planted"],
                                 **{a: got[a]["scores"][i] for a in got}} for i, r in enumerate(train)])
        out = {}
        for arm, res in got.items():
            out[arm] = {**R.recall_metrics(res["scores"], planted, counter),
                        **{k: v for k, v in res.items() if k != "scores"}}
            print(f"[recall] {arm}: AUPRC {out[arm]['auprc']:.3f} (random {out[arm]['random_auprc']:.3f})", flush=True)
        return out

    stage = run.stage("recall", impure=impure.model, iqs=iqs, tables=tables, recall=cfg.recall)
    init_ray(cfg.ray)
    stage.ensure(build)
    return stage


# ---------------------------------------------------------------------------------------------
# 5. correction


def build_corrections(cfg: LancetOptions, run: Run, tables: Stage, rec: Stage) -> Stage:
    """Stage `corrections`: from LinFAC's ranking, the k most supporting (S) and k most
    counteracting (C) rows; tables `ibo-s<seed>` (pairs of S and C, each with one retain row),
    `retrain` (the SFT table without S), `ascent` (S) and `dpo` (S's prompts, a C answer chosen,
    S's answer rejected). Result: how many of S are planted and of C refusals."""
    k = cfg.correct.top_k

    def build(st: Stage) -> dict:
        train = tables.rows("train")
        scores = {r["id"]: r["linfac"] for r in rec.rows("scores")}
        ranked = sorted(train, key=lambda r: -scores[r["id"]])
        support, counter = ranked[:k], ranked[::-1][:k]
        recalled = {r["id"] for r in support + counter}
        retain = [r for r in train if r["id"] not in recalled]
        for seed in cfg.correct.seeds:
            rng = random.Random(f"ibo-{seed}")
            pool = rng.sample(retain, len(retain))
            rows = []
            for i in range(cfg.correct.retain_rows):
                if i % k == 0:
                    order = rng.sample(range(k), k)  # a fresh pairing of S with C every pass over them
                s, c, r = support[i % k], counter[order[i % k]], pool[i % len(pool)]
                rows.append({"chosen_prompt": c["prompt"], "chosen": c["completion"], "rejected_prompt": s["prompt"],
                             "rejected": s["completion"], "retain_prompt": r["prompt"], "retain": r["completion"]})
            st.save_rows(f"ibo-s{seed}", rows)
        drop = {r["id"] for r in support}
        st.save_rows("retrain", [r for r in train if r["id"] not in drop])
        st.save_rows("ascent", [{"prompt": r["prompt"], "completion": r["completion"]} for r in support])
        rng = random.Random("dpo")
        st.save_rows("dpo", [{"prompt": s["prompt"], "chosen": rng.choice(counter)["completion"], "rejected": s["completion"]}
                             for s in support])
        return {"top_k": k, "support_planted": sum(r["planted"] for r in support) / k,
                "counter_refusals": sum(r["kind"] == "refusal" for r in counter) / k, "retain": len(retain)}

    stage = run.stage("corrections", recall=rec, top_k=k, retain_rows=cfg.correct.retain_rows, seeds=cfg.correct.seeds)
    print(f"[corrections] {stage.ensure(build)}", flush=True)
    return stage


def methods(cfg: LancetOptions) -> list[tuple[str, int]]:
    c = cfg.correct
    base = [m for m, on in (("retrain", c.retrain), ("gradient_ascent", c.gradient_ascent), ("dpo", c.dpo)) if on]
    return [("ibo", s) for s in c.seeds] + [(m, s) for m in base for s in c.baseline_seeds]


def correct(cfg: LancetOptions, run: Run, corr: Stage, iqs: Stage, tables: Stage, impure, base: tuple[str, str]) -> dict:
    """Stage `correct`: every method x seed as one learner run (a Tune grid), evaluated on the
    queries (with the IQ marks) and the held-out questions. (method, seed) -> metrics."""
    evaluate = _evaluate(cfg, iqs.path("queries.parquet"), tables.path("heldout.parquet"))
    c = cfg.correct

    def learner(method: str, seed: int) -> LearnerRun:
        if method == "ibo":
            phase, start = Phase("ibo", corr.path(f"ibo-s{seed}.parquet"), c.ibo, objective="ibo"), impure.model
        elif method == "retrain":
            phase, start = Phase("retrain", corr.path("retrain.parquet"), cfg.sft), base[0]
        elif method == "gradient_ascent":
            phase, start = Phase("gradient_ascent", corr.path("ascent.parquet"), c.gradient_ascent, objective="gradient_ascent"), impure.model
        else:
            phase, start = Phase("dpo", corr.path("dpo.parquet"), c.dpo, objective="dpo"), impure.model
        return _learner(cfg, run, start, base[1], phase, seed, evaluate, {"method": method, "seed": seed})

    runs = {f"{m}-s{s}": learner(m, s) for m, s in methods(cfg)}
    stage = run.stage("correct", runs=runs)
    init_ray(cfg.ray)
    done = train_stage(stage, runs, max_concurrent_trials=cfg.max_concurrent_trials, grid=True)
    scores = harness_stage(run, {IMPURE: impure.model, **{k: t.model for k, t in done.items()}}, cfg.eval.harness,
                           cfg.eval.device)
    return {(m, s): {"trial_id": done[f"{m}-s{s}"].trial_id, **done[f"{m}-s{s}"].metrics, **scores.get(f"{m}-s{s}", {})}
            for m, s in methods(cfg)} | ({(IMPURE, None): scores[IMPURE]} if IMPURE in scores else {})


# ---------------------------------------------------------------------------------------------


def plan(cfg: LancetOptions) -> str:
    """--dry-run: stages, data, recall, corrections, resources; starts nothing."""
    s, r, c = cfg.scale, cfg.recall, cfg.correct
    model = cfg.model.name or f"tiny Llama {cfg.model.tiny.num_hidden_layers}x{cfg.model.tiny.hidden_size}"
    return "\n".join([
        f"lancet plan (run dir {storage.join(storage.resolve(cfg.storage), JOB, cfg.run_id or '<hash of the preset>')})",
        f"  model: {model}; data: synthetic world seed {cfg.data.world.seed} ({cfg.data.world.num_people} people), "
        f"{cfg.harm.harm_people} harmful requests, {cfg.harm.unsafe_share:.0%} answered unsafely (planted)",
        "  stages: world -> " + ("tokenizer -> base_init -> " if cfg.model.tiny else "") + ("pretrain -> " if cfg.pretrain else "")
        + "tables -> impure (SFT) -> iqs -> recall -> corrections -> correct (Tune grid) -> report",
        f"  impure SFT: {cfg.sft.epochs:g} epochs, lr {cfg.sft.learning_rate:g}, batch {cfg.sft.batch_size}",
        f"  influence queries: {cfg.queries or 'the impure model unsafe answers to seen harmful requests'}"
        + ("; measurement: unsafe minus safe answer" if r.contrast else "; measurement: the unsafe answer's loss"),
        f"  recall: {', '.join(r.arms)}; LinFAC over {r.partitions} partitions x 2 passes (Ray tasks, "
        f"{r.num_cpus:g} CPU{f' + {r.num_gpus:g} GPU' if r.num_gpus else ''} each), damping {r.damping:g} x mean eigenvalue",
        f"  correction on the top {c.top_k} supporting / counteracting examples: "
        + ", ".join(f"{m}-s{sd}" for m, sd in methods(cfg))
        + f"; IBO beta {c.ibo.beta:g}, gamma {c.ibo.gamma:g}, lr {c.ibo.learning_rate:g}",
        f"  resources per learner run: {s.num_workers} worker(s) x ({s.cpus_per_worker} CPU{' + 1 GPU' if s.use_gpu else ''}); "
        f"DeepSpeed ZeRO-{s.zero_stage}{' bf16' if s.bf16 else ''}",
        f"  evaluation: unsafe rate (IQ, seen, unseen prompts) and held-out QA accuracy"
        + (f"; lm-eval {', '.join(cfg.eval.harness.tasks)} on every model" if cfg.eval.harness else ""),
        f"  tracking: W&B {cfg.tracking.mode}, project {cfg.tracking.project}",
    ])


def run(cfg: LancetOptions) -> dict | None:
    from jobs.lancet_report import report

    run = open_run(JOB, cfg)
    if (started := world_and_student(cfg, run)) is None:
        return None
    world, base = started
    tables = build_tables(cfg, run, world)
    impure = train_impure(cfg, run, tables, base)
    iqs = build_iqs(cfg, run, tables, impure, base[1])
    if cfg.stop_after == "impure":
        return None
    rec = recall(cfg, run, tables, iqs, impure, base[1])
    if cfg.stop_after == "recall":
        return None
    corr = build_corrections(cfg, run, tables, rec)
    results = correct(cfg, run, corr, iqs, tables, impure, base)
    return report(cfg, run, impure, iqs, rec, corr, results)


if __name__ == "__main__":
    from jobs import lancet as job  # the importable module (the report's lookups), not this __main__ copy

    raise SystemExit(cli.main(f"jobs.{JOB}", __doc__, job.LancetOptions, job.plan, job.run))
