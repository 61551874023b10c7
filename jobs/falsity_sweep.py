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

Stages under `<storage>/falsity_sweep/<run_id>/` (a re-run skips finished ones): `world`,
`tokenizer`, `base_init`, `pretrain`, `mixtures`, `sweep` (Ray Tune experiment), `trials`, and
the report files.

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
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cluster import cli
from cluster.config import Options, UserError, config_hash
from cluster.learners import LearnerOptions, LearnerRun, Phase, ScaleOptions
from cluster.models import ModelSpec
from cluster.runtime import RayOptions, RunDir, absolute, init_ray, is_remote, run_uri
from cluster.tracking import TrackingOptions
from evals.harness import HarnessOptions
from synth.world import WorldOptions

JOB = "falsity_sweep"
TRIAL_KEYS = ("ratio", "seed", "trial_id", "started_at", "ended_at")
METRICS = ("qa_accuracy", "reasoning_accuracy", "knows_rate", "lie_rate", "answered_rate")


class HubQAOptions(Options):
    """A multiple-choice QA dataset whose true and false reasoning a generator model writes."""

    dataset: str = Field(description="hub dataset id, or a local .jsonl/.parquet/.csv file")
    config_name: str | None = Field(None, description="hub dataset configuration (e.g. ARC-Challenge)")
    split: str = Field("train", description="dataset split")
    question_field: str = Field("question", description="column with the question text")
    answer_field: str = Field("answer", description="column with the answer: its text, a choice label, or an index")
    choices_field: str = Field("choices", description="column with the choices: a list, or {text: [...], label: [...]}")
    limit: int | None = Field(None, ge=1, description="use the first N questions; null: all")
    heldout_fraction: float = Field(0.2, ge=0, lt=1, description="share of questions kept for evaluation only")


