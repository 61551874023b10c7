"""SFT learner tokens/s and MFU on one GPU, against a bare DeepSpeed loop on the same batches.

A Llama-3-8B-shaped model (hidden 4096, 32 heads, 8 KV heads, MLP 14336, vocab 128256, untied
lm_head; `--layers` of its 32 blocks, random init, bf16) trains under DeepSpeed ZeRO-3 in bf16 on
one GPU, twice, from the same saved weights, on the same batches (random token ids, every row
`--seq` tokens, so there is no padding; the batches come from the SFT trainer's own dataloader),
for the same number of steps, with the same AdamW and gradient clipping (1.0, the HF default):

- the learner: `cluster.learners.fit` (a Ray Train worker running TRL's SFTTrainer);
- the bare loop: `deepspeed.initialize`, then forward, backward, step; nothing else. It runs first,
  in its own process, which exits (freeing the GPU) before Ray starts.

Reported for each, over steps 2-N (the first step carries one-off costs): tokens/s, MFU and HFU
(`benchmarks/gpu/flops.py`: 6N + 12 L H Q T model FLOPs per token; HFU adds the recomputed
forward under `--gradient-checkpointing`), against the GPU's peak dense bf16 FLOP/s (looked up
by name, or `--peak-tflops`). Appends its table to benchmarks/RESULTS.md.

    python -m benchmarks.gpu.bench_mfu [--layers 8] [--seq 2048] [--micro-batch 4] [--steps 30]
    python -m benchmarks.gpu.bench_mfu --cpu-smoke   # the whole script on CPU at toy size (gloo)

Needs no network: the tokenizer is trained offline on a few lines (the data is token ids already).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOKE = "--cpu-smoke" in sys.argv
for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
             "RAY_USAGE_STATS_ENABLED": "0", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(k, v)
# DeepSpeed 0.19 calls c10d functions torch 2.13 deprecates (all_gather_into_tensor, reduce_scatter_tensor):
# one FutureWarning per call site, from the bare loop's process and the Ray workers (which inherit this)
os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"),
                                                      "ignore::FutureWarning:torch.distributed.c10d_logger"]))
os.environ["DS_ACCELERATOR"] = "cpu" if SMOKE else "cuda"  # also what the Ray workers get (init_ray)

import torch  # noqa: E402

from benchmarks.gpu import flops as F  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## SFT learner MFU on one GPU (Llama-3-8B-shaped, ZeRO-3 bf16)"

LLAMA3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                 vocab_size=128256, tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=8192)
SMOKE_MODEL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160,
                   vocab_size=1024, tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=512)
LEARNING_RATE = 1e-5
MAX_GRAD_NORM = 1.0  # TrainingArguments' default; the learner's DeepSpeed config fills "auto" with it


def model_config(args) -> dict:
    return {**(SMOKE_MODEL if args.cpu_smoke else LLAMA3_8B), "num_hidden_layers": args.layers}


def setup(root: Path, args, cfg: dict):
    """Tokenizer (offline BPE; only its special tokens matter), random-init model saved as
    safetensors, and a Parquet table of `input_ids` (every row `seq` random ids)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import LlamaConfig, LlamaForCausalLM

    from cluster.models import train_tokenizer

    tok = train_tokenizer([f"synthetic line {i} for a throughput benchmark" for i in range(64)], 300,
                          root / "tok", args.seq)
    torch.manual_seed(0)
    device = "cpu" if args.cpu_smoke else "cuda"
    config = LlamaConfig(**cfg, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(torch.float32 if args.cpu_smoke else torch.bfloat16).save_pretrained(str(root / "model"))
    params = sum(p.numel() for p in model.parameters())
    del model
    if not args.cpu_smoke:
        torch.cuda.empty_cache()
    rows = args.steps * args.micro_batch
    ids = torch.randint(0, cfg["vocab_size"], (rows, args.seq), generator=torch.Generator().manual_seed(0))
    pq.write_table(pa.table({"input_ids": pa.array(ids.to(torch.int32).tolist(), pa.list_(pa.int32()))}),
                   str(root / "data.parquet"))
    return str(root / "model"), str(root / "tok"), str(root / "data.parquet"), params


def learner_options(args):
    from cluster.learners import LearnerOptions

    return LearnerOptions(learning_rate=LEARNING_RATE, max_steps=args.steps, batch_size=args.micro_batch,
                          max_length=args.seq, save_steps=10**6, logging_steps=1, warmup_steps=0,
                          lr_scheduler="constant", gradient_checkpointing=args.gradient_checkpointing)


def scale_options(args):
    from cluster.learners import ScaleOptions

    if args.cpu_smoke:
        return ScaleOptions(use_gpu=False, zero_stage=3, bf16=False, num_workers=1, cpus_per_worker=1, max_failures=0)
    return ScaleOptions(use_gpu=True, zero_stage=3, bf16=True, num_workers=1, cpus_per_worker=4, max_failures=0)


def trainer_batches(tok_dir: str, data: str, args) -> list[dict]:
    """The first `steps` batches of the SFT trainer's own dataloader (same sampler and seed as the
    learner's; the model here is a stand-in the loader never touches)."""
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from cluster.learners import _table
    from cluster.models import load_tokenizer

    datasets.disable_caching()
    tok = load_tokenizer(tok_dir)
    stand_in = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                            num_attention_heads=1, pad_token_id=tok.pad_token_id,
                                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(output_dir=out, per_device_train_batch_size=args.micro_batch, max_length=args.seq,
                        max_steps=args.steps, seed=0, data_seed=0, dataset_text_field="text", packing=False,
                        completion_only_loss=None, report_to="none", use_cpu=True, bf16=False, disable_tqdm=True,
                        dataloader_num_workers=0, activation_checkpointing=False)
        trainer = SFTTrainer(model=stand_in, args=cfg, train_dataset=_table(data), processing_class=tok)
        batches = []
        for b in trainer.get_train_dataloader():
            batches.append({k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "labels")})
            if len(batches) == args.steps:
                break
    return batches


