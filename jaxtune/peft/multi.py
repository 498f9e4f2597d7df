"""Several named adapters on one base model: add, select, disable, delete, combine.

An adapter is what a PEFT transform added to a tree: its adapter leaves (with the frozen
base taken out) and its added top-level subtrees (prompt, prefix). `AdapterSet` keeps one
base tree and any number of named adapters; ``params(name)`` puts one of them back onto
the base. Nothing is copied: the same base arrays serve every adapter, and ``params(None)``
(adapters disabled) is the base itself, which is what DPO / PPO use as the reference model.

    adapters = AdapterSet.from_params(apply_lora(base, cfg, rng), "chat")
    adapters = adapters.add("code", apply_lora(base, cfg, rng2))
    policy = adapters.params("chat")            # train it, then adapters.update("chat", trained)
    reference = adapters.params(None)           # the base model, no second copy
    both = adapters.combine({"chat": 0.7, "code": 0.3}, "mix")   # LoRA: exact (cat) or SVD

AdapterSet is an immutable value; every method returns a new one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

import jax
import jax.numpy as jnp

from jaxtune.peft.core import ADDED_KEYS, base_model, is_adapter
from jaxtune.peft.lora import LoraWeight
from jaxtune.utils.tree import keypath_str


def _innermost_base(leaf: Any) -> Any:
    while is_adapter(leaf):
        leaf = leaf.base
    return leaf


def _replace_innermost(leaf: Any, value: Any) -> Any:
    if not is_adapter(leaf):
        return value
    return dataclasses.replace(leaf, base=_replace_innermost(leaf.base, value))


def extract_adapter(params: Any) -> dict:
    """-> ``{"leaves": {path: adapter leaf with its base set to None}, "added": {key: subtree}}``."""
    leaves: dict[str, Any] = {}

    def take(path, x):
        if is_adapter(x):
            leaves[keypath_str(path)] = _replace_innermost(x, None)
        return x

    jax.tree_util.tree_map_with_path(take, params, is_leaf=is_adapter)
    added = {k: params[k] for k in ADDED_KEYS if isinstance(params, dict) and k in params}
    return {"leaves": leaves, "added": added}


def attach_adapter(base: Any, adapter: Mapping) -> Any:
    """Inverse of `extract_adapter`: put an adapter's leaves and added subtrees onto ``base``."""
    left = dict(adapter["leaves"])

    def put(path, x):
        where = keypath_str(path)
        if where not in left:
            return x
        if is_adapter(x):
            raise ValueError(f"attach_adapter: {where} already carries an adapter")
        return _replace_innermost(left.pop(where), x)

    out = jax.tree_util.tree_map_with_path(put, base, is_leaf=is_adapter)
    if left:
        raise ValueError(f"adapter leaves for paths not in the base model: {sorted(left)[:5]}")
    added = adapter.get("added") or {}
    if added:
        clash = sorted(set(added) & set(out))
        if clash:
            raise ValueError(f"attach_adapter: the base already has {clash}")
        out = {**out, **added}
    return out


