"""The one linear op for quantized kernels: XLA's dequantize-then-matmul or the fused Pallas kernel.

`quant_matmul(x, w)` is ``x @ dequantize(w)`` and `quant_lora_matmul(x, h, w, a, b, s)` is
``x @ dequantize(w) + s * (h @ a) @ b`` (``h``: the LoRA input, ``x`` after dropout in training).
Both are ``jax.custom_vjp``s whose residuals are the inputs and the *packed* kernel -- never a
dequantized copy -- and whose backward pass gives ``dx = dy @ dequantize(w)^T`` (dequantized again,
after ``dy`` exists) and, for LoRA, ``da``, ``db`` by ordinary matmuls; the quantized kernel gets a
zero cotangent (it is frozen).

Which path runs is decided per call (`path`) from ``w.kernel``: ``xla``; ``pallas`` (the Triton
kernel: GPU only); ``interpret`` (the same kernel in Pallas' interpreter, any backend: tests);
``auto``: the kernel on a GPU whose tile table (``benchmarks/qlora_matmul.py --autotune``) measured
it faster for this shape, where the kernel's layout applies (2-D codes: inputs a multiple of the
blocksize); XLA otherwise -- including every shape no one has measured on this device kind.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.kernels.quant_matmul import Tiles, forward, transposed
from jaxtune.kernels.tiles import choose, measured
from jaxtune.ops.linear import register_linear
from jaxtune.quant.codes import CODES_4BIT
from jaxtune.quant.weight import QuantizedWeight


def path(w: QuantizedWeight, m: int) -> str:
    """``xla``, ``pallas`` or ``interpret`` for a call with ``m`` rows."""
    choice = w.kernel
    if choice == "xla":
        return "xla"
    fits = w.codes.ndim == 2  # the kernel reads the 2-D layout
    if choice in ("pallas", "interpret"):
        if not fits:
            raise ValueError(f"quant.kernel={choice}: the fused kernel needs the 2-D layout (inputs a multiple of "
                             f"the blocksize {w.blocksize}); this kernel has {w.shape[0]} inputs")
        if choice == "pallas" and jax.default_backend() != "gpu":
            raise ValueError(f"quant.kernel=pallas: the fused kernel is lowered by Triton (GPU); this backend is "
                             f"{jax.default_backend()!r}. Use quant.kernel=auto (XLA here) or interpret (tests)")
        return choice
    if not fits or jax.default_backend() != "gpu":
        return "xla"
    n_in, n_out = w.shape
    entry = measured(m, n_out, n_in, w.kind, jax.devices()[0].device_kind)
    return "xla" if entry is None or entry == "xla" else "pallas"  # the kernel where this GPU measured it faster


def _tiles(w: QuantizedWeight, m: int):
    n_in, n_out = w.shape
    return choose(m, n_out, n_in, w.kind, w.blocksize, jax.devices()[0].device_kind)


def code_table(kind: str) -> tuple[float, ...]:
    """The 16 values an nf4 / fp4 code stands for (the kernel maps codes through them); () otherwise."""
    return tuple(float(v) for v in CODES_4BIT[kind]) if kind in CODES_4BIT else ()


def kernel_scales(w: QuantizedWeight) -> jax.Array:
    """What the kernel multiplies codes by: absmax per block (nf4 / fp4), absmax / 7 per group
    (int4, as stored), absmax / 127 per row (int8)."""
    if w.kind == "int8":
        return w.scales * np.float32(1.0 / 127.0)
    return w.absmax()


def _kernel_forward(x2, w: QuantizedWeight, dtype, impl, xa=None, b=None, s=1.0):
    return forward(x2.astype(dtype), w.codes, kernel_scales(w), kind=w.kind, blocksize=w.blocksize, n=w.shape[1],
                   table=code_table(w.kind), xa=xa, b=b, lora_scale=s, tiles=_tiles_or_default(w, x2.shape[0]),
                   out_dtype=dtype, interpret=impl == "interpret")


def _kernel_transposed(dy2, w: QuantizedWeight, dtype, impl):
    return transposed(dy2.astype(dtype), w.codes, kernel_scales(w), kind=w.kind, blocksize=w.blocksize, k=w.shape[0],
                      table=code_table(w.kind), tiles=_tiles_or_default(w, dy2.shape[0], backward=True),
                      out_dtype=dtype, interpret=impl == "interpret")


def _tiles_or_default(w: QuantizedWeight, m: int, backward: bool = False):
    tiles = _tiles(w, m) or Tiles()
    if backward or tiles.splits > 1 and m > 16:
        tiles = Tiles(bm=max(16, min(tiles.bm, 64)), bn=64, bk=min(64, w.blocksize) if w.kind != "int8" else 64)
    return tiles


def _dot_t(x: jax.Array, wt: jax.Array) -> jax.Array:
    """``x @ wt^T`` for ``wt: [out, in]`` (the stored orientation), without a transpose copy."""
    return jax.lax.dot_general(x, wt, (((x.ndim - 1,), (1,)), ((), ())))


def _zero_cotangent(w: QuantizedWeight) -> QuantizedWeight:
    return jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.inexact)
                        else jnp.zeros_like(a), w)


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


def _input_grad(dy, w: QuantizedWeight, dtype: str, impl: str) -> jax.Array:
    """``dy @ dequantize(w)^T`` (dequantized after ``dy`` exists: an optimization barrier keeps XLA
    from hoisting every layer's dequantization to the start of the backward pass)."""
    dy, w = jax.lax.optimization_barrier((dy, w))
    if impl == "xla":
        return jax.lax.dot_general(dy, w.dequantize_t(dtype), (((dy.ndim - 1,), (0,)), ((), ())))
    return _kernel_transposed(_flat(dy), w, dtype, impl).reshape(*dy.shape[:-1], w.shape[0])


# --- x @ dequantize(w) ------------------------------------------------------------------------

@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def quant_matmul(x: jax.Array, w: QuantizedWeight, dtype: str, impl: str) -> jax.Array:
    """``x [..., in] @ dequantize(w) -> [..., out]`` in ``dtype`` by ``impl`` (see `path`)."""
    return _quant_matmul_fwd(x, w, dtype, impl)[0]


def _quant_matmul_fwd(x, w, dtype, impl):
    if impl == "xla":
        y = _dot_t(x, w.dequantize_t(dtype))
    else:
        y = _kernel_forward(_flat(x), w, dtype, impl).reshape(*x.shape[:-1], w.shape[1])
    return y, (x, w)


def _quant_matmul_bwd(dtype, impl, residuals, dy):
    x, w = residuals
    return _input_grad(dy, w, dtype, impl).astype(x.dtype), _zero_cotangent(w)


quant_matmul.defvjp(_quant_matmul_fwd, _quant_matmul_bwd)


# --- x @ dequantize(w) + s * (h @ a) @ b: QLoRA in one kernel -----------------------------------

@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def quant_lora_matmul(x: jax.Array, h: jax.Array, w: QuantizedWeight, a: jax.Array, b: jax.Array, s: float,
                      dtype: str, impl: str) -> jax.Array:
    """``x @ dequantize(w) + s * (h @ a) @ b``; ``a: [in, r]``, ``b: [r, out]``. On the kernel path
    ``h @ a`` is computed once and the low-rank term is added in the kernel's epilogue."""
    return _quant_lora_fwd(x, h, w, a, b, s, dtype, impl)[0]


def _quant_lora_fwd(x, h, w, a, b, s, dtype, impl):
    xa = jnp.matmul(h.astype(dtype), a.astype(dtype))
    if impl == "xla":
        y = _dot_t(x.astype(dtype), w.dequantize_t(dtype)) + s * jnp.matmul(xa, b.astype(dtype))
    else:
        y = _kernel_forward(_flat(x), w, dtype, impl, xa=_flat(xa), b=b.astype(dtype), s=s)
        y = y.reshape(*x.shape[:-1], w.shape[1])
    return y, (h, w, xa, a, b)


def _quant_lora_bwd(s, dtype, impl, residuals, dy):
    h, w, xa, a, b = residuals
    dxa = s * jnp.matmul(dy, b.astype(dy.dtype).T)  # [..., r]
    db = s * jnp.matmul(_flat(xa).T.astype(jnp.float32), _flat(dy).astype(jnp.float32))
    da = jnp.matmul(_flat(h).T.astype(jnp.float32), _flat(dxa).astype(jnp.float32))
    dh = jnp.matmul(dxa, a.astype(dxa.dtype).T)
    dx = _input_grad(dy, w, dtype, impl)
    return (dx.astype(h.dtype), dh.astype(h.dtype), _zero_cotangent(w), da.astype(a.dtype), db.astype(b.dtype))


quant_lora_matmul.defvjp(_quant_lora_fwd, _quant_lora_bwd)


# --- the linear rule ----------------------------------------------------------------------------

@register_linear(QuantizedWeight)
def _quantized_linear(x, w: QuantizedWeight, *, dtype, rng=None):
    dtype = x.dtype if dtype is None else dtype
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"linear: x has {x.shape[-1]} input features, quantized kernel expects {w.shape[0]}")
    m = int(np.prod(x.shape[:-1]))
    return quant_matmul(x.astype(dtype), w, jnp.dtype(dtype).name, path(w, m))


def lora_over_quantized(x: jax.Array, h: jax.Array, w: QuantizedWeight, a, b, s: float, dtype) -> Optional[jax.Array]:
    """The fused QLoRA product when ``w``'s kernel path is the Pallas kernel, else None (the LoRA
    rule then adds its low-rank term to the XLA product itself)."""
    dtype = x.dtype if dtype is None else dtype
    impl = path(w, int(np.prod(x.shape[:-1])))
    if impl == "xla":
        return None
    return quant_lora_matmul(x.astype(dtype), h.astype(dtype), w, a, b, float(s), jnp.dtype(dtype).name, impl)
