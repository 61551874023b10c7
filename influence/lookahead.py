"""Local data influence by one-step AdamW look-ahead (Montessori-Instruct), and fast estimates.

The paper's score for a candidate z, exactly as its code computes it: restore the warm student
(weights *and* AdamW moments, lr, step count), take one AdamW step on z alone (batch of 1, loss on
response tokens), and measure how much the reference loss dropped:

    I(z) = L_ref(theta) - L_ref(theta + Delta_z)

Here that is `exact_influence`, run against a `WarmState` held in memory: restoring it is a few
tensor copies, not a checkpoint reload, and a probe leaves no trace in the model or optimizer.
The probe actors' `ExactScorer` computes the same step out of place, into a float32 scratch copy
of the weights (no restore per candidate, and an update that survives bfloat16 weights).

Reference loss (one definition, used everywhere): token-weighted mean next-token NLL over all
response tokens of the reference set, sum(nll) / count(tokens with label != -100). It does not
depend on how the set is batched.

Where this differs from the official code (`benchmarks/bench_fidelity.py` measures both):
- Gradient scale. The official probe runs on 8 GPUs and each process backpropagates
  loss / num_processes, so the applied AdamW step uses g/8. `WarmState.loss_divisor` (the
  Montessori option `probes.loss_divisor`, default 8 = the paper's setup) does the same; 1 steps
  on g. With beta1 = 0.9 the stored momentum already dominates the step; dividing g shrinks the
  candidate's share further, so more candidates share the momentum's sign.
- Reference loss. The official code averages per-batch means over batches of 8; here it is
  token-weighted (`reference_loss(..., per_batch=True)` computes theirs). The two agree when
  batches hold equal token counts.

`approx_influence` is the cheap estimate; see its docstring for the maths and the trade-off.
Pure torch: no Ray, no jobs; the probe pool (cluster.probes) runs `ExactScorer` objects.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

IGNORE_INDEX = -100
Example = Mapping[str, Any]  # input_ids, labels (-100 on prompt/padding), optional attention_mask
Batch = dict[str, Tensor]


# ----------------------------------------------------------------------------- data and losses


def collate(examples: Sequence[Example], pad_id: int = 0) -> Batch:
    """Right-pad tokenized examples into one batch; padding gets attention 0 and label -100.

    Right padding keeps every real token's position (and, under causal attention, its output)
    unchanged, so an example scores the same alone or in a padded batch.
    """
    rows = [{k: torch.as_tensor(ex[k]).long().flatten() for k in ("input_ids", "labels")} for ex in examples]
    for ex, row in zip(examples, rows):
        mask = ex.get("attention_mask")
        row["attention_mask"] = torch.ones_like(row["input_ids"]) if mask is None else torch.as_tensor(mask).long().flatten()
    width = max(len(r["input_ids"]) for r in rows)
    out = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
    }
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        for k in out:
            out[k][i, :n] = r[k]
    return out


def batched(examples: Sequence[Example], batch_size: int, pad_id: int = 0) -> list[Batch]:
    """The reference set as padded batches (built once, reused for every probe)."""
    return [collate(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


def token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token next-token NLL, shape [B, T-1], zero where the target label is -100."""
    targets = labels[:, 1:].to(logits.device)  # a model spread over GPUs returns logits on its last one
    nll = nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll * (targets != IGNORE_INDEX)


def n_tokens(batch: Batch) -> int:
    """Number of scored (response) tokens in a batch."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def to_device(batch: Batch, model: nn.Module) -> Batch:
    """The batch on the model's device (a no-op on CPU, or when it is there already)."""
    device = next(model.parameters()).device
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def candidate_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Training loss of a probe step: mean NLL over the batch's response tokens (HF semantics)."""
    batch = to_device(batch, model)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_nll(logits, batch["labels"]).sum() / max(n_tokens(batch), 1)


