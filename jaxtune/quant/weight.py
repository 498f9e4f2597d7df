"""Quantized weight leaves and the ``quantize(params, cfg) -> params`` transform (DESIGN contracts 2-3).

A `QuantizedWeight` stands for a kernel ``W: [in, out]`` and stores it as bitsandbytes does for
an ``nn.Linear`` weight, i.e. for ``W^T: [out, in]`` flattened row-major:

==========  ===========================================  ==============================================
kind        ``codes``                                    ``scales``
==========  ===========================================  ==============================================
nf4 / fp4   uint8, two 4-bit codes a byte (high nibble   float32 absmax per block of ``blocksize``
            first): ``[out, in/2]``, or flat             consecutive values: ``[out, in/blocksize]``
            ``[ceil(out*in/2)]`` when blocks would       (or flat); with double quantization uint8
            straddle rows (``in % blocksize != 0``)      codes of ``absmax - offset`` (8-bit dynamic
                                                         map, blocks of 256) plus ``nested_scales``
                                                         float32 ``[ceil(n_blocks/256)]`` and ``offset``
int8        int8 ``[out, in]``: ``round(w * 127/absmax)``   float32 absmax per output row ``[out]``
int4        uint8 ``[out, in/2]``: ``q + 8``, q in          float32 ``absmax / 7`` per group of
            [-7, 7] (symmetric), high nibble first       ``blocksize`` inputs: ``[out, in/blocksize]``
==========  ===========================================  ==============================================

so the packed bytes, absmax and double-quantized statistics are bitsandbytes' own (see
`jaxtune.quant.codes`) and a checkpoint quantized by bitsandbytes loads without a 16-bit round
trip. NF4 with double quantization costs 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter.

The one linear op (`jaxtune.quant.matmul`) dequantizes to the compute dtype and multiplies, by XLA
or by the fused Pallas kernel of `jaxtune.kernels` (``QuantConfig.kernel``). For shape,
dtype and ``astype`` a `QuantizedWeight` behaves like the kernel it stands for: ``astype``
dequantizes, so adapters' ``merged()`` work on quantized bases unchanged.

This module must not quantize anything the linear op does not read (embedding tables used by
lookup, norms): targets must be ``.../kernel`` paths.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxtune.ops.linear import is_typed_weight
from jaxtune.parallel.rules import register_sharding
from jaxtune.quant import codes as C
from jaxtune.utils.targets import map_targets, target_patterns
from jaxtune.utils.tree import keypath_str

KINDS = ("nf4", "fp4", "int8", "int4")
KERNELS = ("auto", "xla", "pallas", "interpret", "interpret_tpu")
@dataclass(frozen=True)
class QuantConfig:
    """The ``quant:`` section. ``blocksize``: the NF4/FP4 block (32..4096, default 64) or the
    int4 group (default 64 as well); int8 is row-wise. ``double_quant`` (NF4/FP4 only):
    8-bit quantized absmax, as QLoRA. ``targets``: presets (attention, mlp, all-linear) or
    regexes over kernel paths; the LM head and embeddings stay in 16/32-bit unless named."""

    kind: Literal["nf4", "fp4", "int8", "int4"] = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    targets: tuple[str, ...] = ("all-linear",)
    # how the linear op multiplies (jaxtune.quant.matmul): auto (by the platform lowered for: the fused
    # Pallas kernel on GPU / TPU where it is expected or measured faster, else XLA's
    # dequantize-then-matmul) | xla | pallas (the platform's fused kernel) | interpret (the GPU kernel
    # in Pallas' interpreter: tests) | interpret_tpu (the TPU kernel in the interpreter: tests)
    kernel: Literal["auto", "xla", "pallas", "interpret", "interpret_tpu"] = "auto"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"quant.kind: unknown kind {self.kind!r} ({' | '.join(KINDS)})")
        if self.kind != "int8" and self.blocksize not in C.BLOCKSIZES:
            raise ValueError(f"quant.blocksize must be a power of two from 32 to 4096, got {self.blocksize}")
        if self.kernel not in KERNELS:
            raise ValueError(f"quant.kernel: unknown kernel choice {self.kernel!r} ({' | '.join(KERNELS)})")
        if self.double_quant and self.kind in ("int8", "int4"):
            raise ValueError(f"quant.double_quant applies to nf4/fp4 absmax only; set it false for {self.kind}")
        target_patterns(self.targets, "quant.targets")


@jax.tree_util.register_dataclass
@dataclass
class QuantizedWeight:
    """A kernel ``[in, out]`` held quantized (layout in the module docstring). Frozen: it has no
    float array to train; ``shape`` / ``orig_dtype`` are the kernel's."""

    never_trainable = True  # `jaxtune.utils.partition`: frozen whatever a trainable mask says

    codes: Any
    scales: Any
    nested_scales: Any = None  # double quantization only
    offset: Any = None  # double quantization only
    kind: str = field(metadata=dict(static=True), default="nf4")
    shape: tuple = field(metadata=dict(static=True), default=())  # (in, out)
    orig_dtype: str = field(metadata=dict(static=True), default="float32")
    blocksize: int = field(metadata=dict(static=True), default=64)
    kernel: str = field(metadata=dict(static=True), default="auto")  # see QuantConfig.kernel

    @property
    def dtype(self):
        return jnp.dtype(self.orig_dtype)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def param_count(self) -> int:
        """Parameters this leaf stands for (the kernel's), not its storage elements."""
        return self.size

    @property
    def double_quant(self) -> bool:
        return self.nested_scales is not None

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(self))

    def config(self, targets: tuple[str, ...] = ("all-linear",)) -> QuantConfig:
        return QuantConfig(kind=self.kind, blocksize=self.blocksize, double_quant=self.double_quant, targets=targets,
                           kernel=self.kernel)

    def absmax(self) -> jax.Array:
        """The float32 absmax (nf4 / fp4: double-dequantized if need be) in ``scales``' shape."""
        if not self.double_quant:
            return self.scales
        return C.double_dequantize(self.scales.reshape(-1), self.nested_scales, self.offset).reshape(self.scales.shape)

    def dequantize_t(self, dtype: Any = jnp.float32) -> jax.Array:
        """``W^T: [out, in]`` in ``dtype`` (the stored orientation; what the linear op contracts)."""
        n_in, n_out = self.shape
        if self.kind == "int8":
            w = self.codes.astype(jnp.float32) * self.scales[:, None] * np.float32(1.0 / 127.0)
            return w.astype(dtype)
        if self.kind == "int4":
            q = C.unpack_4bit(self.codes, n_in) - 8
            groups = q.reshape(n_out, n_in // self.blocksize, self.blocksize).astype(jnp.float32)
            return (groups * self.scales[..., None]).reshape(n_out, n_in).astype(dtype)
        absmax = self.absmax()
        if self.codes.ndim == 1:  # flat layout: blocks run across rows
            flat = C.dequantize_4bit(self.codes, absmax, n_in * n_out, self.blocksize, self.kind, jnp.float32)
            return flat.reshape(n_out, n_in).astype(dtype)
        values = jnp.asarray(C.CODES_4BIT[self.kind])[C.unpack_4bit(self.codes, n_in)]
        blocks = values.reshape(n_out, n_in // self.blocksize, self.blocksize) * absmax[..., None]
        return blocks.reshape(n_out, n_in).astype(dtype)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The kernel ``[in, out]`` in ``dtype`` (default: the dtype it was quantized from)."""
        return self.dequantize_t(self.dtype if dtype is None else dtype).T

    def astype(self, dtype: Any) -> jax.Array:
        return self.dequantize(dtype)

    def requantize(self, w: jax.Array) -> "QuantizedWeight":
        """``w: [in, out]`` quantized with this leaf's settings (e.g. a PiSSA residual)."""
        return quantize_kernel(w, self.config())


@register_sharding(QuantizedWeight)
def _quantized_specs(w: QuantizedWeight, spec: P) -> QuantizedWeight:
    """Stored ``[out, ...]`` arrays take the kernel's axes transposed (out first); flat arrays
    are split in contiguous pieces along the kernel's ``out`` axis; double-quantization
    statistics (one float per 16,384 parameters) are replicated."""
    in_axis = spec[0] if len(spec) > 0 else None
    out_axis = spec[1] if len(spec) > 1 else None

    def of(a):
        if a is None:
            return None
        if a.ndim == 2:
            return P(out_axis, in_axis)
        return P(out_axis) if a.ndim == 1 else P()

    return dataclasses.replace(w, codes=of(w.codes), scales=of(w.scales),
                               nested_scales=None if w.nested_scales is None else P(),
                               offset=None if w.offset is None else P())


@partial(jax.jit, static_argnames=("kind", "blocksize", "double_quant"))
def _quantize_t(wt: jax.Array, kind: str, blocksize: int, double_quant: bool):
    """``W^T: [out, in]`` -> (codes, scales, nested, offset) arrays (see the module docstring)."""
    n_out, n_in = wt.shape
    if kind == "int8":
        absmax = jnp.max(jnp.abs(wt.astype(jnp.float32)), axis=1)
        inv = jnp.where(absmax > 0, np.float32(127.0) / jnp.where(absmax > 0, absmax, 1.0), 0.0)  # a zero row stays 0
        codes = jnp.round(wt.astype(jnp.float32) * inv[:, None])
        return jnp.clip(codes, -127, 127).astype(jnp.int8), absmax, None, None
    if kind == "int4":
        groups = wt.astype(jnp.float32).reshape(n_out, n_in // blocksize, blocksize)
        scale = jnp.max(jnp.abs(groups), axis=-1) / np.float32(7.0)
        q = jnp.clip(jnp.round(groups / jnp.maximum(scale, 1e-30)[..., None]), -7, 7).astype(jnp.int32) + 8
        q = q.reshape(n_out, n_in // 2, 2).astype(jnp.uint8)
        return (q[..., 0] << 4) | q[..., 1], scale, None, None
    packed, absmax = C.quantize_4bit(wt.reshape(-1), blocksize, kind)
    if n_in % blocksize == 0:
        packed, absmax = packed.reshape(n_out, n_in // 2), absmax.reshape(n_out, n_in // blocksize)
    if not double_quant:
        return packed, absmax, None, None
    codes, nested, offset = C.double_quantize(absmax.reshape(-1))
    return packed, codes.reshape(absmax.shape), nested, offset


def quantize_kernel(w: jax.Array, cfg: QuantConfig, where: str = "kernel") -> QuantizedWeight:
    """One kernel ``w: [in, out]`` -> `QuantizedWeight` (jit-compiled once per shape)."""
    if getattr(w, "ndim", None) != 2:
        raise ValueError(f"quantize: {where} is not a 2-D kernel (shape {getattr(w, 'shape', None)})")
    n_in, n_out = (int(d) for d in w.shape)
    if cfg.kind == "int4" and n_in % cfg.blocksize:
        raise ValueError(f"quantize: int4 groups of {cfg.blocksize} do not divide {where}'s {n_in} inputs; "
                         "choose a quant.blocksize that divides it")
    if cfg.kind == "int4" and n_in % 2:
        raise ValueError(f"quantize: int4 packs two inputs a byte; {where} has an odd input size {n_in}")
    codes, scales, nested, offset = _quantize_t(jnp.asarray(w).T, cfg.kind, cfg.blocksize, cfg.double_quant)
    return QuantizedWeight(codes=codes, scales=scales, nested_scales=nested, offset=offset, kind=cfg.kind,
                           shape=(n_in, n_out), orig_dtype=jnp.dtype(w.dtype).name, blocksize=cfg.blocksize,
                           kernel=cfg.kernel)


def with_kernel(params: Any, kernel: str) -> Any:
    """``params`` with every quantized kernel's matmul choice set to ``kernel`` (see QuantConfig.kernel):
    e.g. for a checkpoint loaded pre-quantized, or to compare the paths."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel choice {kernel!r} ({' | '.join(KERNELS)})")
    return jax.tree.map(lambda x: dataclasses.replace(x, kernel=kernel) if is_quantized(x) else x, params,
                        is_leaf=is_quantized)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


def quantize(params: Any, cfg: QuantConfig) -> Any:
    """``params -> params`` with every kernel whose path matches ``cfg.targets`` quantized. An
    adapter leaf at a matching path (e.g. LoRA applied first, PiSSA's residual base) gets its
    ``base`` quantized, adapters untouched. Raises if nothing matches, a target is not a
    ``.../kernel`` or is already quantized."""

    def visit(where, leaf):
        if not where.endswith("kernel"):
            raise ValueError(f"quantize: {where} is not a kernel read by the linear op (only .../kernel paths "
                             "can be quantized; embeddings and norms stay as they are)")
        if is_quantized(leaf):
            raise ValueError(f"quantize: {where} is already quantized ({leaf.kind})")
        if is_typed_weight(leaf):
            if not hasattr(leaf, "base") or not isinstance(leaf.base, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
                raise ValueError(f"quantize: {where} holds a {type(leaf).__name__} without a plain base kernel")
            return dataclasses.replace(leaf, base=quantize_kernel(leaf.base, cfg, where))
        return quantize_kernel(leaf, cfg, where)

    return map_targets(params, cfg.targets, visit, key="quant.targets", is_leaf=is_typed_weight, what="kernel")


def dequantize(params: Any, dtype: Any = None) -> Any:
    """Every `QuantizedWeight` (also as an adapter's base) replaced by its dense kernel."""
    return jax.tree.map(lambda x: x.dequantize(dtype) if is_quantized(x) else x, params, is_leaf=is_quantized)


def quantized_paths(params: Any) -> dict[str, QuantConfig]:
    """``{kernel path: its QuantConfig}`` for every quantized kernel, bare or under an adapter."""
    found: dict[str, QuantConfig] = {}

    def visit(path, leaf):
        base = leaf
        while hasattr(base, "base") and not is_quantized(base):
            base = base.base
        if is_quantized(base):
            found[keypath_str(path)] = base.config()
        return leaf

    jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_typed_weight)
    return found


def bits_per_parameter(params: Any) -> float:
    """Storage bits per parameter of the quantized kernels in ``params`` (NF4 + double quant: ~4.127)."""
    leaves = [x for x in jax.tree.leaves(params, is_leaf=is_quantized) if is_quantized(x)]
    if not leaves:
        raise ValueError("no quantized kernels in params")
    return 8.0 * sum(x.nbytes for x in leaves) / sum(x.size for x in leaves)


def quantized_bytes(cfg: QuantConfig, n_in: int, n_out: int) -> int:
    """Storage bytes of one ``[n_in, n_out]`` kernel under ``cfg`` (for the memory estimator)."""
    n = n_in * n_out
    if cfg.kind == "int8":
        return n + 4 * n_out
    if cfg.kind == "int4":
        return math.ceil(n / 2) + 4 * n_out * (n_in // cfg.blocksize)
    blocks = math.ceil(n / cfg.blocksize)
    if not cfg.double_quant:
        return math.ceil(n / 2) + 4 * blocks
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / C.NESTED_BLOCKSIZE) + 4

