"""Standard benchmarks (MMLU, ARC, GSM8K, TruthfulQA, HellaSwag) through lm-evaluation-harness.

The llama3-8b presets run hub tasks; the smoke presets run a local task file (an lm-eval task
YAML beside its data, `evals/tasks/`), so the same code path runs with no network. Each model is
scored in its own Ray task (one GPU on a cluster) on its saved checkpoint, never inside a Train
worker group: lm-eval's `HFLM` builds an `Accelerator`, which inside an 8-rank process group
would see 8 processes and wait on collectives only rank 0 joins. lm-eval comes with the `cluster`
and `dev` extras and is imported only when an evaluation runs.
"""

from __future__ import annotations

from numbers import Real
from pathlib import Path

import yaml
from pydantic import Field, field_validator

from cluster.config import Options, UserError


class HarnessOptions(Options):
    """Which lm-eval benchmarks to run on a saved model, and how."""

    tasks: list[str] = Field(
        ["mmlu", "arc_challenge", "gsm8k", "truthfulqa_mc2", "hellaswag"],
        min_length=1,
        description="lm-eval task or group names, or local task files (*.yaml, relative to the repository root)",
    )
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per prompt; null: each task's default")
    batch_size: int | str = Field("auto", description="per-device batch size, or 'auto' / 'auto:N' to probe memory")
    limit: int | None = Field(None, ge=1, description="examples per task (smoke runs only); null: all")

    @field_validator("tasks")
    @classmethod
    def _local_tasks_exist(cls, value: list[str]) -> list[str]:
        for task in value:
            if task.endswith((".yaml", ".yml")) and not _task_file(task).is_file():
                raise ValueError(f"local task file {task} not found")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: int | str) -> int | str:
        if (isinstance(value, int) and value < 1) or (isinstance(value, str) and not value.startswith("auto")):
            raise ValueError(f"expected a positive integer, 'auto' or 'auto:N' (got {value!r})")
        return value


def plan_lines(opts: HarnessOptions) -> list[str]:
    """What `evaluate_with_harness` would run, for --dry-run."""
    shots = "task defaults" if opts.num_fewshot is None else str(opts.num_fewshot)
    limit = "all examples" if opts.limit is None else f"first {opts.limit} examples per task"
    return [
        f"lm-eval (hf) on {len(opts.tasks)} tasks: {', '.join(opts.tasks)}, one Ray task per saved model",
        f"  few-shot: {shots}; batch size: {opts.batch_size}; {limit}",
    ]


def flatten_results(results: dict | None) -> dict[str, float]:
    """lm-eval's nested `results` to flat `task/metric` floats for summary.json and W&B.

    Keys look like `acc,none` or `exact_match,strict-match` (metric, filter): the `none` filter
    is dropped, other filters stay in the name. Standard errors, sample counts and text (`alias`)
    are skipped.
    """
    flat: dict[str, float] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or metric == "sample_len" or isinstance(value, bool) or not isinstance(value, Real):
                continue
            flat[f"{task}/{metric if filt in ('', 'none') else key}"] = float(value)
    return flat


def _task_file(task: str) -> Path:
    from cluster.runtime import REPO_ROOT

    return Path(task) if Path(task).is_absolute() else REPO_ROOT / task


def task_spec(task: str) -> str | dict:
    """A task name as is; a local task file as lm-eval's task dict, its data files made absolute
    (lm-eval would resolve them against the working directory)."""
    if not task.endswith((".yaml", ".yml")):
        return task
    path = _task_file(task)
    spec = yaml.safe_load(path.read_text())
    files = (spec.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        spec["dataset_kwargs"]["data_files"] = {k: str(path.parent / v) for k, v in files.items()}
    elif isinstance(files, str):
        spec["dataset_kwargs"]["data_files"] = str(path.parent / files)
    return spec


def evaluate_models(models: dict[str, str], opts: HarnessOptions, device: str) -> dict[str, dict[str, float]]:
    """Score each model (key -> storage URI) in its own Ray task, side by side; key -> metrics.
    On CUDA each task holds one GPU; the cluster runs as many at once as it has GPUs for."""
    import ray

    from cluster.stages import fetch

    def score(uri: str) -> dict[str, float]:
        return evaluate_with_harness(fetch(uri), opts, device)

    task = ray.remote(num_cpus=1, num_gpus=1 if device.startswith("cuda") else 0, max_retries=1)(score)
    refs = {key: task.remote(uri) for key, uri in models.items()}
    return {key: ray.get(ref) for key, ref in refs.items()}


def evaluate_with_harness(model_dir: str, opts: HarnessOptions, device: str = "cuda") -> dict[str, float]:
    """Score a saved HF model directory on the harness tasks; `{task/metric: value}`."""
    try:
        import lm_eval
    except ImportError as exc:
        missing = exc.name or "lm_eval"
        raise UserError(f"harness evals need lm-eval (no module {missing!r}): pip install -e .[cluster]") from None
    if "," in model_dir:  # model_args is a comma-separated key=value string
        raise UserError(f"{model_dir}: model directory for lm-eval must not contain ','")
    from lm_eval.tasks import TaskManager

    dtype = "bfloat16" if device.startswith("cuda") else "float32"  # bf16 matmuls on CPU are slow
    tasks = [task_spec(t) for t in opts.tasks]
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype={dtype}",
        tasks=tasks,
        # lm-eval's own index parses every one of its ~13,000 task files (about 9 s of CPU per
        # call); local task files, given as dicts, need none of it
        task_manager=TaskManager(include_defaults=not all(isinstance(t, dict) for t in tasks)),
        num_fewshot=opts.num_fewshot,
        batch_size=opts.batch_size,
        device=device,
        limit=opts.limit,
        log_samples=False,  # per-sample outputs would stay in memory and are not reported
    )
    return flatten_results(results)


def harness_stage(run, models: dict[str, str], opts: HarnessOptions | None, device: str,
                  prefix: str = "harness") -> dict[str, dict[str, float]]:
    """Stage `harness` of `run` (a `cluster.stages.Run`) when `opts` is set: each model (key ->
    URI, counted by the fingerprint of the stage that holds it) on the lm-eval benchmarks, one Ray
    task per model; key -> `<prefix>/<task>/<metric>`. No options: no stage, no scores."""
    if opts is None:
        return {}

    def build(st) -> dict[str, dict]:
        got = evaluate_models(models, opts, device)
        return {k: {f"{prefix}/{m}": v for m, v in metrics.items()} for k, metrics in got.items()}

    return run.stage("harness", models=models, harness=opts, device=device).ensure(build)
