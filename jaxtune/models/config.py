"""`ModelConfig`: one frozen description that covers every supported decoder family.

A config is plain data (hashable, so it can be a static argument of `jax.jit`).
It says nothing about how weights are stored on disk; `jaxtune.interop.hf_config`
reads and writes Hugging Face ``config.json`` files into and out of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import jax.numpy as jnp

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "bert")


REMAT_POLICIES = ("none", "full", "offload", "save_dots", "save_layer_inputs")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding. kind: default | linear | llama3 (Llama-3.x frequency scaling)."""

    kind: Literal["default", "linear", "llama3"] = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder LM (or a BERT-style encoder). Shapes: embed = hidden_size, heads x head_dim per projection."""

    family: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    intermediate_size: int = 128
    max_position_embeddings: int = 2048
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-6
    mlp: Literal["gated", "plain"] = "gated"  # gated = SwiGLU-style, plain = GPT-2 style
    activation: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"
    position: Literal["rope", "learned"] = "rope"
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    # Per layer "full" or "sliding"; empty means every layer is "full" unless
    # sliding_window is set, in which case every layer slides (Mistral).
    layer_types: tuple[str, ...] = ()
    # pre: x + f(norm(x)) with a final norm (decoders); post: norm(x + f(x)), the embeddings normed
    # and no final norm (BERT)
    norm_placement: Literal["pre", "post"] = "pre"
    # >0: a learned token-type (segment A / B) embedding of this many types added to the input (BERT)
    type_vocab_size: int = 0
    # The LM head: a dense + activation + LayerNorm transform before the vocabulary projection, and a
    # per-token output bias (BERT's MLM head); a pooler (dense + tanh over the first token) beside it
    lm_head_transform: bool = False
    lm_head_bias: bool = False
    pooler: bool = False
    # False: bidirectional attention (masked-LM encoders). Segments (packing, padding) and
    # sliding windows (|i - j| < window) still apply; KV-cache decoding and HF export refuse it.
    causal: bool = True
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    # Numerics: parameters are stored in param_dtype, matmuls run in dtype;
    # norms, softmax and returned logits are always float32.
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # attention: auto (splash on TPU, Pallas flash on GPU where they apply, else blockwise) | blockwise
    # (pure JAX, O(length) memory) | splash | flash | cudnn | dpa | xla (dense); see jaxtune.models.attention
    attention_impl: Literal["auto", "blockwise", "splash", "flash", "cudnn", "dpa", "xla"] = "auto"
    # blockwise attention's query / key-value tiles (0: chosen from the shapes, models/blockwise.py; padded
    # where they do not divide)
    attention_block_q: int = 0
    attention_block_kv: int = 0
    # Rematerialisation of each block in the backward pass (jax.checkpoint):
    # none | full (keep block inputs only) | offload (block inputs in pinned host memory) |
    # save_dots (keep matmul outputs) | save_layer_inputs (keep the normed inputs of attention and MLP).
    remat: Literal["none", "full", "offload", "save_dots", "save_layer_inputs"] = "none"
    # >0: the MLP runs this many tokens at a time, each chunk recomputed in the backward pass (no
    # [tokens, intermediate] tensor of the whole sequence; `jaxtune.models.layers.mlp_by_chunks`)
    mlp_chunk_tokens: int = 0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family: unsupported family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"ModelConfig.layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )
        if self.attention_block_q < 0 or self.attention_block_kv < 0:
            raise ValueError("ModelConfig.attention_block_q / attention_block_kv must be >= 0 (0: chosen per call)")
        if self.type_vocab_size < 0:
            raise ValueError(f"ModelConfig.type_vocab_size must be >= 0 (0: no token types), got {self.type_vocab_size}")
        if self.norm_placement not in ("pre", "post"):
            raise ValueError(f"ModelConfig.norm_placement: {self.norm_placement!r} (pre | post)")
        if self.mlp_chunk_tokens < 0:
            raise ValueError(f"ModelConfig.mlp_chunk_tokens must be >= 0 (0: the whole sequence at once), got {self.mlp_chunk_tokens}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat: unknown policy {self.remat!r} ({' | '.join(REMAT_POLICIES)})")
        for t in self.layer_types:
            if t not in ("full", "sliding"):
                raise ValueError(f"ModelConfig.layer_types: unknown layer type {t!r} (full | sliding)")

    def window_for_layer(self, i: int) -> Optional[int]:
        """Sliding-window size for layer i, or None for full attention."""
        if self.sliding_window is None:
            return None
        if not self.layer_types:
            return self.sliding_window
        return self.sliding_window if self.layer_types[i] == "sliding" else None

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
