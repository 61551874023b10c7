"""benchmarks/RESULTS.md: each benchmark owns one `## ` section and rewrites only that."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_results(path: Path, body: str, section: str) -> None:
    """Replace (or append) a section of RESULTS.md; leave every other section alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = f"{section}\n\n{body.strip()}\n\n"
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text.rstrip("\n") + "\n")
