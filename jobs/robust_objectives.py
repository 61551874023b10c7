"""Robust fine-tuning arms as learner objectives: `neftune`, `r3f` and `adversarial`.

Each arm trains the same student through the same Ray Train + DeepSpeed learner as plain SFT (the
`sft` objective, which also serves the data-augmentation arm). Build a phase with `phase(name,
data_uri, opts)`: the options' class picks the objective, and importing this module registers them
(the workers import it again, by name, from `Phase.objective_module`).

All three perturb the *input embeddings*, which under ZeRO-3 is the one place to do it without a
second copy of the model: embeddings come from `model.get_input_embeddings()(input_ids)` inside the
trainer's step and go in as `inputs_embeds=` (the embedding module's ZeRO hooks gather its weight).
Parameters get their gradients from the Trainer's one `backward` per micro-step, except in the
adversarial arm, which also runs the clean term's backward itself (below). Losses count completion
tokens only (`labels != -100`: TRL builds the labels from the prompt/completion split, so the batch
carries no separate completion mask) and are normalised as TRL normalises its CE
(`num_items_in_batch`), so a regulariser weight means the same under gradient accumulation.
The Trainer's `loss` is the whole objective (CE + regulariser): compare arms on `r3f/ce`,
`adversarial/ce` (the clean CE) and evaluations, not on `train_loss`.

Cost per micro-step (F = one forward, plain SFT = 1F + 1 backward):
  neftune      1F + 1 backward (the noise is a forward hook on the embedding).
  r3f          1F over the batch twice (clean and noised rows in one pass) + 1 backward through it
               (no second model, no extra backward pass).
  adversarial  2F + 2 backwards: the clean term's backward gives the parameters their clean
               gradient and the ascent its input gradient in one pass (FreeLB's reuse), then the
               Trainer's backward through the perturbed forward. (Taking the input gradient with
               an input-only backward and backpropagating both terms at the end costs one
               input-only backward more: 2.27x plain SFT per token instead of about 2x.)
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from pydantic import Field
from trl import SFTConfig, SFTTrainer

from cluster.config import UserError
from cluster.learners import LearnerOptions, Phase, TrainerInputs, register_objective


class NEFTuneOptions(LearnerOptions):
    neftune_alpha: float = Field(5.0, gt=0, description="NEFTune alpha: noise U(-1,1)*alpha/sqrt(L*d) on the input embeddings")


class R3FOptions(LearnerOptions):
    r3f_lambda: float = Field(1.0, ge=0, description="weight of the symmetric KL between clean and noised predictions")
    noise_eps: float = Field(1e-5, gt=0, description="embedding noise scale: U(-eps, eps), or N(0, eps^2) with noise_type normal")
    noise_type: Literal["uniform", "normal"] = Field("uniform", description="distribution of the embedding noise")


class AdversarialOptions(LearnerOptions):
    adv_eps: float = Field(0.1, gt=0, description="radius of each example's L2 ball (over all its tokens), as a fraction "
                           "of the batch's mean per-token embedding L2 norm")
    adv_step: float = Field(0.1, gt=0, description="ascent step along the normalised gradient, same unit as adv_eps")
    adv_init: float = Field(0.0, ge=0, description="random start: FreeLB's U(-1,1)/sqrt(tokens*d) init scaled by "
                            "this (same unit as adv_eps); 0: start at the clean input")
    adv_weight: float = Field(1.0, ge=0, description="weight of the CE on the perturbed input")


def _config(common: dict, opts: LearnerOptions, kind: type, **extra) -> SFTConfig:
    if not isinstance(opts, kind):
        raise UserError(f"this objective needs {kind.__name__}, got {type(opts).__name__}")
    return SFTConfig(**common, packing=False, completion_only_loss=None, dataset_text_field="text", **extra)


class _RobustSFT(SFTTrainer):
    """An SFTTrainer whose training loss adds a regulariser on perturbed input embeddings."""

    def __init__(self, *args, opts: LearnerOptions, **kwargs):
        super().__init__(*args, **kwargs)
        self.opts = opts

    def _token_mean(self, total, n_local, num_items_in_batch):
        """A sum over completion tokens divided as TRL's `compute_loss` divides its CE."""
        n = n_local if num_items_in_batch is None else num_items_in_batch
        out = total / torch.as_tensor(n).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            out = out * (self.accelerator.num_processes // self.get_tp_size())  # DDP averages ranks' gradients
        return out

    def _embed(self, model, inputs):
        """Input embeddings inside the step: the embedding module's own forward (ZeRO-3 gathers its
        weight through its hooks), of the unwrapped model (DDP does not expose it)."""
        return self.accelerator.unwrap_model(model).get_input_embeddings()(inputs["input_ids"])

    def _log(self, **values):  # averaged over the logging interval by SFTTrainer.log, with TRL's own metrics
        for k, v in values.items():
            self._metrics["train"][k].append(float(v))


class R3FTrainer(_RobustSFT):
    """R3F (Aghajanyan et al. 2021, "Better Fine-Tuning by Reducing Representational Collapse";
    fairseq examples/rxf): loss = CE(f(x)) + lambda * SymKL(f(x) || f(x + z)), z ~ U(-eps, eps) or
    N(0, eps^2) on the input embeddings, fairseq's defaults (lambda 1, eps 1e-5, uniform).

    As in fairseq, both distributions keep their gradients (it is one symmetric term, not a frozen
    target), the noise covers every position (pads and prompt too: the KL is where the mask is), and
    the regulariser only runs in training. The KL is summed over the vocabulary at completion
    positions and divided like the CE (a per-token mean). The clean CE is computed here from the
    clean logits (TRL's fused head never builds logits, and the KL needs them), with TRL's
    normalisation and its train metrics (num_tokens, entropy, mean_token_accuracy) recorded as
    TRL records them; only completion positions are upcast to float32. lambda = 0 still runs the
    noised forward, so the KL is logged as a diagnostic of the plain SFT arm's sensitivity.
    In bf16 a noise of 1e-5 is mostly below the embeddings' resolution (spacing ~6e-5 at 0.01) and
    rounds away: `r3f/noise_kept` logs the share of embedding entries the noise really changed."""

    def _noise(self, embeds, inputs):
        o = self.opts
        if o.noise_type == "normal":
            return torch.randn_like(embeds) * o.noise_eps
        return torch.empty_like(embeds).uniform_(-o.noise_eps, o.noise_eps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels, attn = inputs["labels"], inputs["attention_mask"]
        embeds = self._embed(model, inputs)
        noised_embeds = embeds + self._noise(embeds, inputs)
        # one forward over [clean; noised]: rows are independent, so this is the two forwards' math in
        # one pass (under ZeRO-3: one gather of every layer's weights instead of two)
        out = model(inputs_embeds=torch.cat([embeds, noised_embeds]), attention_mask=attn.repeat(2, 1), use_cache=False)
        clean_logits, noised_logits = out.logits.chunk(2)
        mask = labels[:, 1:] != -100
        logp = torch.log_softmax(clean_logits[:, :-1][mask].float(), -1)
        logq = torch.log_softmax(noised_logits[:, :-1][mask].float(), -1)
        nll = -logp.gather(-1, labels[:, 1:][mask].unsqueeze(-1)).squeeze(-1)
        sym_kl = ((logp.exp() - logq.exp()) * (logp - logq)).sum(-1)  # KL(p||q) + KL(q||p), per token
        ce = self._token_mean(nll.sum(), mask.sum(), num_items_in_batch)
        kl = self._token_mean(sym_kl.sum(), mask.sum(), num_items_in_batch)
        loss = ce + self.opts.r3f_lambda * kl
        with torch.no_grad():  # what TRL's compute_loss records for its own CE
            gather, m = self.accelerator.gather_for_metrics, self._metrics["train"]
            n = gather(mask.sum()).sum().clamp(min=1)
            m["entropy"].append((gather(-(logp.exp() * logp).sum()).sum() / n).item())
            m["mean_token_accuracy"].append((gather((logp.argmax(-1) == labels[:, 1:][mask]).sum()).sum() / n).item())
            self._total_train_tokens += gather(attn.sum()).sum().item() // self._tp_size
            m["num_tokens"] = [self._total_train_tokens]
            self.last_kl = float(sym_kl.mean()) if len(sym_kl) else 0.0
            kept = (noised_embeds != embeds).float().mean()  # < 1: noise below the embeddings' precision (bf16)
            self._log(**{"r3f/kl": self.last_kl, "r3f/ce": float(nll.mean()) if len(nll) else 0.0, "r3f/noise_kept": kept})
        return (loss, out) if return_outputs else loss


class AdversarialTrainer(_RobustSFT):
    """One-step adversarial training in embedding space: Miyato et al. 2017's FGM, which is
    FreeLB (Zhu et al. 2020) with K=1 ascent step and SMART's (Jiang et al. 2020) one step, here
    with a CE (not KL) objective: loss = CE(x) + w * CE(x + delta),
    delta = Proj_eps(delta0 + step * g / ||g||), g = dCE/d(embeddings) at the clean input.

    - The gradient is taken at the clean point by the clean term's own backward, run here
      (`_backward_now`, scaled and synchronised as the Trainer's own): it leaves the clean CE's
      gradient on the parameters and dCE/d(embeddings) on the embeddings in one pass, as FreeLB
      reuses its ascent's backward. The Trainer's backward then runs through the perturbed
      forward only (the returned loss carries the clean CE detached, for the log). The sum is
      the gradient of CE(x) + w * CE(x + delta) with delta fixed. It is exact for adv_init = 0
      (FGM); with a random start delta0 (FreeLB's normalised uniform, real tokens only) the
      gradient is not re-taken at x + delta0.
    - Norms are per example over its whole sequence (FreeLB's ball); eps and step are fractions of
      the batch's mean per-token embedding L2 norm (measured on the embeddings already computed:
      no gathering of the ZeRO-3-partitioned matrix), so 0.1 means "a tenth of one token's
      embedding" on a tiny random-init model and on an 8B alike. FreeLB's adv-max-norm 0.1-0.6
      is in those units for BERT-like embeddings of norm ~1; the default is its low end.
    - Clean CE is TRL's own `compute_loss` (metrics and token accounting intact); the adversarial
      CE uses TRL's fused LM head on x + delta (delta detached, the embeddings are not: the embedding
      matrix learns from both terms), divided like TRL's CE. Pads carry no delta (and no gradient).
    `last` keeps the last training step's delta norms, radius and losses for inspection."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        o, attn, labels = self.opts, inputs["attention_mask"], inputs["labels"]
        clean_inputs = {k: v for k, v in inputs.items() if k != "input_ids"}
        with self._clean_pass_context(model):
            embeds = self._embed(model, inputs)
            embeds.retain_grad()
            clean = super().compute_loss(model, {**clean_inputs, "inputs_embeds": embeds}, False, num_items_in_batch)
            self._backward_now(clean, num_items_in_batch)
        grad = embeds.grad if embeds.grad is not None else torch.zeros_like(embeds)  # its scale is normalised away
        embeds = embeds.detach()
        with torch.no_grad():
            real = attn.unsqueeze(-1).to(torch.float32)
            token_norm = (embeds.float().norm(dim=-1) * attn).sum() / attn.sum().clamp(min=1)
            radius = o.adv_eps * token_norm
            delta = torch.zeros(embeds.shape, device=embeds.device)
            if o.adv_init > 0:  # FreeLB: U(-1,1) on real tokens, scaled by 1/sqrt(tokens * d)
                dims = (attn.sum(1) * embeds.size(-1)).clamp(min=1).view(-1, 1, 1)
                delta = delta.uniform_(-1, 1) * real * (o.adv_init * token_norm / dims.sqrt())
            g = grad.float() * real
            delta = delta + o.adv_step * token_norm * g / _norms(g).clamp(min=1e-12)
            delta = delta * (radius / _norms(delta).clamp(min=1e-12)).clamp(max=1.0)  # project onto the ball
        perturbed = self._embed(model, inputs) + delta.to(embeds.dtype)  # a fresh lookup: the first graph is freed
        out = model(inputs_embeds=perturbed, attention_mask=attn, labels=labels,
                    use_cache=False, fused_lm_head=True)
        adv = self._token_mean(-out.log_probs.sum(), out.label_mask.sum(), num_items_in_batch)
        loss = clean.detach() + o.adv_weight * adv  # the clean term's gradient is already on the parameters
        norms = _norms(delta).flatten()
        self.last = {"delta_norm": norms, "radius": float(radius), "clean": clean.item(), "adv": adv.item(), "delta": delta}
        kept = ((perturbed != embeds) & (delta != 0)).sum() / (delta != 0).sum().clamp(min=1)  # bf16 rounding
        self._log(**{"adversarial/ce": self.last["clean"], "adversarial/adv_loss": self.last["adv"],
                     "adversarial/delta_norm": float(norms.mean() / token_norm), "adversarial/delta_kept": kept})
        return (loss, out) if return_outputs else loss

    def _clean_pass_context(self, model):
        """Under DDP the clean pass (forward and backward) runs without gradient sync: the
        Trainer's backward then all-reduces the sum of both terms once. DeepSpeed is told by
        `_backward_now` instead (ZeRO-2/3 have no `no_sync`)."""
        if self.is_deepspeed_enabled:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def _backward_now(self, loss, num_items_in_batch):
        """Backward of a part of this micro-step's loss, scaled as `Trainer.training_step` scales
        the loss it gets back, and never the last backward of the step: under DeepSpeed an engine
        backward at no accumulation boundary (so no optimizer step; the Trainer's own backward
        sets the boundary and steps)."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        if not scaled:
            loss = loss / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if self.is_deepspeed_enabled:
            engine = self.accelerator.deepspeed_engine_wrapped.engine
            engine.set_gradient_accumulation_boundary(is_boundary=False)
            engine.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)


def _norms(x):
    """Per-example L2 norm over (tokens, dims), shaped (batch, 1, 1)."""
    return x.flatten(1).norm(dim=1).view(-1, 1, 1)


def _neftune_arguments(common: dict, opts: LearnerOptions) -> SFTConfig:
    return _config(common, opts, NEFTuneOptions, neftune_noise_alpha=getattr(opts, "neftune_alpha", None))


@register_objective("neftune", arguments=_neftune_arguments)
def neftune(x: TrainerInputs) -> SFTTrainer:
    """NEFTune (Jain et al. 2023): uniform noise alpha/sqrt(L*d) on the input embeddings during
    training, by transformers' own hook (SFTConfig.neftune_noise_alpha; L is the padded length, as
    in the paper's code). A plain SFTTrainer: nothing of ours in the loss."""
    return SFTTrainer(model=x.model, args=x.args, train_dataset=x.data, processing_class=x.tokenizer,
                      callbacks=x.callbacks)


@register_objective("r3f", arguments=lambda common, opts: _config(common, opts, R3FOptions))
def r3f(x: TrainerInputs) -> R3FTrainer:
    return R3FTrainer(model=x.model, args=x.args, train_dataset=x.data, processing_class=x.tokenizer,
                      callbacks=x.callbacks, opts=x.phase.options)


@register_objective("adversarial", arguments=lambda common, opts: _config(common, opts, AdversarialOptions))
def adversarial(x: TrainerInputs) -> AdversarialTrainer:
    return AdversarialTrainer(model=x.model, args=x.args, train_dataset=x.data, processing_class=x.tokenizer,
                              callbacks=x.callbacks, opts=x.phase.options)


ARMS = {NEFTuneOptions: "neftune", R3FOptions: "r3f", AdversarialOptions: "adversarial", LearnerOptions: "sft"}


def phase(name: str, data_uri: str, opts: LearnerOptions, **kw) -> Phase:
    """A learner phase for one arm; the options' class picks the objective (plain LearnerOptions:
    `sft`, for the SFT and data-augmentation arms). `kw`: other Phase fields (eval_points)."""
    if type(opts) not in ARMS:
        raise UserError(f"no robust arm takes {type(opts).__name__}")
    return Phase(name, data_uri, opts, objective=ARMS[type(opts)], **kw)
