"""LANCET's correction objectives as learner objectives: `ibo` (Influence-driven Bregman
Optimization) and `gradient_ascent` (the unlearning baseline). The other two baselines are the
platform's own: `sft` (retrain without the recalled data) and `dpo` (TRL's DPO on recalled pairs).

IBO, the form this project implements (the paper's text is not public; docs/lancet.md says why
this reading). Influence recall ranks the training data by I(z, Q); the most positive examples
z_j support the behaviour, the most negative z_i counteract it. Pair them (i, j) and, with the
impure model pi_s frozen as the anchor, minimise

    L = E_(i,j) [ -log sigma( beta * (r(z_i) - r(z_j)) ) ]  +  gamma * E_(x,y)~retain [ D_B ]
    r(z) = log pi_theta(y|x) - log pi_s(y|x)          (summed over response tokens)
    D_B  = mean over response tokens t of KL( pi_s(.|x, y<t) || pi_theta(.|x, y<t) )

- The pairwise term is "a pairwise objective over samples of different influence ranks": it
  raises the counteracting examples' likelihood relative to the anchor and lowers the supporting
  ones', so it moves the model along the influence ranking, not towards one fixed answer. Unlike
  DPO the two sides of a pair have different prompts: the recalled examples, as they are.
- The proximal term is the proximal Bregman response function's (Bae et al. 2022, what influence
  functions approximate): the Bregman divergence of the training loss in output space between the
  current and the anchor model, D_L(h, h_s, y) = L(h, y) - L(h_s, y) - grad L(h_s, y)^T (h - h_s).
  For the cross-entropy of a softmax that is exactly KL(pi_s || pi_theta) at every position (the
  label's terms cancel), so it keeps the model's outputs on the other training data (retain rows:
  not recalled) where they were: that is what holds utility. PBRF's weight-space term
  (lambda/2 ||theta - theta_s||^2) is left out: the output-space term already anchors the model,
  and a short run at a small learning rate stays near theta_s.

Each IBO row holds one pair and one retain example (columns chosen_prompt, chosen,
rejected_prompt, rejected, retain_prompt, retain), tokenised here as TRL's SFT tokenises a
prompt-completion row. All three sides of a batch go through one forward of the model (and one of
the anchor); under ZeRO-3 the anchor is prepared as TRL prepares DPO's reference.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from transformers import Trainer
from trl import SFTConfig, SFTTrainer

from cluster.config import UserError
from cluster.learners import LearnerOptions, PairwiseOptions, TrainerInputs, register_objective
from influence.lookahead import collate
from influence.warmup import tokenize_sft

SIDES = ("chosen", "rejected", "retain")


class IBOOptions(PairwiseOptions):
    """An IBO phase: the learner options plus the pairwise temperature and the proximal weight."""

    ROWS: ClassVar[str] = "IBO (chosen, rejected, retain)"

    beta: float = Field(0.1, gt=0, description="temperature of the pairwise influence-rank term")
    gamma: float = Field(1.0, ge=0, description="weight of the Bregman proximal term on retain data (0: none)")


def _collate(tokenizer, max_length: int):
    """Rows -> one right-padded batch [chosen; rejected; retain], loss labels on response tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return lambda rows: collate([tokenize_sft(tokenizer, r[f"{s}_prompt"], r[s], max_length) for s in SIDES for r in rows], pad)


class IBOTrainer(Trainer):
    """A Trainer whose loss is IBO's (module docstring); batches are [chosen; rejected; retain]."""

    def __init__(self, *args, ref_model, opts: IBOOptions, **kwargs):
        super().__init__(*args, **kwargs)
        self.opts = opts
        ref_model.eval().requires_grad_(False)
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            self.ref_model = prepare_deepspeed(ref_model, self.accelerator)
        else:
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels, attn = inputs["labels"][:, 1:], inputs["attention_mask"]
        mask = labels != -100
        logits = model(input_ids=inputs["input_ids"], attention_mask=attn, use_cache=False).logits[:, :-1]
        with torch.no_grad():
            ref_logits = self.ref_model(input_ids=inputs["input_ids"], attention_mask=attn, use_cache=False).logits[:, :-1]
        logp, ref_logp = F.log_softmax(logits.float(), -1), F.log_softmax(ref_logits.float(), -1)
        target = labels.clamp(min=0).unsqueeze(-1)
        seq = lambda lp: (lp.gather(-1, target).squeeze(-1) * mask).sum(1)  # noqa: E731
        ratio = seq(logp) - seq(ref_logp)
        chosen, rejected, retain = ratio.chunk(3)
        margin = chosen - rejected
        pair = -F.logsigmoid(self.opts.beta * margin).mean()
        keep = mask.chunk(3)[2]
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).chunk(3)[2]  # KL(pi_s || pi_theta) per position
        bregman = (kl * keep).sum() / keep.sum().clamp(min=1)
        loss = pair + self.opts.gamma * bregman
        if model.training and self.state.global_step % max(self.args.logging_steps, 1) == 0:
            self.log({"ibo/pair": float(pair.detach()), "ibo/bregman": float(bregman.detach()),
                      "ibo/margin": float(margin.detach().mean()), "ibo/chosen_ratio": float(chosen.detach().mean()),
                      "ibo/rejected_ratio": float(rejected.detach().mean())})
        return loss


def _ibo_arguments(common: dict, opts: LearnerOptions) -> SFTConfig:
    if not isinstance(opts, IBOOptions):
        raise UserError(f"an ibo phase needs IBOOptions, got {type(opts).__name__}")
    return SFTConfig(**common, remove_unused_columns=False)


@register_objective("ibo", arguments=_ibo_arguments)
def ibo(x: TrainerInputs) -> IBOTrainer:
    """IBO against the phase's starting weights (the impure model) as the frozen anchor."""
    ref = x.load_model(x.phase.ref_model or x.model_dir)
    return IBOTrainer(model=x.model, args=x.args, train_dataset=x.data, processing_class=x.tokenizer,
                      data_collator=_collate(x.tokenizer, x.phase.options.max_length), callbacks=x.callbacks,
                      ref_model=ref, opts=x.phase.options)


class GradientAscentTrainer(SFTTrainer):
    """Gradient-ascent unlearning (the standard baseline): minimise minus the SFT loss of the
    recalled supporting examples, i.e. make them unlikely, with nothing holding the rest."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        if model.training:
            loss = -loss
            self.log({"ascent/nll": float(-loss.detach())})
        return (loss, out[1]) if return_outputs else loss


@register_objective("gradient_ascent", arguments=lambda common, opts: SFTConfig(
    **common, packing=False, completion_only_loss=None, dataset_text_field="text"))
def gradient_ascent(x: TrainerInputs) -> GradientAscentTrainer:
    return GradientAscentTrainer(model=x.model, args=x.args, train_dataset=x.data, processing_class=x.tokenizer,
                                 callbacks=x.callbacks)
