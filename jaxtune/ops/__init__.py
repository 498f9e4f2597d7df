"""Numerical primitives shared by every model: the one linear op and its dispatch."""

from jaxtune.ops.linear import is_typed_weight, linear, linear_rule, register_linear

__all__ = ["is_typed_weight", "linear", "linear_rule", "register_linear"]
