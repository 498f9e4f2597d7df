"""Context parallelism: attention over a sequence split across the ``context`` mesh axis.

Under a mesh whose ``context`` axis has C > 1 devices (`jaxtune.parallel.mesh`), the activations
``[batch, seq, ...]`` are split into C contiguous blocks of seq / C tokens
(`jaxtune.parallel.rules.constrain`); everything but attention is per token, so it runs on each
block as it is. Attention runs in ``jax.shard_map``: each device holds its block of queries
(``[batch / (data x fsdp), seq / C, heads / tensor, head_dim]``), **all-gathers** the keys / values
over ``context`` and runs blockwise attention of its queries against the whole sequence
(`jaxtune.models.blockwise.gathered_attention`); the backward pass gathers K/V again instead of
keeping them and reduce-scatters dK / dV back to their blocks.

All-gather, not a ring (ppermute of K/V blocks, overlapped with compute): it is what Llama 3 used
for long-context training; under grouped-query attention K/V are a fraction of the queries' size,
so the gathered K/V of one layer are cheap next to the rest of a layer's activations; it needs
one collective per layer rather than C - 1 dependent steps, and every mask (packed documents,
sliding window, bidirectional, a prefix) stays one rule over global slot indices (`MaskInfo`
carries the local queries' global slots), with blockwise attention's tile skipping unchanged.
The price: causal attention's work is not balanced (the last block sees every key, the first
only its own), and one layer's gathered K/V must fit a device.

Composes with ``data`` / ``fsdp`` (the batch) and ``tensor`` (the heads, where the key/value heads
divide). Decoding with a KV cache is not split over the sequence (it runs as without context
parallelism). Pallas kernels (splash / flash / cudnn) and the dense paths are replaced by this
path under context parallelism (one warning).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxtune.models.blockwise import gathered_attention
from jaxtune.models.masks import MaskInfo
from jaxtune.parallel.mesh import BATCH_AXES, CONTEXT_AXIS, axis_size
from jaxtune.parallel.rules import current_mesh


def context_mesh(mask: MaskInfo) -> Optional[Mesh]:
    """The enclosing activation mesh when this attention call is context-parallel: the mesh has
    ``context`` > 1 and the keys are the queries' own sequence (not a KV cache). Else None."""
    mesh = current_mesh()
    if mesh is None or axis_size(mesh, CONTEXT_AXIS) == 1 or mask.cached:
        return None
    return mesh


def context_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo, mesh: Mesh, *, block_q: int = 0,
                      block_kv: int = 0) -> jax.Array:
    """q: [batch, seq, heads, head_dim]; k, v: [batch, num_prefix + seq, kv_heads, head_dim] (the
    prefix columns first) -> [batch, seq, heads, head_dim], the sequence split over ``context``."""
    contexts = axis_size(mesh, CONTEXT_AXIS)
    seq, n = q.shape[1], mask.num_prefix
    if seq % contexts or k.shape[1] - n != seq:
        raise ValueError(f"context parallelism: a sequence of {seq} tokens does not split into mesh.context={contexts} "
                         f"equal blocks; make the sequence length (train.seq_len) a multiple of {contexts}")
    batch_shards = axis_size(mesh, "data") * axis_size(mesh, "fsdp")
    batch = BATCH_AXES if q.shape[0] % batch_shards == 0 else None
    heads = "tensor" if k.shape[2] % axis_size(mesh, "tensor") == 0 else None
    blocks, whole = P(batch, CONTEXT_AXIS, heads, None), P(batch, None, heads, None)
    tokens = P(batch, CONTEXT_AXIS)
    mask_specs = MaskInfo(tokens, P(batch, None), P(CONTEXT_AXIS), P(),
                          None if mask.q_positions is None else tokens,
                          causal=mask.causal, window=mask.window, num_prefix=n, cached=False)

    def local(q, k, v, mask, prefix_k=None, prefix_v=None):
        if prefix_k is None:  # no prefix: an empty one made here, not an input whose gradient is summed
            prefix_k = prefix_v = jnp.zeros((k.shape[0], 0) + k.shape[2:], k.dtype)
        return gathered_attention(q, prefix_k, prefix_v, k, v, mask, CONTEXT_AXIS, block_q=block_q, block_kv=block_kv)

    args, specs = (q, k[:, n:], v[:, n:], mask), (blocks, blocks, blocks, mask_specs)
    if n:
        args, specs = args + (k[:, :n], v[:, :n]), specs + (whole, whole)
    # Axes a spec leaves out (the prefix's context; tensor where the heads do not divide) see the same
    # values on every device; check_vma=False makes shard_map's transpose sum their cotangents over them.
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=blocks, check_vma=False)(*args)


__all__ = ["context_attention", "context_mesh"]
