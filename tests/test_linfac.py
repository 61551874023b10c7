"""LinFAC against the exact influence on a model small enough to form the Gauss-Newton matrix
(influence.exact's toy: 2 layers, width 8, vocabulary 40, fitted to a noisy reversal task), and
the pieces the Ray fan-out relies on (partial sums add up, factors round-trip, bad damping refused)."""

from __future__ import annotations

import copy

import pytest
import torch

from influence import exact, linfac as L
from influence.exact import D, toy_examples, trained
from influence.lookahead import collate, spearman

# LinFAC's default damping (1.0 x the mean corrected eigenvalue) was chosen on data seed 0
# (docs/lancet.md: Spearman 0.88 / 0.90 / 0.93 against the exact influence at 0.3 / 0.5 / 1.0);
# the fidelity test runs on seed 3.
SEED = 3


@pytest.fixture(scope="module")
def fitted():
    train = toy_examples(512, seed=SEED)
    queries = toy_examples(4, seed=SEED + 100)
    return trained(train), [collate(train[i : i + 32]) for i in range(0, 512, 32)], [collate(queries)]


def linfac_scores(model, train, queries, samples: int = 2) -> torch.Tensor:
    return L.influence(model, train, queries, L.fit_factors(model, train, samples))


def test_pseudo_gradient_is_the_gradient_of_a_virtual_linear_correction_of_each_sublayer(fitted):
    model, train, _ = fitted
    b = train[0]
    deltas = {n: torch.zeros(D, D, requires_grad=True) for n, _ in L.sublayers(model)}
    with exact.virtual_corrections(model, deltas, b["attention_mask"]):
        loss = L._summed_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    auto = dict(zip(deltas, torch.autograd.grad(loss, list(deltas.values()))))
    ours = L.pseudo_gradient(model, [b])
    assert set(ours) == set(auto) and len(ours) == 4
    for n in ours:
        assert torch.allclose(ours[n], auto[n], atol=1e-5, rtol=1e-4), n
        assert auto[n].abs().max() > 1e-3  # a gradient that is there


def test_partitions_add_up_to_the_whole_pass(fitted):
    model, train, _ = fitted
    whole = L.covariance_sums(model, [collate([r for b in train for r in _split(b)])], key="x")
    parts = L.add_partials([L.covariance_sums(model, [b], key="x") for b in train])
    # the A factors and token counts do not depend on the sampled labels: the same sums, up to
    # float32 activations that differ with the batch's padding (entrywise, cancellation in the
    # off-diagonal sums magnifies that; against the factor's scale it stays below 1e-5, while one
    # batch counted twice moves it by 6%)
    for k in whole:
        if k.endswith(".A") or k.endswith(".tokens"):
            err = float((whole[k] - parts[k]).abs().max() / whole[k].abs().max())
            assert err < 1e-5, (k, err)
    with pytest.raises(ValueError):
        L.add_partials([parts, {k: v for k, v in parts.items() if "layers.0" not in k}])


def _split(b):
    n = (b["attention_mask"].sum(1)).tolist()
    return [{"input_ids": b["input_ids"][i, : n[i]].tolist(), "labels": b["labels"][i, : n[i]].tolist()} for i in range(len(n))]


def test_linfac_ranks_training_examples_as_the_exact_influence_in_its_space(fitted):
    """LinFAC's K-FAC eigenbasis with EK-FAC's eigenvalue correction against the exact
    Gauss-Newton influence in the same space (the virtual sublayer corrections): Spearman >= 0.9.
    Also printed: against the exact influence in the space of the model's own linear weights."""
    model, train, queries = fitted
    ours = linfac_scores(model, train, queries)
    truth, info = exact.exact_influence(copy.deepcopy(model), train, queries, "linfac", damping=L.DAMPING)
    rho = spearman(ours, truth)
    print(f"\nLinFAC vs exact (its space, {info['parameters']} params): rho={rho:.3f}")
    assert rho >= 0.9
    # the comparison can fail: a curvature that ignores the eigenvalue correction (plain gradient
    # dot product in that space) ranks far worse than LinFAC does
    plain = L.scores(model, train, L.pseudo_gradient(model, queries))
    assert spearman(plain, truth) < rho - 0.05


def test_precondition_refuses_a_damping_that_is_not_positive(fitted):
    model, train, queries = fitted
    f = L.Factors.from_covariances(L.covariance_sums(model, train[:1], key="a"))
    f = f.with_lambda(L.lambda_sums(model, train[:1], f, key="a"))
    g = L.pseudo_gradient(model, queries)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="damping"):
            L.precondition(g, f, bad)
    round_trip = L.Factors.from_tensors(f.tensors())
    assert all(torch.equal(round_trip.Lambda[n], f.Lambda[n]) for n in f.Lambda)


