"""How far this project's probe is from the official Montessori-Instruct code's, on a real warm
student: the agreement table.

Two differences (influence/lookahead.py's docstring): the official probe steps on g/8 (each of its
8 processes backpropagates loss / num_processes), and its reference loss is a mean of per-batch
means over batches of 8 (here: token-weighted). This scores the same candidates four ways and
compares each with the official setup (g/8, per-batch mean): positive share, sign agreement,
Spearman, and the preference pairs each would form (Jaccard overlap with the official pairs).

Input: a Montessori run directory that reached `it1-candidates` (warm students, candidates,
reference set), e.g. the tiny preset's:

    python -m jobs.montessori --config configs/montessori/tiny.yaml storage=runs run_id=fidelity \\
        stop_after=it1-candidates "seeds=[0]"
    python benchmarks/bench_fidelity.py --run runs/montessori/fidelity --n 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.results import write_results  # noqa: E402
from cluster.models import load_tokenizer  # noqa: E402
from cluster.stages import read_rows  # noqa: E402
from influence.lookahead import batched, exact_influence, load_warm, reference_loss, spearman  # noqa: E402
from influence.warmup import tokenize_sft  # noqa: E402
from synth.teacher import preference_pairs  # noqa: E402

VARIANTS = [  # (name, loss divisor, per-batch-mean reference loss)
    ("this project's tiny preset (g, token-weighted)", 1, False),
    ("g/8, token-weighted (loss_divisor: 8, the default)", 8, False),
    ("g, per-batch mean", 1, True),
    ("official (g/8, per-batch mean)", 8, True),
]


def scores(warm: str, ref_batches, items, divisor: float, per_batch: bool) -> list[float]:
    state = load_warm(warm, loss_divisor=divisor)
    L0 = reference_loss(state.model.eval(), ref_batches, per_batch=per_batch)
    return [exact_influence(state, ex, ref_batches, L0, per_batch) for ex in items]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="Montessori run directory (reached it1-candidates)")
    p.add_argument("--seed", type=int, default=0, help="which seed's warm student and candidates")
    p.add_argument("--n", type=int, default=128, help="candidates scored (the first n kept ones)")
    p.add_argument("--template", default="Question: {instruction}\n", help="the student's prompt template")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)

    warm = str(args.run / "warmup" / f"s{args.seed}")
    tok = load_tokenizer(warm)
    ref = [tokenize_sft(tok, r["prompt"], r["completion"], args.max_length)
           for r in read_rows(str(args.run / "data" / "reference.parquet"))]
    ref_batches = batched(ref, 8, tok.pad_token_id)  # the paper's reference batch
    cands = [c for c in read_rows(str(args.run / "it1-candidates" / f"s{args.seed}.parquet")) if c["kept"]][: args.n]
    items = [tokenize_sft(tok, args.template.format(instruction=c["instruction"]), c["response"], args.max_length)
             for c in cands]
    got, secs = {}, {}
    for name, divisor, per_batch in VARIANTS:
        t0 = time.time()
        got[name] = scores(warm, ref_batches, items, divisor, per_batch)
        secs[name] = time.time() - t0
        print(f"{name}: {sum(v > 0 for v in got[name])}/{len(items)} positive ({secs[name]:.0f} s)", flush=True)

    official = got[VARIANTS[-1][0]]

    def pairs(values):
        return {(p["chosen_id"], p["rejected_id"]) for p in preference_pairs(cands, {c["id"]: v for c, v in zip(cands, values)})}

    ref_pairs = pairs(official)
    lines = [f"Command: `python benchmarks/bench_fidelity.py --run {args.run} --n {args.n}` — {time.strftime('%Y-%m-%d')}, "
             f"seed {args.seed}'s warm student and its first {len(items)} kept candidates (tiny Montessori world, "
             f"{len(ref)} reference items in batches of 8), one thread.", "",
             "| probe | positive share | sign agreement with official | Spearman vs official | pairs | pair overlap (Jaccard) with official |",
             "|---|---|---|---|---|---|"]
    for name, _, _ in VARIANTS:
        v = got[name]
        mine = pairs(v)
        agree = sum((a > 0) == (b > 0) for a, b in zip(v, official)) / len(v)
        jac = len(mine & ref_pairs) / max(len(mine | ref_pairs), 1)
        lines.append(f"| {name} | {sum(x > 0 for x in v) / len(v):.3f} | {agree:.3f} | {spearman(v, official):.3f} | "
                     f"{len(mine)} | {jac:.3f} |")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_results(args.results, body, section="## Montessori probe fidelity (agreement with the official code's setup)")


if __name__ == "__main__":
    main()
