"""Classification accuracy of a causal LM: after `text + suffix`, the class whose verbalizer token
has the highest logit (the label words only, as the authors' `train_as_classification` scores)."""

from __future__ import annotations

import torch


@torch.no_grad()
def predict(model, tokenizer, texts: list[str], suffix: str, verbalizer_ids: list[int], batch_size: int = 64) -> list[int]:
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[int] = []
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer([t + suffix for t in texts[i: i + batch_size]], return_tensors="pt", padding=True).to(model.device)
            logits = model(**enc).logits[:, -1, verbalizer_ids]
            out += logits.argmax(-1).tolist()
    finally:
        tokenizer.padding_side = side
    return out


def accuracy(model, tokenizer, rows: list[dict], suffix: str, verbalizer_ids: list[int]) -> float:
    pred = predict(model, tokenizer, [r["text"] for r in rows], suffix, verbalizer_ids)
    return sum(p == r["label"] for p, r in zip(pred, rows)) / len(rows)


def evaluate_classifier(model_dir: str, phase: str, *, test: str, suffix: str, verbalizer_ids: list[int],
                        device: str = "cpu") -> dict[str, float]:
    """A learner run's evaluation after a phase (rank 0): test accuracy on the test rows (URI)."""
    from cluster.models import load_model, load_tokenizer
    from cluster.stages import fetch, read_rows

    local = fetch(model_dir)
    model = load_model(local).to(device)
    return {"accuracy": accuracy(model, load_tokenizer(local), read_rows(test), suffix, verbalizer_ids)}


def fewshot_prompt(demos: list[dict], suffix: str, verbalizers: list[str]) -> str:
    """Labelled demonstrations in context, the authors' relabelling prompt: `text suffix verbalizer`."""
    return "".join(f"{d['text']}{suffix}{verbalizers[d['label']]}\n" for d in demos)


def fewshot_predict(model, tokenizer, texts: list[str], demos: list[dict], suffix: str, verbalizers: list[str],
                    verbalizer_ids: list[int]) -> list[int]:
    """The model's own label of each text, given the demonstrations in context (GRADMM's filter)."""
    head = fewshot_prompt(demos, suffix, verbalizers)
    return predict(model, tokenizer, [head + t for t in texts], suffix, verbalizer_ids)
