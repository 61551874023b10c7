"""GRADMM (Nguyen, Li et al., ICML 2025): readable synthetic text whose fine-tuning gradient matches
the real data's, found by ADMM over the text's embeddings.

A labelled example is next-token prediction: `text + suffix` -> the class's verbalizer (one
token). Its loss's gradient with respect to the output layer W (V x d) has a closed form,

    g = (softmax(W h) - e_y) h^T        (h: the final hidden state at the last position)

so a batch's mean gradient G, and its cosine to a class's target T (the real examples' mean
gradient), are cheap functions of the hidden states: <G, T> = mean_b (p_b - e_y)^T T h_b and
||G||^2 = mean_bb' <p_b - e_y, p_b' - e_y> <h_b, h_b'> (no V x d tensor per sequence). Gradients of
the matching loss with respect to the text's embeddings X then need one backward pass, not the
double backward of differentiating autograd's gradient. The output layer is treated as its own
parameter (a tied model's input embeddings are not part of it), as the authors' code does.

ADMM (per class and round, `admm`): X-update = Adam steps on f(X) + rho/2 ||X - Z + Lambda/rho||^2;
Z-update = `project(X + Lambda/rho)`: left to right, the language model's most probable next token
among the top-k tokens nearest (cosine) to each position's embedding; Lambda += rho (X - Z). The
output is the best projection seen. `project_once` optimises f alone and projects once (its X is
the continuous upper bound). DP: the target is the mean of per-example clipped gradients plus
Gaussian noise (`dp_target`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from cluster.config import Options, UserError

Progress = Callable[[int, int, float, float], None]  # (step, steps, cos(X), cos of the best projection)


# ---------------------------------------------------------------------------------------------
# the output layer's gradient and the matching loss


def head_gradient(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over the batch of d CE(W h_b, y_b) / dW (V x d): what the target is made of."""
    err = torch.softmax(hidden @ weight.T, -1) - F.one_hot(labels, weight.shape[0]).to(hidden.dtype)
    return err.T @ hidden / hidden.shape[0]


