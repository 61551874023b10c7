"""LinFAC: influence functions with one eigenvalue-corrected Kronecker curvature per transformer sublayer.

LANCET (Zhang et al., AAAI 2025) recalls the training examples behind an unwanted behaviour with
influence scores I(z, q) = grad f(q)^T (G + lambda)^-1 grad L(z), where G is approximated by
*LinFAC*: each transformer sublayer (attention block, feed-forward block) is treated as one
linearised map from its input state to its output, with one Kronecker-factored curvature per
sublayer and an EK-FAC eigenvalue correction. The paper's public description stops at a figure
("pre-activation gradient Ds from the input state a", "sublayer ~ W_hat kappa(h, H) + b_hat",
"modular gradient D W_hat = Ds a^T"). The exact definitions used here, and why:

1. Sublayers. Every decoder layer's attention block (`self_attn`) and feed-forward block (`mlp`):
   2 per layer, each a map from a d-dimensional input state to a d-dimensional output s that is
   added to the residual stream.
2. Input state kappa. Feed-forward: kappa_t = a_t, the block's input at token t (after its RMSNorm).
   Attention: kappa_t = sum_j abar_tj a_j, the block's inputs mixed by its head-averaged attention
   weights, the kappa(h, H) of the figure. Why: attention's output at t is sum_h W_o^h W_v^h
   sum_j alpha^h_tj a_j, linear in the mixed inputs for fixed attention weights, so the mixed input
   is what the value path's weights see (their real gradients are Ds_t (sum_j alpha_tj a_j)^T), and
   token interactions are kept. Padding positions have kappa = 0.
3. Linearisation = a virtual linear correction per sublayer. Each sublayer's output becomes
   s_t + dW kappa_t with dW a d x d matrix at 0: the model is unchanged, and the gradient of any
   loss with respect to dW is exactly D W_hat = sum_t Ds_t kappa_t^T, Ds_t = dLoss/ds_t (the
   "pre-activation gradient"; `sublayer_grads`). Influence is the influence function in that space
   of sublayer-level linear corrections: 2 d x d blocks per layer, whatever the widths inside.
4. Curvature. G is the Gauss-Newton matrix (= the Fisher, labels sampled from the model) of the
   summed response-token loss with respect to dW, block-diagonal over sublayers. Per sublayer,
   K-FAC factors A = E_t[kappa kappa^T] and S = E_t[Ds Ds^T] over tokens (with sampled labels) give
   the eigenbases Q_A, Q_S; the eigenvalue correction (George et al. 2018, as EK-FAC) replaces
   their Kronecker eigenvalues by Lambda = E_n[(Q_S^T D W_hat_n Q_A)^2] over examples n, still
   with sampled labels: the exact diagonal of G in that eigenbasis.
5. Damping. lambda_l = `damping` x mean(Lambda_l) per sublayer (kronfluence's heuristic, whose
   default factor is 0.1): scale-free, so one value serves every model size. The default here is
   1.0 (`DAMPING`): against the exact influence on a toy model (docs/lancet.md) the block-diagonal
   curvature loses most at small damping (Spearman 0.81 at 0.1, 0.93 at 1.0), since the sublayers'
   corrections all write into one residual stream and their cross terms are what it drops.
6. Scores. I(z, Q) = sum_l < Q_S [(Q_S^T D W_hat_Q Q_A) / (Lambda_l + lambda_l)] Q_A^T , D W_hat_z >,
   D W_hat_Q the gradient of the summed loss of every query (prompt + the impure model's unsafe
   response), D W_hat_z of training example z's loss (true labels). Positive: training on z lowers
   the queries' loss, i.e. supports the behaviour; negative: counteracts it. The preconditioned
   query gradient is computed once; a training example's score is sum_t Ds_t . (V kappa_t), so no
   per-example d x d gradient is ever formed when scoring.

Cost against EK-FAC with factors for every linear module (kronfluence): LinFAC keeps 2 d x d
factors per sublayer (4 d^2 numbers per layer, eigendecomposed); EK-FAC keeps one pair per
q, k, v, o, gate, up, down (in + out squared: with an MLP of width 4d, the up/gate/down factors
alone are 3 (d^2 + 16 d^2)). `factor_sizes` counts both.

Every sum here (factor covariances, eigenvalue corrections) is a plain sum over examples, so data
partitions can be fitted separately (Ray tasks or pool actors), saved, and added
(`add_partials`). Pure torch: no Ray, no jobs.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from influence.lookahead import IGNORE_INDEX, Batch, to_device, token_nll

DAMPING = 1.0  # x the mean corrected eigenvalue per sublayer (docs/lancet.md: how it was chosen)


# ----------------------------------------------------------------------------- sublayers


def sublayers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every attention and feed-forward block, in depth order."""
    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
    out = []
    for i, layer in enumerate(layers):
        out += [(f"layers.{i}.attn", layer.self_attn), (f"layers.{i}.ffn", layer.mlp)]
    return out


