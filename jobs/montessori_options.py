"""The Montessori-Instruct preset (`jobs.montessori`): its options, the stages it runs, the checks
that turn bad input into one line and exit code 2 before any stage is committed, and the plan
`--dry-run` prints."""

from __future__ import annotations

from pydantic import Field, model_validator

from cluster import storage
from cluster.config import Operational, Options, UserError
from cluster.learners import DPOOptions, LearnerOptions, ScaleOptions
from cluster.models import ModelSpec, check_weights
from cluster.stages import JobOptions
from evals.heldout import EvalOptions
from influence.warmup import WarmupOptions
from synth.instructions import DataOptions
from synth.teacher import TeacherOptions, check_tokenizers, load_tokenizer_or_fail

ITERATION_STAGES = ("candidates", "influence", "pairs", "dpo", "final", "sft", "students")


class ProbeOptions(Options):
    """Candidates per iteration and the probe pool that scores them."""

    prompts: int = Field(48, ge=1, description="instruction-writing prompts per seed and iteration (k candidates each)")
    num_actors: int = Operational(1, ge=1, description="probe actors, each holding the warm student and its AdamW state (each candidate is scored alone: not in the stage fingerprint)")
    cpus_per_actor: float = Field(1, gt=0, description="logical CPUs per probe actor")
    gpus_per_actor: float = Field(0, ge=0, description="GPUs per probe actor")
    batch_size: int = Field(16, ge=1, description="candidates per actor call")
    at_once: int = Operational(1, ge=1, description="candidates an actor scores together (torch.func, one float32 weight copy each: for students small enough that one candidate leaves the device idle); the same scores to float rounding")
    reference_batch_size: int = Field(16, ge=1, description="reference examples per forward (paper: 8)")
    device: str = Field("cpu", description="cpu, cuda, or auto: the warm student's layers spread over the actor's GPUs")
    loss_divisor: float = Field(8, gt=0, description="a probe steps on grad(loss / loss_divisor): the official code divides by its 8 processes (the paper's setup); 1: the plain gradient")

    @model_validator(mode="after")
    def _at_once_on_one_device(self):
        if self.at_once > 1 and self.device == "auto":
            raise ValueError("at_once > 1 scores candidates with torch.func, which needs the student on one device "
                             "(device cpu or cuda, not auto)")
        return self


class MontessoriOptions(JobOptions):
    """Montessori-Instruct preset."""

    student: ModelSpec = Field(description="student model: hub name or a tiny Llama built here")
    student_tokenizer: str | None = Field(None, description="hub tokenizer of the student; null: the model's, or trained offline for tiny")
    student_template: str = Field("Question: {instruction}\n", description="how the student sees an instruction (SFT prompt, probes, evaluation)")
    model_seed: int = Field(0, description="seed of the tiny student's random init")
    pretrain: LearnerOptions | None = Field(None, description="pretraining the tiny student on the world's knowledge corpus; null: as it is")
    pretrain_scale: ScaleOptions = Field(default_factory=ScaleOptions, description="workers and DeepSpeed for pretraining and the tiny teacher's SFT")
    data: DataOptions = Field(default_factory=DataOptions, description="seeds, warm-up, reference and evaluation sets")
    teacher: TeacherOptions = Field(default_factory=TeacherOptions, description="the teacher")
    warmup: WarmupOptions = Field(default_factory=WarmupOptions, description="student warm-up before probing")
    probes: ProbeOptions = Field(default_factory=ProbeOptions, description="local data influence probes")
    dpo: DPOOptions = Field(description="teacher DPO (beta: paper 0.1; lr: paper 1e-6)")
    dpo_scale: ScaleOptions = Field(default_factory=ScaleOptions, description="workers and DeepSpeed per teacher DPO run")
    sft: LearnerOptions = Field(description="student SFT on each final synthetic set")
    scale: ScaleOptions = Field(default_factory=ScaleOptions, description="workers and DeepSpeed per student SFT run")
    final_size: int = Field(256, ge=1, description="examples in each final synthetic set (same for every teacher)")
    iterations: int = Field(2, ge=1, description="probe -> DPO -> final set rounds (paper: 2-3)")
    seeds: list[int] = Field([0, 1], min_length=1, description="seeds of the warm-up, sampling, DPO and SFT data order")
    ablation: bool = Field(True, description="also DPO a teacher on random pairs (iteration 1) and train a student on its data")
    stop_after: str | None = Field(None, description="stop after this stage, e.g. it1-influence, to inspect a partial run; null: run everything")
    eval: EvalOptions = Field(default_factory=EvalOptions, description="evaluation")


