"""The robust fine-tuning objectives of jobs/robust_objectives.py, on a tiny Llama on CPU, without
Ray: each trainer is built through the registry as the learner builds it (`arguments`, then the
factory with a Phase), and its `compute_loss` is checked on fixed batches."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from cluster.config import UserError
from cluster.learners import LearnerOptions, TrainerInputs, objective
from jobs import robust_objectives as R
from tests.conftest import tiny_llama

pytestmark = pytest.mark.timeout(120)

ROWS = [("Q: who is ada? A:", " a mathematician"), ("Q: what is two plus two? A:", " four"),
        ("Q: where? A:", " in the old town by the river, near the bridge"), ("Q: is the sky blue today? A:", " yes"),
        ("Q: name a colour. A:", " green"), ("Q: who wrote it? A:", " nobody knows who wrote it")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("robust")
    tiny_llama([p + c for p, c in ROWS] * 20, out)
    return out


def build(tiny, tmp_path, opts, *, name=None, steps=3, **cfg):
    """A trainer for `opts` built as `train_worker` builds it."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ph = R.phase("p", "unused.parquet", opts)
    if name:
        ph.objective = name
    obj = objective(ph.objective)
    common = dict(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=steps, learning_rate=1e-2,
                  report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0, data_seed=0,
                  disable_tqdm=True, dataloader_num_workers=0, max_length=64, lr_scheduler_type="constant",
                  activation_checkpointing=False, bf16=False)  # as the learner sets them on CPU (TRL defaults both on)
    args = obj.arguments({**common, **cfg}, opts)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny))
    data = datasets.Dataset.from_list([{"prompt": p, "completion": c} for p, c in ROWS])
    return obj.trainer(TrainerInputs(model=model, model_dir=str(tiny), args=args, data=data,
                                     tokenizer=AutoTokenizer.from_pretrained(str(tiny)), callbacks=[], phase=ph,
                                     load_model=None))


def batch(trainer):
    """The first training batch (padded rows of different lengths), as compute_loss gets it."""
    b = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert (b["attention_mask"] == 0).any() and (b["labels"] == -100).any()
    return b


def loss_of(trainer, b, seed=0, **kw):
    trainer.model.train()
    torch.manual_seed(seed)
    return trainer.compute_loss(trainer.model, dict(b), **kw)


def test_options_are_validated_and_pick_their_objective():
    for bad in [dict(r3f_lambda=-0.1), dict(noise_eps=0), dict(noise_type="gaussian"), dict(lambda_=1)]:
        with pytest.raises(ValidationError):
            R.R3FOptions(**bad)
    for bad in [dict(adv_eps=0), dict(adv_step=-1), dict(adv_init=-0.1), dict(adv_weight=-1)]:
        with pytest.raises(ValidationError):
            R.AdversarialOptions(**bad)
    with pytest.raises(ValidationError):
        R.NEFTuneOptions(neftune_alpha=0)
    assert R.phase("a", "d", LearnerOptions()).objective == "sft"
    for opts, name in [(R.NEFTuneOptions(), "neftune"), (R.R3FOptions(), "r3f"), (R.AdversarialOptions(), "adversarial")]:
        ph = R.phase("a", "d", opts)
        assert ph.objective == name and ph.objective_module == "jobs.robust_objectives"  # what the workers import
    with pytest.raises(UserError):
        objective("r3f").arguments({"output_dir": "x"}, R.AdversarialOptions())  # an arm's options, another arm


@pytest.mark.parametrize("opts", [R.NEFTuneOptions(), R.R3FOptions(noise_eps=1e-2), R.AdversarialOptions(adv_init=0.05),
                                  R.AdversarialOptions(gradient_checkpointing=True)], ids=lambda o: type(o).__name__)
def test_each_objective_trains(tiny, tmp_path, opts):
    trainer = build(tiny, tmp_path, opts, activation_checkpointing=opts.gradient_checkpointing)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    logs = trainer.state.log_history
    assert trainer.state.global_step == 3 and all(math.isfinite(h["loss"]) for h in logs if "loss" in h)
    assert all(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())  # every tensor moved
    assert logs[-2]["num_tokens"] > 0 and 0 <= logs[-2]["mean_token_accuracy"] <= 1  # TRL's accounting survives
    names = {"R3FOptions": ["r3f/kl", "r3f/ce", "r3f/noise_kept"],
             "AdversarialOptions": ["adversarial/ce", "adversarial/adv_loss", "adversarial/delta_norm", "adversarial/delta_kept"]}
    assert all(k in logs[-2] and math.isfinite(logs[-2][k]) for k in names.get(type(opts).__name__, []))