def sublayer_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear inside the sublayers (q, k, v, o, gate, up, down): the
    part of the network LinFAC covers, and what EK-FAC and the exact influence over weights track."""
    inside = {id(m) for _, s in sublayers(model) for m in s.modules()}
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside]


class _Capture:
    """Forward hooks that record each sublayer's input state kappa (detached) and its output s
    (in the graph, so its gradient Ds can be asked for)."""

    def __init__(self, model: nn.Module, mask: Tensor):
        self.model, self.mask = model, mask.unsqueeze(-1).float()
        self.kappa: dict[str, Tensor] = {}
        self.out: dict[str, Tensor] = {}
        self._handles = []

    def __enter__(self) -> _Capture:
        for name, mod in sublayers(self.model):
            self._handles.append(mod.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _hook(self, name: str):
        attention = name.endswith(".attn")

        def hook(module, args, kwargs, output):
            a = (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]).detach().float()
            if attention:
                s, weights = output[0], output[1]
                if weights is None:
                    raise RuntimeError("LinFAC needs the attention weights: load the model with attn_implementation='eager'")
                a = weights.detach().float().mean(1) @ a  # kappa_t = sum_j abar_tj a_j
            else:
                s = output
            self.kappa[name] = a * self.mask
            self.out[name] = s

        return hook


def _logits_and_capture(model: nn.Module, batch: Batch) -> tuple[Tensor, _Capture]:
    batch = to_device(batch, model)
    cap = _Capture(model, batch["attention_mask"])
    with cap:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits, cap


def _summed_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum over examples of each example's summed response-token NLL: per-example gradients of
    this are each example's own (examples do not interact)."""
    return token_nll(logits, labels).sum()


def sampled_labels(logits: Tensor, labels: Tensor, generator: torch.Generator | None) -> Tensor:
    """Labels drawn from the model's own next-token distribution at every response position (the
    true Fisher = Gauss-Newton in expectation); -100 kept elsewhere. `generator` None: torch's
    global RNG (kronfluence's convention)."""
    probs = torch.softmax(logits[:, :-1].detach().float(), -1)
    flat = probs.reshape(-1, probs.shape[-1]).cpu()
    draw = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:2]).to(labels.device)
    out = labels.clone()
    out[:, 1:] = torch.where(labels[:, 1:] == IGNORE_INDEX, labels[:, 1:], draw)
    return out


def sublayer_grads(model: nn.Module, batch: Batch, generator: torch.Generator | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Per sublayer, (Ds, kappa), each [B, T, d]: the loss gradient at the sublayer's output and
    its input state, per example and token. D W_hat of example b is Ds[b]^T kappa[b].
    With a `generator`, the loss is on labels sampled from the model (for the curvature)."""
    logits, cap = _logits_and_capture(model, batch)
    labels = batch["labels"].to(logits.device)
    if generator is not None:
        labels = sampled_labels(logits, labels, generator)
    names = list(cap.out)
    grads = torch.autograd.grad(_summed_nll(logits, labels), [cap.out[n] for n in names], allow_unused=True)
    return {n: ((torch.zeros_like(cap.kappa[n]) if g is None else g.detach().float()), cap.kappa[n])
            for n, g in zip(names, grads)}


def partition_generator(key: str) -> torch.Generator:
    """A label-sampling RNG seeded from a partition's name: the same draws on any actor, any run."""
    return torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))


