"""The one linear op for quantized kernels: XLA's dequantize-then-matmul or a fused Pallas kernel.

`quant_matmul(x, w)` is ``x @ dequantize(w)`` and `quant_lora_matmul(x, h, w, a, b, s)` is
``x @ dequantize(w) + s * (h @ a) @ b`` (``h``: the LoRA input, ``x`` after dropout in training).
Both are ``jax.custom_vjp``s whose residuals are the inputs and the *packed* kernel -- never a
dequantized copy -- and whose backward pass gives ``dx = dy @ dequantize(w)^T`` (dequantized again,
after ``dy`` exists) and, for LoRA, ``da``, ``db`` by ordinary matmuls; the quantized kernel gets a
zero cotangent (it is frozen).

Implementations (``impl``): ``xla``; ``pallas`` (the Triton kernel, `jaxtune.kernels.quant_matmul`:
NVIDIA GPUs); ``tpu`` (the Mosaic kernel, `jaxtune.kernels.quant_matmul_tpu`); ``interpret`` /
``interpret_tpu`` (those kernels in Pallas' interpreter, any backend: tests). Under a mesh a kernel
runs in `jax.shard_map` on each device's rows (XLA cannot split a custom call).

Which one runs follows ``w.kernel`` (``quant.kernel``) and the platform the program is *lowered*
for (`jaxtune.utils.platform.per_platform`: the host's, or those of `lowering_for`):

- ``auto``: on CPU, XLA. On a GPU, the Triton kernel where the tile table (`jaxtune.kernels.tiles`,
  filled by ``benchmarks/accelerator_suite.py``) measured it faster for this device kind and shape,
  XLA where it measured XLA faster, and for a shape no one measured the kernel below `KERNEL_ROWS`
  rows, XLA from there. On a TPU the Mosaic kernel below `KERNEL_ROWS` rows. Rows are per device
  (what one device's kernel call sees under the activation mesh), like the tile table's. The kernels need the
  2-D code layout (inputs a multiple of the blocksize); other kernels take XLA everywhere.
- ``xla``, ``interpret``, ``interpret_tpu``: that implementation everywhere;
- ``pallas``: the platform's fused kernel (Triton on GPU, Mosaic on TPU); an error on a CPU host
  unless the program may be lowered for an accelerator (`jaxtune.utils.platform.lowering_for`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxtune.kernels import quant_matmul_tpu
from jaxtune.kernels.quant_matmul import Tiles, forward, transposed
from jaxtune.kernels.tiles import choose, measured
from jaxtune.ops.linear import register_linear
from jaxtune.parallel.mesh import BATCH_AXES, CONTEXT_AXIS
from jaxtune.parallel.rules import current_mesh
from jaxtune.quant.codes import CODES_4BIT
from jaxtune.quant.weight import QuantizedWeight
from jaxtune.utils.platform import PLATFORMS, per_platform, target_platforms

# Unmeasured shapes take the fused kernel below this many rows. Roofline: XLA writes and reads
# the dequantized bf16 weight (about 4.5 bytes a parameter against the kernel's 0.5), while the
# kernel's matmul runs below the vendor GEMM (say 80%); with H100 / H200 (or TPU v5) FLOP/s per
# byte/s near 200-240, the extra traffic costs more than the slower matmul up to M ~ 1,600 rows.
KERNEL_ROWS = 2048
KERNEL_IMPLS = ("pallas", "interpret", "tpu", "interpret_tpu")


def paths(w: QuantizedWeight, m: int) -> dict[str, str]:
    """The implementation of a call with ``m`` rows for each platform it may be lowered for."""
    choice = w.kernel
    if choice == "xla":
        return dict.fromkeys(PLATFORMS, "xla")
    fits = w.codes.ndim == 2  # the kernels read the 2-D layout
    if choice in KERNEL_IMPLS:
        if not fits:
            raise ValueError(f"quant.kernel={choice}: the fused kernel needs the 2-D layout (inputs a multiple of "
                             f"the blocksize {w.blocksize}); this kernel has {w.shape[0]} inputs")
        if choice != "pallas":
            return dict.fromkeys(PLATFORMS, choice)
        if target_platforms() == ("cpu",):
            raise ValueError("quant.kernel=pallas: the fused kernels are lowered for GPUs (Triton) and TPUs (Mosaic); "
                             "this program is for the CPU. Use quant.kernel=auto (XLA here) or interpret (tests)")
        return {"cpu": "xla", "cuda": "pallas", "tpu": "tpu"}
    if not fits:
        return dict.fromkeys(PLATFORMS, "xla")
    return {"cpu": "xla", "cuda": "pallas" if _gpu_kernel_wins(w, m) else "xla",
            "tpu": "tpu" if m < KERNEL_ROWS else "xla"}


def path(w: QuantizedWeight, m: int, platform: Optional[str] = None) -> str:
    """The implementation for ``platform`` (default: the first the program may be lowered for)."""
    platform = platform or target_platforms()[0]
    return paths(w, m).get(platform, "xla")


def _gpu_kernel_wins(w: QuantizedWeight, m: int) -> bool:
    n_in, n_out = w.shape
    entry = measured(m, n_out, n_in, w.kind, jax.devices()[0].device_kind)
    if entry is None:
        return m < KERNEL_ROWS
    return entry != "xla"


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


# The kernels behind jit with their configuration static: a model's many projections of one shape
# (and every layer's) share one traced kernel instead of tracing Pallas again at each call site,
# which halved the time to trace every recipe for CUDA and TPU (tests/job/test_lowering.py: 81 s -> 57 s).
_STATIC_FWD = ("kind", "blocksize", "n", "table", "lora_scale", "out_dtype", "interpret", "tiles")
_STATIC_T = ("kind", "blocksize", "k", "table", "out_dtype", "interpret", "tiles")
_gpu_forward = jax.jit(forward, static_argnames=_STATIC_FWD)
_gpu_transposed = jax.jit(transposed, static_argnames=_STATIC_T)
_tpu_forward = jax.jit(quant_matmul_tpu.forward, static_argnames=_STATIC_FWD)
_tpu_transposed = jax.jit(quant_matmul_tpu.transposed, static_argnames=_STATIC_T)


def _kernel_forward(x2, w: QuantizedWeight, dtype, impl, xa=None, b=None, s=1.0):
    def call(rows, codes, scales, xa=None, b=None):
        common = dict(kind=w.kind, blocksize=w.blocksize, n=w.shape[1], table=code_table(w.kind), xa=xa, b=b,
                      lora_scale=float(s), out_dtype=jnp.dtype(dtype))
        if impl in ("tpu", "interpret_tpu"):
            return _tpu_forward(rows, codes, scales, interpret=impl == "interpret_tpu", **common)
        return _gpu_forward(rows, codes, scales, tiles=_tiles_or_default(w, rows.shape[0]),
                            interpret=impl == "interpret", **common)

    return _on_each_device(call, x2.astype(dtype), w.codes, kernel_scales(w), xa=xa, b=b)


def _kernel_transposed(dy2, w: QuantizedWeight, dtype, impl):
    def call(rows, codes, scales):
        common = dict(kind=w.kind, blocksize=w.blocksize, k=w.shape[0], table=code_table(w.kind),
                      out_dtype=jnp.dtype(dtype))
        if impl in ("tpu", "interpret_tpu"):
            return _tpu_transposed(rows, codes, scales, interpret=impl == "interpret_tpu", **common)
        return _gpu_transposed(rows, codes, scales, tiles=_tiles_or_default(w, rows.shape[0], backward=True),
                               interpret=impl == "interpret", **common)

    return _on_each_device(call, dy2.astype(dtype), w.codes, kernel_scales(w))


def _row_axes(rows: int) -> tuple[str, ...]:
    """The mesh axes a kernel call's ``rows`` are split over (`_on_each_device`): batch and context
    axes of the activation mesh when the rows divide over them, else none."""
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return ()
    axes = tuple(a for a in (*BATCH_AXES, CONTEXT_AXIS) if mesh.shape.get(a, 1) > 1)
    return axes if axes and rows % int(np.prod([mesh.shape[a] for a in axes])) == 0 else ()


def _rows_per_device(rows: int) -> int:
    """What one device's kernel call sees: the tile table and `KERNEL_ROWS` are per device."""
    axes = _row_axes(rows)
    return rows // int(np.prod([current_mesh().shape[a] for a in axes])) if axes else rows


