"""Montessori-Instruct: a teacher learns, by DPO on the student's local data influence, to write
the synthetic data that helps this student most (Li, Yu, Xiong, ICLR 2025, arXiv 2410.14208).

Method, as in the paper and its code (cxcscmu/Montessori-Instruct):

1. Warm up the student: AdamW on a warm-up set, the learning rate ramped linearly to its peak over
   the whole warm-up; keep the weights *and* the optimizer state (per seed).
2. The teacher, prompted with `teacher.prompt.in_context` (8) seed instructions, samples k (4)
   candidate instructions per prompt (T=1.0, top-p 0.9) and a response to each (T=0.6, top-p 0.9).
3. Local data influence of candidate z, on a pool of Ray actors that each hold the warm student
   in memory: one AdamW step on z alone from the warm weights and moments (loss on response
   tokens, divided by `probes.loss_divisor`: the official code's 8 processes each divide by 8),
   written into a float32 scratch copy so a bf16 student's update does not round away,
   I(z) = L_ref(before) - L_ref(after) on the reference set (token-weighted here; the official
   code averages per-batch means: `influence/lookahead.py` and `benchmarks/bench_fidelity.py`).
4. Preference pairs: within a prompt, every positive x negative candidate is (chosen, rejected) on
   the raw instruction text; prompts without both signs are dropped.
5. DPO the teacher against a frozen copy of itself (a Ray Train + TRL DPOTrainer learner run with
   an explicit reference model).
6. The trained teacher writes the final synthetic set; a fresh copy of the student is SFT'd on it
   and compared with a student SFT'd on a set of the same size from the untrained teacher (the
   Self-Instruct baseline). Steps 2-6 repeat for `iterations`, each from the last trained teacher.
   Ablation (iteration 1): the same number of pairs per prompt, formed at random.

The reference set is kept apart from the evaluation set: on the synthetic world they are
questions about disjoint held-out people (the paper drew its reference set from its own test
benchmark); from a dataset they are disjoint slices, and any shared instruction is an error.

Stages under `<storage>/montessori/<run_id>/` (a re-run skips finished ones; a changed option
redoes exactly the stages downstream of it; `stop_after` ends a run early): `data`, `tokenizer`,
`base_init` (tiny students), `pretrain`, `teacher` (tiny presets), `warmup`, then per iteration
`it<i>-candidates`, `it<i>-influence`, `it<i>-pairs`, `it<i>-dpo`, `it<i>-final`, `it<i>-sft`,
`it<i>-students`, and the report files (`jobs/montessori_report.py`).

summary.json: {"job", "run_id", "config", "rows": [...], "probes": [...], "findings": {...}}.
`rows`, one per seed x iteration x teacher:
  seed, iteration,
  teacher            "untrained" (Self-Instruct baseline, written once per seed, listed under
                     iteration 1), "montessori" (DPO on influence pairs), "random_pairs" (ablation),
  examples           size of the final synthetic set the student was SFT'd on,
  distinct           distinct instructions in it (below `examples` when a narrowed teacher repeats),
  accuracy           exact-match accuracy on the held-out evaluation questions (synthetic world;
                     null for datasets without exact answers),
  heldout_loss       token-mean NLL of the reference answers of the evaluation set,
  answered_rate      share of generations with a parseable answer (world),
  win_rate           head-to-head vs the same seed's untrained-teacher student: share of
                     evaluation items where this student's loss is lower (ties count half),
  acc_win_rate       the same by exact correctness (world; ties count half),
  share_<kind>       composition of the final set (world): single, guess, multi, bio, unknown, other,
  share_correct      share of the final set whose response is exactly true (world),
  plus `harness/<task>/<metric>` columns when `eval.harness` is set.
`probes`, one per seed x iteration: candidates, kept, positive_share, mean_influence, pairs,
  prompts_with_pairs, random_pairs, warm_L0, probe_seconds, dpo_train_loss, and per kind (world)
  the mean influence `influence_<kind>`.
`findings`: per iteration the mean over seeds of accuracy_gain (montessori - untrained) and
  loss_gain (untrained - montessori), seeds_better_loss / seeds_better_accuracy, and, with the
  ablation, influence_vs_random_accuracy / influence_vs_random_loss.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from cluster import cli
from cluster.config import UserError
from cluster.learners import LearnerRun, Phase, ScaleOptions
from cluster.models import base_model
from cluster.runtime import init_ray
from cluster.stages import Artifact, Run, Stage, fetch, open_run
from cluster.sweep import Trained, train_stage
from jobs.montessori_options import MontessoriOptions, check, check_models, plan
from synth.teacher import check_tokenizers, derive_seed, load_tokenizer_or_fail

JOB = "montessori"
UNTRAINED, MONTESSORI, RANDOM = "untrained", "montessori", "random_pairs"


@dataclass(frozen=True)
class Arm:
    """One teacher of one seed: what a student is trained on (DPO'd teachers: on which pairs)."""

    seed: int
    teacher: str  # UNTRAINED, MONTESSORI or RANDOM

    @property
    def key(self) -> str:  # its tables, learner runs and folders
        return f"s{self.seed}-{self.teacher}"


@dataclass
class Iteration:
    """One iteration's stages and results, as `jobs.montessori_report` reads them."""

    number: int
    candidates: Stage  # table s<seed>
    influence: Stage  # table s<seed>/scores (id, influence); result s<seed>: warm_L0, probe_seconds
    pairs: Stage  # result: arm key -> pairs, prompts
    dpo: dict[Arm, Trained]
    final: Stage  # table per arm key: the final synthetic set
    evals: dict[Arm, dict]  # the students' held-out scores (`evals.heldout.evaluate_student`)


class StopAfter(Exception):
    """`stop_after` was reached."""


def finished(cfg: MontessoriOptions, stage: Stage, value=None):
    """`value` (default: the stage) once `stage` is done; the job ends here if it is `cfg.stop_after`."""
    if stage.name == cfg.stop_after:
        raise StopAfter(stage.name)
    return stage if value is None else value


def _by_key(by_arm: dict[Arm, object]) -> dict[str, object]:
    return {arm.key: v for arm, v in by_arm.items()}


# -- data, student, teacher -------------------------------------------------------------------


def build_data(cfg: MontessoriOptions, run: Run) -> Stage:
    """Stage `data`: tables seeds, warmup, reference, evaluation, banned (+ world: corpus,
    tokenizer_text, teacher_sft); `synth.instructions`."""
    from synth.instructions import instruction_tables

    t = cfg.teacher
    stage = run.stage("data", data=cfg.data, template=cfg.student_template, prompt=t.prompt, mix=t.mix,
                      teacher_examples=t.sft_examples)

    def build(st: Stage) -> dict[str, int]:
        tables = instruction_tables(cfg.data, cfg.student_template, t.prompt, t.mix, t.sft_examples)
        for name, rows in tables.items():
            st.save_rows(name, rows)
        return {name: len(rows) for name, rows in tables.items()}

    print(f"[data] {', '.join(f'{k}: {v}' for k, v in stage.ensure(build).items())}", flush=True)
    return finished(cfg, stage)


def build_student(cfg: MontessoriOptions, run: Run, data: Stage) -> tuple[str, str]:
    """Stages `tokenizer` and `base_init` (tiny students): (model, tokenizer) of the untrained
    student. A given teacher tokenizer must agree with the trained one (checked before commit)."""
    agree = functools.partial(check_tokenizers, teacher_tok=cfg.teacher.tokenizer) if cfg.teacher.tokenizer else None
    model, tok = base_model(run, cfg.student, tokenizer=cfg.student_tokenizer, texts=data, seed=cfg.model_seed,
                            check_tokenizer=agree)
    if agree is not None and cfg.student.tiny is not None:  # a tokenizer stage older than this option
        agree(load_tokenizer_or_fail(tok, "student_tokenizer"))
    if cfg.stop_after in ("tokenizer", "base_init"):
        raise StopAfter(cfg.stop_after)
    return model, tok


def _learner(cfg: MontessoriOptions, run: Run, model: str, tok: str, phase: Phase, scale: ScaleOptions, seed: int,
             trust_remote_code: bool = False, tracking_config: dict | None = None) -> LearnerRun:
    return LearnerRun(model=model, tokenizer=tok, phases=[phase], scale=scale, seed=seed,
                      tracking=cfg.tracking.for_run(run), tracking_group=run.group,
                      tracking_config=tracking_config or {}, trust_remote_code=trust_remote_code)


def pretrain(cfg: MontessoriOptions, run: Run, data: Stage, model: str, tok: str) -> str:
    """Stage `pretrain`: the tiny student learns the world's facts from the knowledge corpus."""
    if cfg.pretrain is None:
        return model
    learner = _learner(cfg, run, model, tok, Phase("pretrain", data.path("corpus.parquet"), cfg.pretrain),
                       cfg.pretrain_scale, cfg.model_seed, cfg.student.trust_remote_code)
    stage = run.stage("pretrain", run=learner)
    return finished(cfg, stage, train_stage(stage, {"base": learner})["base"].model)


def build_teacher(cfg: MontessoriOptions, run: Run, data: Stage, student: str, tok: str) -> tuple[str, str]:
    """Stage `teacher`: (model, tokenizer) of the untrained teacher. Tiny: the student's pretrained
    base SFT'd on a deliberately mediocre mixture (`synth.teacher.TeacherMix`)."""
    t = cfg.teacher
    if t.model is not None:
        return Artifact(t.model), Artifact(t.tokenizer or t.model)
    learner = _learner(cfg, run, student, tok, Phase("teacher_sft", data.path("teacher_sft.parquet"), t.sft),
                       cfg.pretrain_scale, cfg.model_seed)
    stage = run.stage("teacher", run=learner)
    return finished(cfg, stage, train_stage(stage, {"teacher": learner})["teacher"].model), tok


# -- 1. warm-up -------------------------------------------------------------------------------


def warm_up(cfg: MontessoriOptions, run: Run, data: Stage, student: str, tok: str) -> Stage:
    """Stage `warmup`: one warm student (weights + AdamW state) per seed at `s<seed>`, each a Ray
    task that writes it to the stage's storage (`influence.warmup.warm_up_student`)."""
    import ray

    from influence.warmup import warm_up_student

    stage = run.stage("warmup", student=student, tokenizer=tok, rows=data.path("warmup.parquet"), warmup=cfg.warmup,
                      seeds=cfg.seeds)

    def build(st: Stage) -> dict:
        task = ray.remote(warm_up_student).options(num_cpus=cfg.warmup.num_cpus, num_gpus=cfg.warmup.num_gpus)
        stats = ray.get([task.remote(str(student), str(tok), str(data.path("warmup.parquet")), cfg.warmup, s,
                                     str(st.path(f"s{s}"))) for s in cfg.seeds])
        for s, x in zip(cfg.seeds, stats):
            print(f"[warmup] seed {s}: {x['steps']} steps to lr {x['peak_lr']:.2e}, "
                  f"loss {x['first_loss']:.3f} -> {x['last_loss']:.3f}", flush=True)
        return {f"s{s}": x for s, x in zip(cfg.seeds, stats)}

    stage.ensure(build)
    return finished(cfg, stage)


# -- 2. candidates from the teacher -----------------------------------------------------------


def candidates(cfg: MontessoriOptions, run: Run, it: int, data: Stage, teachers: dict[int, str], tok: str) -> Stage:
    """Stage `it<i>-candidates`: per seed, `probes.prompts` prompts x k candidates (table
    `s<seed>`; the generation pool's resumable shards under `generation/`)."""
    from synth.teacher import drop_copies, open_teacher, pool_writer, teacher_prompts

    t = cfg.teacher
    stage = run.stage(f"it{it}-candidates", teachers=teachers, tokenizer=tok, seeds=data.path("seeds.parquet"),
                      banned=data.path("banned.parquet"), teacher=t, prompts=cfg.probes.prompts)

    def build(st: Stage) -> dict:
        seeds, banned, kept = [r["instruction"] for r in data.rows("seeds")], [r["name"] for r in data.rows("banned")], {}
        for s in cfg.seeds:
            prompts = teacher_prompts(seeds, cfg.probes.prompts, t.prompt, seed=derive_seed(s, f"it{it}-probe"),
                                      prefix=f"s{s}-it{it}-p")
            with open_teacher(t, teachers[s], tok, banned) as pool:
                write = pool_writer(pool, st.path("generation", f"s{s}"), t.k, t.generation.batch_size)
                rows = drop_copies(write(prompts, derive_seed(s, f"it{it}-gen")), prompts)
            if not any(r["kept"] for r in rows):
                raise UserError(nothing_kept(cfg, it, s, rows))
            st.save_rows(f"s{s}", rows)
            kept[f"s{s}"] = sum(r["kept"] for r in rows)
            print(f"[candidates] it{it} seed {s}: {kept[f's{s}']}/{len(rows)} kept", flush=True)
        return kept

    stage.ensure(build)
    return finished(cfg, stage)


def nothing_kept(cfg: MontessoriOptions, it: int, seed: int, rows: list[dict]) -> str:
    """Why a seed's candidates are unusable (none kept): before any probe actor loads the student,
    and before the pairs stage would blame the warm-up."""
    p = cfg.teacher.prompt
    found = sum(bool(r["instruction"]) for r in rows)
    where = (f"instruction_pattern {p.instruction_pattern!r}" if p.instruction_pattern
             else "instruction_pattern null (the first non-empty line)")
    raw = next((r["raw"] for r in rows if r["raw"].strip()), "")
    why = (f"no output had an instruction by teacher.prompt.{where}" if found == 0 else
           f"{found} had an instruction by teacher.prompt.{where}, but none passed min_chars {p.min_chars} / "
           f"max_chars {p.max_chars} / banned_words, or each copied a seed or got an empty response")
    return (f"iteration {it}, seed {seed}: the teacher kept none of its {len(rows)} candidates ({why}); "
            f"a raw output: {raw[:160]!r}")


# -- 3. local data influence on the probe pool ------------------------------------------------


def influence(cfg: MontessoriOptions, run: Run, it: int, data: Stage, cands: Stage, warm: Stage, tok: str) -> Stage:
    """Stage `it<i>-influence`: I(z) of every kept candidate (table `s<seed>/scores`), on a
    `cluster.probes.ProbePool` per seed whose actors load the warm state from the stage's storage."""
    from cluster.models import load_tokenizer
    from cluster.probes import ProbePool
    from influence.warmup import tokenize_sft, warm_scorer

    p, n = cfg.probes, cfg.warmup.max_length
    stage = run.stage(f"it{it}-influence", candidates=cands, warm=warm, reference=data.path("reference.parquet"),
                      tokenizer=tok, template=cfg.student_template, max_length=n, probes=p)

    def build(st: Stage) -> dict:
        tokenizer, stats = load_tokenizer(fetch(tok)), {}
        for s in cfg.seeds:
            items = [{"id": c["id"], **tokenize_sft(tokenizer, cfg.student_template.format(instruction=c["instruction"]),
                                                     c["response"], n)} for c in cands.rows(f"s{s}") if c["kept"]]
            make = functools.partial(warm_scorer, str(warm.path(f"s{s}")), str(data.path("reference.parquet")), n,
                                     p.reference_batch_size, p.device, p.loss_divisor, p.at_once)
            t0 = time.time()
            with ProbePool(make, p.num_actors, p.cpus_per_actor, p.gpus_per_actor) as pool:
                pool.wait_ready()
                L0 = float(pool.call(lambda scorer: scorer.L0))  # the warm student's reference loss
                pool.run(items, "id", out=st.path(f"s{s}"), batch_size=p.batch_size, score_column="influence")
            stats[f"s{s}"] = {"warm_L0": L0, "probe_seconds": time.time() - t0}
            print(f"[influence] it{it} seed {s}: {len(items)} candidates in {stats[f's{s}']['probe_seconds']:.0f} s "
                  f"(reference loss of the warm student {L0:.4f})", flush=True)
        return stats

    stage.ensure(build)
    return finished(cfg, stage)


# -- 4-5. preference pairs and teacher DPO ----------------------------------------------------


def pairs(cfg: MontessoriOptions, run: Run, it: int, cands: Stage, infl: Stage) -> tuple[Stage, list[Arm]]:
    """Stage `it<i>-pairs`: a DPO table per seed (and the random-pair ablation at iteration 1), and
    beside each the candidate ids of its pairs (`<arm>-ids`)."""
    from synth.teacher import dpo_row, preference_pairs, random_pairs

    arms = [Arm(s, v) for s in cfg.seeds for v in [MONTESSORI] + ([RANDOM] if cfg.ablation and it == 1 else [])]
    stage = run.stage(f"it{it}-pairs", candidates=cands, influence=infl, arms=arms, chat=cfg.teacher.prompt.chat)

    def build(st: Stage) -> dict:
        counts = {}
        for arm in arms:
            scores = {r["id"]: r["influence"] for r in infl.rows(f"s{arm.seed}/scores")}
            kept = [c for c in cands.rows(f"s{arm.seed}") if c["kept"] and c["id"] in scores]
            rows = (preference_pairs(kept, scores) if arm.teacher == MONTESSORI
                    else random_pairs(kept, scores, derive_seed(arm.seed, f"it{it}-random")))
            if not rows:
                raise UserError(f"iteration {it}, seed {arm.seed}: no prompt has both a positive and a negative candidate "
                                f"({sum(scores[c['id']] > 0 for c in kept)} of {len(kept)} positive), nothing to DPO on: "
                                "a longer warm-up (warmup.epochs) or more prompts (probes.prompts) gives both signs")
            st.save_rows(arm.key, [dpo_row(r, cfg.teacher.prompt.chat) for r in rows])
            st.save_rows(f"{arm.key}-ids", [{k: r[k] for k in ("prompt_id", "chosen_id", "rejected_id")} for r in rows])
            counts[arm.key] = {"pairs": len(rows), "prompts": len({r["prompt_id"] for r in rows})}
        return counts

    stage.ensure(build)
    return finished(cfg, stage), arms


def dpo(cfg: MontessoriOptions, run: Run, it: int, pairs: Stage, arms: list[Arm], teachers: dict[int, str],
        tok: str) -> dict[Arm, Trained]:
    """Stage `it<i>-dpo`: one DPO learner run per arm, each against a frozen copy of its teacher."""
    runs = {a: _learner(cfg, run, teachers[a.seed], tok,
                        Phase("dpo", pairs.path(f"{a.key}.parquet"), cfg.dpo, objective="dpo", ref_model=teachers[a.seed]),
                        cfg.dpo_scale, a.seed, bool(cfg.teacher.model) and cfg.student.trust_remote_code,
                        {"seed": a.seed, "iteration": it, "pairs": a.teacher}) for a in arms}
    stage = run.stage(f"it{it}-dpo", runs=_by_key(runs))
    trained = train_stage(stage, _by_key(runs), max_concurrent_trials=cfg.max_concurrent_trials)
    return finished(cfg, stage, {a: trained[a.key] for a in arms})


# -- 6. final synthetic sets, student SFT, evaluation -----------------------------------------


def final_sets(cfg: MontessoriOptions, run: Run, it: int, data: Stage, writers: dict[Arm, str], tok: str) -> Stage:
    """Stage `it<i>-final`: each teacher writes `final_size` kept, distinct examples (table per
    arm) from the same prompts and sampling seeds as every other teacher of its seed."""
    from synth.teacher import final_set, open_teacher, pool_writer

    t = cfg.teacher
    stage = run.stage(f"it{it}-final", writers=_by_key(writers), tokenizer=tok, seeds=data.path("seeds.parquet"),
                      banned=data.path("banned.parquet"), teacher=t, size=cfg.final_size, template=cfg.student_template)

    def build(st: Stage) -> list[str]:
        seeds, banned = [r["instruction"] for r in data.rows("seeds")], [r["name"] for r in data.rows("banned")]
        for arm in sorted(writers, key=lambda a: a.key):
            with open_teacher(t, writers[arm], tok, banned) as pool:  # one teacher load for every round
                write = pool_writer(pool, st.path("generation", arm.key), t.k, t.generation.batch_size)
                rows = final_set(write, seeds, cfg.final_size, t.prompt, t.k, t.dedup, arm.seed, f"it{it} {arm.key}")
            st.save_rows(arm.key, [{"prompt": cfg.student_template.format(instruction=r["instruction"]),
                                    "completion": r["response"], "instruction": r["instruction"]} for r in rows])
            print(f"[final] it{it} {arm.key}: {len(rows)} examples", flush=True)
        return sorted(a.key for a in writers)

    stage.ensure(build)
    return finished(cfg, stage)


def train_students(cfg: MontessoriOptions, run: Run, it: int, final: Stage, arms: list[Arm], student: str,
                   tok: str) -> dict[Arm, Trained]:
    """Stage `it<i>-sft`: a fresh copy of the student SFT'd on each final set."""
    runs = {a: _learner(cfg, run, student, tok, Phase("sft", final.path(f"{a.key}.parquet"), cfg.sft), cfg.scale,
                        a.seed, cfg.student.trust_remote_code, {"iteration": it, "teacher": a.teacher}) for a in arms}
    stage = run.stage(f"it{it}-sft", runs=_by_key(runs))
    trained = train_stage(stage, _by_key(runs), max_concurrent_trials=cfg.max_concurrent_trials)
    return finished(cfg, stage, {a: trained[a.key] for a in arms})


def evaluate_students(cfg: MontessoriOptions, run: Run, it: int, data: Stage, students: dict[Arm, Trained],
                      tok: str) -> dict[Arm, dict]:
    """Stage `it<i>-students`: held-out scores of every student, one Ray task each (`evals.heldout`)."""
    import ray

    from evals.heldout import evaluate_student

    evaluation = data.path("evaluation.parquet")
    stage = run.stage(f"it{it}-students", students={a.key: s.model for a, s in students.items()}, tokenizer=tok,
                      evaluation=evaluation, eval=cfg.eval, max_length=cfg.warmup.max_length)

    def build(st: Stage) -> dict:
        task = ray.remote(evaluate_student).options(num_cpus=cfg.eval.num_cpus, num_gpus=cfg.eval.num_gpus)
        arms = sorted(students, key=lambda a: a.key)
        results = ray.get([task.remote(str(students[a].model), str(tok), str(evaluation), cfg.eval,
                                       cfg.warmup.max_length) for a in arms])
        return {a.key: r for a, r in zip(arms, results)}

    results = stage.ensure(build)
    return finished(cfg, stage, {a: results[a.key] for a in students})


# -- the method, iteration by iteration -------------------------------------------------------


def montessori(cfg: MontessoriOptions, run: Run) -> list[Iteration]:
    """Steps 1-6 for every seed and iteration (StopAfter once `cfg.stop_after` is done)."""
    data = build_data(cfg, run)
    student0, tok = build_student(cfg, run, data)
    init_ray(cfg.ray)
    student = pretrain(cfg, run, data, student0, tok)
    teacher0, teacher_tok = build_teacher(cfg, run, data, student, tok)
    warm = warm_up(cfg, run, data, student, tok)
    teachers, out = {s: teacher0 for s in cfg.seeds}, []
    for it in range(1, cfg.iterations + 1):
        cands = candidates(cfg, run, it, data, teachers, teacher_tok)
        infl = influence(cfg, run, it, data, cands, warm, tok)
        pair_stage, arms = pairs(cfg, run, it, cands, infl)
        trained = dpo(cfg, run, it, pair_stage, arms, teachers, teacher_tok)
        writers = {a: t.model for a, t in trained.items()}
        if it == 1:  # the Self-Instruct baseline: the untrained teacher, once per seed
            writers.update({Arm(s, UNTRAINED): teacher0 for s in cfg.seeds})
        final = final_sets(cfg, run, it, data, writers, teacher_tok)
        students = train_students(cfg, run, it, final, list(writers), student, tok)
        evals = evaluate_students(cfg, run, it, data, students, tok)
        out.append(Iteration(it, cands, infl, pair_stage, trained, final, evals))
        teachers = {s: trained[Arm(s, MONTESSORI)].model for s in cfg.seeds}
    return out


# -- the job -----------------------------------------------------------------------------------


def run(cfg: MontessoriOptions) -> dict | None:
    from jobs.montessori_report import report

    t0 = time.time()
    check(cfg)
    check_models(cfg)
    run = open_run(JOB, cfg)  # a partial run (stop_after) is the same run
    try:
        iterations = montessori(cfg, run)
    except StopAfter:
        print(f"[montessori] stopped after {cfg.stop_after} (stop_after); re-run without it to go on", flush=True)
        return None
    summary = report(cfg, run, iterations)
    print(f"[montessori] done in {time.time() - t0:.0f} s", flush=True)
    return summary


if __name__ == "__main__":
    # Run the importable module, not this `__main__` copy of it: `jobs.montessori_report` imports
    # `jobs.montessori`, whose `Arm` is another class than `__main__.Arm` (the report's lookups of
    # the iterations' arms would all miss, after the whole run).
    from jobs import montessori as job

    raise SystemExit(cli.main(f"jobs.{JOB}", job.__doc__, job.MontessoriOptions, job.plan, job.run))