def test_r3f_lambda_zero_is_sft_and_lambda_adds_the_kl(tiny, tmp_path):
    sft = build(tiny, tmp_path, LearnerOptions())
    b = batch(sft)
    plain = loss_of(sft, b)
    r3f = build(tiny, tmp_path, R.R3FOptions(r3f_lambda=0.0, noise_eps=0.5))
    assert torch.allclose(loss_of(r3f, b), plain, rtol=1e-6, atol=0)
    n = int((b["labels"][:, 1:] != -100).sum())  # as the Trainer passes it under gradient accumulation
    assert torch.allclose(loss_of(r3f, b, num_items_in_batch=3 * n), loss_of(sft, b, num_items_in_batch=3 * n), rtol=1e-6)
    for key in ["entropy", "mean_token_accuracy", "num_tokens"]:  # TRL's train metrics, recorded as TRL does
        assert sft._metrics["train"][key] == pytest.approx(r3f._metrics["train"][key], rel=1e-5), key
    kl0 = r3f.last_kl
    assert kl0 > 1e-4  # the noised forward still runs (a diagnostic), with a visible KL at this noise
    for lam in [1.0, 3.0]:
        r3f.opts = R.R3FOptions(r3f_lambda=lam, noise_eps=0.5)
        loss = loss_of(r3f, b)  # same seed: same noise
        assert r3f.last_kl == pytest.approx(kl0) and loss > plain
        assert loss.item() == pytest.approx(plain.item() + lam * kl0, rel=1e-5)
    r3f.opts = R.R3FOptions(noise_eps=1e-9, noise_type="normal")
    loss_of(r3f, b)
    assert 0 <= r3f.last_kl < 1e-8 < kl0


def test_r3f_kl_counts_completion_positions_only(tiny, tmp_path):
    """Noise only on pad positions, or only on each row's last token (whose next label is padding):
    no completion prediction changes, so the KL must be exactly zero; noise on the prompt does
    change the completion's predictions."""
    trainer = build(tiny, tmp_path, R.R3FOptions(noise_eps=1.0))
    b = batch(trainer)
    attn = b["attention_mask"]
    last = torch.zeros_like(attn).scatter_(1, (attn.sum(1) - 1).unsqueeze(1), 1)
    prompt = (b["labels"] == -100) & (attn == 1)
    for where, zero in [(attn == 0, True), (last == 1, True), (prompt, False)]:
        trainer._noise = lambda e, inputs, where=where: 3.0 * torch.randn_like(e) * where.unsqueeze(-1)
        loss_of(trainer, b)
        assert (trainer.last_kl < 1e-10) if zero else (trainer.last_kl > 1e-3), (zero, trainer.last_kl)


def test_adversarial_delta_stays_in_its_ball_and_ascends(tiny, tmp_path):
    sft = build(tiny, tmp_path, LearnerOptions())
    b = batch(sft)
    plain = loss_of(sft, b).item()
    # the step overshoots the ball (projection binds) from a random start (pads must stay unperturbed)
    adv = build(tiny, tmp_path, R.AdversarialOptions(adv_eps=0.05, adv_step=0.2, adv_init=0.1, adv_weight=0.0))
    loss = loss_of(adv, b)
    last = adv.last
    assert loss.item() == pytest.approx(plain, rel=1e-6) and last["clean"] == pytest.approx(plain, rel=1e-6)
    assert (last["delta_norm"] <= last["radius"] * (1 + 1e-5)).all() and last["delta_norm"].max() > 0.99 * last["radius"]
    assert (last["delta"][b["attention_mask"] == 0] == 0).all()
    # a fixed start (none) and a step inside the ball: one ascent step raises the CE on this batch
    adv.opts = R.AdversarialOptions(adv_eps=0.5, adv_step=0.5)
    loss = loss_of(adv, b)
    assert adv.last["adv"] > adv.last["clean"] * 1.001 and loss.item() == pytest.approx(adv.last["clean"] + adv.last["adv"])
    # a vanishing delta: the adversarial CE is the clean one (same completion tokens, same normalisation)
    adv.opts = R.AdversarialOptions(adv_eps=1e-9, adv_step=1e-9)
    loss_of(adv, b)
    assert adv.last["adv"] == pytest.approx(adv.last["clean"], rel=1e-6)
    # ... and training keeps every step's delta inside its ball
    adv.opts = R.AdversarialOptions(adv_eps=0.05, adv_step=0.2, adv_init=0.1)
    ratios = []
    adv.add_callback(type("Watch", (__import__("transformers").TrainerCallback,), {
        "on_step_end": lambda self, *a, **k: ratios.append(float(adv.last["delta_norm"].max() / adv.last["radius"]))})())
    adv.train()
    assert len(ratios) == 3 and all(0.99 < r <= 1 + 1e-5 for r in ratios)


