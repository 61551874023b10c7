"""GRADMM's parts against independent computations (seconds, no Ray): the closed-form output-layer
gradient against autograd, the matching loss's gradient against finite differences, the
projection against a brute-force search on a tiny vocabulary, the DP mechanism's clipping and
noise scale, and the task's splits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from synth import gradmatch as G

TEXTS = ["Oskar has a dog.", "Pell has a cat.", "Brisk has a fox.", "Hessa has an owl.", "Dorn has a goat."] * 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-init 1-layer Llama over a 300-token BPE, in float64 (finite differences need it)."""
    from cluster.models import load_model, load_tokenizer
    from tests.conftest import tiny_llama

    out = tiny_llama(TEXTS + ["Answer: white black"], tmp_path_factory.mktemp("gm-tiny"))
    model = load_model(out).double()
    return model, load_tokenizer(out)


def test_closed_form_head_gradient_and_cosine_match_autograd(tiny):
    model, _ = tiny
    torch.manual_seed(0)
    h = torch.randn(5, model.config.hidden_size, dtype=torch.float64)
    weight = model.get_output_embeddings().weight.detach().clone().requires_grad_(True)
    labels = torch.tensor([3, 7, 7, 11, 3])
    loss = F.cross_entropy(h @ weight.T, labels)  # mean over the batch, as the target's
    (auto,) = torch.autograd.grad(loss, weight)
    closed = G.head_gradient(h, weight.detach(), labels)
    assert torch.allclose(closed, auto, atol=1e-12)
    target = torch.randn_like(auto)
    explicit = F.cosine_similarity(auto.flatten(), target.flatten(), 0)
    assert float(G.gradient_cosine(h, weight.detach(), labels, target)) == pytest.approx(float(explicit), abs=1e-10)
    norms = G.per_example_norms(h, weight.detach(), labels)
    for b in range(5):
        (g_b,) = torch.autograd.grad(F.cross_entropy(h[b: b + 1] @ weight.T, labels[b: b + 1]), weight)
        assert float(norms[b]) == pytest.approx(float(g_b.norm()), rel=1e-10)


def test_the_matching_loss_gradient_matches_finite_differences(tiny, monkeypatch):
    from transformers.models.llama import modeling_llama

    def rms_norm(self, h):  # Llama's RMSNorm computes in float32 even in a float64 model: here, not
        return self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
    model, tok = tiny
    m = G.matcher(model, tok, " Answer:", words_only=False)
    torch.manual_seed(1)
    target = torch.randn_like(m.head, dtype=torch.float64)
    x = torch.randn(2, 4, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    f = lambda v: 1 - m.cosine(v, 5, target)  # noqa: E731
    (grad,) = torch.autograd.grad(f(x), x)
    eps = 1e-5
    for idx in [(0, 0, 0), (0, 3, 7), (1, 1, 12), (1, 2, 31)]:
        up, down = x.detach().clone(), x.detach().clone()
        up[idx] += eps
        down[idx] -= eps
        fd = (float(f(up)) - float(f(down))) / (2 * eps)
        assert fd == pytest.approx(float(grad[idx]), rel=1e-5), idx


def brute_force_projection(model, m: G.Matcher, y: torch.Tensor, k: int) -> list[list[int]]:
    """The projection's definition, computed the slow way: cosines one token at a time, the k
    nearest by sorting, then each candidate scored by a full forward pass of its prefix."""
    emb = m.embed
    out = []
    for b in range(y.shape[0]):
        chosen: list[int] = []
        for i in range(y.shape[1]):
            cos = []
            for t in m.allowed.tolist():
                e = emb[t]
                cos.append((float(y[b, i] @ e) / (float(y[b, i].norm()) * float(e.norm())), t))
            near = [t for _, t in sorted(cos, reverse=True)[:k]]
            prefix = [m.bos_id, *chosen]
            logp = torch.log_softmax(model(input_ids=torch.tensor([prefix])).logits[0, -1], -1)
            chosen.append(max(near, key=lambda t: float(logp[t])))
        out.append(chosen)
    return out


@pytest.mark.parametrize("k", [1, 3, 40])
def test_projection_is_the_lms_best_among_the_k_nearest_tokens(tiny, k):
    model, tok = tiny
    m = G.matcher(model, tok, " Answer:", words_only=False)
    torch.manual_seed(2 + k)
    y = torch.randn(3, 5, model.config.hidden_size, dtype=torch.float64)
    assert m.project(y, k).tolist() == brute_force_projection(model, m, y, k)


def test_projection_never_emits_a_special_token(tiny):
    model, tok = tiny
    m = G.matcher(model, tok, " Answer:", words_only=False)
    y = m.embed[torch.tensor([tok.eos_token_id, tok.pad_token_id, tok.bos_token_id])][None].clone()
    ids = m.project(y, 1)
    assert not set(ids.flatten().tolist()) & set(tok.all_special_ids)


def test_dp_target_clips_each_example_and_adds_noise_of_the_gaussian_mechanisms_scale(tiny):
    model, _ = tiny
    torch.manual_seed(3)
    h = 10 * torch.randn(6, model.config.hidden_size, dtype=torch.float64)  # large: every example is clipped
    w = model.get_output_embeddings().weight.detach()
    labels = torch.tensor([5] * 6)
    sigma = G.dp_sigma(6, 1.0, 0.5, 1e-4)
    assert sigma == pytest.approx(1.0 / 6 * math.sqrt(2 * math.log(1.25e4)) / 0.5)
    tiny_eps = G.dp_target(h, w, labels, clip=1.0, epsilon=1e9, delta=1e-4, generator=torch.Generator().manual_seed(0))
    assert float(tiny_eps.norm()) <= 1.0 + 1e-9  # a mean of vectors of norm <= C
    noisy = [G.dp_target(h, w, labels, clip=1.0, epsilon=0.5, delta=1e-4, generator=torch.Generator().manual_seed(s))
             for s in range(3)]
    spread = float((noisy[0] - tiny_eps).std())
    assert spread == pytest.approx(sigma, rel=0.05)
    assert not torch.equal(noisy[0], noisy[1])


def test_world_task_splits_are_disjoint_balanced_and_labelled_by_the_town():
    from synth.classify import TaskOptions, split_rows, town_classes
    from synth.world import WorldOptions

    opts = TaskOptions()
    rows = split_rows(opts, WorldOptions(seed=4))
    texts = {s: {r["text"] for r in rows if r["split"] == s} for s in ("real", "dev", "test")}
    assert not (texts["real"] & texts["dev"]) and not (texts["real"] & texts["test"]) and not (texts["dev"] & texts["test"])
    for s, n in (("real", 16), ("dev", 12), ("test", 32)):
        assert [sum(r["split"] == s and r["label"] == c for r in rows) for c in (0, 1)] == [n, n]
    classes = town_classes(opts, 4)
    assert all(r["label"] == classes[r["text"].split(" has ")[0]] for r in rows)
    assert sorted(classes.values()).count(0) == 6 and town_classes(opts, 5) != classes  # balanced, per world
