"""What one lm-eval call on a local task costs, with lm-eval's own task index and without it.

`lm_eval.simple_evaluate` builds a `TaskManager` unless handed one, and the default one parses
every task file lm-eval ships (about 13,000 YAML files) before it looks at the tasks asked for.
`evals.harness.evaluate_with_harness` hands it one without that index when every task is a local
file (the smoke presets' `evals/tasks/world_mc.yaml`); a preset naming a hub task still gets it.
Both arms score the same model on the same task and limit in this process, turn about, after one
untimed call each (imports, first load); the metrics must agree.

    python -m benchmarks.bench_harness [--rounds 3]

Writes its table to benchmarks/RESULTS.md (section "lm-eval on a local task").
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}.items():
    os.environ.setdefault(k, v)

SECTION = "## lm-eval on a local task"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_harness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per arm")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from benchmarks.results import RESULTS, write_results
    from cluster.config import load_config
    from evals.harness import evaluate_with_harness, flatten_results, task_spec
    from jobs.falsity_sweep import FalsityOptions
    from synth.smoke import write_assets

    torch.set_num_threads(2)
    assets = write_assets(Path(tempfile.mkdtemp(prefix="bench-harness-")))
    opts = load_config(FalsityOptions, "configs/falsity_sweep/smoke.yaml", [f"model.name={assets['model']}",
                                                                           f"data.file={assets['faco']}"]).eval.harness

    def with_lm_eval_index() -> dict[str, float]:  # what simple_evaluate does when handed no TaskManager
        return flatten_results(lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={assets['model']},dtype=float32", tasks=[task_spec(t) for t in opts.tasks],
            num_fewshot=opts.num_fewshot, batch_size=opts.batch_size, device="cpu", limit=opts.limit,
            log_samples=False, task_manager=TaskManager()))

    def ours() -> dict[str, float]:
        return evaluate_with_harness(assets["model"], opts, device="cpu")

    arms = {"lm-eval's default task index": with_lm_eval_index, "evals.harness (local tasks only)": ours}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    metrics = {name: fn() for name, fn in arms.items()}  # untimed: imports and the first load
    for _ in range(args.rounds):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            metrics[name] = fn()
            seconds[name].append(time.perf_counter() - t0)
    first, second = arms
    assert metrics[first] == metrics[second], metrics
    base = statistics.median(seconds[first])
    rows = "\n".join(f"| {name} | {statistics.median(s):.2f} | {min(s):.2f} | {base / statistics.median(s):.1f}x | "
                     f"{metrics[name]} |" for name, s in seconds.items())
    body = (f"Command: `python -m benchmarks.bench_harness --rounds {args.rounds}` — {time.strftime('%Y-%m-%d')}, "
            f"2-core CPU, torch {torch.__version__}, lm-eval {lm_eval.__version__}. The smoke presets' local "
            f"task (`{opts.tasks[0]}`, limit {opts.limit}) on the smoke model, in one process, the arms taking "
            f"turns.\n\n| arm | median s per call | best s | speed-up | metrics |\n|---|---|---|---|---|\n{rows}\n\n"
            f"lm-eval's default `TaskManager` parses every task file it ships before it reads the one asked "
            f"for; a local task given as a dict needs none of them. A preset naming a hub task (the 8B presets) "
            f"keeps the index.")
    print(body)
    if not args.no_write:
        write_results(RESULTS, body, SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
