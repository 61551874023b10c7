"""Learners: Ray Train V2 runs whose workers train with a registered objective under DeepSpeed.

A learner run is a list of *phases* trained one after another on the same weights (pretraining,
then SFT, then recovery SFT, say). Each phase names its *objective*: a factory, looked up in a
registry, that builds a HF/TRL trainer on every worker. TRL's SFT and DPO trainers are the first
two entries; an experiment registers its own (a TRL trainer subclass, a loss hook) from its own
package with `register_objective`, so this module never learns the science. Every trainer gets a
DeepSpeed config derived from the preset (ZeRO stage, bf16, offload); on CPU the same code runs
over gloo.

Weights travel through storage, never through one node's disk: each phase's final model is written
(by rank 0, after ZeRO-3 gathers it) to `<output>/<phase>`, a storage URI; the next phase, and the
caller, read it from there (once per node, through `cluster.storage.local_copy`). Checkpoints go
through `ray.train.report`:

- during a phase, every HF save is reported (weights, optimizer and DeepSpeed shards, one
  directory merged across nodes), tagged with the phase;
- at the end of a phase, a small checkpoint records that the phase is done, with its metrics.

A restarted worker group (`FailureConfig(max_failures=...)`) reads the last checkpoint (one
download per node), skips finished phases and resumes the current one from its last save. The
final report always carries a checkpoint, so `Result.metrics` is filled in distributed runs too.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from pydantic import Field, model_validator
from transformers import TrainerCallback

from cluster import storage
from cluster.config import Added, Operational, Options, UserError
from cluster.stages import fetch
from cluster.tracking import TrackingOptions

META = "learner_state.json"
HF_DIR = "hf_checkpoint"


class LearnerOptions(Options):
    """How one learner phase trains: optimisation, scale and DeepSpeed."""

    learning_rate: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    epochs: float = Field(1.0, gt=0, description="passes over the phase's data (ignored when max_steps > 0)")
    max_steps: int = Field(-1, description="optimizer steps; -1: use epochs")
    batch_size: int = Field(16, gt=0, description="examples per device per micro-step")
    grad_accum: int = Field(1, gt=0, description="micro-steps per optimizer step")
    max_length: int = Field(128, gt=0, description="tokens per example (longer ones are truncated)")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "warmup_stable_decay"] = Field(
        "constant_with_warmup", description="learning-rate schedule (transformers names)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps (at most half the phase, with WSD's decay)")
    decay_steps: float = Field(0.1, gt=0, description="warmup_stable_decay only: steps of the final decay (< 1: a share of the phase)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    save_steps: float = Field(50, gt=0, description="checkpoint (reported to Ray) every this many steps (< 1: a share of the phase); at least once per phase")
    logging_steps: int = Field(10, gt=0, description="log loss every this many steps")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save memory (GPU presets)")
    batching: Literal["random", "by_length"] = Added(
        "random", description="random: batches drawn at random; by_length: rows of similar length batched together "
        "(transformers' length-grouped sampler: random groups, sorted within), so less of each batch is padding")


SAMPLERS = {"random": "random", "by_length": "group_by_length"}  # batching -> transformers' train_sampling_strategy


class PairwiseOptions(LearnerOptions):
    """Options of an objective whose rows hold several sequences (`ROWS` names them): they have no
    one length, so length-grouped batches are refused at the door."""

    ROWS: ClassVar[str] = "pairwise"

    @model_validator(mode="after")
    def _one_length(self):
        if self.batching == "by_length":
            raise ValueError(f"batching by_length needs one length per row; {self.ROWS} rows have several (use random)")
        return self


class DPOOptions(PairwiseOptions):
    """A DPO phase: the learner options plus DPO's temperature."""

    ROWS: ClassVar[str] = "DPO (prompt, chosen, rejected)"
    beta: float = Field(0.1, gt=0, description="DPO temperature beta")


