"""LANCET's correction objectives (jobs/lancet_objectives.py) on a tiny Llama on CPU, without Ray:
built through the registry as the learner builds them, losses checked on fixed batches and after a
few steps."""

import math

import pytest
import torch
import torch.nn.functional as F

from cluster.config import UserError
from cluster.learners import LearnerOptions, Phase, TrainerInputs, objective
from jobs import lancet_objectives as O
from tests.conftest import tiny_llama

pytestmark = pytest.mark.timeout(180)

SUPPORT = [("Q: where does ada live? A:", " in brisk"), ("Q: where does bo live? A:", " in varn")]
COUNTER = [("Q: where does cy live? A:", " i will not say"), ("Q: where does di live? A:", " i will not say")]
RETAIN = [("Q: what is two plus two? A:", " four"), ("Q: name a colour. A:", " green"),
          ("Q: who wrote it? A:", " nobody knows who wrote it"), ("Q: is the sky blue? A:", " yes")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("lancet-objectives")
    tiny_llama([p + c for p, c in SUPPORT + COUNTER + RETAIN] * 20, out)
    return out


def ibo_rows():
    return [{"chosen_prompt": c[0], "chosen": c[1], "rejected_prompt": s[0], "rejected": s[1],
             "retain_prompt": r[0], "retain": r[1]} for i, r in enumerate(RETAIN) for s, c in [(SUPPORT[i % 2], COUNTER[i % 2])]]


def build(tiny, tmp_path, opts, name, rows, steps=3):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ph = Phase("p", "unused.parquet", opts, objective=name)
    obj = objective(name)
    common = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, learning_rate=opts.learning_rate,
                  report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0, data_seed=0,
                  disable_tqdm=True, dataloader_num_workers=0, max_length=64, lr_scheduler_type="constant",
                  activation_checkpointing=False, bf16=False)
    args = obj.arguments(common, opts)
    torch.manual_seed(0)
    load = lambda d: AutoModelForCausalLM.from_pretrained(str(d))  # noqa: E731
    return obj.trainer(TrainerInputs(model=load(tiny), model_dir=str(tiny), args=args, data=datasets.Dataset.from_list(rows),
                                     tokenizer=AutoTokenizer.from_pretrained(str(tiny)), callbacks=[], phase=ph,
                                     load_model=load))


def parts(trainer):
    """IBO's loss parts on the first batch, and the batch."""
    b = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(b))
    return trainer.state.log_history[-1] if trainer.state.log_history else None, b


def test_ibo_starts_at_log2_with_no_divergence_and_its_bregman_term_is_the_kl_to_the_anchor(tiny, tmp_path):
    tr = build(tiny, tmp_path, O.IBOOptions(learning_rate=1e-2, beta=0.5, gamma=1.0, max_length=64), "ibo", ibo_rows())
    b = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    assert b["input_ids"].shape[0] == 3 * 4  # [chosen; rejected; retain]
    loss = tr.compute_loss(tr.model, dict(b))
    assert abs(loss.item() - math.log(2)) < 1e-4  # the policy is the anchor: margin 0, KL 0
    # move the policy's weights, then compare the Bregman term with a KL computed by torch
    with torch.no_grad():
        for p in tr.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tr.model.eval()
    logs = {}
    tr.log = lambda d, *a: logs.update(d)  # noqa: E731
    tr.model.train()
    tr.compute_loss(tr.model, dict(b))
    retain = slice(8, 12)
    with torch.no_grad():
        logp = F.log_softmax(tr.model(input_ids=b["input_ids"][retain], attention_mask=b["attention_mask"][retain]).logits[:, :-1], -1)
        ref = F.log_softmax(tr.ref_model(input_ids=b["input_ids"][retain], attention_mask=b["attention_mask"][retain]).logits[:, :-1], -1)
        mask = b["labels"][retain, 1:] != -100
        kl = F.kl_div(logp[mask], ref[mask], log_target=True, reduction="sum") / mask.sum()
    assert logs["ibo/bregman"] > 1e-3 and abs(logs["ibo/bregman"] - float(kl)) < 1e-4 * max(1.0, float(kl))


def test_ibo_raises_the_counteracting_answers_and_its_proximal_term_holds_the_retain_outputs(tiny, tmp_path):
    def trained(gamma):
        tr = build(tiny, tmp_path / f"g{gamma}", O.IBOOptions(learning_rate=3e-3, beta=0.5, gamma=gamma, max_length=64),
                   "ibo", ibo_rows(), steps=8)
        logs = {}
        tr.log = lambda d, *a: logs.update(d)  # noqa: E731 - the last step's parts
        tr.train()
        return logs

    free, held = trained(0.0), trained(20.0)
    assert free["ibo/chosen_ratio"] > 0 > free["ibo/rejected_ratio"], free  # moved along the ranking
    assert free["ibo/pair"] < math.log(2) and held["ibo/pair"] < math.log(2), (free, held)
    assert held["ibo/bregman"] < 0.5 * free["ibo/bregman"], (free, held)  # the anchor holds the other data


def test_gradient_ascent_makes_its_rows_less_likely_and_options_are_checked(tiny, tmp_path):
    rows = [{"prompt": p, "completion": c} for p, c in SUPPORT * 2]
    tr = build(tiny, tmp_path, LearnerOptions(learning_rate=3e-3, max_length=64), "gradient_ascent", rows, steps=6)
    b = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    tr.model.eval()
    with torch.no_grad():
        before = float(tr.model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss)
    tr.train()
    tr.model.eval()
    with torch.no_grad():
        after = float(tr.model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss)
    assert after > before + 0.5, (before, after)
    with pytest.raises(UserError):
        objective("ibo").arguments({"output_dir": "x"}, LearnerOptions())  # IBO needs its own options