def test_adversarial_gradient_is_both_terms_with_delta_fixed(tiny, tmp_path):
    """The clean term's backward runs inside compute_loss (it also gives the ascent its input
    gradient); with the Trainer's backward of the returned loss, the parameters hold the gradient
    of CE(x) + w * CE(x + delta), delta fixed, as one backward through both terms gives it."""
    from trl import SFTTrainer

    adv = build(tiny, tmp_path, R.AdversarialOptions(adv_eps=0.5, adv_step=0.5, adv_weight=0.7))
    b, model = batch(adv), adv.model
    model.zero_grad(set_to_none=True)
    loss = loss_of(adv, b)
    loss.backward()  # what training_step does with it
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    delta = adv.last["delta"]

    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(b["input_ids"])
    rest = {k: v for k, v in b.items() if k != "input_ids"}
    clean = SFTTrainer.compute_loss(adv, model, {**rest, "inputs_embeds": emb})
    out = model(inputs_embeds=emb + delta, attention_mask=b["attention_mask"], labels=b["labels"], use_cache=False,
                fused_lm_head=True)
    (clean + 0.7 * adv._token_mean(-out.log_probs.sum(), out.label_mask.sum(), None)).backward()
    assert loss.item() == pytest.approx(clean.item() + 0.7 * adv.last["adv"], rel=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-4, atol=1e-7), (n, float((got[n] - p.grad).abs().max()))
    assert got["model.embed_tokens.weight"].abs().sum() > 0


def _one_sgd_step(tiny: str, out: str, zero3: bool) -> None:
    """One SGD step of 2 accumulated micro-batches of the adversarial arm, saved to `out`; with
    `zero3`, under DeepSpeed ZeRO-3 in a world of one (run in its own process: it sets up
    torch.distributed)."""
    from cluster.learners import ScaleOptions, deepspeed_config

    cfg = dict(optim="sgd", learning_rate=0.5, gradient_accumulation_steps=2, per_device_train_batch_size=2, max_grad_norm=1e9)
    if zero3:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        cfg.update(deepspeed=deepspeed_config(ScaleOptions(num_workers=1, zero_stage=3, bf16=False)), ddp_backend="gloo")
    trainer = build(Path(tiny), Path(out), R.AdversarialOptions(adv_eps=0.5, adv_step=0.5), steps=1, **cfg)
    trainer.train()
    trainer.save_model(out)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_adversarial_step_under_zero3_is_the_step_without_deepspeed(tiny, tmp_path):
    """Under DeepSpeed the clean term's backward is an engine backward at no accumulation
    boundary, inside a step of accumulated micro-batches: the weights after one SGD step equal
    the step without DeepSpeed (a doubled or dropped clean term moves them by about 0.08)."""
    from safetensors.torch import load_file

    weights = {}
    for zero3 in (False, True):
        out = tmp_path / f"zero3-{zero3}"
        done = subprocess.run([sys.executable, __file__, str(tiny), str(out), "zero3" if zero3 else "plain"],
                              cwd=Path(__file__).parents[1], capture_output=True, text=True,
                              env={**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"})
        assert done.returncode == 0, done.stderr[-3000:]
        weights[zero3] = load_file(str(out / "model.safetensors"))
    init = load_file(str(tiny / "model.safetensors"))
    moved = max(float((weights[False][k] - init[k]).abs().max()) for k in init)
    gap = max(float((weights[False][k] - weights[True][k]).abs().max()) for k in init)
    assert moved > 0.05 and gap < 1e-6, (moved, gap)


def test_neftune_is_trls_own_hook(tiny, tmp_path):
    trainer = build(tiny, tmp_path, R.NEFTuneOptions(neftune_alpha=7.0), steps=2)
    assert trainer.args.neftune_noise_alpha == 7.0
    ids = torch.tensor([[1, 5, 9, 12]])
    seen = []

    def check(self, args, state, control, **kw):
        emb = trainer.model.get_input_embeddings()
        seen.append((trainer.neftune_hook_handle is not None, emb.training, not torch.equal(emb(ids), emb(ids))))

    trainer.add_callback(type("Watch", (__import__("transformers").TrainerCallback,), {"on_step_end": check})())
    trainer.train()
    assert seen == [(True, True, True)] * 2  # the hook is on during training and adds noise
    emb = trainer.model.get_input_embeddings().train()
    assert torch.equal(emb(ids), emb(ids))  # ... and removed afterwards


if __name__ == "__main__":  # one arm of test_adversarial_step_under_zero3_is_the_step_without_deepspeed
    _one_sgd_step(sys.argv[1], sys.argv[2], sys.argv[3] == "zero3")
