"""Exact influence for models small enough to form the Gauss-Newton matrix: the ground truth
LinFAC and EK-FAC are checked against (tests/test_linfac.py, benchmarks/bench_linfac.py).

    I(z, Q) = g_Q^T (G + D)^-1 g_z,   G = (1/N) sum_n sum_t J_nt^T (diag p_nt - p_nt p_nt^T) J_nt

over response positions t, J_nt the Jacobian of the logits at t with respect to the parameters,
g the gradient of the summed response-token loss (queries: all of them summed), D the damping:
per block l, `damping` x trace(G_l) / dim(G_l) (the mean eigenvalue, as LinFAC's and kronfluence's
heuristic). Two parameter spaces:

- `linfac`: the virtual linear corrections of influence.linfac (s_t + dW_l kappa_t per sublayer),
  blocks = sublayers: what LinFAC approximates;
- `linear`: the weights of every nn.Linear inside the sublayers (q, k, v, o, gate, up, down),
  blocks = modules: what EK-FAC approximates, and the model's real parameters.

Cost is O(N T V P + N T V P^2) with P parameters: tiny models only (P of a few thousand).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacfwd, jacrev

from influence import linfac as L
from influence.lookahead import IGNORE_INDEX, Batch, collate

Space = Literal["linfac", "linear"]


@contextlib.contextmanager
def virtual_corrections(model: nn.Module, deltas: dict[str, Tensor], mask: Tensor) -> Iterator[None]:
    """Adds dW_l kappa_t to each sublayer's output (kappa as influence.linfac defines it). At
    dW = 0 the model is unchanged; the gradient with respect to dW is LinFAC's pseudo-gradient."""
    m = mask.unsqueeze(-1).to(next(model.parameters()).dtype)
    handles = []
    for name, mod in L.sublayers(model):
        attention = name.endswith(".attn")

        def hook(module, args, kwargs, output, name=name, attention=attention):
            a = kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]
            if attention:
                kappa = output[1].mean(1) @ a * m
                return (output[0] + kappa @ deltas[name].T, *output[1:])
            return output + (a * m) @ deltas[name].T

        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _space(model: nn.Module, space: Space) -> tuple[dict[str, Tensor], list[tuple[str, int]]]:
    """The parameters at their current value, and the blocks (name, size) in flattening order."""
    if space == "linfac":
        d = model.config.hidden_size
        params = {n: torch.zeros(d, d, dtype=torch.float64) for n, _ in L.sublayers(model)}
    else:
        named = dict(model.named_parameters())
        params = {f"{n}.weight": named[f"{n}.weight"].detach().double() for n, _ in L.sublayer_linears(model)}
    return params, [(n, p.numel()) for n, p in params.items()]


def _logits_fn(model: nn.Module, space: Space, batch: Batch):
    """flat parameters of the space -> logits [B, T, V] of `batch` (float64)."""
    params, blocks = _space(model, space)
    shapes = {n: p.shape for n, p in params.items()}
    base = {n: p.detach().double() for n, p in model.named_parameters()}

    def unflat(flat: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n, size in blocks:
            out[n] = flat[i : i + size].reshape(shapes[n])
            i += size
        return out

    def f(flat: Tensor) -> Tensor:
        p = unflat(flat)
        if space == "linfac":
            with virtual_corrections(model, p, batch["attention_mask"]):
                return functional_call(model, base, kwargs=dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])).logits
        return functional_call(model, {**base, **p}, kwargs=dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])).logits

    flat0 = torch.cat([p.flatten() for p in params.values()])
    return f, flat0, blocks


def _gauss_newton_and_grads(model: nn.Module, space: Space, batch: Batch) -> tuple[Tensor, Tensor, list]:
    """The batch's summed Gauss-Newton term [P, P] and each example's loss gradient [B, P], both
    from one Jacobian of the logits: the gradient of -log p(y_t) at t is J_t^T (p_t - e_y)."""
    f, flat0, blocks = _logits_fn(model, space, batch)
    # forward mode when there are fewer parameters than logits (one JVP per parameter)
    J = (jacfwd if flat0.numel() < batch["input_ids"].numel() * model.config.vocab_size else jacrev)(f)(flat0)  # [B, T, V, P]
    with torch.no_grad():
        p = torch.softmax(f(flat0), -1)[:, :-1]
    J = J[:, :-1]
    targets = batch["labels"][:, 1:]
    pos = (targets != IGNORE_INDEX).to(p.dtype)  # logits at t predict token t+1
    residual = (p - nn.functional.one_hot(targets.clamp(min=0), p.shape[-1]).to(p.dtype)) * pos.unsqueeze(-1)
    grads = torch.einsum("btvp,btv->bp", J, residual)
    w = (p * pos.unsqueeze(-1)).reshape(-1, p.shape[-1])  # [K, V]
    Jk = J.reshape(-1, p.shape[-1], J.shape[-1])  # [K, V, P]
    Jp = torch.einsum("kvp,kv->kp", Jk, w)
    weighted = (Jk * w.sqrt().unsqueeze(-1)).reshape(-1, J.shape[-1])
    return weighted.T @ weighted - Jp.T @ Jp, grads, blocks


def exact_influence(model: nn.Module, train: Sequence[Batch], queries: Sequence[Batch], space: Space,
                    damping: float = 0.1) -> tuple[Tensor, dict]:
    """I(z, Q) for every training example (in order), and {"blocks", "parameters"}. Runs the model
    in float64 and eval mode (pass a copy); attention must be eager."""
    model = model.double().eval()
    G, grads, n = 0, [], 0
    for b in train:
        gn, g, blocks = _gauss_newton_and_grads(model, space, b)
        G, n = G + gn, n + b["input_ids"].shape[0]
        grads.append(g)
    G = G / n
    gq = sum(_gauss_newton_and_grads(model, space, q)[1].sum(0) for q in queries)
    lam, i = torch.zeros(G.shape[0], dtype=torch.float64), 0
    for _, size in blocks:
        lam[i : i + size] = damping * torch.diagonal(G[i : i + size, i : i + size]).mean()
        i += size
    v = torch.linalg.solve(G + torch.diag(lam), gq)
    return torch.cat(grads) @ v, {"blocks": len(blocks), "parameters": G.shape[0]}


# ----------------------------------------------------------------------------- the toy problem

V, D = 40, 8


def toy_model(seed: int = 0):
    """A 2-layer Llama of width 8 over 40 tokens, random init, eager attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg)


def toy_examples(n: int, seed: int, prompt: int = 5, noise: float = 0.3) -> list[dict]:
    """Prompt: random tokens; response: the prompt reversed, each token replaced by a random one
    with probability `noise` (labels on the response only). The noise keeps the fitted model's
    predictions uncertain, as a language model's are: a model that memorised its data exactly
    would have a Gauss-Newton matrix of a few rare events."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = torch.randint(3, V, (prompt,), generator=g).tolist()
        r = [t if torch.rand((), generator=g) > noise else int(torch.randint(3, V, (), generator=g)) for t in reversed(p)]
        ids = [1, *p, *r]
        out.append({"input_ids": ids, "labels": [-100] * (1 + prompt) + ids[1 + prompt :]})
    return out


def trained(examples: list[dict], steps: int = 150):
    """The toy model fitted to `examples` (full-batch Adam)."""
    model = toy_model()
    batch = collate(examples)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(steps):
        opt.zero_grad()
        L._summed_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                      batch["labels"]).div(len(examples)).backward()
        opt.step()
    return model.eval()