@torch.no_grad()
def reference_loss(model: nn.Module, ref_batches: Sequence[Batch], per_batch: bool = False) -> float:
    """Token-weighted mean response-token NLL over the whole reference set (see module doc);
    `per_batch=True`: the official code's mean of per-batch means (for comparison only)."""
    total, count, means = 0.0, 0, []
    for b in ref_batches:
        b = to_device(b, model)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        nll, n = float(token_nll(logits, b["labels"]).double().sum()), n_tokens(b)
        total += nll
        count += n
        means.append(nll / max(n, 1))
    return sum(means) / len(means) if per_batch else total / count


# ----------------------------------------------------------------------------- warm state


class WarmState:
    """A warm student and its AdamW, with an in-memory snapshot that a probe can be undone to.

    The snapshot holds clones of the parameters, every optimizer state tensor (exp_avg,
    exp_avg_sq, step) and the param-group hyperparameters; `restore` copies them back in place
    (no allocation, no deepcopy, no disk), so the optimizer keeps pointing at the same tensors.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_divisor: float = 1.0,
                 snapshot: bool = True):
        self.model, self.optimizer = model, optimizer
        self.loss_divisor = loss_divisor  # a probe steps on grad(loss / loss_divisor) (module doc)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self._params = None  # no snapshot: for `ExactScorer` alone, which never steps the state
        if snapshot:
            self.snapshot()

    def snapshot(self) -> None:
        """Make the current weights and optimizer state the ones `restore` returns to."""
        with torch.no_grad():
            self._params = [p.detach().clone() for p in self.params]
            self._state = [
                {k: v.clone() if torch.is_tensor(v) else v for k, v in self.optimizer.state[p].items()}
                if p in self.optimizer.state
                else None
                for p in self.params
            ]
            self._groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    @torch.no_grad()
    def restore(self) -> None:
        """Put weights, moments, step counts and hyperparameters back; drop gradients."""
        if self._params is None:
            raise RuntimeError("this WarmState keeps no snapshot to restore (snapshot=False)")
        for p, saved, st in zip(self.params, self._params, self._state):
            p.copy_(saved)
            p.grad = None
            if st is None:
                self.optimizer.state.pop(p, None)
                continue
            live = self.optimizer.state[p]
            for k, v in st.items():
                if torch.is_tensor(v) and torch.is_tensor(live.get(k)) and live[k].shape == v.shape:
                    live[k].copy_(v)
                else:
                    live[k] = v.clone() if torch.is_tensor(v) else v
        for g, saved in zip(self.optimizer.param_groups, self._groups):
            g.update(saved)

    def named_params(self) -> dict[str, Tensor]:
        """Optimized parameters by module name (the dict torch.func.functional_call wants)."""
        ids = {id(p) for p in self.params}
        return {n: p for n, p in self.model.named_parameters() if id(p) in ids}


def save_warm(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write a warm student (save_pretrained) and its AdamW state (torch.save) to a folder."""
    path = Path(path)
    model.save_pretrained(path)
    torch.save(optimizer.state_dict(), path / "optimizer.pt")


def load_warm(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
              attn_implementation: str = "eager", loss_divisor: float = 1.0, snapshot: bool = True) -> WarmState:
    """Load what `save_warm` wrote, onto `device` ("auto": the layers spread over every visible
    GPU, for a student larger than one). The AdamW is rebuilt once the weights are in place and
    then loaded (its state follows each parameter's device), so lr/betas/eps/wd and the step
    count come from the warm-up (the paper's code relies on the same; a fresh AdamW alone would
    silently step at the default lr 1e-3). Weights are read from safetensors, the optimizer state
    with weights_only=True. `snapshot=False` for a probe actor's `ExactScorer`: no in-memory copy
    of weights and moments to restore (at 8B, ~48 GB less per actor)."""
    from cluster.models import load_model

    model = load_model(path, dtype=dtype, attn_implementation=attn_implementation, device=device)
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.load_state_dict(torch.load(Path(path) / "optimizer.pt", weights_only=True, map_location="cpu"))
    return WarmState(model, optimizer, loss_divisor, snapshot)


# ----------------------------------------------------------------------------- exact influence