def _on_each_device(call, rows, codes, scales, **lora):
    """``call(rows, codes, scales, **lora)`` on each device's rows under the activation mesh (in
    `jax.shard_map`: XLA cannot split a custom call), the kernel and LoRA's ``b`` whole on every
    device (an FSDP-sharded kernel is gathered, as for any matmul); ``xa`` is split like the rows.
    Rows that do not divide over the batch (and context) axes run whole."""
    mesh = current_mesh()
    lora = {k: v for k, v in lora.items() if v is not None}
    if mesh is None or mesh.size == 1:
        return call(rows, codes, scales, **lora)
    axes = _row_axes(rows.shape[0])
    row_spec = P(axes) if axes else P()
    lora_specs = {k: row_spec if k == "xa" else P() for k in lora}
    local = lambda rows, codes, scales, lora: call(rows, codes, scales, **lora)  # noqa: E731
    return jax.shard_map(local, mesh=mesh, in_specs=(row_spec, P(), P(), lora_specs), out_specs=row_spec,
                         check_vma=False)(rows, codes, scales, lora)


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
    dtype = jnp.dtype(x.dtype if dtype is None else dtype).name
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"linear: x has {x.shape[-1]} input features, quantized kernel expects {w.shape[0]}")
    impls = paths(w, _rows_per_device(int(np.prod(x.shape[:-1]))))
    branches = _branches(impls, lambda impl: lambda x, w: quant_matmul(x.astype(dtype), w, dtype, impl))
    return per_platform(branches, x, w)


def lora_over_quantized(x: jax.Array, h: jax.Array, w: QuantizedWeight, a, b, s, dtype,
                        low_rank: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """``x @ dequantize(w) + s * low_rank(h, a, b)``: the fused QLoRA kernel on the platforms whose
    path for ``w`` is a Pallas kernel, XLA's product plus the LoRA rule's own ``low_rank`` term
    elsewhere."""
    dtype = jnp.dtype(x.dtype if dtype is None else dtype).name
    impls = paths(w, _rows_per_device(int(np.prod(x.shape[:-1]))))

    def product(impl):
        if impl == "xla":
            return lambda x, h, w, a, b: quant_matmul(x.astype(dtype), w, dtype, "xla") + s * low_rank(h, a, b)
        return lambda x, h, w, a, b: quant_lora_matmul(x.astype(dtype), h.astype(dtype), w, a, b, float(s), dtype, impl)

    return per_platform(_branches(impls, product), x, h, w, a, b)


def _branches(impls: dict[str, str], make) -> dict:
    """One function per platform, shared between platforms with the same implementation."""
    made = {impl: make(impl) for impl in set(impls.values())}
    return {p: made[impls[p]] for p in PLATFORMS}
