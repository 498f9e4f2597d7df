"""Numerical primitives shared by every model: the one linear op and its dispatch."""

from jaxtune.ops.linear import linear, linear_rule, register_linear

__all__ = ["linear", "linear_rule", "register_linear"]