@dataclass(frozen=True)
class AdapterSet:
    base: Any  # the param tree without adapters
    adapters: Mapping[str, dict] = field(default_factory=dict)  # name -> extract_adapter(...)

    @classmethod
    def from_params(cls, params: Any, name: str = "default") -> "AdapterSet":
        """Start from a tree that carries one adapter (e.g. the output of `apply_lora`)."""
        return cls(base=base_model(params)).add(name, params)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.adapters)

    def _need(self, name: str) -> dict:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r} (adapters: {list(self.adapters) or 'none'})")
        return self.adapters[name]

    def add(self, name: str, params: Any) -> "AdapterSet":
        """Add the adapter that ``params`` carries (a tree made from this set's base) as ``name``."""
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} exists already; delete it first or use update()")
        return dataclasses.replace(self, adapters={**self.adapters, name: self._checked(name, params)})

    def update(self, name: str, params: Any) -> "AdapterSet":
        """Replace adapter ``name`` by the one ``params`` carries (e.g. after training it)."""
        self._need(name)
        return dataclasses.replace(self, adapters={**self.adapters, name: self._checked(name, params)})

    def _checked(self, name: str, params: Any) -> dict:
        base = base_model(params)
        mine, theirs = jax.tree.structure(self.base), jax.tree.structure(base)
        if mine != theirs:
            raise ValueError(f"adapter {name!r} was made on a different model (its base tree differs from this set's)")
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(self.base), jax.tree.leaves(base)):
            if getattr(a, "shape", None) != getattr(b, "shape", None):
                raise ValueError(f"adapter {name!r}: base leaf {keypath_str(path)} has shape "
                                 f"{getattr(b, 'shape', None)}, this set's base {getattr(a, 'shape', None)}")
        adapter = extract_adapter(params)
        if not adapter["leaves"] and not adapter["added"]:
            raise ValueError(f"adapter {name!r}: the tree carries no adapter")
        return adapter

    def delete(self, name: str) -> "AdapterSet":
        self._need(name)
        return dataclasses.replace(self, adapters={k: v for k, v in self.adapters.items() if k != name})

    def params(self, name: Optional[str]) -> Any:
        """The model with adapter ``name`` active; ``None`` = adapters disabled (the base itself)."""
        if name is None:
            return self.base
        return attach_adapter(self.base, self._need(name))

    def combine(self, weights: Mapping[str, float], name: str, *, how: Literal["cat", "svd"] = "cat",
                rank: Optional[int] = None) -> "AdapterSet":
        """A new LoRA adapter ``name`` whose update is ``sum_i w_i * s_i * A_i @ B_i`` over the named
        LoRA adapters. ``cat`` concatenates the factors (rank = the sum of ranks; exact);
        ``svd`` keeps the top ``rank`` singular directions of the summed update (default: the
        largest input rank)."""
        if not weights:
            raise ValueError("combine: no adapters to combine")
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} exists already")
        if how not in ("cat", "svd"):
            raise ValueError(f"combine: unknown method {how!r} (cat | svd)")
        parts = {n: self._need(n) for n in weights}
        paths = None
        for n, adapter in parts.items():
            if adapter["added"]:
                raise ValueError(f"combine: adapter {n!r} has added subtrees {sorted(adapter['added'])}; only LoRA combines")
            bad = [p for p, leaf in adapter["leaves"].items() if type(leaf) is not LoraWeight or is_adapter(leaf.base)]
            if bad:
                raise ValueError(f"combine: adapter {n!r} is not plain LoRA at {bad[0]}")
            if paths is None:
                paths = set(adapter["leaves"])
            elif set(adapter["leaves"]) != paths:
                raise ValueError(f"combine: adapters {list(weights)} target different kernels")
        leaves = {}
        for path in sorted(paths):
            factors = [(float(w), parts[n]["leaves"][path]) for n, w in weights.items()]
            leaves[path] = _combine_lora(factors, how, rank)
        return dataclasses.replace(self, adapters={**self.adapters, name: {"leaves": leaves, "added": {}}})


def _combine_lora(factors: list[tuple[float, LoraWeight]], how: str, rank: Optional[int]) -> LoraWeight:
    dtype = factors[0][1].a.dtype
    if how == "cat":
        a = jnp.concatenate([jnp.sqrt(abs(w) * x.scale) * x.a.astype(jnp.float32) for w, x in factors], axis=1)
        b = jnp.concatenate([jnp.sign(w) * jnp.sqrt(abs(w) * x.scale) * x.b.astype(jnp.float32) for w, x in factors], axis=0)
        return LoraWeight(base=None, a=a.astype(dtype), b=b.astype(dtype), scale=1.0)
    delta = sum(w * x.scale * (x.a.astype(jnp.float32) @ x.b.astype(jnp.float32)) for w, x in factors)
    r = rank or max(x.rank for _, x in factors)
    u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
    if r > s.shape[0]:
        raise ValueError(f"combine: rank {r} exceeds min(in, out) = {s.shape[0]}")
    root = jnp.sqrt(s[:r])
    return LoraWeight(base=None, a=(u[:, :r] * root).astype(dtype), b=(root[:, None] * vt[:r]).astype(dtype), scale=1.0)
