"""Which mesh axes each parameter is split along: rules from param path to PartitionSpec.

A rule is ``(regex over the path string, PartitionSpec over the leaf's dims)``;
the first match wins. Kernels are ``[in, out]``: projections into heads / FFN
put ``fsdp`` on ``in`` and ``tensor`` on ``out``; projections back to the
residual stream the reverse, so a tensor-parallel block needs one reduction
per sublayer. Norm scales, biases into the residual stream and anything
unmatched are replicated.

A typed leaf (LoRA, quantized weight, ...) is sharded by the rule of its path
as if it were the plain ``[in, out]`` kernel, then handed to the function
registered for its type (`register_sharding`), which returns one spec per array
inside it (LoRA's A follows W's ``in`` axis, B its ``out`` axis). An axis that
does not divide a dimension is dropped for that leaf and reported once.

This module decides placement only; it never moves data (see `param_shardings`
plus ``jax.device_put`` or jit ``out_shardings`` for that).
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxtune.ops.linear import keep_leading_dims
from jaxtune.parallel.mesh import BATCH_AXES, CONTEXT_AXIS, axis_size
from jaxtune.utils.tree import keypath_str

Rule = tuple[str, P]

DEFAULT_RULES: tuple[Rule, ...] = (
    (r"(^|/)embed/embedding$", P("tensor", "fsdp")),  # [vocab, embed]
    (r"(^|/)(pos|type)_embed/embedding$", P(None, "fsdp")),  # [positions or token types, embed]
    (r"attn/(q|k|v)_proj/kernel$", P("fsdp", "tensor")),  # [embed, heads*head_dim]
    (r"attn/(q|k|v)_proj/bias$", P("tensor")),
    (r"attn/o_proj/kernel$", P("tensor", "fsdp")),  # [heads*head_dim, embed]
    (r"mlp/(gate|up)_proj/kernel$", P("fsdp", "tensor")),  # [embed, ffn]
    (r"mlp/(gate|up)_proj/bias$", P("tensor")),
    (r"mlp/down_proj/kernel$", P("tensor", "fsdp")),  # [ffn, embed]
    (r"(^|/)lm_head/kernel$", P("fsdp", "tensor")),  # [embed, vocab]
    (r"(_head|classifier)/kernel$", P("fsdp", None)),  # value / reward / classifier heads [embed, n]
    (r"(^|/)(pooler|nsp|lm_head/transform)/kernel$", P("fsdp", None)),  # BERT: [embed, embed] / [embed, 2]
    (r".*", P()),
)

SpecRule = Callable[[Any, P], Any]  # (typed leaf, spec of its [in, out] base) -> pytree of specs like the leaf
_SPEC_RULES: dict[type, SpecRule] = {}


def register_sharding(leaf_type: type) -> Callable[[SpecRule], SpecRule]:
    """Register ``rule(leaf, base_spec) -> specs`` for a typed weight leaf.

    ``specs`` has the leaf's pytree structure with a PartitionSpec in place of
    each array; `param_specs` then drops axes that do not divide the array.
    """

    def decorator(rule: SpecRule) -> SpecRule:
        _SPEC_RULES[leaf_type] = rule
        return rule

    return decorator


def _spec_rule(x: Any) -> Optional[SpecRule]:
    for cls in type(x).__mro__:
        if cls in _SPEC_RULES:
            return _SPEC_RULES[cls]
    return None



def nested_specs(base: Any, spec: P) -> Any:
    """The specs of a (possibly typed) ``base`` whose plain-kernel spec is ``spec``: a typed base
    (quantized, LoRA, ...) is expanded by its own registered sharding rule. Adapter rules use it
    for their ``base`` field, so a LoRA over a quantized kernel gets the quantized layout's specs."""
    rule = _spec_rule(base)
    return spec if rule is None else rule(base, spec)


def fit_spec(spec: P, shape: tuple[int, ...], mesh_shape: dict[str, int], where: str = "", dropped: Optional[list[str]] = None) -> P:
    """Trim/pad ``spec`` to the array's rank and drop axes that do not divide their dimension."""
    entries = list(spec)[: len(shape)] + [None] * max(0, len(shape) - len(spec))
    fitted = []
    for dim, entry in zip(shape, entries):
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        kept = []
        for name in names:
            size = mesh_shape.get(name, 1)
            step = 1
            for k in kept:
                step *= mesh_shape.get(k, 1)
            if dim % (step * size) == 0:
                kept.append(name)
            elif dropped is not None:
                dropped.append(f"{where} dim {dim} not divisible by {name}={size}")
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while fitted and fitted[-1] is None:
        fitted.pop()
    return P(*fitted)