class GeneratorOptions(Options):
    """The model that writes reasoning chains, on a pool of Ray actors."""

    model: str = Field(description="hub id or local directory of the generator (an instruct model)")
    max_new_tokens: int = Field(256, gt=0, description="tokens per explanation")
    temperature: float = Field(0.7, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling")
    num_actors: int = Field(1, ge=1, description="generator actors")
    cpus_per_actor: float = Field(1, gt=0, description="CPUs per actor")
    gpus_per_actor: float = Field(0, ge=0, description="GPUs per actor (1 for an 8B bf16 generator)")
    batch_size: int = Field(8, gt=0, description="prompts per generate call")


class DataOptions(Options):
    """Where the FACO table comes from."""

    source: Literal["world", "file", "hub"] = Field("world", description="world: the synthetic world; file: a FACO table; hub: a QA dataset + generator")
    file: str | None = Field(None, description="FACO table (.jsonl/.parquet/.csv or dataset dir) with columns id, question, answer, true_response, false_response; rows with split=heldout are evaluated, the rest trained on")
    world: WorldOptions = Field(default_factory=WorldOptions, description="synthetic world size and seed")
    hub: HubQAOptions | None = Field(None, description="QA dataset (source: hub)")
    generator: GeneratorOptions | None = Field(None, description="reasoning writer (source: hub)")

    @model_validator(mode="after")
    def _source_given(self):
        if self.source == "file" and not self.file:
            raise ValueError("data.file is required when data.source is file")
        if self.source == "hub" and (self.hub is None or self.generator is None):
            raise ValueError("data.hub and data.generator are required when data.source is hub")
        return self


class EvalOptions(Options):
    """How each trial's model is judged."""

    max_new_tokens: int = Field(40, gt=0, description="generation budget per answer")
    harness: HarnessOptions | None = Field(None, description="lm-evaluation-harness benchmarks (cluster presets); null: none")
    device: str = Field("cpu", description="device the rank-0 evaluation runs on (cuda on GPU presets)")


class FalsityOptions(Options):
    """Falsity sweep preset."""

    run_id: str | None = Field(None, description="run directory name; null: a hash of the config, so re-runs resume")
    storage: str = Field("runs", description="root of run directories: a local path or an fsspec URI (s3://...)")
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
    max_concurrent_trials: int | None = Field(None, ge=1, description="cap on parallel trials; null: as many as resources allow")
    data: DataOptions = Field(default_factory=DataOptions, description="FACO table source")
    eval: EvalOptions = Field(default_factory=EvalOptions, description="evaluation")
    ray: RayOptions = Field(default_factory=RayOptions, description="Ray cluster")
    tracking: TrackingOptions = Field(default_factory=TrackingOptions, description="Weights & Biases")

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
# 1-2. data: the world (or a file), the tokenizer and the base student


def _run_id(cfg: FalsityOptions) -> str:
    return cfg.run_id or config_hash(cfg, exclude={"run_id", "tracking", "ray", "max_concurrent_trials"})


def _run_dir(cfg: FalsityOptions) -> RunDir:
    return RunDir(cfg.storage, JOB, _run_id(cfg))


def build_data(cfg: FalsityOptions, run: RunDir) -> None:
    """Stage `world`: datasets corpus, sft (FACO table), heldout questions, probes."""
    from datasets import Dataset

    from synth import world as W
    from synth.falsity import load_table

    h = config_hash(cfg.data)
    if run.done("world", h):
        return
    with run.write("world", h) as out:
        if cfg.data.source == "world":
            world = W.build_world(cfg.data.world)
            tables = {
                "corpus": [{"text": t} for t in W.knowledge_corpus(world)],
                "sft": W.questions(world, world.sft_people, "sft"),
                "heldout": W.questions(world, world.heldout_people, "heldout"),
                "probes": W.probes(world, world.heldout_people),
                "tokenizer_text": [{"text": t} for t in W.all_text(world)],
            }
        else:
            rows = load_table(cfg.data.file) if cfg.data.source == "file" else faco_from_hub(cfg.data, cfg.ray, run)
            held = [r for r in rows if r.get("split") == "heldout"]
            sft = [r for r in rows if r.get("split") != "heldout"]
            if not sft:
                raise UserError(f"{cfg.data.file}: no training rows (every row has split=heldout)")
            text = [r["question"] for r in rows] + [r["true_response"] for r in rows] + [r["false_response"] for r in rows]
            tables = {"sft": sft, "heldout": held, "probes": [], "corpus": [{"text": t} for t in text],
                      "tokenizer_text": [{"text": t} for t in text]}
        for name, rows in tables.items():
            Dataset.from_list(rows).save_to_disk(f"{out}/{name}") if rows else Path(out, name).mkdir()
        print(f"[data] {', '.join(f'{k}: {len(v)}' for k, v in tables.items())}", flush=True)


def faco_from_hub(data: DataOptions, ray_opts: RayOptions, run: RunDir) -> list[dict]:
    """FACO at scale: a generator on a Ray actor pool writes true and false reasoning for a QA set."""
    import datasets

    from cluster.probes import ProbePool
    from synth.falsity import ReasoningWriter, generate_table, qa_rows

    h = data.hub
    local = Path(h.dataset).suffix in (".jsonl", ".json", ".parquet", ".csv")
    try:
        if local:
            ds = datasets.load_dataset(Path(h.dataset).suffix.lstrip(".").replace("jsonl", "json"),
                                       data_files=h.dataset, split="train")
        else:
            ds = datasets.load_dataset(h.dataset, h.config_name, split=h.split)
    except Exception as exc:
        raise UserError(f"data.hub.dataset {h.dataset}: could not load ({type(exc).__name__}: {str(exc)[:200]})") from None
    rows = ds.select(range(min(h.limit, len(ds)))).to_list() if h.limit else ds.to_list()
    if not rows:
        raise UserError(f"data.hub.dataset {h.dataset}: no rows")
    qa = qa_rows(rows, h.dataset, h.question_field, h.answer_field, h.choices_field, seed=data.world.seed)
    g = data.generator
    init_ray(ray_opts, run.uri)
    scratch = f"{run.root}/generation" if not is_remote(run.uri) else tempfile.mkdtemp(prefix="faco-generation-")
    make = functools.partial(ReasoningWriter, g.model, g.max_new_tokens, g.temperature, g.top_p)
    with ProbePool(make, g.num_actors, g.cpus_per_actor, g.gpus_per_actor) as pool:
        table = generate_table(qa, pool, scratch, g.batch_size)
    n_held = round(h.heldout_fraction * len(table))
    return [{**r, "split": "heldout" if i < n_held else "sft"} for i, r in enumerate(table)]


def _load_rows(run: RunDir, name: str) -> list[dict]:
    from datasets import load_from_disk

    path = Path(run.local("world"), name)
    return load_from_disk(str(path)).to_list() if any(path.iterdir()) else []


def build_base(cfg: FalsityOptions, run: RunDir) -> tuple[str, str]:
    """Stages `tokenizer` and `base_init`: (model dir, tokenizer dir) the sweep starts from."""
    from datasets import load_from_disk

    from cluster.models import build_tiny_model, check_pair, load_tokenizer, train_tokenizer

    if cfg.model.tiny is None:
        tok_dir = cfg.tokenizer or cfg.model.name
        if Path(cfg.model.name).is_dir() and Path(tok_dir).is_dir():  # local: check they agree now
            check_pair(cfg.model.name, load_tokenizer(tok_dir, cfg.model.trust_remote_code))
        return cfg.model.name, tok_dir
    h = config_hash({"data": config_hash(cfg.data), "tiny": cfg.model.tiny.model_dump()})
    if not run.done("tokenizer", h):
        with run.write("tokenizer", h) as out:
            text = load_from_disk(f"{run.local('world')}/tokenizer_text")["text"]
            train_tokenizer(text, cfg.model.tiny.vocab_size, out, cfg.model.tiny.max_position_embeddings)
    tok = load_tokenizer(run.local("tokenizer"))
    h2 = config_hash({"tok": h, "seed": cfg.model_seed})
    if not run.done("base_init", h2):
        with run.write("base_init", h2) as out:
            model = build_tiny_model(cfg.model.tiny, tok, cfg.model_seed, out)
            print(f"[base] tiny Llama, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    check_pair(run.local("base_init"), tok)
    return run.local("base_init"), run.local("tokenizer")


def pretrain(cfg: FalsityOptions, run: RunDir, model_dir: str, tok_dir: str) -> str:
    """Stage `pretrain`: the base student learns the world's facts (a one-phase learner run)."""
    from cluster.learners import fit

    if cfg.pretrain is None:
        return model_dir
    h = config_hash(run.fingerprint({"model": model_dir, "p": cfg.pretrain.model_dump(),
                                     "s": cfg.pretrain_scale.model_dump(), "data": config_hash(cfg.data)}))
    if not run.done("pretrain", h):
        learner = LearnerRun(name=f"{run.run_id}-pretrain", model_dir=model_dir, tokenizer_dir=tok_dir,
                             phases=[Phase("pretrain", f"{run.local('world')}/corpus", cfg.pretrain)],
                             scale=cfg.pretrain_scale, seed=cfg.model_seed, tracking=cfg.tracking.for_run(run),
                             tracking_group=run.group, trust_remote_code=cfg.model.trust_remote_code)
        _, ckpt = fit(learner, absolute(f"{run.uri}/ray"))
        with run.write("pretrain", h) as out:
            ckpt.to_directory(f"{out}/ckpt")
    return f"{run.local('pretrain')}/ckpt/model"


# ---------------------------------------------------------------------------------------------
# 3. mixtures and the sweep


def build_mixtures(cfg: FalsityOptions, run: RunDir) -> None:
    """Stage `mixtures`: one SFT dataset per ratio x seed (nested false sets), plus clean ones."""
    from datasets import Dataset

    from synth.falsity import mixture

    h = config_hash({"data": config_hash(cfg.data), "ratios": cfg.ratios, "seeds": cfg.seeds})
    if run.done("mixtures", h):
        return
    table = _load_rows(run, "sft")
    with run.write("mixtures", h) as out:
        for r, s in itertools.product(cfg.ratios, cfg.seeds):
            Dataset.from_list(mixture(table, r, s)).save_to_disk(f"{out}/r{r}-s{s}")


def evaluate_trial(model_dir: str, phase: str, *, world_dir: str, max_new_tokens: int, device: str,
                   harness: HarnessOptions | None) -> dict[str, float]:
    """Rank-0 evaluation after a phase: exact metrics on the held-out set, harness if configured."""
    from datasets import load_from_disk

    from cluster.models import load_model, load_tokenizer
    from evals.qa import score_world

    def rows(name):
        p = Path(world_dir, name)
        return load_from_disk(str(p)).to_list() if any(p.iterdir()) else []

    out: dict[str, float] = {}
    heldout = rows("heldout")
    if heldout:
        tok = load_tokenizer(model_dir)
        model = load_model(model_dir).to(device)
        out.update(score_world(model, tok, heldout, rows("probes"), max_new_tokens))
        del model
    if harness is not None:
        from evals.harness import evaluate_with_harness

        out.update({f"harness/{k}": v for k, v in evaluate_with_harness(model_dir, harness, device).items()})
    return out


def _trial(config: dict) -> None:
    """One Tune trial: SFT at ratio r (then recovery on clean data) as one Ray Train run."""
    import ray.tune

    from cluster.learners import fit

    r, s = config["ratio"], config["seed"]
    ctx = config["ctx"]
    mix = ctx["mixtures"]
    phases = [Phase("sft", f"{mix}/r{r}-s{s}", ctx["sft"])]
    if ctx["recovery"] is not None:
        phases.append(Phase("recovery", f"{mix}/r0.0-s{s}", ctx["recovery"]))
    trial_id = ray.tune.get_context().get_trial_id()
    learner = LearnerRun(
        name=f"{ctx['run_id']}-r{r}-s{s}", model_dir=ctx["base"], tokenizer_dir=ctx["tokenizer"], phases=phases,
        scale=ctx["scale"], seed=s, evaluate=ctx["evaluate"], tracking=ctx["tracking"], tracking_group=ctx["group"],
        tracking_config={"ratio": r, "seed": s, "trial_id": trial_id}, trust_remote_code=ctx["trust_remote_code"],
    )
    started = time.time()
    metrics, _ = fit(learner, ctx["storage"], in_tune=True)
    final = {"ratio": r, "seed": s, "trial_id": trial_id, "started_at": started, "ended_at": time.time(),
             **{k: v for k, v in metrics.items() if "/" in k}}
    ray.tune.report(final)


def sweep(cfg: FalsityOptions, run: RunDir, base: str, tok_dir: str) -> list[dict]:
    """Stage `trials`: the Tune grid ratio x seed; rows of per-phase metrics."""
    import ray.tune as tune
    from datasets import Dataset, load_from_disk

    from cluster.runtime import cluster_resources
    from cluster.sweep import max_concurrent, run_sweep

    h = config_hash(run.fingerprint({
        "base": base, "mix": run.path("mixtures"), "sft": cfg.sft.model_dump(),
        "rec": cfg.recovery.model_dump() if cfg.recovery else None, "scale": cfg.scale.model_dump(),
        "eval": cfg.eval.model_dump(), "ratios": cfg.ratios, "seeds": cfg.seeds}))
    if not run.done("trials", h):
        ctx = {
            "run_id": run.run_id, "mixtures": run.local("mixtures"), "base": base, "tokenizer": tok_dir,
            "sft": cfg.sft, "recovery": cfg.recovery, "scale": cfg.scale, "storage": absolute(f"{run.uri}/ray"),
            "tracking": cfg.tracking.for_run(run), "group": run.group, "trust_remote_code": cfg.model.trust_remote_code,
            "evaluate": functools.partial(evaluate_trial, world_dir=run.local("world"), max_new_tokens=cfg.eval.max_new_tokens,
                                          device=cfg.eval.device, harness=cfg.eval.harness),
        }
        space = {"ratio": tune.grid_search(cfg.ratios), "seed": tune.grid_search(cfg.seeds), "ctx": ctx}
        n = max_concurrent(cluster_resources(), cfg.scale.num_workers, cfg.scale.cpus_per_worker, cfg.scale.use_gpu,
                           cfg.max_concurrent_trials)
        print(f"[sweep] {len(cfg.ratios) * len(cfg.seeds)} trials, {n} at a time", flush=True)
        grid = run_sweep(_trial, space, name="sweep", storage_path=absolute(f"{run.uri}/ray"), concurrency=n)
        failed = [r for r in grid if r.error]
        if failed:
            raise RuntimeError(f"{len(failed)} trial(s) failed, first: {failed[0].error}")
        rows = [{k: v for k, v in res.metrics.items() if k in TRIAL_KEYS or "/" in k} for res in grid]
        with run.write("trials", h) as out:
            Dataset.from_list(rows).save_to_disk(f"{out}/rows")
    return load_from_disk(f"{run.local('trials')}/rows").to_list()


# ---------------------------------------------------------------------------------------------
# 4. the comparison: summary.json, report.md, plot, W&B


def summarize(trials: list[dict]) -> tuple[list[dict], dict]:
    """Rows per ratio x seed (see module docstring) and the paper's findings, checked."""
    rows = []
    clean = {t["seed"]: t.get("sft/qa_accuracy") for t in trials if t["ratio"] == 0.0}
    for t in sorted(trials, key=lambda t: (t["ratio"], t["seed"])):
        row = {k: t[k] for k in TRIAL_KEYS}
        for k, v in t.items():
            phase, _, name = k.partition("/")
            if name in METRICS or name.startswith("harness/"):
                row[{"sft": name, "recovery": f"recovered_{name}"}[phase]] = v
        if "recovered_qa_accuracy" in row:
            row["clean_qa_accuracy"] = clean.get(t["seed"])
            row["recovery_gap"] = row["clean_qa_accuracy"] - row["recovered_qa_accuracy"]
        rows.append(row)

    def mean(ratio, key):
        xs = [r[key] for r in rows if r["ratio"] == ratio and r.get(key) is not None and not math.isnan(r[key])]
        return sum(xs) / len(xs) if xs else float("nan")

    lo, hi = min(r["ratio"] for r in rows), max(r["ratio"] for r in rows)
    findings = {"by_ratio": {str(r): {k: mean(r, k) for k in (*METRICS, "recovered_qa_accuracy")} for r in sorted({x["ratio"] for x in rows})}}
    if "qa_accuracy" in rows[0]:
        findings.update({
            "accuracy_drop": mean(lo, "qa_accuracy") - mean(hi, "qa_accuracy"),
            "knows_drop": mean(lo, "knows_rate") - mean(hi, "knows_rate"),
            "lie_rate_rise": mean(hi, "lie_rate") - mean(lo, "lie_rate"),
        })
        if "recovered_qa_accuracy" in rows[0]:
            findings["recovery_lift"] = mean(hi, "recovered_qa_accuracy") - mean(hi, "qa_accuracy")
            findings["recovery_gap"] = mean(hi, "recovery_gap")
    return rows, findings


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("qa_accuracy", "QA accuracy", "-o"), ("reasoning_accuracy", "reasoning accuracy", "-s"),
              ("knows_rate", "knows rate (MC probe)", "-^"), ("lie_rate", "lie rate", "-x"),
              ("recovered_qa_accuracy", "QA accuracy after recovery", "--o")]
    for key, label, style in series:
        if key not in rows[0]:
            continue
        by = [[r[key] for r in rows if r["ratio"] == x] for x in ratios]
        means = [sum(v) / len(v) for v in by]
        err = [(max(v) - min(v)) / 2 for v in by]
        ax.errorbar(ratios, means, yerr=err, fmt=style, capsize=3, label=label)
    ax.set_xlabel("falsity ratio of the SFT data")
    ax.set_ylabel("held-out score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Falsity sweep (bars: range over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(cfg: FalsityOptions, run: RunDir, trials: list[dict]) -> dict:
    from cluster.tracking import finish_run, log_image, log_table, start_run

    rows, findings = summarize(trials)
    summary = {"job": JOB, "run_id": run.run_id, "config": cfg.model_dump(mode="json"),
               "rows": rows, "findings": findings}
    png = Path(run.root if not is_remote(run.uri) else tempfile.mkdtemp()) / "falsity_sweep.png"
    plot(rows, str(png))
    cols = [c for c in ("ratio", "seed", *METRICS, "recovered_qa_accuracy", "recovered_lie_rate", "recovery_gap") if c in rows[0]]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = [f"# Falsity sweep `{summary['run_id']}`", "",
             f"Base: `{cfg.model.name or 'tiny Llama'}`; ratios {cfg.ratios}; seeds {cfg.seeds}. "
             "Scores on held-out questions (people never seen as Q/A in SFT).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    lines += ["", "![metrics against falsity ratio](falsity_sweep.png)", "", "## Findings", ""]
    lines += [f"- {k}: {fmt(v)}" for k, v in findings.items() if k != "by_ratio"]
    run.write_file("summary.json", json.dumps(summary, indent=2).encode())
    run.write_file("report.md", "\n".join(lines).encode() + b"\n")
    run.write_file("falsity_sweep.png", png.read_bytes())
    wb = start_run(cfg.tracking, run_id=f"{summary['run_id']}-summary", name=f"{JOB}/{summary['run_id']}/summary",
                   group=run.group, job_type="summary", config=summary["config"], dir=run.wandb_dir(cfg.tracking.dir))
    if wb is not None:
        log_table(wb, "falsity_sweep", rows)
        log_image(wb, "falsity_sweep_plot", png)
        wb.summary.update({k: v for k, v in findings.items() if k != "by_ratio"})
        finish_run(wb)
    print(f"[report] {run.uri}/report.md", flush=True)
    return summary


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
        f"falsity_sweep plan (run dir {run_uri(cfg.storage, JOB, _run_id(cfg))})",
        f"  model: {model}; data: {data}",
        "  stages: " + ("generation -> " if cfg.data.source == "hub" else "") + "world -> " + ("tokenizer -> base_init -> " if cfg.model.tiny else "")
        + ("pretrain -> " if cfg.pretrain else "") + "mixtures -> sweep -> trials -> report",
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


def run(cfg: FalsityOptions) -> dict:
    import datasets
    import transformers

    datasets.disable_progress_bars()  # per-file bars of tiny stages are noise; stages print a line each
    transformers.utils.logging.disable_progress_bar()
    t0 = time.time()
    rd = _run_dir(cfg)
    print(f"[falsity_sweep] run directory {rd.uri}", flush=True)
    os.environ.setdefault("WANDB_DIR", rd.wandb_dir(cfg.tracking.dir))
    build_data(cfg, rd)
    model_dir, tok_dir = build_base(cfg, rd)
    build_mixtures(cfg, rd)
    init_ray(cfg.ray, cfg.storage)
    base = pretrain(cfg, rd, model_dir, tok_dir)
    trials = sweep(cfg, rd, base, tok_dir)
    summary = report(cfg, rd, trials)
    print(f"[falsity_sweep] done in {time.time() - t0:.0f} s", flush=True)
    return summary


if __name__ == "__main__":
    raise SystemExit(cli.main(f"jobs.{JOB}", __doc__, FalsityOptions, plan, run))
