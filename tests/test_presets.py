"""The presets as a cluster user meets them: the 8B presets' schedules work on their data, the
smoke presets take the 8B presets' code path (same keys), and schedules are counted as the HF
Trainer counts them. No weights, no GPU: trainer arguments, DeepSpeed configs and schedulers only."""

import pytest
import yaml

from cluster.config import UserError, load_config
from cluster.learners import LearnerRun, Phase, _common_arguments, check_schedule, objective, schedule
from cluster.sweep import max_concurrent
from jobs import falsity_sweep, gradmatch, lancet, montessori_options, robust

# The 8B presets' data sizes (rows per learner phase), from the datasets they name:
# ARC-Challenge's train split has 1,119 questions, 20% held out; explanations the generator gets
# wrong are rejected, so the sweep must also work on 70% of them. Montessori: final_size rows of
# student SFT, and (at least) one DPO pair per probed prompt.
ARC_SFT_ROWS = round(1119 * 0.8)


def _phases(job: str) -> list[tuple[str, object, object, list[int]]]:
    """(name, phase options, scale, data sizes) for every learner phase of a job's 8B preset."""
    if job == "falsity_sweep":
        cfg = load_config(falsity_sweep.FalsityOptions, "configs/falsity_sweep/llama3-8b.yaml", [])
        sizes = [ARC_SFT_ROWS, round(0.7 * ARC_SFT_ROWS)]
        out = [("sft", cfg.sft, cfg.scale, sizes), ("recovery", cfg.recovery, cfg.scale, sizes)]
        for f in cfg.budget_study.factors:
            out.append((f"sft x{f}", cfg.sft.model_copy(update={"epochs": cfg.sft.epochs * f}), cfg.scale, sizes))
        return out
    if job == "robust":  # every arm's options on the clean table (an augmenting arm takes as many steps)
        cfg = load_config(robust.RobustOptions, "configs/robust/llama3-8b.yaml", [])
        return [(f"sft {name}", arm.options(cfg.sft), cfg.scale, [round(0.7 * ARC_SFT_ROWS), ARC_SFT_ROWS])
                for name, arm in cfg.arms.items()]
    if job == "lancet":  # the world's tables at the preset's size: corpus, impure SFT, each correction's table
        from synth.falsity import faco_tables
        from synth.lancet import training_rows

        cfg = load_config(lancet.LancetOptions, "configs/lancet/llama3-8b.yaml", [])
        tables = faco_tables(cfg.data, generation="unused")
        train, k, c = len(training_rows(tables["sft"], cfg.harm)), cfg.correct.top_k, cfg.correct
        return [("pretrain", cfg.pretrain, cfg.pretrain_scale, [len(tables["corpus"])]), ("sft", cfg.sft, cfg.scale, [train]),
                ("ibo", c.ibo, cfg.scale, [c.retain_rows]), ("sft retrain", cfg.sft, cfg.scale, [train - k]),
                ("gradient_ascent", c.gradient_ascent, cfg.scale, [k]), ("dpo", c.dpo, cfg.scale, [k])]
    if job == "gradmatch":  # every arm's set: per_class texts per class
        cfg = load_config(gradmatch.GradmatchOptions, "configs/gradmatch/llama3-8b.yaml", [])
        return [("sft", cfg.finetune.sft, cfg.scale, [len(cfg.task.classes) * cfg.generation.per_class])]
    cfg = load_config(montessori_options.MontessoriOptions, "configs/montessori/llama3-8b.yaml", [])
    return [("dpo", cfg.dpo, cfg.dpo_scale, [cfg.probes.prompts]), ("sft", cfg.sft, cfg.scale, [cfg.final_size])]


def _objective(name: str, opts) -> str:
    first = name.split()[0]
    return first if first in ("dpo", "ibo", "gradient_ascent") else robust.R.ARMS[type(opts)]


