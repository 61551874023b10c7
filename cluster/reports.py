"""What a finished job leaves for people: `summary.json`, `report.md`, plots, and a W&B summary run.

Every job ends with `publish`: the machine-readable summary, the markdown report (its table made by
`markdown_table`), the plots (drawn by the job into PNG files), all written to the run's storage,
and the same tables, plots and headline numbers in one W&B run of the job's group.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Callable

from cluster.stages import Run
from cluster.tracking import TrackingOptions, finish_run, log_image, log_table, start_run


def mean(xs) -> float:
    """Mean of the values that are there: None and NaN (a metric a run did not produce) are left
    out; NaN when none is left."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict], columns: list[str], digits: int = 3) -> list[str]:
    """Rows as a markdown table; only the columns some row has a value for."""
    cols = [c for c in columns if any(r.get(c) is not None for r in rows)]
    return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(fmt(r.get(c), digits) for c in cols) + " |" for r in rows])


def publish(run: Run, tracking: TrackingOptions, *, summary: dict, report: list[str],
            plots: dict[str, Callable[[str], None]], tables: dict[str, list[dict]], headline: dict) -> None:
    """Write summary.json, report.md and the plots (`name.png` -> draw(path)) to the run's storage,
    and log the tables, plots and headline numbers to one W&B run (`<run_id>-summary`)."""
    with tempfile.TemporaryDirectory() as tmp:
        pngs = {}
        for name, draw in plots.items():
            pngs[name] = Path(tmp, name)
            draw(str(pngs[name]))
            run.write_file(name, pngs[name].read_bytes())
        run.write_file("summary.json", json.dumps(summary, indent=2).encode())
        run.write_file("report.md", "\n".join(report).encode() + b"\n")
        wb = start_run(tracking, run_id=f"{run.run_id}-summary", name=f"{run.job}/{run.run_id}/summary",
                       group=run.group, job_type="summary", config=summary.get("config", {}),
                       dir=run.wandb_dir(tracking.dir))
        if wb is not None:
            for key, rows in tables.items():
                log_table(wb, key, rows)
            for name, path in pngs.items():
                log_image(wb, Path(name).stem, path)
            wb.summary.update(headline)
            finish_run(wb)
    print(f"[{run.job}] report: {run.uri}/report.md", flush=True)
