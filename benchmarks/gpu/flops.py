"""Model FLOPs per token, MFU and HFU for Llama-style decoders (pure arithmetic; no GPU needed).

Convention: PaLM's (Chowdhery et al. 2022, appendix B), as torchtitan's `get_num_flop_per_token`:

    model FLOPs per token = 6 * N + 12 * L * H * Q * T

- N, *non-embedding parameters*: every parameter but the input embedding. The q, k, v, o
  projections (with grouped-query attention k and v are `num_key_value_heads * head_dim` wide),
  the three MLP matrices (gate, up, down), the RMSNorm weights (two per layer and the final one;
  they are not matmuls, but the convention counts every non-embedding parameter, and they are
  ~1e-6 of N) and biases where the config has them. **The untied output projection (`lm_head`)
  counts**, as in torchtitan, which subtracts only `nn.Embedding` parameters: the embedding is a
  lookup, the output projection a matmul done for every token. With tied embeddings `lm_head` is
  the embedding matrix: `non_embedding_params` then does not count it (it is no separate
  parameter), but `flops_per_token` still adds its matmul (vocab x d_model).
- 6N: forward 2N (a multiply and an add per weight per token), backward 4N (gradients with respect
  to the inputs and to the weights).
- 12 L H Q T: attention's two matmuls (Q K^T and the weighted sum of V), each 2 * H * Q * T FLOPs
  per token per layer in the forward (4 L H Q T), x3 with the backward. H * Q (heads x head_dim)
  equals d_model in Llama, hence the usual "12 * layers * d_model * seq". T is the full sequence
  length: causal masking would halve this term, the convention (PaLM, torchtitan) does not.
- Element-wise work (norms, SiLU, RoPE, softmax, the loss) is not counted.

MFU (model FLOPs utilisation) = tokens/s x model FLOPs per token / the GPU's peak dense FLOP/s.

HFU (hardware FLOPs utilisation) counts what the GPU actually computes, including the forward that
activation checkpointing recomputes in the backward. transformers' gradient checkpointing wraps
each decoder layer, so the recompute is the layers' forward: per token, +2 x the layers'
parameters (their matmuls count 8x instead of 6x) and +4 L H Q T (attention 16 instead of 12).
The output projection and the final norm sit outside the checkpointed layers and stay at 6x (the
blunter "8N" rule would count a recomputed lm_head that never happens: ~2-3% more on Llama-3-8B).
Without checkpointing hardware FLOPs equal model FLOPs and HFU == MFU.

Llama-3-8B (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 128256, untied):
N = 6,979,588,096 in the layers and final norm + 525,336,576 lm_head = 7,504,924,672, and at
T = 2048, 6N + 12 L H Q T = 48.25e9 FLOPs per token.
"""

from __future__ import annotations

from typing import Any

# Peak dense (no 2:4 sparsity) bf16 tensor-core FLOP/s by datasheet, keyed by a substring of
# torch.cuda.get_device_name(); the first match wins, so longer names come before their prefixes
# ("H200 NVL" before "H200", "L40S" before "L40" before "L4", "GH200" before "H200").
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM: "NVIDIA H200"
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("B200", 2250e12),
    ("A100", 312e12),  # SXM4 and PCIe: "NVIDIA A100-SXM4-80GB"
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("MI300X", 1307e12),
]


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    value = cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)
    return default if value is None else value


def _shape(cfg: Any) -> tuple[int, int, int, int, int, int, int]:
    """(d_model, layers, heads, kv heads, head_dim, mlp width, vocab) of a LlamaConfig or a dict."""
    d = int(_get(cfg, "hidden_size"))
    heads = int(_get(cfg, "num_attention_heads"))
    kv = int(_get(cfg, "num_key_value_heads", heads))
    head_dim = int(_get(cfg, "head_dim", d // heads))
    return (d, int(_get(cfg, "num_hidden_layers")), heads, kv, head_dim, int(_get(cfg, "intermediate_size")),
            int(_get(cfg, "vocab_size")))


def layer_params(cfg: Any) -> int:
    """Parameters of one decoder layer: attention, MLP, its two RMSNorms (and biases if any)."""
    d, _, heads, kv, hd, ffn, _ = _shape(cfg)
    attn = d * heads * hd + 2 * d * kv * hd + heads * hd * d  # q; k and v (GQA); o
    if _get(cfg, "attention_bias", False):
        attn += heads * hd + 2 * kv * hd + d
    mlp = 3 * d * ffn  # gate, up, down
    if _get(cfg, "mlp_bias", False):
        mlp += 2 * ffn + d
    return attn + mlp + 2 * d  # input and post-attention RMSNorm


def non_embedding_params(cfg: Any) -> int:
    """Every parameter but the input embedding: the layers, the final norm and, when untied, lm_head."""
    d, layers, _, _, _, _, vocab = _shape(cfg)
    head = 0 if _get(cfg, "tie_word_embeddings", False) else vocab * d
    return layers * layer_params(cfg) + d + head


def _matmul_params(cfg: Any) -> int:
    """N for the FLOPs: the output projection is a matmul per token, tied or not."""
    d, *_, vocab = _shape(cfg)
    return non_embedding_params(cfg) + (vocab * d if _get(cfg, "tie_word_embeddings", False) else 0)


def attention_flops_per_token(cfg: Any, seq: int) -> int:
    """12 * L * H * Q * T: attention's score and value matmuls, forward and backward."""
    _, layers, heads, _, hd, _, _ = _shape(cfg)
    return 12 * layers * heads * hd * seq


def flops_per_token(cfg: Any, seq: int) -> int:
    """Model FLOPs per trained token: 6 * N + 12 * L * H * Q * T (see the module docstring)."""
    return 6 * _matmul_params(cfg) + attention_flops_per_token(cfg, seq)


def hardware_flops_per_token(cfg: Any, seq: int, activation_checkpointing: bool) -> int:
    """FLOPs the GPU computes per token: model FLOPs plus, under activation checkpointing, the
    decoder layers' recomputed forward (2 x layer parameters + 4 L H Q T per token)."""
    flops = flops_per_token(cfg, seq)
    if activation_checkpointing:
        layers = int(_get(cfg, "num_hidden_layers"))
        flops += 2 * layers * layer_params(cfg) + attention_flops_per_token(cfg, seq) // 3
    return flops


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (a fraction, not percent)."""
    return tokens_per_s * flops_per_token / peak_flops


def hfu(tokens_per_s: float, hardware_flops_per_token: float, peak_flops: float) -> float:
    """Hardware FLOPs utilisation: `mfu` with `hardware_flops_per_token` (recompute counted)."""
    return mfu(tokens_per_s, hardware_flops_per_token, peak_flops)


def peak_flops(device_name: str | None = None, override_tflops: float | None = None) -> float:
    """Peak dense bf16 FLOP/s: `override_tflops` x 1e12 if given, else looked up in
    PEAK_BF16_FLOPS by `device_name` (default: torch.cuda.get_device_name()). ValueError if unknown."""
    if override_tflops is not None:
        if override_tflops <= 0:
            raise ValueError(f"peak TFLOP/s must be positive, got {override_tflops}")
        return override_tflops * 1e12
    if device_name is None:
        import torch

        device_name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return value
    raise ValueError(f"no peak bf16 FLOP/s known for {device_name!r}: pass it (--peak-tflops)")
