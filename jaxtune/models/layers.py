"""Flax Linen building blocks of a decoder: Linear, norms, attention, MLP, Block.

Every projection goes through `jaxtune.ops.linear`, so a kernel may be a plain
array or any registered typed leaf. Kernels are declared with
``self.variable('params', ...)`` rather than ``self.param`` because Linen's
shape check would reject typed leaves (a quantized kernel is not [in, out]).
Norms and softmax compute in float32; matmuls in ``cfg.dtype``.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxtune.models.attention import attend
from jaxtune.models.config import ModelConfig
from jaxtune.models.norms import layer_norm, rms_norm
from jaxtune.models.rope import apply_rotary
from jaxtune.ops import linear
from jaxtune.parallel.rules import constrain_weight, context_size

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class Linear(nn.Module):
    """y = x @ kernel (+ bias). kernel: [in, features] or a typed leaf."""

    features: int
    use_bias: bool
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        init = nn.initializers.normal(cfg.initializer_range)
        kernel = self.variable(
            "params",
            "kernel",
            lambda: init(self.make_rng("params"), (x.shape[-1], self.features), cfg.weight_dtype),
        ).value
        # Typed leaves with dropout (LoRA's adapter input) draw from the 'dropout' stream, which
        # exists only in training steps (`Model.hidden(..., rng=key)`).
        rng = self.make_rng("dropout") if self.has_rng("dropout") else None
        y = linear(x, kernel, dtype=cfg.compute_dtype, rng=rng)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), cfg.weight_dtype)
            y = y + bias.astype(y.dtype)
        return y


class Embed(nn.Module):
    """Token (or position) embedding table ``embedding: [num, features]``; ids -> [..., features]."""

    num: int
    features: int
    cfg: ModelConfig

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        init = nn.initializers.normal(self.cfg.initializer_range)
        table = self.param("embedding", init, (self.num, self.features), self.cfg.weight_dtype)
        # Under a mesh the table may be split along features (fsdp); gather it for the lookup so
        # the result is split by batch like every other activation.
        table = constrain_weight(table, "tensor", None)
        return jnp.take(table, ids, axis=0).astype(self.cfg.compute_dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last axis, computed in float32 (`jaxtune.models.norms`: a
    backward pass that keeps only the input and one number per row)."""

    eps: float
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.cfg.weight_dtype)
        return rms_norm(x, scale, self.eps, self.cfg.compute_dtype)


class LayerNorm(nn.Module):
    """(x - mean) / std * scale + bias over the last axis, computed in float32."""

    eps: float
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (dim,), self.cfg.weight_dtype)
        bias = self.param("bias", nn.initializers.zeros, (dim,), self.cfg.weight_dtype)
        return layer_norm(x, scale, bias, self.eps, self.cfg.compute_dtype)


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    cls = RMSNorm if cfg.norm == "rmsnorm" else LayerNorm
    return cls(eps=cfg.norm_eps, cfg=cfg, name=name)


class Attention(nn.Module):
    """Grouped-query self-attention with optional q/k norm, rotary embeddings and KV cache."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, rotary, mask, kv_cache=None, cache_end=None, prefix=None):
        """x: [batch, seq, embed]; rotary: (cos, sin) [batch, seq, head_dim] or None;
        mask: `MaskInfo` of the queries and keys; kv_cache: (keys, values) [batch, max_len, kv_heads,
        head_dim]; prefix: (keys, values) [n, kv_heads, head_dim], shared by every row, used as given
        (already rotated, as a KV cache stores them) in front of the other keys (``mask.num_prefix``
        = n). The cache never holds the prefix.
        Returns (out [batch, seq, embed], updated (keys, values) or None)."""
        cfg = self.cfg
        batch, seq, _ = x.shape
        q = Linear(cfg.num_heads * cfg.head_dim, cfg.qkv_bias, cfg, name="q_proj")(x)
        k = Linear(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, cfg, name="k_proj")(x)
        v = Linear(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, cfg, name="v_proj")(x)
        q = q.reshape(batch, seq, cfg.num_heads, cfg.head_dim)
        k = k.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = RMSNorm(cfg.norm_eps, cfg, name="q_norm")(q)
            k = RMSNorm(cfg.norm_eps, cfg, name="k_norm")(k)
        if rotary is not None:
            q = apply_rotary(q, *rotary)
            k = apply_rotary(k, *rotary)
        new_cache = None
        if kv_cache is not None:
            keys, values = kv_cache
            keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, cache_end, 0, 0))
            values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, cache_end, 0, 0))
            new_cache = (keys, values)
            k, v = keys.astype(q.dtype), values.astype(q.dtype)
        if prefix is not None:
            shape = (batch,) + tuple(prefix[0].shape)
            k = jnp.concatenate([jnp.broadcast_to(prefix[0].astype(q.dtype)[None], shape), k], axis=1)
            v = jnp.concatenate([jnp.broadcast_to(prefix[1].astype(q.dtype)[None], shape), v], axis=1)
        out = attend(q, k, v, mask, cfg.attention_impl, block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv)
        out = out.reshape(batch, seq, cfg.num_heads * cfg.head_dim)
        return Linear(cfg.hidden_size, cfg.o_bias, cfg, name="o_proj")(out), new_cache


class MLP(nn.Module):
    """Gated: down(act(gate(x)) * up(x)) (SwiGLU). Plain: down(act(up(x))) (GPT-2)."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.up_proj = Linear(cfg.intermediate_size, cfg.mlp_bias, cfg)
        if cfg.mlp == "gated":
            self.gate_proj = Linear(cfg.intermediate_size, cfg.mlp_bias, cfg)
        self.down_proj = Linear(cfg.hidden_size, cfg.mlp_bias, cfg)

    def __call__(self, x):
        act = ACTIVATIONS[self.cfg.activation]
        up = self.up_proj(x)
        h = act(self.gate_proj(x)) * up if self.cfg.mlp == "gated" else act(up)
        return self.down_proj(h)