# ---------------------------------------------------------------------------------------------
# the bare arm, in its own process


def bare_arm(spec_file: str) -> None:
    """deepspeed.initialize + forward/backward/step on the saved batches; writes its timings as JSON."""
    import socket

    spec = json.loads(Path(spec_file).read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    gpu = not spec["cpu_smoke"]
    if gpu:
        torch.cuda.set_device(0)
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from transformers.integrations import HfDeepSpeedConfig

    from cluster.learners import ScaleOptions, deepspeed_config
    from cluster.models import load_model

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a JIT build (docs/STACK.md)
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    scale = ScaleOptions(**spec["scale"])
    ds = deepspeed_config(scale)  # the learner's own config; its "auto" entries filled as HF fills them
    ds.update(train_micro_batch_size_per_gpu=spec["micro_batch"], gradient_accumulation_steps=1,
              train_batch_size=spec["micro_batch"], gradient_clipping=MAX_GRAD_NORM,
              zero_allow_untested_optimizer=True)
    # while it is alive, from_pretrained partitions the weights as it loads them (zero.Init), as in the learner
    keep = HfDeepSpeedConfig(ds)  # noqa: F841
    model = load_model(spec["model"])
    if spec["gradient_checkpointing"]:
        model.activation_checkpointing_enable()
    model.train()
    # HF's default optimizer ("adamw_torch_fused") with the learner's hyper-parameters
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    batches = torch.load(spec["batches"], weights_only=True)
    sync = get_accelerator().synchronize
    counts = [int(b["attention_mask"].sum()) for b in batches]  # on the host: no sync in the loop
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    marks = []
    for i, b in enumerate(batches):
        b = {k: v.to(engine.device, non_blocking=True) for k, v in b.items()}
        loss = engine(**b, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        if i in (0, len(batches) - 1):  # the only two syncs: the end of step 1 and of step N
            sync()
            marks.append(time.perf_counter())
    wall = time.perf_counter() - t0
    tokens = sum(counts)
    result = {"seconds": wall, "tokens": tokens, "steady_tokens_per_s": (tokens - counts[0]) / (marks[1] - marks[0]),
              "final_loss": loss.detach().item(),
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None}
    Path(spec["out"]).write_text(json.dumps(result))


def run_bare(root: Path, model_dir: str, batches_file: str, args) -> dict:
    spec = {"cpu_smoke": args.cpu_smoke, "model": model_dir, "batches": batches_file, "micro_batch": args.micro_batch,
            "gradient_checkpointing": args.gradient_checkpointing, "scale": scale_options(args).model_dump(),
            "out": str(root / "bare.json")}
    (root / "bare_spec.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "benchmarks.gpu.bench_mfu", *(["--cpu-smoke"] if args.cpu_smoke else []),
                    "--bare-arm", str(root / "bare_spec.json")], cwd=REPO, check=True)
    return json.loads((root / "bare.json").read_text())


# ---------------------------------------------------------------------------------------------


def _count(n: float) -> str:
    return f"{n / 1e9:.3f}e9" if n >= 1e8 else f"{n:,.0f}"


def command(args) -> str:
    parts = ["python -m benchmarks.gpu.bench_mfu"]
    if args.cpu_smoke:
        parts.append("--cpu-smoke")
    parts += [f"--layers {args.layers}", f"--seq {args.seq}", f"--micro-batch {args.micro_batch}",
              f"--steps {args.steps}"]
    if args.gradient_checkpointing:
        parts.append("--gradient-checkpointing")
    if args.peak_tflops is not None:
        parts.append(f"--peak-tflops {args.peak_tflops:g}")
    return " ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=None, help="decoder layers of Llama-3-8B's 32 (default 8; smoke 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; smoke 64)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default 4; smoke 2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 30; smoke 4)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer's forward (HFU > MFU)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s (default: looked up from the GPU's name; smoke: a nominal 1)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="the whole script on CPU at toy size (hidden 64, gloo, fp32 ZeRO-3); MFU against a nominal peak")
    p.add_argument("--results", type=Path, default=None,
                   help="markdown file to append to (default benchmarks/RESULTS.md; smoke: one in the temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (model, data, Ray storage)")
    p.add_argument("--bare-arm", help=argparse.SUPPRESS)  # internal: the bare loop's process
    args = p.parse_args()
    if args.bare_arm:
        bare_arm(args.bare_arm)
        return
    defaults = (2, 64, 2, 4) if args.cpu_smoke else (8, 2048, 4, 30)
    for name, d in zip(("layers", "seq", "micro_batch", "steps"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, d)
    if args.steps < 2:
        p.error("--steps must be at least 2 (tokens/s is over steps 2..N)")

    if args.cpu_smoke:
        device, peak = "CPU (smoke run)", (args.peak_tflops or 1.0) * 1e12
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU visible: run on a GPU machine, or use --cpu-smoke")
        device = torch.cuda.get_device_name()
        try:
            peak = F.peak_flops(device, args.peak_tflops)
        except ValueError as e:
            sys.exit(str(e))
    cfg = model_config(args)
    n = F.non_embedding_params(cfg)
    model_flops = F.flops_per_token(cfg, args.seq)
    hw_flops = F.hardware_flops_per_token(cfg, args.seq, args.gradient_checkpointing)
    root = Path(tempfile.mkdtemp(prefix="bench-mfu-"))
    print(f"{device}: peak {peak / 1e12:g} TFLOP/s; {args.layers} layers, {_count(n)} non-embedding params, "
          f"{_count(model_flops)} FLOPs/token (hardware {_count(hw_flops)}); work dir {root}", flush=True)
    try:
        table = benchmark(root, args, device, peak, cfg)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)  # the model and its copies: gigabytes on a GPU run
    print(table)
    smoke_results = Path(tempfile.gettempdir(), "bench_mfu_smoke_RESULTS.md")  # never the real RESULTS.md
    results = args.results or (smoke_results if args.cpu_smoke else RESULTS)
    where = "CPU smoke run, toy size" if args.cpu_smoke else f"one {device}"
    section = f"{SECTION}\n\nCommand: `{command(args)}` ({where}, {time.strftime('%Y-%m-%d')}).\n\n{table}\n"
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    text = re.sub(re.escape(SECTION) + r".*?(?=\n## |\Z)", "", text, flags=re.S).rstrip() + "\n\n" + section
    results.write_text(text)
    print(f"appended to {results}")


def benchmark(root: Path, args, device: str, peak: float, cfg: dict) -> str:
    """Both arms on the same weights and batches; returns the markdown table."""
    n = F.non_embedding_params(cfg)
    model_flops = F.flops_per_token(cfg, args.seq)
    hw_flops = F.hardware_flops_per_token(cfg, args.seq, args.gradient_checkpointing)
    t = time.perf_counter()
    model_dir, tok_dir, data, params = setup(root, args, cfg)
    torch.save(trainer_batches(tok_dir, data, args), root / "batches.pt")
    print(f"set-up (model, data, batches): {time.perf_counter() - t:.1f} s", flush=True)

    bare = run_bare(root, model_dir, str(root / "batches.pt"), args)
    print(f"bare loop: {bare['steady_tokens_per_s']:,.0f} tokens/s (steps 2-N)", flush=True)

    import ray

    from cluster.learners import LearnerRun, Phase, fit
    from cluster.runtime import RayOptions, init_ray

    t = time.perf_counter()
    init_ray(RayOptions(num_cpus=max(4, os.cpu_count() or 1)))
    ray_start = time.perf_counter() - t
    run = LearnerRun(name="bench-mfu", model=model_dir, tokenizer=tok_dir,
                     phases=[Phase("sft", data, learner_options(args))], scale=scale_options(args),
                     output=str(root / "out"))
    t = time.perf_counter()
    try:
        metrics = fit(run, str(root / "ray")).metrics
    finally:
        ray.shutdown()
    fit_wall = time.perf_counter() - t
    learner = {"seconds": metrics["sft/train_runtime_s"], "tokens": metrics["sft/train_tokens"],
               "steady_tokens_per_s": metrics["sft/steady_tokens_per_s"]}
    if learner["tokens"] != bare["tokens"]:
        print(f"note: the arms trained on different token counts ({learner['tokens']:.0f} vs {bare['tokens']})")

    def utilisation(tps: float) -> str:
        return f"MFU {F.mfu(tps, model_flops, peak):.1%}, HFU {F.hfu(tps, hw_flops, peak):.1%}"

    b, lr = bare["steady_tokens_per_s"], learner["steady_tokens_per_s"]
    learner_mfu = F.mfu(lr, model_flops, peak)
    whole = (bare["tokens"] / bare["seconds"], learner["tokens"] / learner["seconds"])
    rows = [
        ("device", f"{device}, peak dense bf16 {peak / 1e12:g} TFLOP/s" + (" (nominal)" if args.cpu_smoke else "")),
        ("model", f"Llama-3-8B-shaped, {args.layers} of 32 layers (hidden {cfg['hidden_size']}, vocab "
                  f"{cfg['vocab_size']}, untied): {_count(params)} params, {_count(n)} non-embedding; "
                  f"{'fp32' if args.cpu_smoke else 'bf16'}, ZeRO-3, 1 worker"),
        ("work", f"{args.steps} steps x {args.micro_batch} sequences x {args.seq} tokens, same batches in both arms"
                 + (", activation checkpointing" if args.gradient_checkpointing else "")),
        ("FLOPs per token", f"model {_count(model_flops)} (6N + 12·L·H·Q·T at T = {args.seq}), "
                            f"hardware {_count(hw_flops)}"),
        ("bare DeepSpeed loop, steps 2-N", f"{b:,.0f} tokens/s; {utilisation(b)}"),
        ("**SFT learner (Ray Train + TRL SFTTrainer), steps 2-N**", f"**{lr:,.0f} tokens/s; {utilisation(lr)}**"),
        ("learner / bare, steps 2-N", f"{lr / b:.2f}x"),
        ("whole loop: bare / learner", f"{whole[0]:,.0f} / {whole[1]:,.0f} tokens/s"),
        ("goal: learner MFU >= 40%", ("met" if learner_mfu >= 0.40 else "not met") + f" ({learner_mfu:.1%})"),
        ("learner start-up (fit wall - training loop)",
         f"{fit_wall - learner['seconds']:.1f} s (fit wall {fit_wall:.1f} s; Ray start {ray_start:.1f} s)"),
    ]
    if bare.get("peak_memory_gib") is not None:
        rows.append(("bare loop peak GPU memory", f"{bare['peak_memory_gib']:.1f} GiB"))
    return "\n".join(["| quantity | value |", "|---|---|"] + [f"| {a} | {v} |" for a, v in rows])


if __name__ == "__main__":
    main()
