"""Montessori probe throughput on one GPU: the probe pool against the official-style reload loop.

One Llama-3-8B-shaped student (`--layers` of its 32 blocks; by default the most that fit the GPU
with what a probe actor holds), random init, warmed up with a few AdamW steps in bf16 so its
moments are real, saved as the 8B preset's warm-up saves it (bf16 weights in safetensors, bf16
AdamW state in optimizer.pt) on local disk. Candidates and reference items are random-token
"reverse the prompt" examples (`--seq` tokens at most), the reference set in batches of 8 (paper).

- (a) reload loop, the official code's shape: per candidate, load weights and AdamW state from
  disk onto the GPU, then score it. It scores with the same out-of-place float32 step as the pool
  (`influence.lookahead.ExactScorer`), so the scores are identical and only the reload differs.
- (b) the probe pool: `cluster.probes.ProbePool`, one actor on the GPU holding the warm state
  (loaded once: start-up reported, not counted), scoring every candidate.
- (c) a small student (GPT-2-small-sized Llama), one candidate at a time against `--at-once`
  together (torch.func): whether batching candidates pays where one leaves the GPU idle.

Reported: candidates/s per arm, (b) / (a) per GPU (goal: >= 20x), the largest score difference
between arms, and where the reload loop's time goes. Appends its table to benchmarks/RESULTS.md.

    python -m benchmarks.gpu.bench_probes_gpu [--layers 16] [--seq 512] [--ref 64] [--cands 8]
    python -m benchmarks.gpu.bench_probes_gpu --cpu-smoke   # the whole script on CPU at toy size

Needs no network; about 4-6 minutes on one H100/H200 (an estimate: not yet run on a GPU; the state is
written to and read from disk).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SMOKE = "--cpu-smoke" in sys.argv
for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0", "TRANSFORMERS_VERBOSITY": "error",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(k, v)

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.results import RESULTS, write_results  # noqa: E402
from cluster import memory as M  # noqa: E402
from influence.lookahead import ExactScorer, batched, candidate_loss, collate, load_warm, save_warm  # noqa: E402

SECTION = "## Probe throughput on one GPU (Montessori, Llama-3-8B-shaped)"
SMALL = M.Shape(hidden=768, layers=12, intermediate=2048, vocab=32000, heads=12, kv_heads=12)  # ~120 M


def llama(shape: M.Shape, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=layers, intermediate_size=shape.intermediate,
                      vocab_size=shape.vocab, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                      max_position_embeddings=4096, tie_word_embeddings=shape.tied)
    cfg._attn_implementation = "eager"  # what the probe actors load (influence.lookahead.load_warm)
    return LlamaForCausalLM(cfg)


def example(g: torch.Generator, vocab: int, seq: int) -> dict:
    """Prompt of n random tokens, response = the prompt reversed; loss on the response."""
    n = int(torch.randint(max(2, seq // 4), seq // 2 - 1, (1,), generator=g))
    prompt = torch.randint(3, vocab, (n,), generator=g)
    ids = torch.cat([torch.tensor([1]), prompt, torch.tensor([2]), prompt.flip(0)])
    return {"input_ids": ids.tolist(), "labels": [-100] * (n + 2) + prompt.flip(0).tolist()}


def auto_layers(device: str, disk: Path) -> int:
    """The most Llama-3-8B blocks whose probe actor (bf16 weights, moments and gradient, float32
    scratch: 12 bytes a parameter) fits 80% of this GPU with 10 GB for activations, and whose saved
    state (bf16 weights and moments: 6 bytes a parameter) takes at most half the free disk."""
    if device == "cpu":
        return 2
    gpu, free_disk = torch.cuda.get_device_properties(0).total_memory, shutil.disk_usage(disk).free
    params = lambda n: M.Shape(**{**M.LLAMA3_8B.__dict__, "layers": n}).params  # noqa: E731
    return max((n for n in range(1, 33) if 12 * params(n) + 10e9 <= 0.8 * gpu and 6 * params(n) <= 0.5 * free_disk), default=1)


def make_scorer(warm_dir: str, ref: list[dict], device: str, at_once: int = 1) -> ExactScorer:
    """What a probe actor builds once: the warm state from disk, the reference batches (paper: 8)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return ExactScorer(load_warm(warm_dir, device=device, snapshot=False), batched(ref, 8), at_once)


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def warm_student(shape: M.Shape, layers: int, device: str, dtype, g, seq: int, out: Path) -> int:
    """Random init, 3 AdamW steps (lr 5e-6, the 8B probe's) on 4 examples each, saved; returns parameters."""
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU itself: billions of parameters, not a CPU init then a copy
        model = llama(shape, layers).to(dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-6, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        candidate_loss(model, collate([example(g, shape.vocab, seq) for _ in range(4)])).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    save_warm(out, model, opt)
    n = sum(p.numel() for p in model.parameters())
    del model, opt
    if device != "cpu":
        torch.cuda.empty_cache()
    return n


def reload_arm(warm_dir: str, ref, cands, device: str) -> tuple[list[float], float, float]:
    """(scores, seconds, of which loading) for the official-style loop."""
    scores, load_s = [], 0.0
    sync(device)
    start = time.perf_counter()
    for c in cands:
        t = time.perf_counter()
        scorer = make_scorer(warm_dir, ref, device)  # weights + AdamW state from disk, every candidate
        sync(device)
        load_s += time.perf_counter() - t
        scores.append(scorer.influence(c))
        del scorer
        if device != "cpu":
            torch.cuda.empty_cache()
    sync(device)
    return scores, time.perf_counter() - start, load_s


def pool_arm(warm_dir: str, ref, cands, device: str) -> tuple[list[float], float, float]:
    """(scores in candidate order, scoring seconds, start-up seconds) for a 1-actor pool on the GPU."""
    import ray

    from cluster.probes import ProbePool

    ray.init(address="local", num_cpus=4, num_gpus=0 if device == "cpu" else 1, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        t = time.perf_counter()
        pool = ProbePool(functools.partial(make_scorer, warm_dir, ref, device), num_actors=1, num_cpus_per_actor=1,
                         num_gpus_per_actor=0 if device == "cpu" else 1)
        pool.wait_ready()
        startup = time.perf_counter() - t
        out = tempfile.mkdtemp(prefix="pool_")
        ds = pool.run([{"id": i, **c} for i, c in enumerate(cands)], id_column="id", out=out, batch_size=4, progress=False)
        by_id = dict(zip(ds["id"], ds["score"]))
        seconds = pool.stats["seconds"]
        pool.shutdown()
    finally:
        ray.shutdown()
    return [by_id[i] for i in range(len(cands))], seconds, startup


def at_once_arm(device: str, dtype, g, args) -> tuple[float, float, float, int]:
    """(cand/s one at a time, cand/s --at-once together, max abs score difference, parameters) on the small student."""
    shape = M.Shape(64, 2, 128, 512, 4, 4) if SMOKE else SMALL
    d = Path(tempfile.mkdtemp(prefix="small_"))
    n = warm_student(shape, shape.layers, device, dtype, g, args.seq, d)
    ref = [example(g, shape.vocab, args.seq) for _ in range(args.ref)]
    cands = [example(g, shape.vocab, args.seq) for _ in range(4 * args.at_once)]
    rates, scores = [], []
    for k in (1, args.at_once):
        scorer = make_scorer(str(d), ref, device, k)
        scorer.score(cands[:k])  # warm caches / kernels
        sync(device)
        t = time.perf_counter()
        scores.append(scorer.score(cands))
        sync(device)
        rates.append(len(cands) / (time.perf_counter() - t))
        del scorer
    shutil.rmtree(d, ignore_errors=True)
    return rates[0], rates[1], max(abs(a - b) for a, b in zip(*scores)), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="the whole script on CPU at toy size")
    p.add_argument("--layers", type=int, default=0, help="Llama-3-8B blocks of the student (0: the most that fit)")
    p.add_argument("--seq", type=int, default=512, help="longest example, tokens")
    p.add_argument("--ref", type=int, default=64, help="reference items (paper: 256)")
    p.add_argument("--cands", type=int, default=8, help="candidates the pool scores")
    p.add_argument("--reload-cands", type=int, default=3, help="candidates the reload loop scores (the first of --cands)")
    p.add_argument("--at-once", type=int, default=8, help="candidates scored together on the small student")
    p.add_argument("--dir", default=None, help="local disk for the saved state (default: a temporary folder)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()
    device = "cpu" if SMOKE else "cuda"
    if SMOKE:
        args.seq, args.ref, args.cands, args.reload_cands, args.at_once = 32, 8, 4, 2, 2
    dtype = torch.float32 if SMOKE else torch.bfloat16
    shape = M.Shape(64, 2, 160, 1024, 4, 2) if SMOKE else M.LLAMA3_8B
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (smoke)"
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_probes_gpu_"))
    root.mkdir(parents=True, exist_ok=True)
    layers = args.layers or auto_layers(device, root)
    warm_dir = root / "warm"
    g = torch.Generator().manual_seed(0)
    print(f"[bench] {name}: student of {layers} Llama-3-8B-shaped blocks", flush=True)
    t = time.perf_counter()
    n_params = warm_student(shape, layers, device, dtype, g, args.seq, warm_dir)
    state_gb = sum(f.stat().st_size for f in warm_dir.iterdir()) / 1e9
    print(f"[bench] {n_params / 1e6:,.1f} M parameters warmed up and saved ({state_gb:.1f} GB) in {time.perf_counter() - t:.0f} s", flush=True)
    ref = [example(g, shape.vocab, args.seq) for _ in range(args.ref)]
    cands = [example(g, shape.vocab, args.seq) for _ in range(args.cands)]

    reload_scores, t_reload, t_load = reload_arm(str(warm_dir), ref, cands[: args.reload_cands], device)
    print(f"[bench] reload loop: {args.reload_cands / t_reload:.3f} cand/s ({t_load / t_reload:.0%} loading)", flush=True)
    pool_scores, t_pool, startup = pool_arm(str(warm_dir), ref, cands, device)
    print(f"[bench] pool: {args.cands / t_pool:.3f} cand/s (start-up {startup:.0f} s)", flush=True)
    one, together, diff_small, n_small = at_once_arm(device, dtype, g, args)
    print(f"[bench] small student: {one:.2f} cand/s one at a time, {together:.2f} with {args.at_once} at once", flush=True)
    shutil.rmtree(root, ignore_errors=True)

    diff = max(abs(a - b) for a, b in zip(reload_scores, pool_scores))
    spread = max(pool_scores) - min(pool_scores)
    speedup = (args.cands / t_pool) / (args.reload_cands / t_reload)
    body = "\n".join([
        f"Command: `python -m benchmarks.gpu.bench_probes_gpu {' '.join(sys.argv[1:])}`".rstrip() + f" — {time.strftime('%Y-%m-%d')}, "
        f"{name}, torch {torch.__version__}.",
        "",
        f"Student: {layers} Llama blocks of Llama-3-8B's shape (hidden {shape.hidden}, GQA {shape.heads}/{shape.kv_heads}, "
        f"MLP {shape.intermediate}, vocab {shape.vocab}), {n_params / 1e6:,.1f} M parameters, {str(dtype).split('.')[-1]} weights and AdamW state "
        f"({state_gb:.1f} GB on disk). Reference set {args.ref} items, candidates up to {args.seq} tokens.",
        "",
        "| arm | candidates | cand/s | notes |",
        "|---|---|---|---|",
        f"| (a) reload weights + AdamW state from disk per candidate (official loop) | {args.reload_cands} | "
        f"{args.reload_cands / t_reload:.3f} | {t_load / t_reload:.0%} of its time loading |",
        f"| (b) probe pool, 1 actor on the GPU (state held) | {args.cands} | {args.cands / t_pool:.3f} | "
        f"start-up {startup:.0f} s (not counted); max abs score diff vs (a) {diff:.1e} (score spread {spread:.1e}) |",
        f"| (c) small student ({n_small / 1e6:.0f} M), one candidate at a time | {4 * args.at_once} | {one:.2f} | |",
        f"| (c') the same, {args.at_once} candidates at once (torch.func) | {4 * args.at_once} | {together:.2f} | "
        f"{together / one:.2f}x (c); max abs score diff {diff_small:.1e} |",
        "",
        f"- Goal: pool >= 20x the reload loop per GPU — **{'met' if speedup >= 20 else 'not met'}**: {speedup:.1f}x.",
    ])
    print(body)
    if not args.no_write and not SMOKE:
        write_results(RESULTS, body, SECTION)


if __name__ == "__main__":
    main()
