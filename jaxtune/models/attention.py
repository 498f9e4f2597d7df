"""The KV cache, and scaled dot-product attention behind one entry: `attend(q, k, v, mask, cfg)`.

Who attends to whom comes in as a `MaskInfo` (`jaxtune.models.masks`: segment ids, slot
indices, causality, sliding window, prefix columns), never as a stored [q, k] array; an
implementation that needs a dense mask builds it itself.

Implementations (``ModelConfig.attention_impl``), numerically equivalent:

- ``blockwise``: `jaxtune.models.blockwise`, online softmax over key/value blocks with its own
  backward pass, O(length) memory, fully masked tiles skipped; pure JAX, every backend;
- ``splash``: Pallas splash attention on TPU (segment ids, causal and local masks;
  `jaxtune.kernels.flash_attention`);
- ``flash``: the Pallas (Triton) flash attention on NVIDIA GPUs (segment ids, causal);
- ``cudnn``: cuDNN's fused attention through `jax.nn.dot_product_attention`, given causality,
  the window and sequence lengths as arguments (NVIDIA GPUs);
- ``dpa``: `jax.nn.dot_product_attention` on its XLA path with a dense mask;
- ``xla``: a grouped-query einsum with a dense mask that never repeats K/V heads;
- ``auto`` (the default): by the platform the program is lowered for (the host's, or those of
  `jaxtune.utils.platform.lowering_for`, staged out with `jax.lax.platform_dependent`): ``splash``
  on TPU and ``flash`` on GPU where they express the mask, else ``blockwise``; on CPU ``blockwise``
  (measured faster than the dense paths, README).

A kernel that cannot express a call's mask (a prefix, a KV cache, a sliding window on GPU,
packed documents for cuDNN) falls back to ``blockwise`` with one warning naming what it lacked.
Softmax runs in float32 in all of them.

Under a mesh with a ``context`` axis (context parallelism) every implementation gives way to
context-parallel blockwise attention (`jaxtune.models.context_attention`; one warning for an
implementation other than ``auto`` / ``blockwise``), except with a KV cache.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from jaxtune.kernels.flash_attention import gpu_flash_attention, splash_attention, unsupported_by
from jaxtune.models.blockwise import blockwise_attention
from jaxtune.models.context_attention import context_attention, context_mesh
from jaxtune.models.masks import MaskInfo, attention_mask  # noqa: F401  (attention_mask: also importable here)
from jaxtune.parallel.mesh import BATCH_AXES
from jaxtune.parallel.rules import current_mesh
from jaxtune.utils.platform import per_platform

log = logging.getLogger(__name__)
IMPLEMENTATIONS = ("auto", "blockwise", "splash", "flash", "cudnn", "dpa", "xla")
_warned: set[str] = set()


class KVCache(NamedTuple):
    """Decoding state. keys/values: per layer [batch, max_len, kv_heads, head_dim];
    segment_ids: [batch, max_len] int32 (0 = empty or padding); end: int32 scalar,
    the number of slots written so far (the next write goes to slot ``end``)."""

    keys: tuple
    values: tuple
    segment_ids: jax.Array
    end: jax.Array

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


def init_cache(num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
    zeros = lambda: jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)  # noqa: E731
    return KVCache(
        keys=tuple(zeros() for _ in range(num_layers)),
        values=tuple(zeros() for _ in range(num_layers)),
        segment_ids=jnp.zeros((batch, max_len), jnp.int32),
        end=jnp.zeros((), jnp.int32),
    )


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo, impl: str = "auto", *, block_q: int = 0,
           block_kv: int = 0) -> jax.Array:
    """q: [batch, q_len, heads, head_dim]; k, v: [batch, num_prefix + kv_len, kv_heads, head_dim]
    (prefix columns first) -> [batch, q_len, heads, head_dim]."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl: unknown implementation {impl!r} ({' | '.join(IMPLEMENTATIONS)})")
    mesh = context_mesh(mask)
    if mesh is not None:
        if impl not in ("auto", "blockwise"):
            _warn_once(f"{impl}:context", f"attention_impl={impl} has no context-parallel form; under mesh.context > 1 "
                                          "attention runs context-parallel blockwise attention")
        return context_attention(q, k, v, mask, mesh, block_q=block_q, block_kv=block_kv)
    blockwise = lambda: blockwise_attention(q, k, v, mask, block_q=block_q, block_kv=block_kv)  # noqa: E731
    if impl == "blockwise":
        return blockwise()
    if impl == "auto":
        branches = {
            "cpu": lambda *a: blockwise_attention(*a, block_q=block_q, block_kv=block_kv),
            "cuda": lambda *a: _kernel_or_blockwise("flash", *a, block_q=block_q, block_kv=block_kv, warn=False),
            "tpu": lambda *a: _kernel_or_blockwise("splash", *a, block_q=block_q, block_kv=block_kv, warn=False),
        }
        return per_platform(branches, q, k, v, mask)
    if impl in ("splash", "flash"):
        return _kernel_or_blockwise(impl, q, k, v, mask, block_q=block_q, block_kv=block_kv)
    if impl == "cudnn":
        return _cudnn(q, k, v, mask, block_q, block_kv)
    if impl == "dpa":
        return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), scale=_scale(q))
    return _grouped_attention(q, k, v, mask.dense(), _scale(q))  # xla