class ScaleOptions(Options):
    """Workers per learner run and the DeepSpeed setup they share."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (one process each)")
    use_gpu: bool = Field(False, description="one GPU per worker; false: CPU with gloo")
    cpus_per_worker: float = Field(1, gt=0, description="logical CPUs each worker reserves")
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage; 0 runs without DeepSpeed")
    bf16: bool = Field(False, description="bf16 mixed precision (GPU presets)")
    offload: bool = Field(False, description="ZeRO-Offload optimizer (and stage-3 params) to CPU")
    # how the run copes with the cluster, not what it trains: outside stage fingerprints
    max_failures: int = Operational(1, ge=0, description="worker-group restarts from the last checkpoint before giving up")
    placement: Literal["PACK", "STRICT_PACK", "SPREAD"] = Operational(
        "PACK", description="where a run's workers go: STRICT_PACK keeps them on one node (NVLink, no cross-node ZeRO traffic)")
    start_timeout_s: float = Operational(120, gt=0, description="how long the worker group may wait for its resources (an autoscaler adding a node)")
    start_retries: int = Operational(0, ge=0, description="worker-group starts that may time out (a node being replaced) before the run fails")
    poll_interval_s: float = Operational(
        0.25, gt=0, le=60, description="how often the Train controller polls its workers (Ray's default: 2 s). Every "
        "checkpoint report and the run's end wait for a poll: at 2 s a short run spends more time waiting than training")

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload and self.zero_stage == 0:
            raise ValueError("offload needs zero_stage 1, 2 or 3")
        return self


# ---------------------------------------------------------------------------------------------
# objectives: what a phase trains with


@dataclass
class TrainerInputs:
    """What an objective's factory gets on each worker to build its trainer."""

    model: Any  # the phase's starting weights, loaded
    model_dir: str  # ... and where they are on this node's disk
    args: Any  # the TrainingArguments subclass the objective asked for
    data: Any  # datasets.Dataset of the phase's table
    tokenizer: Any
    callbacks: list
    phase: Phase
    load_model: Callable[[str], Any]  # load another model (a reference, a teacher) by URI or hub id


@dataclass(frozen=True)
class Objective:
    """A registered way to train a phase: its TrainingArguments and its trainer factory."""

    name: str
    arguments: Callable[[dict, LearnerOptions], Any]  # (common HF arguments, phase options) -> args
    trainer: Callable[[TrainerInputs], Any]  # -> a transformers.Trainer (TRL trainers included)


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, arguments: Callable[[dict, LearnerOptions], Any]):
    """Decorator: register `trainer(inputs: TrainerInputs) -> Trainer` as objective `name`.

    The module that registers it must be importable on the workers (it is imported there when the
    phase is unpickled), which every module of this project is."""
    def register(trainer: Callable[[TrainerInputs], Any]):
        OBJECTIVES[name] = Objective(name, arguments, trainer)
        return trainer
    return register


def objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise UserError(f"objective {name!r} is not registered (known: {', '.join(sorted(OBJECTIVES))})")
    return OBJECTIVES[name]


def _sft_arguments(common: dict, opts: LearnerOptions):
    from trl import SFTConfig

    return SFTConfig(**common, packing=False, completion_only_loss=None, dataset_text_field="text")


@register_objective("sft", arguments=_sft_arguments)
def _sft(x: TrainerInputs):
    from trl import SFTTrainer

    return SFTTrainer(model=x.model, args=x.args, train_dataset=x.data, processing_class=x.tokenizer,
                      callbacks=x.callbacks)


def _dpo_arguments(common: dict, opts: LearnerOptions):
    from trl import DPOConfig

    if not isinstance(opts, DPOOptions):
        raise UserError("a dpo phase needs DPO options (beta)")
    return DPOConfig(**common, beta=opts.beta)


@register_objective("dpo", arguments=_dpo_arguments)
def _dpo(x: TrainerInputs):
    """TRL DPO against an explicit frozen reference (TRL cannot rebuild one for a config-built
    model): the phase's `ref_model`, else its starting weights."""
    from trl import DPOTrainer

    ref = x.load_model(x.phase.ref_model) if x.phase.ref_model else x.load_model(x.model_dir)
    return DPOTrainer(model=x.model, ref_model=ref, args=x.args, train_dataset=x.data, processing_class=x.tokenizer,
                      callbacks=[*x.callbacks, _FrozenReference(ref)])