def stage_names(cfg: MontessoriOptions) -> list[str]:
    """The stages this preset runs, in order."""
    return (["data"] + (["tokenizer", "base_init"] if cfg.student.tiny else []) + (["pretrain"] if cfg.pretrain else [])
            + (["teacher"] if cfg.teacher.model is None else []) + ["warmup"]
            + [f"it{i}-{s}" for i in range(1, cfg.iterations + 1) for s in ITERATION_STAGES])


def check(cfg: MontessoriOptions) -> None:
    """Cross-option checks (bad input: one line naming the key, exit code 2)."""
    d, t = cfg.data, cfg.teacher
    if d.seed_size == 0:
        raise UserError("data.seed_size: no seed instructions (the teacher is prompted with "
                        f"teacher.prompt.in_context={t.prompt.in_context} of them)")
    if d.seed_size < t.prompt.in_context:
        raise UserError(f"data.seed_size: {d.seed_size} seed instructions, fewer than teacher.prompt.in_context="
                        f"{t.prompt.in_context} shown per prompt")
    if d.reference_size == 0 or (d.source == "world" and d.reference_people == 0):
        raise UserError("data.reference_size: empty reference set (local data influence is measured on it; "
                        "world presets also need data.reference_people > 0)")
    if d.source == "world" and cfg.student.tiny is None:
        raise UserError("student: the synthetic world needs a tiny student (its tokenizer is trained on the world)")
    if t.model is None and (t.sft is None or d.source != "world"):
        raise UserError("teacher.model: required unless teacher.sft builds a tiny teacher on the synthetic world")
    if d.warmup_size > d.seed_size:
        raise UserError(f"data.warmup_size: {d.warmup_size} warm-up examples are drawn from the {d.seed_size} seeds")
    if cfg.stop_after is not None and cfg.stop_after not in stage_names(cfg):
        raise UserError(f"stop_after: this preset has no stage {cfg.stop_after!r} (stages: {', '.join(stage_names(cfg))})")


def check_models(cfg: MontessoriOptions) -> None:
    """Before any stage: a local teacher holds safetensors weights; a hub student's and teacher's tokenizers agree."""
    if cfg.teacher.model is not None:
        check_weights(cfg.teacher.model)  # the student's are checked by cluster.models.base_model
    if cfg.student.tiny is None:
        check_tokenizers(load_tokenizer_or_fail(cfg.student_tokenizer or cfg.student.name, "student_tokenizer"),
                         cfg.teacher.tokenizer or cfg.teacher.model)


def memory_parts(cfg: MontessoriOptions):
    """What each GPU part of the preset holds (`cluster.memory`), or None when nothing runs on a GPU
    or a model's shape is unknown on this machine."""
    from cluster import memory as M

    w, p, g = cfg.warmup, cfg.probes, cfg.teacher.generation
    if not (w.num_gpus or p.gpus_per_actor or g.gpus_per_actor or cfg.dpo_scale.use_gpu or cfg.scale.use_gpu):
        return None
    student = M.shape_of(cfg.student.name, cfg.student.tiny)
    teacher = M.shape_of(cfg.teacher.model) if cfg.teacher.model else student
    if student is None or teacher is None:
        return cfg.student.name if student is None else cfg.teacher.model
    b = 2 if (w.dtype or "bfloat16") in ("bfloat16", "float16") else 4  # the warm state's dtype
    one = student.activation_bytes(w.max_length, w.max_length, checkpointing=False)
    new_tokens = max(cfg.teacher.instruction_sampling.max_new_tokens, cfg.teacher.response_sampling.max_new_tokens)
    return [
        # the warm-up's own loop: weights, gradients, AdamW moments in the warm dtype; no checkpointing
        M.Part.layers_over("warm-up (one task)", w.num_gpus, student.params, 4 * b,
                           student.activation_bytes(w.batch_size * w.max_length, w.max_length, checkpointing=False)),
        # a probe actor: the warm state (weights, moments); per candidate scored at once, its
        # gradient and the float32 copy theta' is written into, its backward and the logits of a
        # reference batch
        M.Part.layers_over("probe actor", p.gpus_per_actor, student.params, 3 * b + p.at_once * (b + 4),
                           p.at_once * (one + p.reference_batch_size * w.max_length * student.vocab * 4)),
        # a generation actor: the bf16 teacher and the KV cache of batch x k sequences
        M.Part.layers_over("generation actor", g.gpus_per_actor, teacher.params, 2,
                           teacher.kv_cache_bytes(g.batch_size * cfg.teacher.k * (cfg.dpo.max_length + new_tokens))),
        # teacher DPO: policy + its frozen reference; chosen and rejected in one forward
        M.Part(f"teacher DPO worker (x{cfg.dpo_scale.num_workers})", cfg.dpo_scale.num_workers, teacher.params,
               M.learner_bytes_per_param(cfg.dpo_scale.zero_stage, cfg.dpo_scale.num_workers, cfg.dpo_scale.offload, 1),
               teacher.activation_bytes(2 * cfg.dpo.batch_size * cfg.dpo.max_length, cfg.dpo.max_length,
                                        cfg.dpo.gradient_checkpointing)),
        M.Part(f"student SFT worker (x{cfg.scale.num_workers})", cfg.scale.num_workers, student.params,
               M.learner_bytes_per_param(cfg.scale.zero_stage, cfg.scale.num_workers, cfg.scale.offload),
               student.activation_bytes(cfg.sft.batch_size * cfg.sft.max_length, cfg.sft.max_length,
                                        cfg.sft.gradient_checkpointing)),
    ]


