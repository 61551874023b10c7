"""Standard benchmarks (MMLU, ARC, GSM8K, TruthfulQA, HellaSwag) through lm-evaluation-harness.

Only the llama3-8b presets use this: the tasks download from the Hugging Face hub, so tiny
presets and tests judge models with the exact synthetic-world evals instead. lm-eval comes with
the `cluster` extra and is imported only when an evaluation runs.
"""

from __future__ import annotations

from numbers import Real

from pydantic import Field, field_validator

from cluster.config import Options, UserError


class HarnessOptions(Options):
    """Which lm-eval benchmarks to run on a saved model, and how."""

    tasks: list[str] = Field(
        ["mmlu", "arc_challenge", "gsm8k", "truthfulqa_mc2", "hellaswag"],
        min_length=1,
        description="lm-eval task or group names",
    )
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per prompt; null: each task's default")
    batch_size: int | str = Field("auto", description="per-device batch size, or 'auto' / 'auto:N' to probe memory")
    limit: int | None = Field(None, ge=1, description="examples per task (smoke runs only); null: all")

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
        f"lm-eval (hf, bfloat16) on {len(opts.tasks)} tasks: {', '.join(opts.tasks)}",
        f"  few-shot: {shots}; batch size: {opts.batch_size}; {limit}",
    ]


def flatten_results(results: dict | None) -> dict[str, float]:
    """lm-eval's nested `results` to flat `task/metric` floats for summary.json and W&B.

    Keys look like `acc,none` or `exact_match,strict-match` (metric, filter): the `none` filter
    is dropped, other filters stay in the name. Standard errors and text (`alias`) are skipped.
    """
    flat: dict[str, float] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, Real):
                continue
            flat[f"{task}/{metric if filt in ('', 'none') else key}"] = float(value)
    return flat


def evaluate_with_harness(model_dir: str, opts: HarnessOptions, device: str = "cuda") -> dict[str, float]:
    """Score a saved HF model directory on the harness tasks; `{task/metric: value}`."""
    try:
        import lm_eval
    except ImportError as exc:
        missing = exc.name or "lm_eval"
        raise UserError(f"harness evals need lm-eval (no module {missing!r}): pip install -e .[cluster]") from None
    if "," in model_dir:  # model_args is a comma-separated key=value string
        raise UserError(f"{model_dir}: model directory for lm-eval must not contain ','")
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=bfloat16",
        tasks=list(opts.tasks),
        num_fewshot=opts.num_fewshot,
        batch_size=opts.batch_size,
        device=device,
        limit=opts.limit,
        log_samples=False,  # per-sample outputs would stay in memory and are not reported
    )
    return flatten_results(results)  # None on non-zero ranks of a multi-process run