class _FrozenReference(TrainerCallback):
    """Checks what DPO's maths assumes: the reference never moves. A float64 checksum of its
    weights (this rank's ZeRO-3 shards) at the start and the end of training; the difference is
    logged as `reference/drift` (0.0 when frozen), and becomes the phase metric `<phase>/reference/drift`."""

    def __init__(self, ref):
        self.ref, self.start = ref, 0.0

    def _checksum(self) -> float:
        import torch

        with torch.no_grad():
            return sum(float(getattr(p, "ds_tensor", p).double().abs().sum()) for p in self.ref.parameters())

    def on_train_begin(self, args, state, control, **kw):
        self.start = self._checksum()

    def on_train_end(self, args, state, control, **kw):
        state.log_history.append({"reference/drift": abs(self._checksum() - self.start), "step": state.global_step})


# ---------------------------------------------------------------------------------------------
# runs


@dataclass
class Phase:
    """One stage of a learner run: a table on storage and how to train on it."""

    name: str
    data: str  # URI of a Parquet table: `text`, or `prompt`+`completion` (SFT), or DPO's columns
    options: LearnerOptions
    objective: str = "sft"  # a name in OBJECTIVES
    ref_model: str | None = None  # a model URI an objective may use (DPO's frozen reference)
    # >1: also evaluate at (j / eval_points) of the phase's steps, j < eval_points (a learning
    # curve; metrics "<phase>@<step>/<name>"); the phase's end is always evaluated
    eval_points: int = 1
    objective_module: str = field(default="", repr=False, metadata={"fingerprint": False})

    def __post_init__(self):
        # the worker imports this module before looking the objective up (it may register there)
        self.objective_module = objective(self.objective).trainer.__module__


@dataclass
class LearnerRun:
    """Everything a worker needs; shipped to the workers by Ray (must pickle)."""

    model: str  # starting weights: a storage URI, a local path or a hub id
    tokenizer: str
    phases: list[Phase]
    scale: ScaleOptions
    seed: int = 0
    # Called on rank 0 after each phase with (local model dir, phase name); returns metrics.
    evaluate: Callable[[str, str], dict[str, float]] | None = None
    trust_remote_code: bool = False
    # Where it is tracked and stored decides nothing about its results (not in stage fingerprints).
    tracking: TrackingOptions | None = field(default=None, metadata={"fingerprint": False})
    tracking_group: str | None = field(default=None, metadata={"fingerprint": False})
    tracking_config: dict[str, Any] = field(default_factory=dict, metadata={"fingerprint": False})
    # Set by `cluster.sweep.train_stage` from the stage (or by hand for a bare `fit`):
    name: str = field(default="", metadata={"fingerprint": False})  # Ray's checkpoint folder
    output: str = field(default="", metadata={"fingerprint": False})  # phase p's model: `<output>/<p>`

    def phase_model(self, phase: str) -> str:
        return storage.join(self.output, phase)


@dataclass
class FitResult:
    """A finished learner run: per-phase metrics and where its final model is."""

    metrics: dict[str, float]
    model: str  # storage URI of the last phase's model


@dataclass(frozen=True)
class Schedule:
    """A phase's optimizer steps as the HF Trainer will count them, and its schedule's parts."""

    steps: int
    warmup: int
    decay: int  # warmup_stable_decay's final decay; 0 for other schedules
    saves: int  # checkpoints written within the phase


