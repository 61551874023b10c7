"""A learner objective registered from outside `cluster/`: SFT with label smoothing.

It exists to show (tests/test_learners.py) that an experiment can add an objective without touching
the platform: its options subclass `LearnerOptions`, its trainer subclasses TRL's `SFTTrainer`, and
it logs a namespaced metric of its own that the learner reports per phase.
"""

from __future__ import annotations

import torch
from pydantic import Field
from trl import SFTConfig, SFTTrainer

from cluster.learners import LearnerOptions, TrainerInputs, register_objective


class SmoothingOptions(LearnerOptions):
    smoothing: float = Field(0.1, ge=0, le=1, description="label smoothing epsilon")


class SmoothedSFT(SFTTrainer):
    """Loss = (1 - eps) * NLL(target) + eps * mean over the vocabulary of -log p, on completion tokens."""

    def __init__(self, *args, smoothing: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.smoothing = smoothing

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"][:, 1:]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        logp = torch.log_softmax(outputs.logits[:, :-1].float(), -1)
        mask = labels != -100
        nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        uniform = -logp.mean(-1)
        n = mask.sum().clamp(min=1)
        ce = (nll * mask).sum() / n
        loss = (1 - self.smoothing) * ce + self.smoothing * (uniform * mask).sum() / n
        if self.state.global_step % max(self.args.logging_steps, 1) == 0 and model.training:
            self.log({"smoothing/ce": float(ce.detach()), "smoothing/loss": float(loss.detach())})
        return (loss, outputs) if return_outputs else loss


def _arguments(common: dict, opts: SmoothingOptions) -> SFTConfig:
    return SFTConfig(**common, packing=False, completion_only_loss=None, dataset_text_field="text")


@register_objective("sft_label_smoothing", arguments=_arguments)
def smoothed_sft(x: TrainerInputs) -> SmoothedSFT:
    return SmoothedSFT(model=x.model, args=x.args, train_dataset=x.data, processing_class=x.tokenizer,
                       callbacks=x.callbacks, smoothing=x.phase.options.smoothing)
