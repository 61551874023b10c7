"""LinFAC against kronfluence's EK-FAC and the exact influence, on influence.exact's toy model.

Both approximations score the same training examples against the same queries with the same
damping rule (x the mean corrected eigenvalue per block); the exact influence is computed in each
one's parameter space (LinFAC: the virtual sublayer corrections; EK-FAC: the linear weights inside
the sublayers). Reported per data seed: Spearman of each against each exact, and against each
other; fit and score wall time (both fitted with one label draw per example, both in this process,
side by side); curvature numbers stored.

    python -m benchmarks.bench_linfac [--seeds 3 4] [--examples 512]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from benchmarks.results import RESULTS, write_results
from influence import exact, linfac as L
from influence.ekfac import ekfac_influence
from influence.lookahead import collate, spearman


def one_seed(seed: int, n: int) -> dict:
    train, queries = exact.toy_examples(n, seed=seed), exact.toy_examples(4, seed=seed + 100)
    model = exact.trained(train)
    tb, qb = [collate(train[i : i + 32]) for i in range(0, n, 32)], [collate(queries)]
    t0 = time.perf_counter()
    factors = L.fit_factors(model, tb, samples=1)
    t1 = time.perf_counter()
    lin = L.influence(model, tb, qb, factors)
    t2 = time.perf_counter()
    ek, info = ekfac_influence(copy.deepcopy(model), train, queries)
    ex_lin, _ = exact.exact_influence(copy.deepcopy(model), tb, qb, "linfac", damping=L.DAMPING)
    ex_w, _ = exact.exact_influence(copy.deepcopy(model), tb, qb, "linear", damping=L.DAMPING)
    sizes = L.factor_sizes(model)
    return {"seed": seed, "linfac_vs_exact_own": spearman(lin, ex_lin), "linfac_vs_exact_weights": spearman(lin, ex_w),
            "ekfac_vs_exact_weights": spearman(ek, ex_w), "ekfac_vs_linfac": spearman(ek, lin),
            "exact_own_vs_exact_weights": spearman(ex_lin, ex_w),
            "linfac_fit_s": t1 - t0, "linfac_score_s": t2 - t1, "ekfac_fit_s": info["fit_s"], "ekfac_score_s": info["score_s"],
            "linfac_numbers": sizes["linfac"], "ekfac_numbers": sizes["ekfac"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--examples", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)  # both arms on one core each, in turn: the ratio, not the machine
    rows = [one_seed(s, args.examples) for s in args.seeds]
    head = ["seed", "LinFAC vs exact (its space)", "LinFAC vs exact (weights)", "EK-FAC vs exact (weights)",
            "EK-FAC vs LinFAC", "exact: its space vs weights", "LinFAC fit / score s", "EK-FAC fit / score s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['linfac_vs_exact_own']:.3f} | {r['linfac_vs_exact_weights']:.3f} | "
                     f"{r['ekfac_vs_exact_weights']:.3f} | {r['ekfac_vs_linfac']:.3f} | {r['exact_own_vs_exact_weights']:.3f} | "
                     f"{r['linfac_fit_s']:.2f} / {r['linfac_score_s']:.2f} | {r['ekfac_fit_s']:.2f} / {r['ekfac_score_s']:.2f} |")
    body = "\n".join([
        f"`python -m benchmarks.bench_linfac --seeds {' '.join(map(str, args.seeds))} --examples {args.examples}` "
        f"(toy Llama: 2 layers, width 8, vocabulary 40; {args.examples} training examples, 4 queries; damping "
        f"{L.DAMPING:g} x the mean corrected eigenvalue per block; Spearman over training examples; 1 thread).", "",
        *lines, "",
        f"Curvature numbers stored: LinFAC {rows[0]['linfac_numbers']} (2 d x d per sublayer), EK-FAC {rows[0]['ekfac_numbers']} "
        "(in^2 + out^2 per linear module). On this toy LinFAC's ranking follows the exact influence *in its own space*; "
        "that space (a d x d linear correction per sublayer) ranks examples differently from the influence over the "
        "model's weights, which EK-FAC approximates. Whether that matters for recall is measured on the planted world "
        "(the lancet job), not here."])
    write_results(RESULTS, body, "## LinFAC against EK-FAC and the exact influence (toy model)")
    print(body)


if __name__ == "__main__":
    main()
