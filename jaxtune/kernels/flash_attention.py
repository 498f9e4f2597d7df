"""The accelerators' fused attention kernels, wrapped to jaxtune's layout and mask data.

- `splash_attention`: JAX's Pallas splash attention for TPU
  (`jax.experimental.pallas.ops.tpu.splash_attention`): segment ids, causal / full / local
  (sliding-window) masks, grouped-query attention through its MQA form (one kernel per key/value
  head, the query heads of its group sharing it), batch by `jax.vmap`.
- `gpu_flash_attention`: JAX's Pallas flash attention for NVIDIA GPUs
  (`jax.experimental.pallas.ops.gpu.attention.mha`, the Triton lowering): segment ids, causal or
  bidirectional; K/V heads are repeated to the query heads (the kernel has no groups).

Both take q [batch, q_len, heads, head_dim], k / v [batch, kv_len, kv_heads, head_dim] and the
per-token data of `jaxtune.models.masks.MaskInfo`, pad the sequence to the kernel's blocks
(padding gets segment 0, which only other padding sees) and cut the result back.
`unsupported_by` says, before any tracing, what a kernel cannot express for a call (a prefix, a KV
cache, a window on GPU) so that the caller can use blockwise attention instead. ``interpret=True``
runs a kernel in Pallas' interpreter on any backend (tests).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_masks

SPLASH_BLOCK = 128  # splash's tiles are multiples of 128 along both sequences
GPU_BLOCK = 128


def unsupported_by(impl: str, q: jax.Array, k: jax.Array, mask: Any) -> Optional[str]:
    """What kernel ``impl`` (splash | flash | cudnn) cannot express for this call, or None."""
    if mask.num_prefix:
        return "prefix key columns (prefix / prompt tuning)"
    if mask.cached or q.shape[1] != k.shape[1]:
        return "a KV cache (queries against a longer key sequence)"
    if impl in ("flash",) and mask.window is not None:
        return "a sliding window"
    if impl == "cudnn" and not mask.causal and mask.window is not None:
        return "a bidirectional sliding window"
    return None


def _pad_sequence(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Any, *, interpret: bool = False,
                     block: int = 512) -> jax.Array:
    """Splash attention (TPU) for a self-attention call `unsupported_by` accepted."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    padded = length + (-length % SPLASH_BLOCK)
    tile = math.gcd(padded, max(SPLASH_BLOCK, block - block % SPLASH_BLOCK))
    shape = (padded, padded)
    if mask.window is not None:
        one = splash_masks.LocalMask(shape, (mask.window - 1, 0 if mask.causal else mask.window - 1), offset=0)
    elif mask.causal:
        one = splash_masks.CausalMask(shape)
    else:
        one = splash_masks.FullMask(shape)
    sizes = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile, block_kv_dkv=tile,
                              block_kv_dkv_compute=tile, block_q_dq=tile, block_kv_dq=tile)
    kernel = splash.make_splash_mqa(splash_masks.MultiHeadMask([one] * groups), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
    # [B, L, H, D] -> [B, KVH, G, L, D] (the query heads of one key/value head together)
    qh = _pad_sequence(q, 1, SPLASH_BLOCK).reshape(batch, padded, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    kh = _pad_sequence(k, 1, SPLASH_BLOCK).transpose(0, 2, 1, 3)
    vh = _pad_sequence(v, 1, SPLASH_BLOCK).transpose(0, 2, 1, 3)
    seg = _pad_sequence(mask.q_segments.astype(jnp.int32), 1, SPLASH_BLOCK)
    scale = 1.0 / math.sqrt(head_dim)

    def one_head(qg, kg, vg, s):  # qg [G, L, D], kg / vg [L, D], s [L]; splash takes q already scaled
        scaled = (qg.astype(jnp.float32) * scale).astype(qg.dtype)
        return kernel(scaled, kg, vg, segment_ids=splash.SegmentIds(q=s, kv=s))

    per_batch = jax.vmap(one_head, in_axes=(0, 0, 0, None))  # over key/value heads
    out = jax.vmap(per_batch)(qh, kh, vh, seg)  # over the batch: [B, KVH, G, L, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, padded, heads, head_dim)[:, :length]


def gpu_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Any, *, interpret: bool = False) -> jax.Array:
    """Pallas flash attention (GPU, Triton) for a self-attention call `unsupported_by` accepted."""
    batch, length, heads, head_dim = q.shape
    groups = heads // k.shape[2]
    # Triton wants power-of-two tiles (and dots of at least 16): short sequences pad to one such tile
    multiple = GPU_BLOCK if length > GPU_BLOCK else max(16, 1 << (length - 1).bit_length())
    qp, kp, vp = (_pad_sequence(x, 1, multiple) for x in (q, k, v))
    if groups > 1:
        kp, vp = jnp.repeat(kp, groups, axis=2), jnp.repeat(vp, groups, axis=2)
    seg = _pad_sequence(mask.q_segments.astype(jnp.int32), 1, multiple)
    call = partial(gpu_attention.mha, sm_scale=1.0 / math.sqrt(head_dim), causal=mask.causal, interpret=interpret)
    return call(qp, kp, vp, seg)[:, :length]
