"""Model and tokenizer specs: a hub name (cluster presets) or a tiny Llama built from a config.

The tiny path needs no network: a byte-level BPE is trained on the texts the job supplies (the
synthetic world's), wrapped as a `PreTrainedTokenizerFast`, and a `LlamaConfig` model is built with
random init. Both are saved with `save_pretrained` (safetensors) so every later stage, on any Ray
worker, loads the same files with `from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import Field, model_validator

from cluster.config import Options, UserError

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


class TinyLlama(Options):
    """A small Llama built from a config with random init (CPU presets and tests)."""

    hidden_size: int = Field(128, gt=0, description="model width")
    num_hidden_layers: int = Field(4, gt=0, description="transformer blocks")
    num_attention_heads: int = Field(4, gt=0, description="attention heads")
    intermediate_size: int = Field(512, gt=0, description="MLP width")
    max_position_embeddings: int = Field(256, gt=0, description="longest sequence, in tokens")
    vocab_size: int = Field(1024, ge=300, description="size of the BPE trained offline on the job's texts")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return self


class ModelSpec(Options):
    """Either `name` (a hub id or local path) or `tiny` (built here)."""

    name: str | None = Field(None, description="hub model id or local directory (null: build `tiny`)")
    tiny: TinyLlama | None = Field(None, description="tiny Llama config; used when name is null")
    trust_remote_code: bool = Field(False, description="allow model code from the hub (off unless needed)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name is None) == (self.tiny is None):
            raise ValueError("give exactly one of name (hub/local model) or tiny (built from a config)")
        return self


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, max_length: int = 256):
    """Train a byte-level BPE on `texts` and save it as a HF fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **SPECIAL_TOKENS)
    hf.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    hf.save_pretrained(str(out_dir))
    return hf


def build_tiny_model(tiny: TinyLlama, tokenizer, seed: int, out_dir: str | Path):
    """Random-init Llama sized by `tiny`, matched to `tokenizer`, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_attention_heads,
        intermediate_size=tiny.intermediate_size,
        max_position_embeddings=tiny.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, *, dtype=None, trust_remote_code: bool = False, attn_implementation=None,
               device: str | None = None):
    """Load causal-LM weights (safetensors only; no pickled checkpoints).

    `dtype`: a torch dtype or its name ("bfloat16"); `device`: where the weights go, "auto"
    spreads the layers over every visible GPU (a model larger than one GPU, in one process)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"use_safetensors": True, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device == "auto":
        kwargs["device_map"] = "auto"
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model if device in (None, "auto") else model.to(device)


PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_weights(model_dir: str | Path) -> None:
    """A local model directory must hold safetensors weights. Pickled ones (`pytorch_model.bin`)
    are refused at the door, never loaded: unpickling a file can run any code it names. A hub id
    (not a directory here) is left to `load_model`, which asks the hub for safetensors only."""
    d = Path(model_dir)
    if not d.is_dir() or any(d.glob("*.safetensors")) or (d / "model.safetensors.index.json").is_file():
        return
    pickled = sorted(p.name for pattern in PICKLED for p in d.glob(pattern))
    if pickled:
        raise UserError(f"{d}: weights only as pickles ({', '.join(pickled[:3])}); this project loads safetensors only "
                        "(a pickle can run code when loaded): convert them once where you trust the file "
                        "(from_pretrained(..., use_safetensors=False).save_pretrained(dir)) and point at the result")


def check_pair(model_dir: str | Path, tokenizer) -> None:
    """Model and tokenizer must agree on the vocabulary: a mismatch is bad input, not a crash."""
    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.is_file():
        return
    vocab = json.loads(cfg_file.read_text()).get("vocab_size")
    if vocab is not None and len(tokenizer) > vocab:
        raise UserError(
            f"{model_dir}: model vocabulary ({vocab}) is smaller than the tokenizer's ({len(tokenizer)})"
        )


def base_model(run, spec: ModelSpec, *, tokenizer: str | None, texts, seed: int,
               check_tokenizer: Callable[[Any], None] | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) a job starts from, as `cluster.stages.Artifact`s: a named model as it is (hub id or local directory,
    checked against its tokenizer when both are local), or for a tiny spec two stages of `run`:
    `tokenizer` (a BPE trained on `texts`' `tokenizer_text` table) and `base_init` (random init).

    `texts` is the upstream stage holding the text; `check_tokenizer` may veto the trained
    tokenizer (a UserError) before the stage is committed."""
    import tempfile

    from cluster import storage
    from cluster.stages import Artifact

    if spec.tiny is None:
        tok = tokenizer or spec.name
        check_weights(spec.name)
        if Path(spec.name).is_dir() and Path(tok).is_dir():  # local: check they agree now
            check_pair(spec.name, load_tokenizer(tok, spec.trust_remote_code))
        return Artifact(spec.name), Artifact(tok)
    tiny = spec.tiny

    def build_tokenizer(st) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            tok = train_tokenizer([r["text"] for r in texts.rows("tokenizer_text")], tiny.vocab_size, tmp,
                                  tiny.max_position_embeddings)
            if check_tokenizer is not None:
                check_tokenizer(tok)
            storage.upload(tmp, st.uri)

    tok_stage = run.stage("tokenizer", shared=True, texts=texts, tiny=tiny)
    tok_stage.ensure(build_tokenizer)
    tok = load_tokenizer(tok_stage.local())

    def build_init(st) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            model = build_tiny_model(tiny, tok, seed, tmp)
            print(f"[base] tiny Llama, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
            storage.upload(tmp, st.uri)

    init = run.stage("base_init", shared=True, tokenizer=tok_stage, seed=seed)
    init.ensure(build_init)
    check_pair(init.local(), tok)
    return init.path(), tok_stage.path()