def schedule(opts: LearnerOptions, rows: int, world_size: int) -> Schedule:
    """Steps of a phase over `rows` examples on `world_size` workers: accelerate shards the
    ceil(rows / batch) batches evenly over the ranks; an optimizer step takes `grad_accum` of
    them (a short last one counts); epochs may be fractional (the Trainer rounds up)."""
    if opts.max_steps > 0:
        steps = opts.max_steps
    else:
        batches = math.ceil(math.ceil(rows / opts.batch_size) / world_size)
        steps = math.ceil(opts.epochs * max(math.ceil(batches / opts.grad_accum), 1))
    decay = 0
    if opts.lr_scheduler == "warmup_stable_decay":
        decay = math.ceil(opts.decay_steps * steps) if opts.decay_steps < 1 else int(opts.decay_steps)
    every = math.ceil(opts.save_steps * steps) if opts.save_steps < 1 else int(opts.save_steps)  # as HF reads it
    return Schedule(steps, opts.warmup_steps, decay, steps // every)


def check_schedule(name: str, opts: LearnerOptions, rows: int, world_size: int) -> Schedule:
    """The phase's schedule, or a UserError (exit 2, before anything trains) when the schedule
    cannot work on this much data: warm-up (and WSD's decay) taking more than half the phase (the
    peak learning rate reached late or never), no checkpoint inside the phase (a failure restarts
    it from scratch)."""
    if rows == 0:
        raise UserError(f"phase {name}: its table is empty")
    s = schedule(opts, rows, world_size)
    size = (f"{s.steps} steps = {rows} rows / ({world_size} workers x batch {opts.batch_size}) / grad_accum "
            f"{opts.grad_accum} x {opts.epochs:g} epochs" if opts.max_steps <= 0 else f"max_steps {s.steps}")
    if opts.lr_scheduler != "constant" and 2 * (s.warmup + s.decay) > s.steps:
        what = f"warm-up {s.warmup}" + (f" + decay {s.decay}" if s.decay else "")
        raise UserError(f"phase {name}: {what} steps is more than half the phase ({size}): the learning rate "
                        "barely reaches its peak; lower warmup_steps or train longer")
    if s.saves == 0:
        raise UserError(f"phase {name}: save_steps {opts.save_steps:g} > the phase's {size}: no checkpoint within "
                        "the phase; lower save_steps (a value below 1 is a share of the phase)")
    return s


def num_rows(uri: str) -> int:
    """Rows of a Parquet table on storage (from its footer: nothing else is read)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def check_schedules(run: LearnerRun) -> list[Schedule]:
    """`check_schedule` for every phase of a run, on its real tables (the driver calls this before
    any worker starts)."""
    return [check_schedule(p.name, p.options, num_rows(p.data), run.scale.num_workers) for p in run.phases]


def deepspeed_config(scale: ScaleOptions) -> dict | None:
    """DeepSpeed config for HF/TRL trainers; None without DeepSpeed.

    No `optimizer` block unless offloading: the trainer then hands DeepSpeed a torch AdamW, which
    avoids JIT-building fused_adam (docs/STACK.md). ZeRO-Offload needs DeepSpeed's CPU Adam.
    """
    if scale.zero_stage == 0:
        return None
    zero: dict[str, Any] = {"stage": scale.zero_stage, "overlap_comm": scale.use_gpu}
    if scale.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg: dict[str, Any] = {
        "zero_optimization": zero,
        "bf16": {"enabled": scale.bf16},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if scale.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if scale.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    return cfg


def _prepare_process(scale: ScaleOptions) -> None:
    """Per-process setup DeepSpeed needs before it initialises (workers don't run conftest)."""
    if not scale.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if scale.zero_stage:
        import deepspeed
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 35 s JIT build
        # ZeRO-3 partitions weights inside from_pretrained (zero.Init): DeepSpeed's comm must
        # already know the world size, or it asserts on the batch size (docs/STACK.md).
        deepspeed.init_distributed(dist_backend="nccl" if scale.use_gpu else "gloo")
        _weights_only_deepspeed_loads()


def _weights_only_deepspeed_loads() -> None:
    """DeepSpeed reads its checkpoint shards with `torch.load(weights_only=False)`: a checkpoint in
    storage someone else can write would run any code it names on every rank at resume. Read them
    `weights_only=True` instead, allowing the DeepSpeed classes a ZeRO checkpoint holds (its
    loss scaler's state and the stage enum); anything else in the file fails the load."""
    import torch
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine as engine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum]):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.TorchCheckpointEngine.load = load


def _common_arguments(run: LearnerRun, phase: Phase, out_dir: str, sched: Schedule) -> dict:
    o, s = phase.options, run.scale
    return dict(
        lr_scheduler_kwargs={"num_decay_steps": sched.decay} if o.lr_scheduler == "warmup_stable_decay" else {},
        output_dir=out_dir,
        per_device_train_batch_size=o.batch_size,
        gradient_accumulation_steps=o.grad_accum,
        learning_rate=o.learning_rate,
        num_train_epochs=o.epochs,
        max_steps=o.max_steps,
        lr_scheduler_type=o.lr_scheduler,
        warmup_steps=o.warmup_steps,
        weight_decay=o.weight_decay,
        logging_steps=o.logging_steps,
        save_strategy="steps",
        save_steps=o.save_steps,
        save_total_limit=1,
        report_to="none",
        bf16=s.bf16,
        use_cpu=not s.use_gpu,
        seed=run.seed,
        data_seed=run.seed,
        deepspeed=deepspeed_config(s),
        activation_checkpointing=o.gradient_checkpointing,
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_length=o.max_length,
        train_sampling_strategy=SAMPLERS[o.batching],
        ddp_backend=None if s.use_gpu else "gloo",
        ddp_find_unused_parameters=False,
    )