def per_example_norms(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """||g_b|| of each example's output-layer gradient: ||p_b - e_y|| ||h_b|| (a rank-one matrix)."""
    err = torch.softmax(hidden @ weight.T, -1) - F.one_hot(labels, weight.shape[0]).to(hidden.dtype)
    return err.norm(dim=-1) * hidden.norm(dim=-1)


def gradient_cosine(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """cos(G, T) for the batch's mean output-layer gradient G, without forming G."""
    err = torch.softmax(hidden @ weight.T, -1) - F.one_hot(labels, weight.shape[0]).to(hidden.dtype)
    dot = (err * (hidden @ target.T)).sum() / hidden.shape[0]
    sq = ((err @ err.T) * (hidden @ hidden.T)).sum() / hidden.shape[0] ** 2
    return dot / (sq.clamp_min(1e-30).sqrt() * target.norm())


def dp_target(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, clip: float, epsilon: float,
              delta: float, generator: torch.Generator) -> torch.Tensor:
    """The Gaussian mechanism on the mean gradient: each example's gradient clipped to norm `clip`
    (a scale of its rank-one gradient), then noise of std (clip / n) sqrt(2 ln(1.25 / delta)) / epsilon."""
    n = hidden.shape[0]
    err = torch.softmax(hidden @ weight.T, -1) - F.one_hot(labels, weight.shape[0]).to(hidden.dtype)
    scale = (clip / per_example_norms(hidden, weight, labels).clamp_min(1e-12)).clamp(max=1.0)
    mean = (err * scale[:, None]).T @ hidden / n
    sigma = dp_sigma(n, clip, epsilon, delta)
    return mean + sigma * torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)


def dp_sigma(n: int, clip: float, epsilon: float, delta: float) -> float:
    return clip / n * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


# ---------------------------------------------------------------------------------------------
# the model as the matching needs it


@dataclass
class Matcher:
    """A causal LM seen as GRADMM uses it: embeddings in, last hidden state and output layer out.

    Sequences are [BOS] + text + suffix; the label is predicted at the last position."""

    model: torch.nn.Module
    suffix_ids: list[int]
    bos_id: int | None
    allowed: torch.Tensor
    start_id: int = 0  # the projection's first context token when there is no BOS (GPT-style: <|endoftext|>)  # token ids a projection may choose (no specials, no control characters)
    embed: torch.Tensor = field(init=False)  # V x d input embeddings (frozen)
    head: torch.Tensor = field(init=False)  # V x d output layer (frozen; its gradient is matched)
    dtype: torch.dtype = field(init=False)

    def __post_init__(self):
        self.model.eval().requires_grad_(False)
        self.embed = self.model.get_input_embeddings().weight.detach()
        # the matching runs in float32 (float64 for a float64 model: the finite-difference tests)
        self.dtype = torch.float64 if self.embed.dtype == torch.float64 else torch.float32
        self.head = self.model.get_output_embeddings().weight.detach().to(self.dtype)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def _wrap(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        parts = [x]
        if self.bos_id is not None:
            parts.insert(0, self.embed[self.bos_id].expand(b, 1, -1))
        if self.suffix_ids:
            parts.append(self.embed[torch.tensor(self.suffix_ids, device=self.device)].expand(b, -1, -1))
        return torch.cat(parts, 1)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Final (normed) hidden state at the last position, for text embeddings x (B x L x d)."""
        return self.model.base_model(inputs_embeds=self._wrap(x.to(self.embed.dtype))).last_hidden_state[:, -1].to(self.dtype)

    @torch.no_grad()
    def hidden_of_ids(self, ids: list[list[int]], batch_size: int = 32) -> torch.Tensor:
        """The same for tokenized texts (any lengths; one at a time per length group)."""
        out = [None] * len(ids)
        by_len: dict[int, list[int]] = {}
        for i, seq in enumerate(ids):
            by_len.setdefault(len(seq), []).append(i)
        for idx in by_len.values():
            for j in range(0, len(idx), batch_size):
                part = idx[j: j + batch_size]
                x = self.embed[torch.tensor([ids[i] for i in part], device=self.device)]
                for i, h in zip(part, self.hidden(x)):
                    out[i] = h
        return torch.stack(out)

    def tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of token ids (a projection's Z)."""
        return self.embed[ids].to(self.dtype)

    def cosine(self, x: torch.Tensor, label: int, target: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        return gradient_cosine(h, self.head, torch.full((h.shape[0],), label, device=self.device), target)

    # -- the Z-update ----------------------------------------------------------------------

    @torch.no_grad()
    def project(self, y: torch.Tensor, top_k: int) -> torch.Tensor:
        """Token ids (B x L): left to right, at position i the LM's most probable next token (given
        BOS and the tokens chosen before i) among the `top_k` allowed tokens nearest in cosine to
        y[:, i]."""
        emb = F.normalize(self.embed[self.allowed].to(self.dtype), dim=-1)
        near = self.allowed[(F.normalize(y.to(self.dtype), dim=-1) @ emb.T).topk(top_k, dim=-1).indices]  # B x L x k
        b, length = y.shape[:2]
        chosen = torch.empty(b, length, dtype=torch.long, device=self.device)
        start = torch.full((b, 1), self.bos_id if self.bos_id is not None else self.start_id, device=self.device)
        past, step_ids = None, start
        for i in range(length):
            out = self.model(input_ids=step_ids, cache=past, use_cache=True)
            past, logits = out.cache, out.logits[:, -1]
            pick = logits.gather(1, near[:, i]).argmax(-1)
            chosen[:, i] = near[:, i].gather(1, pick[:, None])[:, 0]
            step_ids = chosen[:, i: i + 1]
        return chosen


def allowed_tokens(tokenizer, words_only: bool = True) -> torch.Tensor:
    """Ids a projection may emit: never special tokens or ones with control characters (newlines);
    `words_only` (the authors' filter): letters only, after a leading space, or one of . , ' -"""
    special = set(tokenizer.all_special_ids)
    keep = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        s = tokenizer.decode([i])
        if not s or any(not c.isprintable() for c in s):
            continue
        if words_only and not re.fullmatch(r" ?[A-Za-z]+|[.,'-]", s):
            continue
        keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# generation: initialisation, ADMM, project-once


class DPOptions(Options):
    """The differentially private arm: the Gaussian mechanism on the target gradient."""

    epsilon: float = Field(gt=0, description="privacy budget ε (the authors: 0.05)")
    delta: float = Field(1e-4, gt=0, lt=1, description="privacy δ")
    clip: float = Field(1.0, gt=0, description="per-example gradient norm bound C")


class GenOptions(Options):
    """How synthetic texts are generated, per class, in rounds of `batch` sequences."""

    per_class: int = Field(16, ge=1, description="synthetic texts per class (a multiple of batch: rounds of batch)")
    batch: int = Field(8, ge=1, description="sequences optimised jointly (one round)")
    length: int | None = Field(None, ge=1, description="tokens per text; null: the real texts' mean length")
    top_k: int = Field(5, ge=1, description="projection: candidates per position, the nearest in cosine")
    words_only: bool = Field(True, description="projection and sampling emit letters-only tokens (and . , ' -), as the authors' filter")
    outer_steps: int = Field(15, ge=1, description="ADMM iterations (the authors: 30)")
    inner_steps: int = Field(30, ge=1, description="Adam steps per X-update (the authors: 50)")
    lr: float = Field(0.01, gt=0, description="Adam learning rate of the X-update (x0.9 per outer step)")
    init_candidates: int = Field(50, ge=1, description="random-normal initialisations tried; the best is kept (the authors: 500)")
    init_size: float | None = Field(None, gt=0, description="norm of each initial position; null: the vocabulary's mean embedding norm")
    rhos: list[float] = Field([0.01, 0.1, 1.0], min_length=1, description="ADMM penalties ρ, one Tune trial each (the authors: 0.01-5)")
    dp: DPOptions | None = Field(None, description="the DP arm (one trial per ρ); null: no DP arm")
    few_shot: int = Field(3, ge=1, description="real examples per class in context: the few-shot baseline's, the filter's")
    filter: bool = Field(False, description="drop texts the student itself, shown few_shot real examples per class in "
                         "context, labels as another class (the authors' relabelling filter)")
    oversample: int = Field(1, ge=1, description="generate oversample x per_class candidates per class; the first "
                            "per_class the filter keeps are the set")
    seed: int = Field(0, description="seed of initialisation and sampling")

    @field_validator("rhos")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if bad := [r for r in v if r <= 0]:
            raise ValueError(f"rho {bad[0]:g} must be > 0 (the penalty's weight)")
        return sorted(set(v))

    @model_validator(mode="after")
    def _rounds(self):
        if self.per_class % self.batch:
            raise ValueError(f"per_class {self.per_class} is not a multiple of batch {self.batch}")
        return self

    @property
    def rounds(self) -> int:
        return self.per_class * self.oversample // self.batch


@dataclass
class Generated:
    ids: list[list[int]]  # the projected texts' tokens
    cosine: float  # cos of their (embedded) gradient to the target
    x: torch.Tensor  # the continuous solution (B x L x d)
    x_cosine: float
    history: list[dict]  # per outer step: cos(X), cos(Z), best


def initial(m: Matcher, label: int, target: torch.Tensor, opts: GenOptions, gen: torch.Generator) -> torch.Tensor:
    """Best of `init_candidates` random-normal batches (lowest matching loss), each position at
    norm `init_size`."""
    best, best_cos = None, -2.0
    d = m.embed.shape[1]
    with torch.no_grad():
        for _ in range(opts.init_candidates):
            x = torch.randn(opts.batch, opts.length, d, generator=gen).to(m.device)
            x = opts.init_size * F.normalize(x, dim=-1)
            c = float(m.cosine(x, label, target))
            if c > best_cos:
                best, best_cos = x, c
    return best


def _adam_steps(m: Matcher, x: torch.Tensor, label: int, target: torch.Tensor, opts: GenOptions, steps: int,
                penalty: Callable[[torch.Tensor], torch.Tensor] | None, lr: float) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = 1 - m.cosine(x, label, target)
        if penalty is not None:
            loss = loss + penalty(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([x], 1.0)
        opt.step()
    return x.detach()


def admm(m: Matcher, label: int, target: torch.Tensor, opts: GenOptions, rho: float, gen: torch.Generator,
         progress: Progress | None = None) -> Generated:
    """Full GRADMM for one batch of one class."""
    x = initial(m, label, target, opts, gen)
    z_ids = m.project(x, opts.top_k)
    dual = torch.zeros_like(x)
    best_ids, best_cos, history = z_ids, float(m.cosine(m.tokens(z_ids), label, target)), []
    for step in range(opts.outer_steps):
        z = m.tokens(z_ids)
        lr = opts.lr * 0.9 ** step  # the authors' StepLR (x0.9 every 50 inner steps = every outer step)
        x = _adam_steps(m, x, label, target, opts, opts.inner_steps,
                        lambda v, z=z, dual=dual: rho / 2 * (v - z + dual / rho).pow(2).sum(), lr)
        z_ids = m.project(x + dual / rho, opts.top_k)
        dual = dual + rho * (x - m.tokens(z_ids))
        with torch.no_grad():
            zc, xc = float(m.cosine(m.tokens(z_ids), label, target)), float(m.cosine(x, label, target))
        if zc > best_cos:
            best_ids, best_cos = z_ids, zc
        history.append({"step": step + 1, "x_cosine": xc, "z_cosine": zc, "best": best_cos})
        if progress:
            progress(step + 1, opts.outer_steps, xc, best_cos)
    with torch.no_grad():
        xc = float(m.cosine(x, label, target))
    return Generated(best_ids.tolist(), best_cos, x.cpu(), xc, history)


def project_once(m: Matcher, label: int, target: torch.Tensor, opts: GenOptions, gen: torch.Generator,
                 progress: Progress | None = None) -> Generated:
    """The same Adam budget on f alone (no constraint), then one projection: the ablation that
    shows what ADMM's coupling buys; its X is the continuous arm (the upper bound)."""
    x, history = initial(m, label, target, opts, gen), []
    for step in range(opts.outer_steps):
        x = _adam_steps(m, x, label, target, opts, opts.inner_steps, None, opts.lr * 0.9 ** step)
        with torch.no_grad():
            xc = float(m.cosine(x, label, target))
        history.append({"step": step + 1, "x_cosine": xc})
        if progress:
            progress(step + 1, opts.outer_steps, xc, float("nan"))
    ids = m.project(x, opts.top_k)
    with torch.no_grad():
        zc = float(m.cosine(m.tokens(ids), label, target))
    return Generated(ids.tolist(), zc, x.cpu(), history[-1]["x_cosine"] if history else float("nan"), history)


# ---------------------------------------------------------------------------------------------
# the generation baselines: the LM's own samples


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], length: int, allowed: torch.Tensor, gen: torch.Generator,
           temperature: float = 1.0) -> list[list[int]]:
    """`length` tokens sampled after each prompt, restricted to `allowed` tokens (as GRADMM's
    projection is): the zero-shot (prompt: BOS only) and few-shot (prompt: real examples) arms."""
    model.eval()
    device = model.get_input_embeddings().weight.device
    mask = torch.full((len(tokenizer),), float("-inf"), device=device)
    mask[allowed.to(device)] = 0.0
    out = []
    for p in prompts:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id  # GPT-style: <|endoftext|>
        ids = tokenizer(p, return_tensors="pt").input_ids.to(device) if p else torch.tensor([[start]], device=device)
        past, step, new = None, ids, []
        for _ in range(length):
            res = model(input_ids=step, cache=past, use_cache=True)
            past = res.cache
            logits = res.logits[0, -1, : mask.shape[0]].float() / temperature + mask
            tok = int(torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=gen))
            new.append(tok)
            step = torch.tensor([[tok]], device=device)
        out.append(new)
    return out


@torch.no_grad()
def perplexity(model, ids: list[list[int]], bos_id: int | None) -> float:
    """exp(mean NLL) of the texts' tokens under the LM (after BOS): how readable the LM finds them."""
    nll, count = 0.0, 0
    device = model.get_input_embeddings().weight.device
    for seq in ids:
        full = torch.tensor([([bos_id] if bos_id is not None else []) + list(seq)], device=device)
        logits = model(input_ids=full).logits[0, :-1].float()
        nll += float(F.cross_entropy(logits, full[0, 1:], reduction="sum"))
        count += full.shape[1] - 1
    return math.exp(nll / max(count, 1))


# ---------------------------------------------------------------------------------------------
# the task's side: verbalizers, targets, and one trial's generation, resumable per class and round


def verbalizer_ids(tokenizer, verbalizers: list[str]) -> list[int]:
    """Each verbalizer's token id; a verbalizer the tokenizer splits is bad input (the label is
    one next-token prediction)."""
    out = []
    for v in verbalizers:
        ids = tokenizer(v, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise UserError(f"task.verbalizers: {v!r} is {len(ids)} tokens for this tokenizer "
                            f"({tokenizer.convert_ids_to_tokens(ids)}); each must be one token")
        out.append(ids[0])
    return out


def text_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def matcher(model, tokenizer, suffix: str, words_only: bool = True) -> Matcher:
    """The LM as GRADMM sees it: [BOS] + text + suffix, projections over the allowed tokens."""
    first = tokenizer("a").input_ids[0]
    bos = first if first in tokenizer.all_special_ids else None
    return Matcher(model, tokenizer(suffix, add_special_tokens=False).input_ids, bos,
                   allowed_tokens(tokenizer, words_only).to(model.device),
                   start_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)


def class_gradients(m: Matcher, ids: list[list[int]], labels: list[int], verbalizers: list[int]) -> list[torch.Tensor]:
    """Per class, the mean output-layer gradient of its examples (the real target, or dev's)."""
    h = m.hidden_of_ids(ids)
    y = torch.tensor([verbalizers[c] for c in labels], device=m.device)
    lab = torch.tensor(labels, device=m.device)
    return [head_gradient(h[lab == c], m.head, y[lab == c]) for c in range(len(verbalizers))]


def set_cosine(m: Matcher, ids: list[list[int]], label_id: int, target: torch.Tensor) -> float:
    """cos to `target` of the mean gradient of a set of tokenized texts of one class."""
    h = m.hidden_of_ids(ids)
    return float(gradient_cosine(h, m.head, torch.full((h.shape[0],), label_id, device=m.device), target))


@dataclass
class Trial:
    """One generation trial: a method (gradmm | dp | once) at a penalty ρ (none for once)."""

    method: str
    rho: float | None

    @property
    def key(self) -> str:
        return self.method if self.rho is None else f"{self.method}-rho{self.rho:g}"


def unit_uri(trial_dir: str, c: int, r: int, ext: str = "json") -> str:
    """Where one class x round of a trial lives: `<trial_dir>/<class>-r<round>.json` (tokens,
    cosines, the per-step history; written last) and `.safetensors` (the continuous solution)."""
    from cluster import storage

    return storage.join(trial_dir, f"{c}-r{r}.{ext}")


def read_unit(trial_dir: str, c: int, r: int) -> dict:
    import json

    from cluster import storage

    return json.loads(storage.read_bytes(unit_uri(trial_dir, c, r)))


def read_x(trial_dir: str, c: int, r: int) -> torch.Tensor:
    from safetensors.torch import load

    from cluster import storage

    return load(storage.read_bytes(unit_uri(trial_dir, c, r, "safetensors")))["x"]


def run_trial(trial: Trial, *, model_dir: str, tokenizer_dir: str, real: list[dict], suffix: str, verbalizers: list[str],
              opts: GenOptions, out: str, device: str = "cpu", log: Callable[[str], None] = print) -> dict:
    """Every class and round of one trial, each written as it finishes (`unit_uri`): a re-run
    redoes only the units whose file is missing. `opts.init_size` null: the vocabulary's mean
    embedding norm, read here where the model is loaded. Returns {class index: [unit results]}."""
    import json

    from safetensors.torch import save

    from cluster import storage
    from cluster.models import load_model, load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    model = load_model(model_dir).to(device)
    m = matcher(model, tok, suffix, opts.words_only)
    if opts.init_size is None:
        opts = opts.model_copy(update={"init_size": round(float(m.embed.norm(dim=-1).mean()), 4)})
    verb = verbalizer_ids(tok, verbalizers)
    targets = class_gradients(m, text_ids(tok, [r["text"] for r in real]), [r["label"] for r in real], verb)
    results: dict[int, list[dict]] = {}
    for c in range(len(verbalizers)):
        target = targets[c]
        if trial.method == "dp":
            members = [r for r in real if r["label"] == c]
            h = m.hidden_of_ids(text_ids(tok, [r["text"] for r in members]))
            target = dp_target(h, m.head, torch.full((len(members),), verb[c], device=m.device),
                               clip=opts.dp.clip, epsilon=opts.dp.epsilon, delta=opts.dp.delta,
                               generator=torch.Generator().manual_seed(opts.seed * 1000 + c))
        results[c] = []
        for r in range(opts.rounds):
            if storage.exists(unit_uri(out, c, r)):
                results[c].append(read_unit(out, c, r))
                continue
            gen = torch.Generator().manual_seed(opts.seed * 100_003 + c * 101 + r)
            name = f"[{trial.key}] class {c} round {r + 1}/{opts.rounds}"
            step = lambda s, n, xc, zc, name=name: log(f"{name} step {s}/{n}: cos(X) {xc:.3f}  best projection {zc:.3f}")  # noqa: E731
            if trial.method == "once":
                g = project_once(m, verb[c], target, opts, gen, step)
            else:
                g = admm(m, verb[c], target, opts, trial.rho, gen, step)
            storage.write_bytes(unit_uri(out, c, r, "safetensors"), save({"x": g.x.contiguous()}))
            res = {"class": c, "round": r, "ids": g.ids, "cosine": g.cosine, "x_cosine": g.x_cosine,
                   "init_size": opts.init_size, "history": g.history}
            storage.write_bytes(unit_uri(out, c, r), json.dumps(res).encode())  # last: the unit is done
            results[c].append(res)
    return results
