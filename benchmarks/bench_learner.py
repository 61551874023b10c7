"""SFT learner throughput against a bare PyTorch loop, side by side in one run.

The learner (Ray Train worker running TRL's SFTTrainer; DeepSpeed off, as on the tiny presets) and
a bare loop doing the same work (collate, forward, backward, clip the gradient norm, AdamW, a
schedule step; nothing else) train the same model from the same init on the same examples (the
trainer's own, in its order) for the same number of steps, each with 2 threads. The bare loop runs
three times: before Ray starts, and as a Ray task with the learner's 2 CPUs just before and just
after the learner, so that one comparison shares the machine with Ray's own processes as the learner
does. Reported: tokens/s over the whole loop and over steps 2-N (the goal, learner >= 0.9x the bare
loop in a Ray task, is on the latter: the first step carries one-off costs), what Ray's own
processes cost the bare loop, and the fixed start-up cost of one learner run (wall time of `fit`
minus its training loop).

    python -m benchmarks.bench_learner [--steps 40] [--hidden 512] [--layers 8]

Rewrites its section of benchmarks/RESULTS.md ("SFT learner throughput").
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu",
             "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "RAY_USAGE_STATS_ENABLED": "0", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(k, v)
os.environ["WANDB_MODE"] = "disabled"  # even under `make bench` (offline there): the bare loop logs nothing either

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from benchmarks.results import RESULTS, write_results  # noqa: E402
from cluster.learners import LearnerOptions, LearnerRun, Phase, ScaleOptions, fit  # noqa: E402
from cluster.models import TinyLlama, build_tiny_model, load_model, load_tokenizer, train_tokenizer  # noqa: E402
from cluster.runtime import RayOptions, init_ray  # noqa: E402
from synth import world as W  # noqa: E402

SECTION = "## SFT learner throughput (falsity_sweep)"


def setup(root: Path, args) -> tuple[str, str, str, LearnerOptions, int]:
    world = W.build_world(W.WorldOptions(num_people=120, bios_per_person=4))
    tok = train_tokenizer(W.all_text(world), 2048, root / "tok", 512)
    tiny = TinyLlama(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                     intermediate_size=args.hidden * 3, max_position_embeddings=512, vocab_size=2048)
    model = build_tiny_model(tiny, tok, 0, root / "model")
    params = sum(p.numel() for p in model.parameters())
    corpus = W.knowledge_corpus(world)
    docs = [" ".join(corpus[i : i + 3]) for i in range(0, len(corpus) - 3, 3)]  # ~150 tokens, cut to max_length
    Dataset.from_dict({"text": docs}).to_parquet(str(root / "data.parquet"))
    opts = LearnerOptions(learning_rate=3e-4, max_steps=args.steps, batch_size=args.batch, max_length=args.seq,
                          save_steps=10**6, logging_steps=1, warmup_steps=0, lr_scheduler="constant")
    print(f"model: {params / 1e6:.1f}M parameters; {args.steps} steps of {args.batch} x <= {args.seq} tokens")
    return str(root / "model"), str(root / "tok"), str(root / "data.parquet"), opts, params


def bare_loop(model_dir: str, tok_dir: str, data_dir: str, opts: LearnerOptions, steps: int) -> tuple[float, int, float]:
    """What the trainer's step must do, and nothing else: collate the step's examples (the
    trainer's own collator), forward, backward, clip the gradient norm to 1 (HF's default), AdamW,
    a learning-rate schedule step. The examples are the trainer's own, in its order.
    Returns (seconds, tokens, tokens/s after the first step)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    tok = load_tokenizer(tok_dir)
    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=opts.batch_size, max_length=opts.max_length,
                     report_to="none", use_cpu=True, bf16=False, seed=0, data_seed=0, dataset_text_field="text",
                     disable_tqdm=True, max_steps=steps)
    trainer = SFTTrainer(model=load_model(model_dir), args=args, train_dataset=Dataset.from_parquet(data_dir), processing_class=tok)
    steps_examples = []  # each step's examples, unpadded again (right padding: the mask's ones)
    while len(steps_examples) < steps:  # as many epochs as the steps take, as the trainer does
        for b in trainer.get_train_dataloader():
            steps_examples.append([{"input_ids": ids[m.bool()].tolist()} for ids, m in zip(b["input_ids"], b["attention_mask"])])
            if len(steps_examples) == steps:
                break
    collate = trainer.data_collator
    del trainer
    model = load_model(model_dir)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=opts.learning_rate, weight_decay=opts.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # "constant", as the learner's
    tokens, marks = 0, []
    t0 = time.perf_counter()
    for examples in steps_examples:
        b = collate(examples)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
        marks.append((time.perf_counter(), tokens))
    (ta, na), (tb, nb) = marks[0], marks[-1]
    return time.perf_counter() - t0, tokens, (nb - na) / (tb - ta)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="two epochs of the table at the default batch")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-learner-"))
    model_dir, tok_dir, data_dir, opts, params = setup(root, args)

    # The bare loop runs three times: before Ray starts, on a quiet machine, and inside the local Ray as a
    # task with the learner's worker resources (2 CPUs), once before and once after the learner, so
    # that both arms share the machine with Ray's own processes (GCS, raylet, dashboard, agents).
    # The learner's own overhead is learner / bare-in-Ray; learner / bare-outside adds Ray's.
    bare_s, bare_tokens, bare_steady = bare_loop(model_dir, tok_dir, data_dir, opts, args.steps)

    t = time.perf_counter()
    init_ray(RayOptions(num_cpus=4))
    ray_start = time.perf_counter() - t
    import ray

    in_ray = ray.remote(num_cpus=2)(bare_loop)
    bare_in_ray = [ray.get(in_ray.remote(model_dir, tok_dir, data_dir, opts, args.steps))]

    run = LearnerRun(name="bench", model=model_dir, tokenizer=tok_dir, phases=[Phase("sft", data_dir, opts)],
                     scale=ScaleOptions(num_workers=1, cpus_per_worker=2, max_failures=0), output=str(root / "out"))
    t = time.perf_counter()
    metrics = fit(run, str(root / "ray")).metrics
    fit_wall = time.perf_counter() - t
    learner_s = metrics["sft/train_runtime_s"]
    learner_tokens = metrics["sft/train_tokens"]
    learner_steady = metrics["sft/steady_tokens_per_s"]  # from the end of step 1 to the last step, as bare_steady
    bare_in_ray.append(ray.get(in_ray.remote(model_dir, tok_dir, data_dir, opts, args.steps)))
    ray_steady = sum(r[2] for r in bare_in_ray) / len(bare_in_ray)

    bare_tps, learner_tps = bare_tokens / bare_s, learner_tokens / learner_s
    rows = [
        ("model", f"{params / 1e6:.1f}M-parameter Llama ({args.layers} x {args.hidden}), fp32, 2 threads"),
        ("work", f"{args.steps} steps x {args.batch} sequences x <= {args.seq} tokens; both arms collate, clip "
                 "the gradient norm and step a schedule in the timed loop, on the same examples"),
        ("bare PyTorch loop", f"{bare_tps:,.0f} tokens/s ({bare_tokens} tokens in {bare_s:.1f} s)"),
        ("SFT learner (Ray Train + TRL SFTTrainer)", f"{learner_tps:,.0f} tokens/s ({learner_tokens:.0f} tokens in {learner_s:.1f} s)"),
        ("learner / bare, whole loop", f"{learner_tps / bare_tps:.2f}x"),
        ("steps 2-N: bare outside Ray / bare in a Ray task (before, after the learner) / learner",
         f"{bare_steady:,.0f} / {' and '.join(f'{r[2]:,.0f}' for r in bare_in_ray)} / {learner_steady:,.0f} tokens/s"),
        ("bare in a Ray task / bare outside Ray, steps 2-N (what Ray's own processes cost on this machine)",
         f"{ray_steady / bare_steady:.2f}x"),
        ("**learner / bare in a Ray task, steps 2-N** (the learner's own overhead)",
         f"**{learner_steady / ray_steady:.2f}x** (goal >= 0.9x)"),
        ("learner / bare outside Ray, steps 2-N", f"{learner_steady / bare_steady:.2f}x"),
        ("learner start-up (fit wall - training loop)", f"{fit_wall - learner_s:.1f} s (fit wall {fit_wall:.1f} s)"),
        ("local Ray start", f"{ray_start:.1f} s"),
    ]
    table = "\n".join(["| quantity | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])
    print(table)
    cmd = "python -m benchmarks.bench_learner " + " ".join(f"--{k} {v}" for k, v in vars(args).items())
    write_results(RESULTS, f"Command: `{cmd}` (2-core CPU machine, {time.strftime('%Y-%m-%d')}).\n\n{table}", SECTION)


if __name__ == "__main__":
    main()