@pytest.mark.parametrize("job", ["falsity_sweep", "montessori", "robust", "lancet", "gradmatch"])
def test_8b_schedules_reach_their_peak_and_checkpoint(job):
    """Each phase's real TrainingArguments (TRL config, DeepSpeed ZeRO-3 config) and the scheduler
    the Trainer would build from them: the learning rate reaches its peak after warm-up, and at
    least one checkpoint falls inside the phase."""
    import torch
    import transformers

    for name, opts, scale, sizes in _phases(job):
        for rows in sizes:
            s = check_schedule(name, opts, rows, scale.num_workers)
            kind = _objective(name, opts)
            run = LearnerRun(model="m", tokenizer="m", phases=[Phase(name.split()[0], "t.parquet", opts, objective=kind)],
                             scale=scale)
            common = _common_arguments(run, run.phases[0], "/tmp/unused", s)
            assert common["deepspeed"]["zero_optimization"]["stage"] == 3 and common["bf16"]
            common.update(use_cpu=True, bf16=False)  # this machine has no GPU; nothing else changes
            args = objective(run.phases[0].objective).arguments(common, opts)
            assert args.hf_deepspeed_config.config["zero_optimization"]["stage"] == 3
            optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
            scheduler = transformers.get_scheduler(args.lr_scheduler_type, optimizer,
                                                   num_warmup_steps=args.get_warmup_steps(s.steps),
                                                   num_training_steps=s.steps,
                                                   scheduler_specific_kwargs=args.lr_scheduler_kwargs)
            lrs = []
            for _ in range(s.steps):
                lrs.append(scheduler.get_last_lr()[0])
                optimizer.step()
                scheduler.step()
            assert max(lrs) == pytest.approx(opts.learning_rate), (job, name, rows, s)
            assert 1 <= s.steps // opts.save_steps, (job, name, rows, s)


def test_montessori_8b_takes_the_papers_global_batches():
    """Examples per optimizer step as the paper's code runs them (warm-up 2 per device x 2
    accumulation x 8 GPUs = 32; teacher DPO one process x 2 = 2; student SFT 8 x 2 x 2 = 32), read
    from the trainer arguments each learner run would build (and the warm-up's own loop)."""
    cfg = load_config(montessori_options.MontessoriOptions, "configs/montessori/llama3-8b.yaml", [])
    assert cfg.warmup.batch_size * cfg.warmup.grad_accum == 32
    for kind, opts, scale, paper in [("dpo", cfg.dpo, cfg.dpo_scale, 2), ("sft", cfg.sft, cfg.scale, 32)]:
        run = LearnerRun(model="m", tokenizer="m", phases=[Phase(kind, "t.parquet", opts, objective=kind)], scale=scale)
        common = _common_arguments(run, run.phases[0], "/tmp/unused", check_schedule(kind, opts, 10_000, scale.num_workers))
        common.update(use_cpu=True, bf16=False)
        args = objective(kind).arguments(common, opts)
        ds = args.hf_deepspeed_config.config
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps * scale.num_workers == paper, kind
        assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * scale.num_workers == paper, kind


def test_a_schedule_that_cannot_work_is_refused():
    """The old 8B falsity numbers (128 sequences per step: 21 steps, 20 of them warm-up; a save
    every 200) peaked at the phase's last step and never checkpointed inside it."""
    cfg = load_config(falsity_sweep.FalsityOptions, "configs/falsity_sweep/llama3-8b.yaml",
                      ["sft.grad_accum=4", "sft.warmup_steps=20"])
    with pytest.raises(UserError, match="warm-up 20 steps is more than half the phase"):
        check_schedule("sft", cfg.sft, ARC_SFT_ROWS, 8)
    cfg = load_config(falsity_sweep.FalsityOptions, "configs/falsity_sweep/llama3-8b.yaml", ["sft.save_steps=200"])
    with pytest.raises(UserError, match="no checkpoint within the phase"):
        check_schedule("sft", cfg.sft, ARC_SFT_ROWS, 8)
    wsd = cfg.sft.model_copy(update={"lr_scheduler": "warmup_stable_decay", "warmup_steps": 30, "decay_steps": 0.2})
    with pytest.raises(UserError, match="decay 17 steps"):
        check_schedule("sft", wsd, ARC_SFT_ROWS, 8)


