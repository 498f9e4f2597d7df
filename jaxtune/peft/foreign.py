"""LoRA for JAX code that was not written for jaxtune (the idea of lorax's ``lora`` transform).

jaxtune's own models route every projection through the one linear op, which computes LoRA
factored. A foreign function (a Flax Linen module's ``apply``, a hand-written ``x @ p['w']``)
does not, so it cannot take a `LoraWeight` leaf. Two pieces make it work anyway:

    adapted = init_foreign_lora(variables, rng, targets=r"Dense_\\d+/kernel$", rank=4)
    apply = lora_wrap(model.apply)          # same signature as model.apply
    y = apply(adapted, x)                   # jit / grad / vmap as usual

`init_foreign_lora` puts a `LoraWeight` (frozen ``base``, trainable ``A``, ``B``; B = 0 so the
function is unchanged at init) at each targeted leaf of any pytree. `lora_wrap(fn)` returns a
function that, inside the trace, replaces every `LoraWeight` in its params argument by the dense
``base + s * A @ B`` (DESIGN contract 3) and calls ``fn`` with plain arrays. The base goes
through ``stop_gradient``, so gradients reach only A and B even when a caller differentiates the
whole tree; with `jaxtune.peft.core.trainable_mask` + `jaxtune.utils.partition.split` the base is
not in the trainable half at all. `jaxtune.peft.lora.merge` gives the same plain tree outside.

Kernels with more than two dimensions (a Flax ``Conv`` kernel ``[kh, kw, in, out]``, a
``DenseGeneral`` kernel ``[in, heads, head_dim]``) are adapted as the matrix
``[prod(in dims), prod(out dims)]``; how many leading axes are inputs is ambiguous, so it must be
given (``in_dims``) and such leaves are `FoldedLoraWeight`s (the base keeps its shape). For a conv
kernel with ``in_dims=3`` this is PEFT's Conv LoRA: A a ``kh x kw`` conv to ``r`` channels, B a
1x1 conv. Materialising the weight costs one ``[in, r] @ [r, out]`` product per adapted leaf per
call; that is the price of not touching the foreign code. LoRA dropout acts on the adapter's
input activations, which a merged weight cannot express, so leaves with dropout are refused.
Use `jaxtune.peft.core.trainable_mask` for the trainable half (`jaxtune.peft.lora.lora_mask`
builds plain `LoraWeight` masks, which do not fit a `FoldedLoraWeight`).

This module must not import or assume anything about the foreign code: it sees a pytree and a
function, nothing else (no Flax, no jaxtune model).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxtune.ops.linear import register_linear
from jaxtune.parallel.rules import nested_specs, register_sharding
from jaxtune.peft.core import register_adapter
from jaxtune.peft.lora import INITS, LoraWeight, init_factors
from jaxtune.utils.tree import keypath_str

Predicate = Callable[[str, Any], bool]  # (path like "params/Dense_0/kernel", leaf) -> adapt?
InDims = Union[int, Callable[[str, tuple], int], None]


@register_adapter
@jax.tree_util.register_dataclass
@dataclass
class FoldedLoraWeight(LoraWeight):
    """LoRA on a kernel of ndim > 2 read as the matrix ``[prod(shape[:in_dims]), prod(shape[in_dims:])]``:
    base keeps its shape; a: [prod(in), r]; b: [r, prod(out)]."""

    in_dims: int = field(metadata=dict(static=True), default=1)

    def merged(self) -> jax.Array:
        delta = jnp.matmul(self.a.astype(jnp.float32), self.b.astype(jnp.float32)) * self.scale
        return (self.base.astype(jnp.float32) + delta.reshape(self.base.shape)).astype(self.base.dtype)


@register_linear(FoldedLoraWeight)
def _folded_linear(x, w, *, dtype, rng=None):
    raise TypeError(f"a FoldedLoraWeight (kernel shape {tuple(w.base.shape)}) is for foreign functions: "
                    "call them through jaxtune.peft.foreign.lora_wrap, not the linear op")


@register_sharding(FoldedLoraWeight)
def _folded_specs(w: FoldedLoraWeight, spec: P) -> FoldedLoraWeight:
    """The base keeps its rule's spec; the folded factors are replicated (they are small)."""
    return dataclasses.replace(w, base=nested_specs(w.base, spec), a=P(), b=P())


def _matcher(targets: Union[str, Sequence[str], Predicate]) -> Predicate:
    if callable(targets):
        return targets
    patterns = [re.compile(t) for t in ((targets,) if isinstance(targets, str) else targets)]
    if not patterns:
        raise ValueError("foreign lora: no targets given")
    return lambda path, _: any(p.search(path) for p in patterns)


