"""Numerical primitives shared by every model: the one linear op and its dispatch."""

from jaxtune.ops.linear import is_typed_weight, keep_leading_dims, linear, linear_rule, register_linear

__all__ = ["is_typed_weight", "keep_leading_dims", "linear", "linear_rule", "register_linear"]