def _scale(q: jax.Array) -> float:
    return 1.0 / math.sqrt(q.shape[-1])


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        log.warning(message)
        _warned.add(key)


def _kernel_or_blockwise(impl: str, q, k, v, mask: MaskInfo, *, block_q: int, block_kv: int, warn: bool = True):
    """The Pallas kernel ``impl`` where it expresses this call, else blockwise (warned once)."""
    lacking = unsupported_by(impl, q, k, mask)
    if lacking is None:
        return _per_device(splash_attention if impl == "splash" else gpu_flash_attention, q, k, v, mask)
    if warn:
        _warn_once(f"{impl}:{lacking}", f"attention_impl={impl} cannot express {lacking}; using blockwise attention there")
    return blockwise_attention(q, k, v, mask, block_q=block_q, block_kv=block_kv)


def _per_device(kernel, q, k, v, mask: MaskInfo):
    """A Pallas kernel on each device's share: XLA cannot split a custom call, so under a mesh
    (`jaxtune.parallel.rules.activation_mesh`) the kernel runs in `jax.shard_map` over the batch
    (data x fsdp) and, where the key/value heads divide, the heads (tensor) -- never on gathered
    activations."""
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, mask)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    heads = "tensor" if k.shape[2] % mesh.shape["tensor"] == 0 else None
    if q.shape[0] % batch_shards:
        heads_spec = P(None, None, heads, None)
        batch_axes = None
    else:
        heads_spec = P(BATCH_AXES, None, heads, None)
        batch_axes = BATCH_AXES

    def local(q, k, v, segments, index):
        local_mask = MaskInfo(segments, segments, index, index, causal=mask.causal, window=mask.window)
        return kernel(q, k, v, local_mask)

    return jax.shard_map(local, mesh=mesh, in_specs=(heads_spec, heads_spec, heads_spec, P(batch_axes, None), P()),
                         out_specs=heads_spec, check_vma=False)(q, k, v, mask.q_segments, mask.q_index)


def _cudnn(q, k, v, mask: MaskInfo, block_q: int, block_kv: int):
    """cuDNN fused attention given causality, the window and per-row lengths (no dense mask). It
    expresses one document per row, right-padded: rows that are (packed documents, left padding)
    take blockwise attention at run time; a prefix, a KV cache or a backend without cuDNN falls
    back to blockwise at trace time (one warning)."""
    blockwise = lambda q, k, v: blockwise_attention(q, k, v, mask, block_q=block_q, block_kv=block_kv)  # noqa: E731
    lacking = unsupported_by("cudnn", q, k, mask)
    if lacking is None:
        seg = mask.q_segments
        lengths = jnp.sum(seg != 0, axis=1).astype(jnp.int32)
        one_document = jnp.all(seg == jnp.where(jnp.arange(seg.shape[1])[None] < lengths[:, None], seg[:, :1], 0))
        one_document = one_document & jnp.all(lengths > 0)  # cuDNN is not given an empty row
        window = None if mask.window is None else ((mask.window - 1, 0) if mask.causal else (mask.window - 1,) * 2)

        def fused(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, scale=_scale(q), is_causal=mask.causal,
                                                query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                                local_window_size=window, implementation="cudnn")

        try:
            return jax.lax.cond(one_document, fused, blockwise, q, k, v)
        except (RuntimeError, ValueError, NotImplementedError) as err:
            lacking = f"this backend ({err})"
    _warn_once(f"cudnn:{lacking}", f"attention_impl=cudnn does not apply to {lacking}; using blockwise attention there")
    return blockwise(q, k, v)


def _grouped_attention(q, k, v, mask, scale):
    """Grouped-query attention in a heads-major layout ``[batch, kv_heads, groups * q_len, ...]``:
    K/V are never repeated, and both attention matmuls are plain batched GEMMs over
    (batch, kv_heads), which XLA:CPU runs with fewer layout copies than the time-major form
    (gradients 6-10% faster, whole training steps 2% faster on bench-llama-31m)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    qh = jnp.transpose(q, (0, 2, 1, 3)).reshape(batch, kv_heads, groups * q_len, head_dim)
    kh = jnp.transpose(k, (0, 2, 1, 3))  # [batch, kv_heads, kv_len, head_dim]
    vh = jnp.transpose(v, (0, 2, 1, 3))
    logits = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32) * scale
    mask = jnp.broadcast_to(mask[:, :, None], (batch, 1, groups, q_len, kv_len)).reshape(batch, 1, groups * q_len, kv_len)
    big_negative = jnp.float32(-0.7 * jnp.finfo(jnp.float32).max)
    weights = jax.nn.softmax(jnp.where(mask, logits, big_negative), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", weights, vh).reshape(batch, heads, q_len, head_dim)
    return jnp.transpose(out, (0, 2, 1, 3))


__all__ = ["IMPLEMENTATIONS", "KVCache", "MaskInfo", "attend", "attention_mask", "init_cache"]