def init_foreign_lora(
    params: Any,
    rng: jax.Array,
    *,
    targets: Union[str, Sequence[str], Predicate],
    rank: int = 8,
    alpha: float = 16.0,
    init: str = "default",
    rslora: bool = False,
    in_dims: InDims = None,
) -> Any:
    """A copy of any pytree ``params`` with a `LoraWeight` at every targeted array leaf.

    ``targets``: a regex (or several) over leaf paths such as ``params/Dense_0/kernel``, or a
    predicate ``(path, leaf) -> bool``. Scale ``alpha / rank`` (``alpha / sqrt(rank)`` with
    ``rslora``); ``init`` as `jaxtune.peft.lora.LoraConfig.init` (default: B = 0, the function is
    unchanged). A 2-D target ``[in, out]`` gets a `LoraWeight`; a target of ndim > 2 needs
    ``in_dims`` (an int, or ``(path, shape) -> int``): its first ``in_dims`` axes are inputs,
    and it gets a `FoldedLoraWeight`. Raises if nothing matches, a target is not a float array of
    ndim >= 2, or is already adapted.
    """
    if rank < 1:
        raise ValueError(f"foreign lora: rank must be >= 1, got {rank}")
    if init not in INITS:
        raise ValueError(f"foreign lora: unknown init {init!r} ({' | '.join(INITS)})")
    match = _matcher(targets)
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    adapted: list[str] = []

    def adapt(path, leaf):
        where = keypath_str(path)
        if not match(where, leaf):
            return leaf
        if isinstance(leaf, LoraWeight):
            raise ValueError(f"foreign lora: {where} already has a LoRA adapter")
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) < 2 or not jnp.issubdtype(getattr(leaf, "dtype", np.dtype("int32")), jnp.floating):
            raise ValueError(f"foreign lora: target {where} is not a float kernel of ndim >= 2 (shape {shape}); "
                             "narrow the targets (e.g. r'kernel$')")
        key = jax.random.fold_in(rng, len(adapted))
        adapted.append(where)
        if len(shape) == 2:
            base, a, b = init_factors(init, jnp.asarray(leaf), rank, scale, key)
            return LoraWeight(base=base, a=a, b=b, scale=scale)
        k = in_dims(where, shape) if callable(in_dims) else in_dims
        if k is None:
            raise ValueError(
                f"foreign lora: target {where} has shape {shape}; say which leading axes are inputs with "
                "in_dims= (3 for a Conv kernel [kh, kw, in, out], 1 for a DenseGeneral kernel "
                "[in, heads, head_dim], 2 for one [heads, head_dim, out])")
        if not 1 <= k < len(shape):
            raise ValueError(f"foreign lora: in_dims={k} does not split shape {shape} into inputs and outputs")
        matrix = jnp.reshape(leaf, (math.prod(shape[:k]), math.prod(shape[k:])))
        base, a, b = init_factors(init, matrix, rank, scale, key)
        return FoldedLoraWeight(base=base.reshape(shape), a=a, b=b, scale=scale, in_dims=k)

    out = jax.tree_util.tree_map_with_path(adapt, params, is_leaf=lambda x: isinstance(x, LoraWeight))
    if not adapted:
        raise ValueError(f"foreign lora: targets {targets!r} match no leaf of this tree")
    return out


def materialise(params: Any) -> Any:
    """``params`` with every `LoraWeight` replaced by the dense ``stop_gradient(base) + s * A @ B``
    (in the base's dtype). Meant to run inside the traced function (`lora_wrap` calls it)."""

    def dense(path, leaf):
        if not isinstance(leaf, LoraWeight):
            return leaf
        where = keypath_str(path)
        if leaf.dropout:
            raise ValueError(f"foreign lora: {where} has LoRA dropout {leaf.dropout}; dropout acts on the "
                             "adapter's input activations and cannot be applied through a merged weight")
        if not isinstance(leaf.base, (jax.Array, np.ndarray)):
            raise TypeError(f"foreign lora: the base at {where} is a {type(leaf.base).__name__}, not an array; "
                            "a foreign function needs a plain kernel (dequantize it first)")
        return dataclasses.replace(leaf, base=jax.lax.stop_gradient(leaf.base)).merged()

    return jax.tree_util.tree_map_with_path(dense, params, is_leaf=lambda x: isinstance(x, LoraWeight))


def lora_wrap(fn: Callable, argnums: Union[int, Sequence[int]] = 0) -> Callable:
    """``fn(params, *args, **kwargs)`` -> the same function taking a params tree with `LoraWeight`
    leaves: they are materialised (`materialise`) inside the call, then ``fn`` runs on plain
    arrays. ``argnums``: which positional arguments hold such trees. Composes with
    jit / grad / vmap; gradients reach A and B, never the base."""
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        args = list(args)
        for i in nums:
            if not -len(args) <= i < len(args):
                raise TypeError(f"lora_wrap({getattr(fn, '__name__', fn)!s}): argnums {i} but the call "
                                f"has {len(args)} positional arguments")
            args[i] = materialise(args[i])
        return fn(*args, **kwargs)

    return wrapped