def param_specs(params: Any, mesh: Mesh, rules: Sequence[Rule] = (), *, warn: bool = True) -> Any:
    """A pytree of PartitionSpecs matching ``params`` (typed leaves expanded to their arrays).

    ``rules`` are tried before `DEFAULT_RULES`. Leaves may be arrays or
    ``jax.ShapeDtypeStruct`` (so abstract trees work).
    """
    compiled = [(re.compile(pattern), spec) for pattern, spec in (*rules, *DEFAULT_RULES)]
    mesh_shape = dict(mesh.shape)
    dropped: list[str] = []

    def base_spec(path: str) -> P:
        return next(spec for pattern, spec in compiled if pattern.search(path))

    def leaf_specs(path, leaf):
        where = keypath_str(path)
        rule = _spec_rule(leaf)
        if rule is None:
            return fit_spec(base_spec(where), tuple(leaf.shape), mesh_shape, where, dropped)
        specs = rule(leaf, base_spec(where))
        # A split typed leaf (frozen base, trainable adapters) has None where the other half lives.
        is_none_or_spec = lambda x: x is None or isinstance(x, P)  # noqa: E731
        arrays, treedef = jax.tree.flatten(leaf, is_leaf=lambda x: x is None)
        spec_list = jax.tree.leaves(specs, is_leaf=is_none_or_spec)
        if len(spec_list) != len(arrays):
            raise ValueError(f"{where}: the sharding rule for {type(leaf).__name__} returned "
                             f"{len(spec_list)} specs for {len(arrays)} arrays")
        fitted = [None if a is None else fit_spec(s, tuple(a.shape), mesh_shape, where, dropped)
                  for s, a in zip(spec_list, arrays)]
        return jax.tree.unflatten(treedef, fitted)

    specs = jax.tree_util.tree_map_with_path(leaf_specs, params, is_leaf=lambda x: _spec_rule(x) is not None)
    if dropped and warn:
        shown = "; ".join(dropped[:5]) + (f"; and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        warnings.warn(f"replicated instead of sharded (axis does not divide): {shown}", stacklevel=2)
    return specs


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[Rule] = (), *, warn: bool = True) -> Any:
    """Like `param_specs`, as NamedShardings on ``mesh``."""
    specs = param_specs(params, mesh, rules, warn=warn)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


# --- activations ---------------------------------------------------------------------------

_ACTIVATION_MESH: contextvars.ContextVar[Optional[Mesh]] = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Optional[Mesh]) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations to ``mesh``. With a
    ``context`` axis, projections also keep the [batch, seq] dimensions apart
    (`jaxtune.ops.keep_leading_dims`), so the split sequence is never gathered for a matmul."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        with keep_leading_dims(mesh is not None and dict(mesh.shape).get(CONTEXT_AXIS, 1) > 1):
            yield
    finally:
        _ACTIVATION_MESH.reset(token)


def current_mesh() -> Optional[Mesh]:
    """The mesh of the enclosing `activation_mesh` (None outside one)."""
    return _ACTIVATION_MESH.get()


def context_size() -> int:
    """How many devices split the sequence while tracing (the activation mesh's ``context`` axis;
    1 without a mesh or the axis)."""
    mesh = current_mesh()
    return 1 if mesh is None else axis_size(mesh, CONTEXT_AXIS)


def constrain(x: jax.Array, *rest: Any) -> jax.Array:
    """Sharding constraint for an activation ``[batch, seq, *more]``: batch over data x fsdp, the
    sequence over ``context`` (context parallelism; where the mesh has that axis and it divides).

    ``rest`` names the mesh axis (or None) of each dimension after the batch, replacing that
    default (further dimensions replicated); an axis that does not divide its dimension is dropped.
    A no-op outside `activation_mesh`, so models stay usable without any mesh.
    """
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return x
    mesh_shape = dict(mesh.shape)
    batch_size = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    if x.shape[0] % batch_size:
        return x  # e.g. a batch of one while decoding: leave placement to XLA
    if not rest and x.ndim > 1 and mesh_shape.get(CONTEXT_AXIS, 1) > 1:
        rest = (CONTEXT_AXIS,)
    fitted = fit_spec(P(None, *rest), tuple(x.shape), mesh_shape)  # e.g. one token while decoding: no split
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH_AXES, *tuple(fitted)[1:])))


def constrain_weight(w: jax.Array, *spec: Any) -> jax.Array:
    """Ask for weight ``w`` laid out as ``spec`` at its point of use (e.g. an FSDP-sharded
    embedding table gathered over ``fsdp`` before a lookup, so the lookup's output is split by
    batch rather than by feature). Axes that do not divide are dropped; no-op without a mesh."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return w
    return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, fit_spec(P(*spec), tuple(w.shape), dict(mesh.shape))))