def plan(cfg: MontessoriOptions) -> str:
    """--dry-run: stages, learner runs, resources, data sizes; starts nothing."""
    check(cfg)
    d, t, p = cfg.data, cfg.teacher, cfg.probes
    if d.source == "world":
        held = d.world.num_heldout
        data = (f"synthetic world: {d.world.num_people} people ({d.world.num_people - held} training, {d.reference_people} "
                f"reference, {held - d.reference_people} evaluated); {d.seed_size} seed instructions")
    else:
        data = f"{d.dataset}: {d.eval_size or 0} evaluation / {d.reference_size} reference / {d.seed_size} seed rows"
    names = stage_names(cfg)
    students = len(cfg.seeds) * (1 + cfg.iterations + (1 if cfg.ablation else 0))
    dpos = len(cfg.seeds) * (cfg.iterations + (1 if cfg.ablation else 0))
    run_dir = storage.join(storage.resolve(cfg.storage), "montessori", cfg.run_id or "<hash of the preset>")
    harness = []
    if cfg.eval.harness:
        from evals.harness import plan_lines

        harness = ["  " + line for line in plan_lines(cfg.eval.harness)]
    return "\n".join([
        f"montessori plan (run dir {run_dir})",
        f"  student: {cfg.student.name or 'tiny Llama'}; teacher: {t.model or 'tiny teacher SFT from the student base'}",
        f"  data: {data}; warm-up {d.warmup_size}; reference {d.reference_size}",
        "  stages: " + " -> ".join(names[: names.index("it1-candidates")])
        + f" -> {cfg.iterations} x ({' -> '.join(ITERATION_STAGES)}) -> report"
        + (f" (stop after {cfg.stop_after})" if cfg.stop_after else ""),
        f"  warm-up: {d.warmup_size} examples x {cfg.warmup.epochs} epochs, lr ramp to {cfg.warmup.learning_rate}",
        f"  per seed and iteration: {p.prompts} prompts x k={t.k} = {p.prompts * t.k} candidates "
        f"(instructions T={t.instruction_sampling.temperature}/top-p {t.instruction_sampling.top_p}, responses "
        f"T={t.response_sampling.temperature}/top-p {t.response_sampling.top_p}), probed on {p.num_actors} actor(s) "
        f"against {d.reference_size} reference items",
        f"  teacher DPO: {dpos} learner runs (beta {cfg.dpo.beta}, lr {cfg.dpo.learning_rate}; "
        f"{1 + cfg.ablation} pair kind(s) at iteration 1), {cfg.dpo_scale.num_workers} worker(s), "
        f"ZeRO-{cfg.dpo_scale.zero_stage}",
        f"  students: {students} SFT runs of {cfg.final_size} examples (lr {cfg.sft.learning_rate}), "
        f"{cfg.scale.num_workers} worker(s) each, ZeRO-{cfg.scale.zero_stage}",
        f"  generation: {'in-process' if t.generation.num_actors == 0 else f'{t.generation.num_actors} Ray actors'}",
        "  evaluation: held-out loss" + (" + exact accuracy" if d.source == "world" else "")
        + (" + lm-eval harness" if cfg.eval.harness else "") + f"; seeds {cfg.seeds}",
        *harness,
        f"  tracking: W&B {cfg.tracking.mode}, project {cfg.tracking.project}",
        *memory_lines(cfg),
    ])


def memory_lines(cfg: MontessoriOptions) -> list[str]:
    from cluster import memory as M

    parts = memory_parts(cfg)
    if parts is None:
        return []
    if isinstance(parts, str):
        return [f"  memory per GPU: unknown (no config.json of {parts} on this machine, and not in cluster.memory.KNOWN)"]
    return ["  " + line for line in M.table(parts)]
