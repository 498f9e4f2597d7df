"""The one linear op: every projection in every jaxtune model calls `linear`.

A weight leaf is either a plain array ``w: [in, out]`` or a registered typed
leaf (a pytree node such as a LoRA weight or a quantized weight). `linear`
dispatches on the leaf's type to the rule registered for it, so a model never
writes ``x @ w`` and never needs to know which kind of weight it was handed.

This module must not import any PEFT or quantization code: those modules
register their own rules here (``@register_linear(MyLeaf)``), which keeps the
dependency pointing one way.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np


class LinearRule(Protocol):
    def __call__(self, x: jax.Array, w: Any, *, dtype: Any, rng: Optional[jax.Array] = None) -> jax.Array: ...


_RULES: dict[type, LinearRule] = {}


def register_linear(leaf_type: type) -> Callable[[LinearRule], LinearRule]:
    """Register ``rule(x, w, *, dtype, rng=None) -> y`` as the linear op for ``leaf_type``.

    The rule receives activations ``x: [..., in]`` and the typed leaf and must
    return ``y: [..., out]`` in ``dtype`` (the compute dtype; None keeps
    ``x.dtype``). ``rng`` is a key in training steps (for leaves with dropout, such
    as LoRA's on its adapter input) and None when the model runs deterministically
    (evaluation, generation). Subclasses of a registered type use their parent's
    rule unless they register their own.
    """

    def decorator(rule: LinearRule) -> LinearRule:
        _RULES[leaf_type] = rule
        return rule

    return decorator


def is_typed_weight(x: Any) -> bool:
    """True for an instance of a registered typed weight leaf (LoRA, quantized, ...): the
    ``is_leaf`` that lets a tree walk stop at a kernel, whatever it is made of."""
    return bool(_RULES) and isinstance(x, tuple(_RULES))


def linear_rule(w: Any) -> LinearRule:
    """The rule that `linear` would use for weight leaf ``w``."""
    if isinstance(w, (jax.Array, np.ndarray)):
        return _dense
    for cls in type(w).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    raise TypeError(
        f"no linear rule for weight leaf of type {type(w).__module__}.{type(w).__qualname__}; "
        "register one with @jaxtune.ops.register_linear(ThatType)"
    )


def linear(x: jax.Array, w: Any, *, dtype: Any = None, rng: Optional[jax.Array] = None) -> jax.Array:
    """``y = x @ w`` for any weight leaf. x: [..., in]; w: [in, out] (or a typed leaf);
    ``rng``: dropout key in training, None for deterministic use."""
    return linear_rule(w)(x, w, dtype=dtype, rng=rng)


def dropout(x: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
    """Inverted dropout of ``x`` at ``rate``; the identity when ``rng`` is None or rate is 0."""
    if rng is None or not rate:
        return x
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


_KEEP_LEADING_DIMS: contextvars.ContextVar[bool] = contextvars.ContextVar("linear_keep_leading_dims", default=False)


@contextlib.contextmanager
def keep_leading_dims(keep: bool = True) -> Iterator[None]:
    """Within the block (while tracing), a plain kernel's matmul contracts ``x [..., in]`` as it is
    instead of flattening the leading dimensions into one: a sequence split over devices (context
    parallelism, `jaxtune.parallel.rules.activation_mesh`) cannot be merged with the batch
    dimension without gathering it whenever a device holds more than one row."""
    token = _KEEP_LEADING_DIMS.set(keep)
    try:
        yield
    finally:
        _KEEP_LEADING_DIMS.reset(token)


def _dense(x: jax.Array, w: jax.Array, *, dtype: Any, rng: Optional[jax.Array] = None) -> jax.Array:
    dtype = x.dtype if dtype is None else dtype
    if w.ndim != 2:
        raise ValueError(f"linear expects a 2-D kernel [in, out], got shape {w.shape}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"linear: x has {x.shape[-1]} input features, kernel expects {w.shape[0]}")
    if _KEEP_LEADING_DIMS.get():
        return jax.lax.dot_general(x.astype(dtype), jnp.asarray(w).astype(dtype), (((x.ndim - 1,), (0,)), ((), ())))
    # One 2-D GEMM over every leading dimension: its gradients are 2-D GEMMs too (dW contracts the
    # tokens), which XLA:CPU runs without the transposing copies it inserts for a 3-D contraction.
    y = jnp.matmul(x.reshape(-1, x.shape[-1]).astype(dtype), jnp.asarray(w).astype(dtype))
    return y.reshape(*x.shape[:-1], w.shape[1])