def _mlp_chunk(mlp: MLP, carry, x):
    return carry, mlp(x)


def mlp_by_chunks(mlp: MLP, x: jax.Array, chunk_tokens: int) -> jax.Array:
    """``mlp(x)`` for x [batch, seq, embed] about ``chunk_tokens`` tokens at a time (`lax.scan`,
    each chunk re-run in the backward pass), so no [tokens, intermediate] tensor of the whole
    sequence exists: the backward pass keeps the chunks' inputs only. Chunks are runs of
    consecutive positions (for one row a free reshape of x); under a mesh whose ``context`` axis
    splits the sequence they take every n-th position instead, so each device's chunk stays its own."""
    batch, seq, embed = x.shape
    n = min(seq, -(-batch * seq // chunk_tokens))
    if n <= 1:
        return mlp(x)
    scan = lambda axis: nn.scan(nn.remat(_mlp_chunk, prevent_cse=False), variable_broadcast="params",  # noqa: E731
                                split_rngs={"params": False, "dropout": True}, in_axes=axis, out_axes=axis, length=n)
    if context_size() > 1:  # every n-th position of each row
        pad = -seq % n
        xs = (jnp.pad(x, ((0, 0), (0, pad), (0, 0))) if pad else x).reshape(batch, (seq + pad) // n, n, embed)
        _, ys = scan(2)(mlp, None, xs)
        return ys.reshape(batch, seq + pad, embed)[:, :seq]
    tokens = batch * seq  # runs of consecutive tokens of the flattened batch: reshapes, no copies
    pad = -tokens % n
    xs = x.reshape(tokens, embed)
    xs = (jnp.pad(xs, ((0, pad), (0, 0))) if pad else xs).reshape(n, (tokens + pad) // n, embed)
    _, ys = scan(0)(mlp, None, xs)
    return ys.reshape(tokens + pad, embed)[:tokens].reshape(batch, seq, embed)


class Block(nn.Module):
    """Transformer block. Pre-norm (``cfg.norm_placement`` "pre"): x + attn(norm(x)), then
    h + mlp(norm(h)). Post-norm ("post", BERT): norm(x + attn(x)), then norm(h + mlp(h))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, rotary, mask, kv_cache=None, cache_end=None, prefix=None):
        cfg = self.cfg
        post = cfg.norm_placement == "post"
        x = checkpoint_name(x, "block_input")
        attn_norm, mlp_norm = make_norm(cfg, "attn_norm"), make_norm(cfg, "mlp_norm")
        attn_input = checkpoint_name(x if post else attn_norm(x), "attn_input")
        attn_out, new_cache = Attention(cfg, name="attn")(attn_input, rotary, mask, kv_cache, cache_end, prefix)
        h = attn_norm(x + attn_out) if post else x + attn_out
        mlp_input = checkpoint_name(h if post else mlp_norm(h), "mlp_input")
        mlp = MLP(cfg, name="mlp")
        out = mlp_by_chunks(mlp, mlp_input, cfg.mlp_chunk_tokens) if cfg.mlp_chunk_tokens else mlp(mlp_input)
        h = mlp_norm(h + out) if post else h + out
        return h, new_cache


REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # the block's input to pinned host memory, everything else recomputed (`check_host_offload`)
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["block_input"], offload_src="device",
        offload_dst="pinned_host"),
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_layer_inputs": jax.checkpoint_policies.save_only_these_names("attn_input", "mlp_input"),
}


def check_host_offload(device: Optional[jax.Device] = None) -> None:
    """Refuse ``remat: offload`` where the device has no pinned host memory to offload to."""
    device = device or jax.devices()[0]
    kinds = {m.kind for m in device.addressable_memories()}
    if "pinned_host" not in kinds:
        raise ValueError(f"remat=offload (train.remat) keeps block inputs in pinned host memory, which this backend's "
                         f"device {device.device_kind!r} ({device.platform}) does not have (memory kinds: "
                         f"{', '.join(sorted(kinds))}); use train.remat=full")


def block_class(cfg: ModelConfig) -> type[nn.Module]:
    """`Block`, wrapped in ``jax.checkpoint`` with the policy ``cfg.remat`` names."""
    if cfg.remat == "none":
        return Block
    if cfg.remat == "offload":
        check_host_offload()
    return nn.remat(Block, policy=REMAT[cfg.remat])
