"""GRADMM's cost: the matching loss's gradient in closed form against autograd's double backward,
and time per synthetic example with the gradient cosine reached per CPU-second, side by side.

1. d(1 - cos)/dX for the same batch X, two ways: the closed form of `synth.gradmatch` (the
   output-layer gradient's cosine from hidden states, one backward) and the authors' way (autograd
   computes the batch's output-layer gradient with create_graph=True, then the cosine is
   differentiated through it). Both give the same gradient (checked); they alternate for
   `--rounds` rounds, the median time of each is reported.
2. One class and round of generation (the tiny preset's options and its first ρ: 8 sequences,
   15 outer x 30 inner steps, top-k 5): full ADMM and project-once from the same initialisation, on the world task's
   real texts; wall and CPU seconds per synthetic example, the cosine of the best projection, and
   cosine per CPU-second.

    python -m benchmarks.bench_gradmatch [--hidden 128] [--layers 4] [--device cpu] [--rounds 30]

The student is random-init (a tiny Llama over a BPE trained on the world's text; `--hidden 2048
--layers 16 --device cuda` is a 1B-class model for a GPU machine). Writes its section of
benchmarks/RESULTS.md ("GRADMM generation cost").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

for k, v in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}.items():
    os.environ.setdefault(k, v)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.results import RESULTS, write_results  # noqa: E402
from cluster.config import load_config  # noqa: E402
from cluster.models import TinyLlama, build_tiny_model, train_tokenizer  # noqa: E402
from jobs.gradmatch import GradmatchOptions  # noqa: E402
from synth import gradmatch as G  # noqa: E402
from synth import world as W  # noqa: E402
from synth.classify import TaskOptions, split_rows  # noqa: E402

SECTION = "## GRADMM generation cost"


def autograd_cosine(m: G.Matcher, x: torch.Tensor, label: int, target: torch.Tensor) -> torch.Tensor:
    """The authors' way: the output layer's gradient by autograd (create_graph), then its cosine."""
    head = m.head.clone().requires_grad_(True)
    h = m.hidden(x)
    loss = F.cross_entropy(h @ head.T, torch.full((h.shape[0],), label, device=h.device))
    (g,) = torch.autograd.grad(loss, head, create_graph=True)
    return F.cosine_similarity(g.flatten(), target.flatten(), 0)


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_gradmatch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    world = W.build_world(W.WorldOptions(seed=0, num_people=120))
    task = TaskOptions()
    rows = split_rows(task, W.WorldOptions(seed=0))
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(W.all_text(world) + [r["text"] for r in rows], 1024, tmp)
        heads = max(1, args.hidden // 64) if args.hidden >= 256 else 4
        model = build_tiny_model(TinyLlama(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
                                           intermediate_size=4 * args.hidden, vocab_size=1024), tok, 0, tmp)
    model = model.to(args.device)
    m = G.matcher(model, tok, task.suffix)
    verb = G.verbalizer_ids(tok, task.verbalizers)
    real = [r for r in rows if r["split"] == "real"]
    targets = G.class_gradients(m, G.text_ids(tok, [r["text"] for r in real]), [r["label"] for r in real], verb)
    preset = load_config(GradmatchOptions, "configs/gradmatch/tiny.yaml", []).generation
    opts = preset.model_copy(update={"init_size": float(m.embed.norm(dim=-1).mean()),
                                     "length": round(statistics.mean(len(i) for i in G.text_ids(tok, [r["text"] for r in real])))})
    rho = opts.rhos[0]
    params = sum(p.numel() for p in model.parameters())

    # 1. the matching loss's gradient, two ways
    x0 = torch.randn(opts.batch, opts.length, args.hidden, generator=torch.Generator().manual_seed(0)).to(args.device)
    grads, times = {}, {"closed form": [], "autograd double backward": []}

    def grad_of(fn):
        x = x0.clone().requires_grad_(True)
        (1 - fn(m, x, verb[0], targets[0])).backward()
        return x.grad

    ways = {"closed form": lambda mm, x, y, t: mm.cosine(x, y, t), "autograd double backward": autograd_cosine}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            times[name].append(timed(lambda fn=fn, name=name: grads.__setitem__(name, grad_of(fn)), args.device))
    a, b = grads["closed form"], grads["autograd double backward"]
    rel = float((a - b).norm() / b.norm())
    assert rel < 1e-3, f"the two gradients differ: relative difference {rel:.2e}"
    med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items()}

    # 2. one class and round: ADMM and project-once from the same initialisation
    gen_rows = []
    for method in ("gradmm", "project once"):
        gen = torch.Generator().manual_seed(1)
        trace = []
        c0, t0 = time.process_time(), time.perf_counter()
        step = lambda s, n, xc, zc, trace=trace, c0=c0: trace.append((time.process_time() - c0, zc))  # noqa: E731
        out = (G.admm(m, verb[0], targets[0], opts, rho, gen, step) if method == "gradmm"
               else G.project_once(m, verb[0], targets[0], opts, gen))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        half = next((zc for c, zc in trace if c >= cpu / 2), float("nan")) if trace else float("nan")
        gen_rows.append({"arm": method, "wall": wall, "cpu": cpu, "per_example": wall / opts.batch, "cos": out.cosine,
                         "half": half, "per_cpu_s": out.cosine / cpu})

    cmd = "python -m benchmarks.bench_gradmatch " + " ".join(argv if argv is not None else sys.argv[1:])
    body = "\n".join([
        f"`{cmd.strip()}` on {args.device} ({args.threads} threads): a random-init Llama {args.layers}x{args.hidden} "
        f"({params / 1e6:.1f}M parameters, vocabulary 1024), the tiny world task's 16 real texts per class, "
        f"batch {opts.batch} x {opts.length} tokens.", "",
        "| d(1 - cos)/dX | median s per evaluation | against closed form |", "|---|---|---|",
        *[f"| {k} | {v:.4f} | {v / med['closed form']:.2f}x |" for k, v in med.items()], "",
        f"Both give the same gradient (relative difference {rel:.1e}).", "",
        f"One class and round ({opts.outer_steps} outer x {opts.inner_steps} inner steps, top-k {opts.top_k}, ρ {rho:g}; "
        "project-once: the same Adam steps, one projection):", "",
        "| arm | wall s | CPU s | wall s per synthetic example | cosine of the output | at half the CPU time | cosine per CPU-second |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['arm']} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['per_example']:.2f} | {r['cos']:.3f} | "
          f"{r['half']:.3f} | {r['per_cpu_s']:.4f} |" for r in gen_rows],
    ])
    print(body)
    write_results(RESULTS, body, SECTION + ("" if args.device == "cpu" else f" ({args.device})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