# ----------------------------------------------------------------------------- factors


def covariance_sums(model: nn.Module, batches: Sequence[Batch], key: str) -> dict[str, Tensor]:
    """Pass 1 over a data partition: per sublayer the sums of kappa kappa^T and Ds Ds^T over its
    tokens (sampled labels), and the token count. Add partitions with `add_partials`."""
    gen = partition_generator(f"cov-{key}")
    out: dict[str, Tensor] = {}
    for b in batches:
        m = to_device(b, model)["attention_mask"].bool()
        for name, (ds, kappa) in sublayer_grads(model, b, gen).items():
            k, g = kappa[m], ds[m]
            _add(out, f"{name}.A", k.T @ k)
            _add(out, f"{name}.S", g.T @ g)
            _add(out, f"{name}.tokens", torch.tensor(float(m.sum())))
    return {k: v.cpu() for k, v in out.items()}


def _add(acc: dict[str, Tensor], key: str, value: Tensor) -> None:
    acc[key] = acc[key] + value if key in acc else value.double()


def add_partials(parts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Sum partial factor sums of disjoint data partitions (all must hold the same keys)."""
    if not parts:
        raise ValueError("no partial factors to add")
    keys = set(parts[0])
    if any(set(p) != keys for p in parts):
        raise ValueError("partial factors disagree on their sublayers")
    return {k: sum(p[k] for p in parts) for k in sorted(keys)}


@dataclass
class Factors:
    """Per sublayer: eigenbases of A and S, and (after the correction pass) Lambda [d_out, d_in]."""

    QA: dict[str, Tensor]
    QS: dict[str, Tensor]
    Lambda: dict[str, Tensor] | None = None

    @staticmethod
    def from_covariances(sums: dict[str, Tensor]) -> Factors:
        names = sorted({k.rsplit(".", 1)[0] for k in sums})
        QA, QS = {}, {}
        for n in names:
            t = sums[f"{n}.tokens"].clamp(min=1)
            QA[n] = torch.linalg.eigh(_sym(sums[f"{n}.A"] / t))[1].float()
            QS[n] = torch.linalg.eigh(_sym(sums[f"{n}.S"] / t))[1].float()
        return Factors(QA, QS)

    def with_lambda(self, sums: dict[str, Tensor]) -> Factors:
        lam = {n: (sums[f"{n}.lambda"] / sums[f"{n}.examples"].clamp(min=1)).float() for n in self.QA}
        return Factors(self.QA, self.QS, lam)

    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor (for safetensors)."""
        out = {f"{n}.QA": q for n, q in self.QA.items()} | {f"{n}.QS": q for n, q in self.QS.items()}
        if self.Lambda is not None:
            out |= {f"{n}.Lambda": v for n, v in self.Lambda.items()}
        return {k: v.contiguous() for k, v in out.items()}

    @staticmethod
    def from_tensors(t: dict[str, Tensor]) -> Factors:
        names = sorted({k.rsplit(".", 1)[0] for k in t})
        lam = {n: t[f"{n}.Lambda"] for n in names} if all(f"{n}.Lambda" in t for n in names) else None
        return Factors({n: t[f"{n}.QA"] for n in names}, {n: t[f"{n}.QS"] for n in names}, lam)


def _sym(m: Tensor) -> Tensor:
    return 0.5 * (m + m.T)


def lambda_sums(model: nn.Module, batches: Sequence[Batch], factors: Factors, key: str) -> dict[str, Tensor]:
    """Pass 2 over a data partition: per sublayer the sum over examples of (Q_S^T D W_hat_n Q_A)^2
    (sampled labels), and the example count: EK-FAC's eigenvalue correction."""
    gen = partition_generator(f"lambda-{key}")
    out: dict[str, Tensor] = {}
    for b in batches:
        for name, (ds, kappa) in sublayer_grads(model, b, gen).items():
            qa, qs = factors.QA[name].to(ds.device), factors.QS[name].to(ds.device)
            rot = torch.einsum("btd,bte->bde", ds @ qs, kappa @ qa)  # Q_S^T (Ds^T kappa) Q_A per example
            _add(out, f"{name}.lambda", (rot**2).sum(0))
            _add(out, f"{name}.examples", torch.tensor(float(ds.shape[0])))
    return {k: v.cpu() for k, v in out.items()}


# ----------------------------------------------------------------------------- scores


def pseudo_gradient(model: nn.Module, batches: Sequence[Batch]) -> dict[str, Tensor]:
    """D W_hat of the summed loss over every example in `batches` (true labels), per sublayer."""
    out: dict[str, Tensor] = {}
    for b in batches:
        for name, (ds, kappa) in sublayer_grads(model, b).items():
            _add(out, name, torch.einsum("btd,bte->de", ds, kappa))
    return {k: v.float() for k, v in out.items()}


def precondition(grad: dict[str, Tensor], factors: Factors, damping: float) -> dict[str, Tensor]:
    """(G + lambda)^-1 grad, per sublayer in the eigenbasis: Q_S [(Q_S^T V Q_A) / (Lambda + lambda)] Q_A^T."""
    if factors.Lambda is None:
        raise ValueError("factors have no eigenvalue correction yet (run the Lambda pass)")
    if not damping > 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    out = {}
    for n, g in grad.items():
        qa, qs, lam = factors.QA[n], factors.QS[n], factors.Lambda[n]
        rot = qs.T @ g @ qa
        out[n] = qs @ (rot / (lam + damping * lam.mean())) @ qa.T
    return out


def scores(model: nn.Module, batches: Sequence[Batch], preconditioned: dict[str, Tensor]) -> Tensor:
    """Influence of each example (true labels) on the queries: sum_l sum_t Ds_t . (V_l kappa_t).
    One value per example, in batch order; no per-example d x d gradient is formed."""
    out = []
    for b in batches:
        total = None
        for name, (ds, kappa) in sublayer_grads(model, b).items():
            v = preconditioned[name].to(ds.device)
            s = torch.einsum("btd,btd->b", ds, kappa @ v.T)
            total = s if total is None else total + s
        out.append(total.cpu())
    return torch.cat(out) if out else torch.zeros(0)


def fit_factors(model: nn.Module, batches: Sequence[Batch], samples: int = 1) -> Factors:
    """Both factor passes in this process, with `samples` label draws per example (small models,
    tests, benchmarks; the lancet job fans the same sums out over data partitions)."""
    with eval_mode(model):
        f = Factors.from_covariances(add_partials([covariance_sums(model, batches, key=f"s{i}") for i in range(samples)]))
        return f.with_lambda(add_partials([lambda_sums(model, batches, f, key=f"s{i}") for i in range(samples)]))


def influence(model: nn.Module, train: Sequence[Batch], queries: Sequence[Batch], factors: Factors,
              damping: float = DAMPING, contrast: Sequence[Batch] | None = None) -> Tensor:
    """I(z, Q) for every training example in `train` (in order), the queries' loss summed. With
    `contrast` (the same prompts with the wanted response), the measurement is the queries' loss
    minus the contrast's: what decides the behaviour (the unwanted answer over the wanted one),
    with the tokens both share cancelled."""
    with eval_mode(model):
        g = pseudo_gradient(model, queries)
        if contrast is not None:
            c = pseudo_gradient(model, contrast)
            g = {k: v - c[k] for k, v in g.items()}
        return scores(model, train, precondition(g, factors, damping))


def factor_sizes(model: nn.Module) -> dict[str, int]:
    """Numbers stored in curvature factors: LinFAC (2 d x d per sublayer) and EK-FAC over every
    nn.Linear inside the sublayers (in^2 + out^2 each)."""
    subs, linears = sublayers(model), [m for _, m in sublayer_linears(model)]
    d = model.config.hidden_size
    return {"linfac": len(subs) * 2 * d * d,
            "ekfac": sum(m.in_features**2 + m.out_features**2 for m in linears),
            "sublayers": len(subs), "linear_modules": len(linears)}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Dropout off for every pass (factors and scores see the same deterministic model)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
