"""LinFAC against kronfluence's EK-FAC on the lancet job's tiny impure model: recall of the planted
examples and wall time, fit and score separately, side by side in one process.

Both arms score the same training rows of a finished `jobs.lancet` run (its `impure` model, its
`tables/train` and `iqs/iqs`) with the same measurement (the unsafe answer's loss minus the
refusal's), the same damping rule and batch size, one label draw per example, one thread each, in
turn, `--repeats` times (the minimum is reported: the least disturbed run). The issue's goal:
LinFAC at least EK-FAC's recall (AUPRC) in at most half its time.

    python -m jobs.lancet --config configs/lancet/tiny.yaml run_id=w0 stop_after=recall
    python -m benchmarks.bench_lancet_recall --runs runs/lancet/w0 runs/lancet/w1
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from benchmarks.results import RESULTS, write_results
from cluster.stages import read_rows
from influence import linfac as L
from influence.ekfac import ekfac_influence
from influence.lookahead import batched
from jobs import lancet_recall as R


def one_run(run: Path, repeats: int) -> dict:
    from cluster.models import load_model, load_tokenizer

    model_dir = run / "impure" / "impure" / "sft"
    model, tok = load_model(model_dir, attn_implementation="eager").eval(), load_tokenizer(model_dir)
    train, iqs = read_rows(str(run / "tables" / "train.parquet")), read_rows(str(run / "iqs" / "iqs.parquet"))
    planted = [bool(r["planted"]) for r in train]
    ex = lambda rows, col="completion": R.examples(tok, rows, 128, col)  # noqa: E731
    pad = tok.pad_token_id or 0
    tb, qb, cb = batched(ex(train), 16, pad), batched(ex(iqs), 16, pad), batched(ex(iqs, "contrast"), 16, pad)
    best: dict[str, float] = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        factors = L.fit_factors(model, tb, samples=1)
        t1 = time.perf_counter()
        lin = L.influence(model, tb, qb, factors, contrast=cb)
        t2 = time.perf_counter()
        ek, info = ekfac_influence(copy.deepcopy(model), ex(train), ex(iqs), contrast=ex(iqs, "contrast"), batch_size=16)
        for k, v in {"linfac_fit_s": t1 - t0, "linfac_score_s": t2 - t1, "ekfac_fit_s": info["fit_s"],
                     "ekfac_score_s": info["score_s"]}.items():
            best[k] = min(best.get(k, float("inf")), v)
    return {"run": run.name, "rows": len(train), "planted": sum(planted), "iqs": len(iqs),
            "linfac_auprc": R.average_precision(lin.tolist(), planted), "ekfac_auprc": R.average_precision(ek.tolist(), planted),
            "random": sum(planted) / len(planted), "linfac_numbers": L.factor_sizes(model)["linfac"],
            "ekfac_numbers": info["factor_numbers"], **best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run directories of finished lancet runs (recall done)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # both arms on one core, in turn: the ratio, not the machine
    rows = [one_run(Path(r), args.repeats) for r in args.runs]
    head = ["run", "rows / planted / IQs", "LinFAC AUPRC", "EK-FAC AUPRC", "random", "LinFAC fit / score s",
            "EK-FAC fit / score s", "LinFAC time / EK-FAC time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lin_t, ek_t = r["linfac_fit_s"] + r["linfac_score_s"], r["ekfac_fit_s"] + r["ekfac_score_s"]
        lines.append(f"| {r['run']} | {r['rows']} / {r['planted']} / {r['iqs']} | {r['linfac_auprc']:.3f} | {r['ekfac_auprc']:.3f} | "
                     f"{r['random']:.3f} | {r['linfac_fit_s']:.2f} / {r['linfac_score_s']:.2f} | "
                     f"{r['ekfac_fit_s']:.2f} / {r['ekfac_score_s']:.2f} | {lin_t / ek_t:.2f} |")
    body = "\n".join([
        f"`python -m benchmarks.bench_lancet_recall --runs {' '.join(args.runs)} --repeats {args.repeats}` "
        "(the lancet tiny preset's impure model: Llama 4 x 128; contrastive measurement; damping "
        f"{L.DAMPING:g} x the mean corrected eigenvalue; batch 16; one label draw; 1 thread; minimum of "
        f"{args.repeats} runs per arm, the arms in turn).", "", *lines, "",
        f"Curvature numbers: LinFAC {rows[0]['linfac_numbers']:,} (2 d x d per sublayer), EK-FAC "
        f"{rows[0]['ekfac_numbers']:,} (eigenvectors of every linear module's two factors)."])
    write_results(RESULTS, body, "## LinFAC against EK-FAC: recall of the planted examples (lancet tiny)")
    print(body)


if __name__ == "__main__":
    main()