def test_schedule_counts_steps_as_the_trainer_does(tmp_path):
    """`schedule` against a real SFTTrainer's step count (fractional epochs, a ragged last batch,
    gradient accumulation) on one worker."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from cluster.learners import LearnerOptions
    from cluster.models import load_model, load_tokenizer
    from tests.conftest import tiny_llama

    texts = [f"row {i} says {i * 7 % 13}" for i in range(37)]
    tiny_llama(texts, tmp_path, hidden_size=16)
    opts = LearnerOptions(batch_size=4, grad_accum=3, epochs=2.5)
    trainer = SFTTrainer(model=load_model(str(tmp_path)), processing_class=load_tokenizer(str(tmp_path)),
                         train_dataset=datasets.Dataset.from_list([{"text": t} for t in texts]),
                         args=SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                        gradient_accumulation_steps=3, num_train_epochs=2.5, use_cpu=True,
                                        report_to="none", save_strategy="no", disable_tqdm=True, max_length=16,
                                        activation_checkpointing=False))
    trainer.train()
    assert schedule(opts, 37, 1).steps == trainer.state.max_steps == trainer.state.global_step


def _keys(tree, prefix=""):
    """Every key path of a YAML tree (lists are values)."""
    if not isinstance(tree, dict):
        return {prefix}
    return set().union(*(_keys(v, f"{prefix}.{k}" if prefix else k) for k, v in tree.items())) | ({prefix} if prefix else set())


# What a smoke preset may change beside names, sizes and resources: falsity's data (a FACO table
# file instead of a hub QA set plus a generator writing its reasoning).
SMOKE_ONLY = {"falsity_sweep": {"data.hub", "data.generator"}, "montessori": set(), "robust": {"data.hub", "data.generator"},
              "lancet": set(), "gradmatch": set()}


@pytest.mark.parametrize("job", ["falsity_sweep", "montessori", "robust", "lancet", "gradmatch"])
def test_smoke_preset_has_the_8b_presets_keys(job):
    smoke = yaml.safe_load(open(f"configs/{job}/smoke.yaml"))
    big = yaml.safe_load(open(f"configs/{job}/llama3-8b.yaml"))
    allowed = {k for k in _keys(big) if any(k == a or k.startswith(a + ".") for a in SMOKE_ONLY[job])}
    assert _keys(smoke) ^ (_keys(big) - allowed) <= {a for a in SMOKE_ONLY[job]}, _keys(smoke) ^ _keys(big)
    # the cluster code path: a named model (no tiny build), ZeRO-3 across 2 workers, lm-eval
    assert smoke.get("model", smoke.get("student"))["tiny"] is None
    scale = smoke["scale"]
    assert scale["zero_stage"] == 3 and scale["num_workers"] == 2
    assert smoke["eval"]["harness"]["limit"] and smoke["ray"]["address"] == "auto"


def test_gpu_trials_are_queued_not_capped_by_what_the_cluster_has_now():
    """An autoscaling cluster has 0 GPUs when the sweep starts: every trial goes to Tune anyway.
    CPU trials are capped by the CPUs (more would deadlock on their drivers)."""
    assert max_concurrent({"CPU": 4}, 11, 8, 8, use_gpu=True) == 11
    assert max_concurrent({"CPU": 4, "GPU": 8}, 11, 8, 8, use_gpu=True, limit=3) == 3
    assert max_concurrent({"CPU": 4}, 11, 1, 1, use_gpu=False) == 3
    assert max_concurrent({"CPU": 1}, 11, 2, 1, use_gpu=False) == 1


def test_by_length_batching_reaches_the_trainer_and_cuts_padding(tmp_path):
    """`batching: by_length` goes from the options through the learner's arguments to the
    objective's own trainer: its batches hold far less padding than random ones on rows of mixed
    lengths, over the same rows and the same number of batches."""
    import random

    import datasets

    from cluster.learners import LearnerOptions, ScaleOptions, TrainerInputs
    from cluster.models import load_model, load_tokenizer
    from tests.conftest import tiny_llama

    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(20)}" for _ in range(rng.randint(1, 60))) for _ in range(192)]
    tiny_llama(texts, tmp_path, hidden_size=16)
    data = datasets.Dataset.from_list([{"text": t} for t in texts])
    share = {}
    for batching in ("random", "by_length"):
        opts = LearnerOptions(batch_size=8, max_length=128, batching=batching)
        run = LearnerRun(model=str(tmp_path), tokenizer=str(tmp_path), phases=[Phase("sft", "unused", opts)], scale=ScaleOptions())
        obj = objective("sft")
        common = _common_arguments(run, run.phases[0], str(tmp_path / batching), schedule(opts, len(texts), 1))
        common.update(ddp_backend=None)  # one process here, no process group; nothing else changes
        args = obj.arguments(common, opts)
        trainer = obj.trainer(TrainerInputs(model=load_model(str(tmp_path)), model_dir=str(tmp_path), args=args, data=data,
                                            tokenizer=load_tokenizer(str(tmp_path)), callbacks=[], phase=run.phases[0],
                                            load_model=load_model))
        masks = [b["attention_mask"] for b in trainer.get_train_dataloader()]
        assert len(masks) == 24
        share[batching] = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert share["by_length"] > share["random"] + 0.2, share  # 0.88 against 0.59 here