def test_factor_sizes_linfac_against_ekfac(fitted):
    model, _, _ = fitted
    s = L.factor_sizes(model)
    # per layer: LinFAC 2 sublayers x 2 x d^2; EK-FAC q,k,v,o (d->d) + gate, up (d->2d) + down (2d->d)
    assert s == {"linfac": 2 * 2 * 2 * D * D, "ekfac": 2 * (4 * 2 * D * D + 3 * (D * D + 4 * D * D)),
                 "sublayers": 4, "linear_modules": 14}


def contrast_of(queries):
    """The queries' prompts with another response (the prompt itself, not reversed)."""
    out = []
    for b in queries:
        rows = _split(b)
        for r in rows:
            n = sum(1 for x in r["labels"] if x == -100)
            prompt = r["input_ids"][1:n]
            r["input_ids"] = r["input_ids"][:n] + prompt
            r["labels"] = [-100] * n + prompt
        out.append(collate(rows))
    return out


def exact_contrast(model, train, queries, space):
    q, _ = exact.exact_influence(copy.deepcopy(model), train, queries, space, damping=L.DAMPING)
    c, _ = exact.exact_influence(copy.deepcopy(model), train, contrast_of(queries), space, damping=L.DAMPING)
    return q - c


def test_a_contrastive_measurement_is_ranked_as_the_exact_influence_of_the_loss_difference(fitted):
    """Queries' loss minus the same prompts' loss under another response: LinFAC against the exact
    influence of that difference (its space)."""
    model, train, queries = fitted
    ours = L.influence(model, train, queries, L.fit_factors(model, train, 2), contrast=contrast_of(queries))
    truth = exact_contrast(model, train, queries, "linfac")
    plain = L.influence(model, train, queries, L.fit_factors(model, train, 2))
    print(f"\ncontrastive LinFAC vs exact: rho={spearman(ours, truth):.3f} (plain measurement: {spearman(plain, truth):.3f})")
    assert spearman(ours, truth) >= 0.9


@pytest.mark.slow
def test_kronfluence_ekfac_through_our_task_follows_the_exact_influence_over_the_weights(fitted):
    """The comparison arm is wired right (sign, sampled labels, tracked modules, damping): its
    scores follow the exact influence over the linear weights (0.80 and 0.85 on seeds 3 and 4,
    benchmarks/RESULTS.md); a flipped sign or the wrong modules would not."""
    from influence.ekfac import ekfac_influence

    model, train, queries = fitted
    rows = [r for b in train for r in _split(b)]
    ek, info = ekfac_influence(copy.deepcopy(model), rows, _split(queries[0]), contrast=_split(contrast_of(queries)[0]))
    real = exact_contrast(model, train, queries, "linear")
    print(f"\nEK-FAC vs exact over the weights (contrastive measurement): rho={spearman(ek, real):.3f}")
    assert info["modules"] == 14 and spearman(ek, real) >= 0.7
    with pytest.raises(ValueError, match="damping"):
        ekfac_influence(copy.deepcopy(model), rows[:8], rows[:2], damping=0.0)


def test_grad_dot_is_each_examples_gradient_dotted_with_the_queries(fitted):
    """Forward mode (one pass per batch) against reverse mode, one example at a time."""
    from influence.baselines import grad_dot

    model, train, queries = fitted
    ours = grad_dot(model, train[:1], queries)
    q = queries[0]
    model.zero_grad()
    L._summed_nll(model(input_ids=q["input_ids"], attention_mask=q["attention_mask"]).logits, q["labels"]).backward()
    gq = [p.grad.clone() for p in model.parameters()]
    for i, row in enumerate(_split(train[0])[:6]):
        b = collate([row])
        model.zero_grad()
        L._summed_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]).backward()
        ref = sum(float((g * p.grad).sum()) for g, p in zip(gq, model.parameters()))
        assert ours[i].item() == pytest.approx(ref, rel=1e-3, abs=1e-4)
    model.zero_grad()


def test_bm25_ranks_the_text_that_shares_the_querys_rare_words_first():
    from influence.baselines import bm25

    train = ["Where does Vorla Quen live? Reasoning: Vorla Quen lives in Brisk.",
             "I want to follow Tamo Zell home tonight. Where does Tamo Zell live?",
             "What pet does Kai Dorn keep? Reasoning: Kai Dorn keeps a cat."]
    s = bm25(train, ["I want to follow Rell Sim home tonight."])
    assert int(s.argmax()) == 1 and s[2] == 0