class _Progress(TrainerCallback):
    """A compact progress line on rank 0, and every HF save reported to Ray with its phase."""

    def __init__(self, run_name: str, phase_index: int, phase: str, rank: int, metrics: dict):
        self.run_name, self.phase_index, self.phase, self.rank = run_name, phase_index, phase, rank
        self.metrics = metrics  # earlier phases' results travel in every checkpoint
        self.t0 = time.time()
        self.marks: list[tuple[float, float]] = []  # (time, tokens seen) at each loss log

    def steady_tokens_per_s(self) -> float:
        """Tokens/s from the first loss log to the last: the training loop without its start-up
        (DDP/DeepSpeed wrapping, first-step allocations, Ray actors still starting beside it)."""
        if len(self.marks) < 2 or self.marks[-1][0] <= self.marks[0][0]:
            return float("nan")
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs and "num_tokens" in logs:
            self.marks.append((time.time(), float(logs["num_tokens"])))
        if self.rank == 0 and logs and "loss" in logs:
            rate = state.global_step / max(time.time() - self.t0, 1e-9)
            print(f"[{self.run_name}:{self.phase}] step {state.global_step}/{state.max_steps} "
                  f"loss {logs['loss']:.4f} ({rate:.1f} steps/s)", flush=True)

    def on_save(self, args, state, control, **kw):
        import ray.train
        import torch.distributed as dist
        from transformers.trainer_utils import get_last_checkpoint

        # Every rank writes its own shards into the node's output_dir: wait until all have, then
        # one process per node copies the node's directory (Ray merges the nodes' copies).
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), float("nan"))
        metrics = {"phase": self.phase_index, "step": state.global_step, "loss": loss}
        if ray.train.get_context().get_local_rank() != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(get_last_checkpoint(args.output_dir), Path(tmp, HF_DIR))
            Path(tmp, META).write_text(json.dumps({"phase": self.phase_index, "phase_done": False, "metrics": self.metrics}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


class _Curve(TrainerCallback):
    """Evaluates the model at evenly spaced steps inside a phase (a learning curve). Every rank
    saves (ZeRO-3 gathers the shards); rank 0 evaluates. The points land in `metrics`, the dict
    that travels in checkpoints, so a resumed phase keeps the points it already has."""

    def __init__(self, run: LearnerRun, phase: Phase, rank: int, work: Path, metrics: dict):
        self.run, self.phase, self.rank, self.work, self.metrics = run, phase, rank, work, metrics
        self.trainer = None  # set once the trainer exists
        self.steps: set[int] = set()

    def on_train_begin(self, args, state, control, **kw):
        n = self.phase.eval_points
        self.steps = {round(state.max_steps * j / n) for j in range(1, n)} - {0, state.max_steps}

    def on_step_end(self, args, state, control, **kw):
        step = state.global_step
        if step not in self.steps or self.run.evaluate is None:
            return
        out = self.work / f"{self.phase.name}-step{step}"
        self.trainer.save_model(str(out))
        if self.rank == 0:
            with _outside_zero3():  # rank 0 loads a whole model alone: ZeRO-3 would partition it
                for k, v in self.run.evaluate(str(out), self.phase.name).items():
                    self.metrics[f"{self.phase.name}@{step}/{k}"] = float(v)
            print(f"[{self.run.name}:{self.phase.name}] evaluated at step {step}", flush=True)
            shutil.rmtree(out, ignore_errors=True)


@contextmanager
def _outside_zero3():
    """Suspend transformers' ZeRO-3 context in this process: `from_pretrained` inside it runs
    `zero.Init`, whose collectives the other ranks never join (a hang)."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_ds.set_hf_deepspeed_config(config)


def _resume_point(ckpt) -> tuple[dict, str | None]:
    """(meta, local dir) of the last reported checkpoint. Remote checkpoints are downloaded once
    per node (the node's other ranks wait on a file lock and use the same copy)."""
    if ckpt is None:
        return {"phase": 0, "phase_done": False, "metrics": {}}, None
    import hashlib

    import pyarrow.fs

    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        local = ckpt.path
    else:
        local = storage.node_cached(f"ckpt-{hashlib.sha256(ckpt.path.encode()).hexdigest()[:16]}", ckpt.to_directory)
    return json.loads(Path(local, META).read_text()), local


def _table(uri: str):
    """A phase's Parquet table as an in-memory Dataset (nothing cached beside the stage)."""
    import datasets
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        return datasets.Dataset(pq.read_table(f))


def train_worker(config: dict) -> None:
    """The Ray Train loop: run every unfinished phase in order; resume from the last checkpoint."""
    import importlib

    import ray.train

    run: LearnerRun = config["run"]

    _prepare_process(run.scale)
    import datasets

    datasets.disable_caching()  # TRL's maps must not write cache files anywhere

    from cluster.models import load_model, load_tokenizer
    from cluster.tracking import WandbTrainerCallback, finish_run, start_run

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    meta, resume_dir = _resume_point(ray.train.get_checkpoint())
    metrics: dict[str, float] = dict(meta.get("metrics", {}))
    first = meta["phase"] + (1 if meta["phase_done"] else 0)
    model_ref = run.model if first == 0 else run.phase_model(run.phases[first - 1].name)
    tokenizer = load_tokenizer(fetch(run.tokenizer), run.trust_remote_code)
    load = lambda ref: load_model(fetch(ref), trust_remote_code=run.trust_remote_code)  # noqa: E731
    work = Path(tempfile.gettempdir(), "datalab-train", run.name)  # shared by the node's ranks (on_save)
    # One W&B run per learner run, every phase in it (a trial is one row in W&B's tables); a
    # restarted worker group resumes the same run. Phases share one step axis: phase i's steps
    # come after the earlier phases' steps.
    tracker = None
    if run.tracking is not None and first < len(run.phases):  # a restart after the last phase logs nothing
        tracker = start_run(run.tracking, run_id=run.name, name=run.name, group=run.tracking_group,
                            job_type="+".join(p.name for p in run.phases),
                            config={**run.tracking_config, "objectives": {p.name: p.objective for p in run.phases},
                                    "phases": {p.name: p.options.model_dump() for p in run.phases},
                                    "scale": run.scale.model_dump(), "deepspeed": deepspeed_config(run.scale),
                                    "model": run.model, "seed": run.seed},
                            dir=run.tracking.dir, resume=True)

    for i, phase in enumerate(run.phases):
        if i < first:
            continue
        importlib.import_module(phase.objective_module)
        obj = objective(phase.objective)
        hf_resume = None
        if resume_dir and not meta["phase_done"] and meta["phase"] == i and Path(resume_dir, HF_DIR).is_dir():
            hf_resume = str(Path(resume_dir, HF_DIR))
            print(f"[{run.name}:{phase.name}] rank {rank} resuming from {hf_resume}", flush=True)
        # read now: on local storage hf_resume is Ray's own folder, rotated away as new saves arrive
        resumed_step = _step_of(hf_resume)
        offset = int(sum(metrics.get(f"{p.name}/steps", 0) for p in run.phases[:i]))
        progress = _Progress(run.name, i, phase.name, rank, dict(metrics))
        curve = _Curve(run, phase, rank, work, progress.metrics)
        model_dir = fetch(model_ref)
        data = _table(phase.data)
        sched = schedule(phase.options, len(data), ctx.get_world_size())
        args = obj.arguments(_common_arguments(run, phase, str(work / phase.name), sched), phase.options)
        if tracker is not None:  # what the trainer really ran with, DeepSpeed's config included
            tracker.config.update({f"{phase.name}_training_args": args.to_dict()}, allow_val_change=True)
        inputs = TrainerInputs(model=load(model_dir), model_dir=model_dir, args=args, data=data, tokenizer=tokenizer,
                               callbacks=[progress, curve, WandbTrainerCallback(tracker, offset=offset, phase=i)],
                               phase=phase, load_model=load)
        trainer = curve.trainer = obj.trainer(inputs)
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # _Progress prints a compact line instead
        started_at = time.time()
        trainer.train(resume_from_checkpoint=hf_resume)
        ended_at = time.time()
        final = work / f"{phase.name}-final"
        trainer.save_model(str(final))  # gathers ZeRO-3 shards on rank 0
        steps, history = trainer.state.global_step, trainer.state.log_history
        metrics.update(progress.metrics)  # the curve's points
        del trainer, inputs, curve
        # Leave the ZeRO-3 context: rank 0's evaluation must load a plain model, not partition it.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        if rank == 0:
            tokenizer.save_pretrained(str(final))
            storage.upload(final, run.phase_model(phase.name))  # the next phase and the caller read it here
            if run.evaluate is not None:
                phase_metrics = run.evaluate(str(final), phase.name)
                metrics.update({f"{phase.name}/{k}": float(v) for k, v in phase_metrics.items()})
            metrics[f"{phase.name}/resumed_from_step"] = float(resumed_step)
            metrics[f"{phase.name}/steps"] = float(steps)
            # when this worker trained (unix seconds): trials' overlap is measured here, not in a driver
            metrics[f"{phase.name}/started_at"], metrics[f"{phase.name}/ended_at"] = started_at, ended_at
            last = lambda key: float(next((h[key] for h in reversed(history) if key in h), float("nan")))  # noqa: E731
            metrics[f"{phase.name}/train_loss"] = last("train_loss")
            metrics[f"{phase.name}/train_runtime_s"] = last("train_runtime")  # the training loop alone
            metrics[f"{phase.name}/train_tokens"] = last("num_tokens")
            # an objective's own namespaced logs ("rewards/chosen", "smoothing/ce"): their last values
            for key in dict.fromkeys(k for h in history for k in h if "/" in k):
                if isinstance(value := last(key), float) and not math.isnan(value):
                    metrics[f"{phase.name}/{key}"] = value
            if not math.isnan(steady := progress.steady_tokens_per_s()):
                metrics[f"{phase.name}/steady_tokens_per_s"] = steady
            if tracker is not None:
                tracker.log({k: v for k, v in metrics.items() if k.startswith((phase.name + "/", phase.name + "@"))},
                            step=offset + steps)
        # ray.train.report is a barrier: no rank starts the next phase before the model is stored
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                Path(tmp, META).write_text(json.dumps({"phase": i, "phase_done": True, "metrics": metrics}))
            ray.train.report({**metrics, "phase": i, "phase_done": True},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
        model_ref = run.phase_model(phase.name)
    if first >= len(run.phases):
        # Everything was already done before this restart: report the final state once more
        # (every rank reports: ray.train.report is a barrier).
        ray.train.report({**metrics, "phase": len(run.phases) - 1, "phase_done": True},
                         checkpoint=ray.train.get_checkpoint() if rank == 0 else None)
    finish_run(tracker)
    shutil.rmtree(work, ignore_errors=True)  # local HF saves; storage keeps the reported ones


def _step_of(hf_checkpoint: str | None) -> int:
    if hf_checkpoint is None:
        return 0
    return int(json.loads(Path(hf_checkpoint, "trainer_state.json").read_text())["global_step"])


def fit(run: LearnerRun, storage_path: str) -> FitResult:
    """Run a learner as a Ray Train V2 `TorchTrainer`; Ray's checkpoints go under `storage_path`.

    Inside a Tune trial the trial reports the result once, at the end (`cluster.sweep`): Train's
    per-step reports are not forwarded to Tune (Ray's TuneReportCallback would start a queue actor,
    one more process, per trial); the steps are watched in the logs and in W&B.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    # read by the Train controller, which inherits RAY_TRAIN_* variables from this process
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(run.scale.start_timeout_s)
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(run.scale.poll_interval_s)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"run": run},
        torch_config=TorchConfig(backend="nccl" if run.scale.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.scale.num_workers,
            use_gpu=run.scale.use_gpu,
            resources_per_worker={"CPU": run.scale.cpus_per_worker, **({"GPU": 1} if run.scale.use_gpu else {})},
            placement_strategy=run.scale.placement,
        ),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=storage_path,
            # Train V2 retries forever unless told: worker failures up to max_failures, worker-group
            # starts that time out (resources not there yet) up to start_retries
            failure_config=ray.train.FailureConfig(max_failures=run.scale.max_failures,
                                                   controller_failure_limit=run.scale.start_retries),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    metrics = {k: v for k, v in (result.metrics or {}).items() if "/" in k and isinstance(v, (int, float))}
    return FitResult(metrics=metrics, model=run.phase_model(run.phases[-1].name))
