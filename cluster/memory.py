"""GPU memory of a job's parts, estimated before anything starts (what `--dry-run` prints).

A part is one process on its GPUs: a learner worker, an actor, a task. What it holds is counted in
bytes per parameter, which is exact arithmetic (bf16 weights 2, float32 Adam moments 8, ...);
activations come from a formula for a Llama layer (below), an estimate to within tens of percent.
A part fits a card when its estimate stays under `HEADROOM` of the card's memory: the rest is for
the CUDA context, NCCL buffers, fragmentation and ZeRO-3's gathered layers.

Shapes: a hub model's `config.json` when it is on this machine (a local directory or the hub
cache), else the table below of the models the presets name (published configs), else unknown
(the plan says so instead of guessing). Knows nothing of any experiment: the jobs say what each
part holds.
"""

from __future__ import annotations

from dataclasses import dataclass

CARDS = {"H100 80 GB": 80e9, "H200 141 GB": 141e9}  # what the cluster presets are sized for
HEADROOM = 0.9


@dataclass(frozen=True)
class Shape:
    """What the memory of a Llama-style decoder depends on."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = False

    @property
    def params(self) -> int:
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h  # q, o; k, v; gate, up, down; 2 norms
        return self.layers * layer + self.vocab * h * (1 if self.tied else 2) + h

    def activation_bytes(self, tokens: int, seq: int, checkpointing: bool, eager: bool = True) -> float:
        """Bytes a training forward keeps for backward, `tokens` = batch x seq, bf16. Per layer and
        token about 2 x (10 h + 4 i) (norm inputs, q/k/v/o, gate/up/act outputs) plus, with eager
        attention, 2 x 2 x heads x seq (scores and softmax); with gradient checkpointing only each
        layer's input is kept, and one layer's full set during its recompute. The float32 logits and
        their gradient come on top."""
        layer = tokens * (2 * (10 * self.hidden + 4 * self.intermediate) + (4 * self.heads * seq if eager else 0))
        kept = self.layers * tokens * 2 * self.hidden + layer if checkpointing else self.layers * layer
        return kept + tokens * self.vocab * 8

    def kv_cache_bytes(self, tokens: int) -> float:
        """bf16 keys and values of `tokens` cached tokens (generation)."""
        return self.layers * 2 * tokens * (self.hidden // self.heads * self.kv_heads) * 2


# Published configs of the hub models the presets name (their config.json).
LLAMA3_8B = Shape(hidden=4096, layers=32, intermediate=14336, vocab=128256, heads=32, kv_heads=8)
KNOWN = {"meta-llama/Meta-Llama-3-8B": LLAMA3_8B, "meta-llama/Meta-Llama-3-8B-Instruct": LLAMA3_8B,
         "meta-llama/Llama-3.1-8B": LLAMA3_8B, "meta-llama/Llama-3.1-8B-Instruct": LLAMA3_8B}


def shape_of(name: str | None, tiny=None) -> Shape | None:
    """The shape of a hub model or local directory (`name`), or of a `cluster.models.TinyLlama`."""
    if tiny is not None:
        return Shape(tiny.hidden_size, tiny.num_hidden_layers, tiny.intermediate_size, tiny.vocab_size,
                     tiny.num_attention_heads, tiny.num_attention_heads, tied=True)
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(name, local_files_only=True)
        return Shape(c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size, c.num_attention_heads,
                     getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                     tied=bool(getattr(c, "tie_word_embeddings", False)))
    except Exception:  # noqa: BLE001 - not on this machine, or not a Llama-style config
        return KNOWN.get(name)


@dataclass(frozen=True)
class Part:
    """One process of a job and what each of its GPUs holds: `bytes_per_param` x `params` (the
    model it holds) + `activations`. `spread`: one model whose layers spread over the part's GPUs
    (device_map auto), so the same total over more or fewer GPUs is an option; a learner worker's
    share is fixed by its run's ZeRO stage and worker count instead."""

    name: str
    gpus: int
    params: int
    bytes_per_param: float
    activations: float = 0.0
    spread: bool = False

    @classmethod
    def layers_over(cls, name: str, gpus: float, params: int, bytes_per_param: float, activations: float) -> "Part":
        """A process holding `bytes_per_param` per parameter and `activations` bytes in all, its
        layers spread over `gpus` GPUs."""
        n = max(int(gpus), 1)
        return cls(name, n, params, bytes_per_param / n, activations / n, spread=True)

    @property
    def per_gpu(self) -> float:
        return self.bytes_per_param * self.params + self.activations

    def fewest_gpus(self, card: float) -> int | None:
        """A spread part: the fewest GPUs (1, 2, 4, 8) over which it fits `card` bytes each."""
        total = self.per_gpu * self.gpus
        return next((n for n in (1, 2, 4, 8) if total / n <= HEADROOM * card), None)


def learner_bytes_per_param(zero_stage: int, workers: int, offload: bool, frozen_copies: int = 0) -> float:
    """Per GPU and parameter, a mixed-precision AdamW learner worker: bf16 weights (2) and gradients
    (2), float32 master weights and moments (12); ZeRO-1/2/3 shard the optimizer / + gradients /
    + weights over the workers; offload moves the optimizer state (and at ZeRO-3 the weights) to
    CPU. A frozen copy (DPO's reference model) is 2 bytes, sharded like the weights."""
    n = max(workers, 1)
    weights = 0 if offload and zero_stage == 3 else (2 / n if zero_stage == 3 else 2)
    grads = 2 / n if zero_stage >= 2 else 2
    optim = 0 if offload else (12 / n if zero_stage >= 1 else 12)
    return weights + grads + optim + frozen_copies * (2 / n if zero_stage == 3 else 2)


def table(parts: list[Part]) -> list[str]:
    """The plan's lines: per part its GPUs, estimated GB per GPU, and for each card whether it fits
    (a spread part: on how few GPUs it would)."""
    lines = [f"memory per GPU (estimates; a part fits under {HEADROOM:.0%} of a card):",
             (f"    {'part':<26}{'params':>8}{'GPUs':>5}{'GB/GPU':>8}   " + "".join(f"{c:<30}" for c in CARDS)).rstrip()]
    for part in parts:
        cells = []
        for card in CARDS.values():
            cell = "fits" if part.per_gpu <= HEADROOM * card else "NO"
            need = part.fewest_gpus(card) if part.spread else None
            if need is not None and need != part.gpus:
                cell += f"; fits on {need} GPU{'s' if need > 1 else ''}"
            cells.append(cell)
        lines.append(f"    {part.name:<26}{part.params / 1e9:>7.2f}B{part.gpus:>5}{part.per_gpu / 1e9:>8.1f}   "
                     + "".join(f"{c:<30}" for c in cells).rstrip())
    return lines
