"""benchmarks/gpu/flops.py: the FLOPs formula against a hand count, and the parameter count against
real transformers modules (built on the meta device: no memory, no weights)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.gpu import flops as F

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=160, vocab_size=100, tie_word_embeddings=False)
LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)


def _real_non_embedding(cfg: dict) -> int:
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    total = sum(p.numel() for p in model.parameters())  # shared (tied) weights counted once
    return total - model.get_input_embeddings().weight.numel()


def test_tiny_llama_by_hand():
    # d = 64, 4 heads of head_dim 16, 2 KV heads (k and v are 2 x 16 = 32 wide), MLP 160, vocab 100
    q = 64 * 64
    k = 64 * 32
    v = 64 * 32
    o = 64 * 64
    mlp = 3 * 64 * 160  # gate, up, down
    norms = 2 * 64  # input and post-attention RMSNorm
    layer = q + k + v + o + mlp + norms
    assert layer == 4096 + 2048 + 2048 + 4096 + 30720 + 128 == 43136
    final_norm = 64
    lm_head = 100 * 64  # untied output projection: counted (torchtitan); input embedding is not
    n = 2 * layer + final_norm + lm_head
    assert n == 92736
    assert F.layer_params(TINY) == layer
    assert F.non_embedding_params(TINY) == n

    seq = 32
    attention = 12 * 2 * 64 * seq  # 12 * layers * (heads * head_dim = d_model) * seq
    assert F.attention_flops_per_token(TINY, seq) == attention == 49152
    assert F.flops_per_token(TINY, seq) == 6 * n + attention == 556416 + 49152 == 605568

    # checkpointing recomputes the layers' forward: +2 x layer params, +4 * L * H * Q * T
    recompute = 2 * 2 * layer + 4 * 2 * 64 * seq
    assert F.hardware_flops_per_token(TINY, seq, activation_checkpointing=False) == 605568
    assert F.hardware_flops_per_token(TINY, seq, activation_checkpointing=True) == 605568 + recompute == 794496


def test_tied_head_is_no_parameter_but_still_a_matmul():
    tied = {**TINY, "tie_word_embeddings": True}
    assert F.non_embedding_params(tied) == 92736 - 100 * 64
    assert F.flops_per_token(tied, 32) == F.flops_per_token(TINY, 32)


@pytest.mark.parametrize("cfg", [TINY, {**TINY, "tie_word_embeddings": True},
                                 {**TINY, "attention_bias": True, "mlp_bias": True}], ids=["untied", "tied", "biases"])
def test_counts_real_modules(cfg):
    assert F.non_embedding_params(cfg) == _real_non_embedding(cfg)


def test_llama3_8b():
    n = F.non_embedding_params(LLAMA3_8B)
    layers_and_norm = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 4096
    assert layers_and_norm == 6_979_588_096  # the "6.98e9" often quoted: without lm_head
    assert n == layers_and_norm + 128256 * 4096 == 7_504_924_672  # with the untied lm_head (torchtitan)
    assert n == _real_non_embedding(LLAMA3_8B)
    assert F.flops_per_token(LLAMA3_8B, 2048) == 6 * n + 12 * 32 * 4096 * 2048 == 48_250_773_504
    assert F.flops_per_token(LlamaConfig(**LLAMA3_8B), 2048) == 48_250_773_504  # a config object too


def test_mfu_and_peak():
    assert F.mfu(10_000, 48.25e9, 989e12) == pytest.approx(0.48787, rel=1e-4)
    assert F.hfu(10_000, 2 * 48.25e9, 989e12) == pytest.approx(2 * 0.48787, rel=1e-4)
    assert F.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert F.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert F.peak_flops("NVIDIA H200") == 989e12
    assert F.peak_flops("NVIDIA GH200 480GB") == 989e12
    assert F.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert F.peak_flops("NVIDIA L40S") == 362e12
    assert F.peak_flops("NVIDIA L4") == 121e12
    assert F.peak_flops("NVIDIA H100 80GB HBM3", override_tflops=500) == 500e12
    with pytest.raises(ValueError, match="--peak-tflops"):
        F.peak_flops("Some Future GPU")