def candidate_gradient(state: WarmState, candidate: Example | Batch) -> None:
    """The gradient of one candidate's loss / `loss_divisor` (batch of 1, response tokens) at the
    state's current weights, left in `.grad`: what a probe step steps on."""
    batch = candidate if torch.is_tensor(candidate["input_ids"]) and candidate["input_ids"].dim() == 2 else collate([candidate])
    state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    (candidate_loss(state.model, batch) / state.loss_divisor).backward()


def per_candidate_gradients(state: WarmState):
    """f(params, input_ids [B, T], labels [B, T]) -> {name: [B, *shape]}: each candidate's gradient
    of its own loss / `loss_divisor` (response-token mean, batch of 1), all at once (torch.func
    vmap over grad). Right padding + causal attention: pads come after every real token, so no
    attention mask is needed (none has to cross vmap); the labels already ignore them."""
    model, buffers = state.model, dict(state.model.named_buffers())

    def one_loss(p: dict[str, Tensor], ids: Tensor, labels: Tensor) -> Tensor:
        logits = functional_call(model, (p, buffers), (ids[None],)).logits
        return token_nll(logits, labels[None]).sum() / (labels[1:] != IGNORE_INDEX).sum().clamp(min=1) / state.loss_divisor

    return vmap(grad(one_loss), in_dims=(None, 0, 0))


def probe_step(state: WarmState, candidate: Example | Batch) -> None:
    """One AdamW step on one candidate (batch of 1, response-token loss) from the current state."""
    candidate_gradient(state, candidate)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)


def exact_influence(state: WarmState, candidate: Example | Batch, ref_batches: Sequence[Batch], L0: float,
                    per_batch: bool = False) -> float:
    """I(z) = L0 - L_ref(after one AdamW step on z); the warm state is restored before and after.
    `per_batch`: the official reference loss (see `reference_loss`), for comparison only."""
    state.restore()
    try:
        probe_step(state, candidate)
        state.model.eval()
        return L0 - reference_loss(state.model, ref_batches, per_batch)
    finally:
        state.restore()


