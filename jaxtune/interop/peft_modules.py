"""Which Hugging Face modules a PEFT adapter can name, and PEFT's rules for matching them.

`linear_modules(cfg)` derives, from the HF weight table (`jaxtune.interop.hf_weights.tensor_maps`),
every linear module of a model and how its output features lie over jaxtune's kernels (a
transposed ``nn.Linear``, GPT-2's ``Conv1D``, GPT-2's fused ``c_attn`` split into q/k/v), by
feeding each map's own ``to_jax`` index arrays. `peft_targets`, `pattern_value` and
`compress_targets` mirror PEFT's ``target_modules`` / ``rank_pattern`` matching both ways.
Used by `jaxtune.interop.peft_adapters`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import jax
import numpy as np

from jaxtune.interop.hf_weights import TensorMap, tensor_maps
from jaxtune.models import Model, ModelConfig
from jaxtune.utils.tree import get_path, path_str


class AdapterFormatError(ValueError):
    """A PEFT adapter directory that cannot be read as (or written from) a jaxtune adapter."""


@dataclass(frozen=True)
class LinearModule:
    """One Hugging Face linear module and the jaxtune kernels that hold it."""

    name: str  # e.g. "model.layers.0.self_attn.q_proj"
    paths: tuple[tuple[str, ...], ...]  # the jaxtune kernel paths, e.g. (("layers_0", "attn", "q_proj", "kernel"),)
    conv1d: bool  # HF stores the weight [in, out] (GPT-2 Conv1D), not nn.Linear's [out, in]
    in_features: int
    out_features: int
    out_slices: tuple[slice, ...]  # per path: the HF output features that kernel holds

    def bias_path(self, k: int) -> tuple[str, ...]:
        return self.paths[k][:-1] + ("bias",)


_PROBE_IN = 3  # the maps split / transpose whole weights; a few input rows show how


def _probe(m: TensorMap, shapes: list[tuple[int, ...]]) -> Optional[LinearModule]:
    """How ``m`` lays an HF weight out over its kernels, found by running ``m.to_jax`` on index
    arrays (output-feature numbers; a few input rows stand in for all of them)."""
    if any(len(s) != 2 for s in shapes) or len({s[0] for s in shapes}) != 1:
        return None
    d_in, d_out, rows = shapes[0][0], sum(s[1] for s in shapes), _PROBE_IN
    for conv1d in (False, True):
        out_axis = 1 if conv1d else 0
        shape = (rows, d_out) if conv1d else (d_out, rows)
        out_ids = np.ascontiguousarray(np.broadcast_to(np.expand_dims(np.arange(d_out), 1 - out_axis), shape))
        in_ids = np.ascontiguousarray(np.broadcast_to(np.expand_dims(np.arange(rows), out_axis), shape))
        try:
            outs, ins = m.to_jax(out_ids), m.to_jax(in_ids)
        except Exception:  # noqa: BLE001 - this layout does not fit the map; try the other one
            continue
        if len(outs) != len(shapes) or any(tuple(o.shape) != (rows, s[1]) for o, s in zip(outs, shapes)):
            continue
        if not all(np.array_equal(i, np.broadcast_to(np.arange(rows)[:, None], i.shape)) for i in ins):
            continue
        if not all(np.array_equal(o, np.broadcast_to(o[:1], o.shape)) for o in outs):
            continue
        slices, start = [], 0
        for o in outs:
            if not np.array_equal(o[0], np.arange(start, start + o.shape[1])):
                break  # not contiguous, in order: not a layout this module handles
            slices.append(slice(start, start + o.shape[1]))
            start += o.shape[1]
        else:
            return LinearModule(m.hf_name[: -len(".weight")], tuple(m.paths), conv1d, d_in, d_out, tuple(slices))
    return None


_MODULES: dict[ModelConfig, dict[str, LinearModule]] = {}


def linear_modules(cfg: ModelConfig) -> dict[str, LinearModule]:
    """Every linear module of the Hugging Face model of ``cfg``, by HF module name (a map whose
    layout the probe cannot read is left out: adapters on it are refused, naming it)."""
    try:
        return _MODULES[cfg]
    except (KeyError, TypeError):  # TypeError: a config that does not hash is simply not cached
        pass
    modules = _linear_modules(cfg)
    try:
        _MODULES[cfg] = modules
    except TypeError:
        pass
    return modules


def _linear_modules(cfg: ModelConfig) -> dict[str, LinearModule]:
    expected = jax.eval_shape(Model(cfg).init, jax.random.key(0))
    out = {}
    for m in tensor_maps(cfg):
        if not m.hf_name.endswith(".weight") or not all(p[-1] == "kernel" for p in m.paths):
            continue
        module = _probe(m, [tuple(get_path(expected, p).shape) for p in m.paths])
        if module is not None:
            out[module.name] = module
    return out


def modules_by_path(cfg: ModelConfig) -> dict[str, tuple[LinearModule, int]]:
    return {path_str(p): (mod, k) for mod in linear_modules(cfg).values() for k, p in enumerate(mod.paths)}


# --- PEFT's module matching (target_modules, rank_pattern, ...) --------------------------------


def _matches_list(key: str, names) -> bool:
    return any(key == t or key.endswith("." + t) for t in names)


def peft_targets(config: dict, modules: dict[str, LinearModule], source: str) -> set[str]:
    """The modules of ``modules`` that PEFT's ``check_target_module_exists`` would adapt."""
    targets = config.get("target_modules")
    if targets is None:
        raise AdapterFormatError(f"{source}: target_modules is not set")
    names = set(modules)
    if isinstance(targets, str) and targets.lower() == "all-linear":
        chosen = {n for n in names if n != "lm_head"}
    elif isinstance(targets, str):
        chosen = {n for n in names if re.fullmatch(targets, n)}
    else:
        chosen = {n for n in names if _matches_list(n, targets)}
    exclude = config.get("exclude_modules")
    if exclude:
        excluded = (lambda n: re.fullmatch(exclude, n)) if isinstance(exclude, str) else (lambda n: _matches_list(n, exclude))
        chosen = {n for n in chosen if not excluded(n)}
    layers = config.get("layers_to_transform")
    if layers is not None and layers != []:
        layers = {layers} if isinstance(layers, int) else set(layers)
        patterns = config.get("layers_pattern")
        patterns = [patterns] if isinstance(patterns, str) else (patterns or [])

        def layer_of(n):
            if not patterns:
                found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", n)
            else:
                found = next((f for p in patterns if (f := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", n))), None)
            return None if found is None else int(found.group("idx"))

        chosen = {n for n in chosen if layer_of(n) in layers}
    return chosen


def pattern_value(patterns: dict, key: str, default):
    """PEFT's ``get_pattern_key``: the first pattern with ``(.*\\.)?(pattern)$`` matching ``key``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def compress_targets(adapted: set[str], all_names) -> list[str]:
    """Shortest dotted suffixes that select exactly ``adapted`` among ``all_names`` (PEFT matches a
    list entry t against a module key by ``key == t or key.endswith('.' + t)``)."""
    chosen = set()
    for name in adapted:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(n in adapted for n in all_names if n == suffix or n.endswith("." + suffix)):
                chosen.add(suffix)
                break
    return sorted(chosen)