class ExactScorer:
    """What a probe actor holds: a warm state, one float32 scratch copy of its weights, the
    reference batches and L0, computed once.

    A probe never touches the warm state: the candidate's gradient is taken at the warm weights,
    and theta' = theta - lr * u(g; m, v, t) (`_adam_direction`: torch's AdamW step, written out)
    goes straight into the scratch copy, where the reference loss is measured. The moments after
    the step are never needed, so nothing is snapshotted or restored per candidate
    (`exact_influence` does the step in place and undoes it: the reference this is tested against).

    The scratch copy is float32 whatever the warm weights are: at 8B learning rates (1e-6 to 5e-6)
    one AdamW step changes a few percent of bfloat16 weights at all and the rest rounds away, so
    a pure-bf16 look-ahead measures rounding, not the update (tests/test_lookahead.py). The first
    score prints that share for the warm weights' dtype (`update_survival`).

    `at_once` > 1 scores that many candidates together (`_score_at_once`, torch.func): the same
    step and loss, batched on a leading dimension, with `at_once` float32 copies of the weights, so
    for students small enough that one candidate leaves the hardware idle.

    `score(batch)` follows the `cluster.probes.Scorer` protocol (list of example dicts in, one
    float per example out) without importing it: this module knows nothing about Ray.
    """

    def __init__(self, state: WarmState, ref_batches: Sequence[Batch], at_once: int = 1):
        self.state, self.ref_batches = state, [to_device(b, state.model) for b in ref_batches]
        self.at_once = at_once
        self.scratch = copy.deepcopy(state.model).float().eval()
        by_id = {id(p): (p, g) for g in state.optimizer.param_groups for p in g["params"]}
        base = dict(state.model.named_parameters())
        self.pairs = [(by_id[id(base[n])], q) for n, q in self.scratch.named_parameters() if id(base[n]) in by_id]
        self.L0 = reference_loss(self.scratch, self.ref_batches)
        self.reported = False

    @torch.no_grad()
    def _look_ahead(self) -> None:
        """theta' into the scratch copy, from the gradients on the warm weights (AdamW skips a
        parameter without a gradient: it stays theta)."""
        for (p, group), q in self.pairs:
            w = p.detach().float()
            if p.grad is None:
                q.copy_(w)
                continue
            q.copy_(w - group["lr"] * _adam_direction(p.grad.float(), w, self.state.optimizer.state.get(p, {}), group))

    def _report(self, pairs) -> None:
        """Once per scorer: how much of a look-ahead step the warm weights' dtype would keep."""
        if not self.reported:
            self.reported = True
            dtype = next(self.state.model.parameters()).dtype
            print(f"[probe] one AdamW step at lr {self.state.optimizer.param_groups[0]['lr']:.3g} changes "
                  f"{update_survival(pairs, dtype):.1%} of the {dtype} weights; scored in float32", flush=True)

    def influence(self, candidate: Example | Batch) -> float:
        candidate_gradient(self.state, candidate)
        self._look_ahead()
        self._report(self.pairs)
        self.state.optimizer.zero_grad(set_to_none=True)
        return self.L0 - reference_loss(self.scratch, self.ref_batches)

    @torch.no_grad()
    def _score_at_once(self, candidates: Sequence[Example]) -> list[float]:
        """`influence` for several candidates together: their gradients at the warm weights by
        vmap(grad) (`per_candidate_gradients`), theta'_i = theta - lr u(g_i) for all i at once
        (`_adam_direction` broadcasts over the leading dimension), and the reference loss under
        every theta'_i by one vmapped forward per reference batch over the float32 scratch module.
        AdamW steps every parameter of a Llama (each one has a gradient), as here."""
        st = self.state
        b = to_device(collate(candidates), st.model)
        params = st.named_params()
        with torch.enable_grad():
            grads = per_candidate_gradients(st)({n: p.detach() for n, p in params.items()}, b["input_ids"], b["labels"])
        by_id = {id(p): g for g in st.optimizer.param_groups for p in g["params"]}
        ahead = {}
        for n, p in params.items():
            w, group = p.detach().float(), by_id[id(p)]
            ahead[n] = w - group["lr"] * _adam_direction(grads.pop(n).float(), w, st.optimizer.state.get(p, {}), group)
        self._report([((params[n], None), q[0]) for n, q in ahead.items()])
        buffers = dict(self.scratch.named_buffers())

        def ref_nll(params: dict[str, Tensor], ids: Tensor, labels: Tensor) -> Tensor:
            logits = functional_call(self.scratch, (params, buffers), (ids,)).logits  # right padding: no mask
            return token_nll(logits, labels).double().sum()

        total = sum(vmap(ref_nll, in_dims=(0, None, None))(ahead, r["input_ids"], r["labels"]) for r in self.ref_batches)
        count = sum(n_tokens(r) for r in self.ref_batches)
        return (self.L0 - total.cpu() / count).tolist()

    def score(self, batch: Sequence[Example]) -> list[float]:
        if self.at_once == 1:
            return [self.influence(ex) for ex in batch]
        return [x for i in range(0, len(batch), self.at_once) for x in self._score_at_once(batch[i : i + self.at_once])]


@torch.no_grad()
def update_survival(pairs, dtype: torch.dtype) -> float:
    """Share of weight elements whose look-ahead value theta' (in the scratch copies of `pairs`)
    differs from theta once both are rounded to `dtype`: what a look-ahead in that dtype keeps of
    the update."""
    changed = total = 0
    for (p, _), q in pairs:
        changed += int((q.to(dtype) != p.detach().to(dtype)).sum())
        total += p.numel()
    return changed / max(total, 1)


# ----------------------------------------------------------------------------- fast estimate


def _moments(p: Tensor, st: Mapping[str, Any]) -> tuple[Tensor, Tensor, float]:
    """AdamW's (exp_avg, exp_avg_sq, step) for parameter p; zeros before its first step."""
    if st:
        return st["exp_avg"], st["exp_avg_sq"], float(st["step"])
    zero = torch.zeros_like(p)
    return zero, zero, 0.0


def _adam_direction(
    g: Tensor, p: Tensor, st: Mapping[str, Any], group: Mapping[str, Any], g2: Tensor | None = None
) -> Tensor:
    """u with theta_after = theta - lr * u for torch's AdamW (single-tensor path), given gradient g.

    m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g2 (g2 = g^2 unless given), t' = t+1,
    u  = wd * theta + (m'/(1-b1^t')) / (sqrt(v')/sqrt(1-b2^t') + eps).
    Elementwise, so g may carry extra leading (per-candidate) dimensions. Nonlinear in g through
    v'; linear in g when g2 is held fixed.
    """
    if group.get("amsgrad") or group.get("maximize") or (group["weight_decay"] and not group.get("decoupled_weight_decay")):
        raise NotImplementedError("the written-out AdamW step supports plain AdamW (no amsgrad, maximize or L2 weight decay)")
    b1, b2 = group["betas"]
    m, v, t = _moments(p, st)
    m2 = b1 * m + (1 - b1) * g
    v2 = b2 * v + (1 - b2) * (g * g if g2 is None else g2)
    bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
    return group["weight_decay"] * p + (m2 / bc1) / (v2.sqrt() / math.sqrt(bc2) + group["eps"])


def _adam_dots(g: Tensor, p: Tensor, st: Mapping[str, Any], group: Mapping[str, Any], w: Tensor) -> Tensor:
    """<w, u(g_i) - wd*theta> for every row g_i of g ([B, *p.shape]): `_adam_direction`'s
    arithmetic rearranged to run in place on g (consumed), one temporary, one matvec.

    (b1 m + (1-b1) g) / (sqrt((b2 v + (1-b2) g^2) / bc2) + eps)
      = (1-b1) (g + b1 m/(1-b1)) / (sqrt((1-b2)/bc2) sqrt(g^2 + b2 v/(1-b2)) + eps)
    """
    b1, b2 = group["betas"]
    m, v, t = _moments(p, st)
    bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
    d = g.square()
    d.add_(v, alpha=b2 / (1 - b2)).sqrt_().mul_(math.sqrt((1 - b2) / bc2)).add_(group["eps"])
    g.add_(m, alpha=b1 / (1 - b1)).div_(d)
    return g.flatten(1) @ (w.flatten() * ((1 - b1) / bc1))


def _item_losses(model: nn.Module, b: Batch, output_grads: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-candidate mean response-token loss for a padded batch (no grad), and with
    `output_grads` each candidate's gradient of that loss with respect to the output layer's weight
    ([B, vocab, hidden]), which needs no backward: sum_t (softmax(z_t) - onehot(y_t)) h_t^T / n."""
    b = to_device(b, model)
    h = model.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    logits = model.get_output_embeddings()(h)
    n = (b["labels"][:, 1:] != IGNORE_INDEX).sum(1).clamp(min=1)
    losses = token_nll(logits, b["labels"]).sum(1) / n
    if not output_grads:
        return losses, None
    targets = b["labels"][:, 1:]
    delta = torch.softmax(logits[:, :-1].float(), -1)
    keep = targets != IGNORE_INDEX
    delta.scatter_add_(-1, targets.clamp(min=0)[..., None], -keep[..., None].to(delta.dtype))
    delta *= (keep / n[:, None])[..., None]
    return losses, torch.einsum("btv,bth->bvh", delta, h[:, :-1].float())


def approx_influence(
    state: WarmState,
    candidates: Sequence[Example],
    ref_batches: Sequence[Batch],
    L0: float | None = None,
    *,
    method: str = "adam",
    around: str = "momentum",
    chunk_size: int = 16,
    calibrate: int = 16,
) -> Tensor:
    """Fast estimate of `exact_influence` for many candidates at once; float64, input order.

    A probe step is theta -> theta - lr*u(g_z), u the AdamW direction (`_adam_direction`). With
    beta1=0.9 the stored momentum supplies most of that step, the same for every candidate; only
    the (1-beta1) g_z share and the g_z^2 term in v' differ. So by default (around="momentum") we
    expand around the candidate-free step theta_bar = theta - lr*u(0):

        I(z) ~= [L0 - L(theta_bar)] + lr * <grad L(theta_bar), u(g_z) - u(0)>

    The bracket and grad L(theta_bar) are computed once, exactly (one reference forward +
    backward); the error is second order in the candidate-specific part of the step only.
    around="warm" is the plain first-order lr * <grad L(theta), u(g_z)>, whose error is second
    order in the whole step, momentum included (kept for comparison).

    method="adam": per-candidate gradients with torch.func (vmap(grad)), then the exact,
      nonlinear AdamW direction per candidate (`_adam_dots`, in place). Cost ~ one
      forward+backward per candidate plus a few elementwise passes over the parameters.
    method="linear": freezes v' at b2 v + (1-b2) s, with s the mean g_z^2 over `calibrate`
      candidates (s keeps the denominator finite where the warm-up never touched a weight,
      v = 0). Then u is linear in g_z, u(g) = u_s(0) + c*g, and <w, g_z> with w = lr c grad L is
      the directional derivative of the candidate's own loss along w: a central difference
      (l_z(theta + w) - l_z(theta - w)) / 2 over a batch of candidates, two plain forwards, no
      per-sample gradients. Cheaper; loses the g_z^2 term of v' that "adam" keeps exactly. (The
      difference is of float32 losses: fine while lr-sized steps move losses by >> 1e-7.)
    method="hybrid": "linear", plus the exact nonlinear term of the output layer, where the
      frozen v' errs most (its rows for tokens the warm-up rarely predicted have v ~ 0, so the
      candidate's own g^2 sets their step): lr <grad L, u(G_z) - u_s(0) - c G_z> with the output
      layer's per-candidate gradient G_z read off the forward at theta + w (softmax minus target,
      times the last hidden states: no backward; reading it at theta + w instead of theta is an
      O(|w|) error, far below the approximation's). With tied embeddings G_z is the output side's
      share of that gradient only. Costs ~15% over "linear"; ranks like "adam" where the output
      layer carries the nonlinearity (benchmarks/RESULTS.md).
    """
    if method not in ("adam", "linear", "hybrid") or around not in ("momentum", "warm"):
        raise ValueError(f"method must be adam|linear|hybrid and around momentum|warm, got {method!r}, {around!r}")
    state.restore()
    model, opt = state.model, state.optimizer
    model.eval()
    params = state.named_params()
    groups = {n: next(g for g in opt.param_groups if any(q is p for q in g["params"])) for n, p in params.items()}
    sts = {n: opt.state.get(p, {}) for n, p in params.items()}
    lrs = {n: float(groups[n]["lr"]) for n in params}
    theta = {n: p.detach() for n, p in params.items()}
    u0 = {n: _adam_direction(torch.zeros_like(p), p, sts[n], groups[n]) for n, p in theta.items()}
    if L0 is None:
        L0 = reference_loss(model, ref_batches)

    # Reference gradient (and loss) at the expansion point, once.
    try:
        if around == "momentum":
            with torch.no_grad():
                for n, p in params.items():
                    p.sub_(lrs[n] * u0[n])
        model.zero_grad(set_to_none=True)
        count = sum(n_tokens(b) for b in ref_batches)
        base = 0.0
        for b in ref_batches:
            b = to_device(b, model)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss = token_nll(logits, b["labels"]).sum() / count
            loss.backward()
            base += float(loss.detach().double())
        g_ref = {n: p.grad.detach().clone() for n, p in params.items()}
    finally:
        state.restore()
    const = L0 - base if around == "momentum" else 0.0
    shift = u0 if around == "momentum" else {n: torch.zeros_like(p) for n, p in theta.items()}

    per_sample = per_candidate_gradients(state)
    order = sorted(range(len(candidates)), key=lambda i: len(candidates[i]["input_ids"]))  # less padding
    out = torch.empty(len(candidates), dtype=torch.float64)

    if method == "adam":
        # the candidate-independent parts of lr <g_ref, u(g_z) - shift>: weight decay and shift
        offset = sum(
            lrs[n] * float((g_ref[n] * (groups[n]["weight_decay"] * p - shift[n])).double().sum()) for n, p in theta.items()
        )
        for s in range(0, len(order), chunk_size):
            idx = order[s : s + chunk_size]
            b = to_device(collate([candidates[i] for i in idx]), model)
            with torch.no_grad():
                gs = per_sample(theta, b["input_ids"], b["labels"])
                score = torch.zeros(len(idx), dtype=torch.float64, device=b["input_ids"].device)
                for n, p in theta.items():
                    score += lrs[n] * _adam_dots(gs.pop(n), p, sts[n], groups[n], g_ref[n]).double()
            out[idx] = const + offset + score.cpu()
        return out

    # method == "linear" or "hybrid"
    s2 = {n: torch.zeros_like(p) for n, p in theta.items()}
    if calibrate:
        b = to_device(collate([candidates[i] for i in order[:: max(1, len(order) // calibrate)][:calibrate]]), model)
        with torch.no_grad():
            s2 = {n: (g**2).mean(0) for n, g in per_sample(theta, b["input_ids"], b["labels"]).items()}
    w, lin_const, lin = {}, 0.0, {}
    for n, p in theta.items():
        us0 = _adam_direction(torch.zeros_like(p), p, sts[n], groups[n], s2[n])
        c = _adam_direction(torch.ones_like(p), p, sts[n], groups[n], s2[n]) - us0
        w[n] = lrs[n] * c * g_ref[n]
        lin_const += lrs[n] * float((g_ref[n] * (us0 - shift[n])).double().sum())
        lin[n] = (us0, c)
    hybrid = method == "hybrid"
    if hybrid:  # the output layer's parameter name and its linear part <g_ref, u_s(0)> (the c G part is per candidate)
        out_w = model.get_output_embeddings().weight
        o = next(n for n, p in params.items() if p is out_w)
        us0_o, c_o = lin[o]
        base_o = float((g_ref[o] * us0_o).double().sum()) - float((g_ref[o] * groups[o]["weight_decay"] * theta[o]).double().sum())
        cg_o = (c_o * g_ref[o]).flatten()
    # Every chunk's forward at theta + w, then every chunk's at theta - w: the weights move (to
    # theta + w, to theta - w, restored) once per call, not once per chunk (the same weights, so the
    # same scores as chunk by chunk).
    chunks = [order[s : s + chunk_size] for s in range(0, len(order), chunk_size)]
    batches = [collate([candidates[i] for i in idx]) for idx in chunks]
    ups, output_terms = [], []
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.add_(w[n])
            for b in batches:
                up, g_up = _item_losses(model, b, hybrid)
                ups.append(up)
                if hybrid:  # lr <g_ref, u(G) - u_s(0) - c G> for the output layer, exactly
                    G = g_up / state.loss_divisor
                    lin_part = (G.flatten(1) @ cg_o).double()  # a float32 matvec, as in _adam_dots
                    exact = _adam_dots(G, theta[o], sts[o], groups[o], g_ref[o]).double()
                    output_terms.append(lrs[o] * (exact - base_o - lin_part).cpu())
            for n, p in params.items():
                p.sub_(2 * w[n])
            for k, (idx, b) in enumerate(zip(chunks, batches)):
                down, _ = _item_losses(model, b)
                score = lin_const + (ups[k] - down).double().cpu() / (2 * state.loss_divisor)
                if hybrid:
                    score += output_terms[k]
                out[idx] = const + score
    finally:
        state.restore()
    return out


# ----------------------------------------------------------------------------- statistics


def _ranks(x: Tensor) -> Tensor:
    """Ranks 0..n-1, ties given their average rank."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    ranks = torch.empty_like(x)
    ranks[torch.argsort(x)] = torch.arange(len(x), dtype=torch.float64)
    _, tie, counts = torch.unique(x, return_inverse=True, return_counts=True)
    return torch.zeros(len(counts), dtype=torch.float64).index_add_(0, tie, ranks)[tie] / counts[tie]


def spearman(a: Sequence[float] | Tensor, b: Sequence[float] | Tensor) -> float:
    """Spearman rank correlation (Pearson on average ranks); no scipy needed."""
    ra, rb = _ranks(torch.as_tensor(a)), _ranks(torch.as_tensor(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))

