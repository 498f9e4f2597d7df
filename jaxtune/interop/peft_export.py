"""PEFT-format adapters out: `save_peft_adapter` (LoRA, DoRA, (IA)^3) and `save_merged_hf`.

The layout, module naming and the exactness rules for GPT-2's fused ``c_attn`` are described in
`jaxtune.interop.peft_adapters`, which reads the same format back.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxtune.interop.hf_weights import save_hf
from jaxtune.interop.peft_adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX
from jaxtune.interop.peft_modules import (
    AdapterFormatError,
    LinearModule,
    compress_targets,
    linear_modules,
    modules_by_path,
)
from jaxtune.models import ModelConfig
from jaxtune.peft.core import ADDED_KEYS, is_adapter, merge_adapters
from jaxtune.peft.dora import DoraWeight, weight_norm
from jaxtune.peft.ia3 import IA3Weight
from jaxtune.peft.lora import LoraWeight
from jaxtune.utils.tree import get_path, keypath_str, path_str


# --- writing an adapter directory ---------------------------------------------------------------


def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _tidy(value: float) -> float | int:
    """An alpha that came back through a float product: the integer it is, if it is one."""
    nearest = round(value)
    return int(nearest) if abs(value - nearest) <= 1e-9 * max(1.0, abs(value)) else value


def _plain_kernel(params, module: LinearModule, k: int) -> np.ndarray:
    kernel = get_path(params, module.paths[k])
    if not isinstance(kernel, (jax.Array, np.ndarray)):
        raise AdapterFormatError(f"{path_str(module.paths[k])}: a {type(kernel).__name__} leaf; DoRA export needs "
                                 "the plain kernel of every part of a fused module")
    return _np(kernel)


def _lora_module_tensors(params, module: LinearModule, parts: list, use_dora: bool):
    """-> (lora_A [r, in], lora_B [out, r], magnitude [out] or None, rank, scale) for one module."""
    adapted = [(k, leaf) for k, leaf in enumerate(parts) if leaf is not None]
    first = adapted[0][1]
    shared = (len(adapted) == len(parts) and len({leaf.scale for _, leaf in adapted}) == 1
              and all(np.array_equal(_np(leaf.a), _np(first.a)) for _, leaf in adapted))
    dtype = _np(first.a).dtype
    if shared:
        rank, scale = first.rank, first.scale
        lora_a = _np(first.a).T
        lora_b = np.zeros((module.out_features, rank), dtype)
        for k, leaf in adapted:
            lora_b[module.out_slices[k]] = _np(leaf.b).T
    else:  # A stacked along the rank, B block-diagonal: the same function, rank = sum of ranks
        scale = first.scale
        rank = sum(leaf.rank for _, leaf in adapted)
        lora_a = np.concatenate([_np(leaf.a).T for _, leaf in adapted], axis=0)
        lora_b = np.zeros((module.out_features, rank), np.float32)
        offset = 0
        for k, leaf in adapted:
            block = _np(leaf.b).astype(np.float32).T * (leaf.scale / scale)
            lora_b[module.out_slices[k], offset:offset + leaf.rank] = block
            offset += leaf.rank
        lora_b = lora_b.astype(dtype)
    magnitude = None
    if use_dora:
        magnitude = np.zeros((module.out_features,), dtype)
        for k, leaf in enumerate(parts):
            if isinstance(leaf, DoraWeight):
                m = _np(leaf.magnitude)
            elif isinstance(leaf, LoraWeight):  # DoRA with m = ||W + sAB|| is this LoRA layer
                m = _np(weight_norm(leaf.base, leaf.a, leaf.b, leaf.scale))
            else:  # un-adapted part of a fused module: m = ||W|| leaves it unchanged
                m = np.linalg.norm(_plain_kernel(params, module, k).astype(np.float64), axis=0)
            magnitude[module.out_slices[k]] = m
    return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b), magnitude, rank, scale


def _adapters_by_module(params, cfg: ModelConfig) -> dict[str, list]:
    by_path = modules_by_path(cfg)
    found: dict[str, list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_adapter)[0]:
        if not is_adapter(leaf):
            continue
        where = keypath_str(path)
        if is_adapter(leaf.base):
            raise AdapterFormatError(f"{where}: nested adapters ({type(leaf).__name__} over {type(leaf.base).__name__}) "
                                     "cannot be written as one PEFT adapter")
        if where not in by_path:
            raise AdapterFormatError(f"{where}: adapter on a leaf that is not a linear layer of the Hugging Face "
                                     f"{cfg.family} model")
        module, k = by_path[where]
        found.setdefault(module.name, [None] * len(module.paths))[k] = leaf
    return found


def save_peft_adapter(params: Any, cfg: ModelConfig, directory: str | os.PathLike, *, use_rslora: bool = False,
                      base_model_name_or_path: Optional[str] = None, dtype: Optional[str] = None,
                      base_params: Any = None, overwrite: bool = False) -> Path:
    """Write the adapter leaves of ``params`` as a PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors) for the Hugging Face model of ``cfg``.

    LoRA and DoRA leaves (any mix: the adapter is DoRA if one leaf is) become a ``LORA`` adapter,
    `IA3Weight` leaves an ``IA3`` one. Ranks / scales that differ between modules go into
    ``rank_pattern`` / ``alpha_pattern`` (by full module name); alpha is ``scale * r`` (or
    ``scale * sqrt(r)`` with ``use_rslora``, which changes only how the same scales are written).
    ``dtype`` casts the tensors (None keeps the adapters' dtype).

    A PEFT adapter only holds the adapter tensors: it is meant for the base whose weights the
    leaves' ``base`` fields hold. PiSSA / OLoRA inits replace that base by a residual, so their
    adapters do not fit the original model; pass ``base_params`` (the plain params the Hugging
    Face base model holds) to have every adapter's base checked against it (an error names the
    first that differs; export such a model merged, with `save_merged_hf`)."""
    found = _adapters_by_module(params, cfg)
    if base_params is not None:
        _check_bases(found, base_params, cfg)
    if isinstance(params, dict) and any(k in params for k in ADDED_KEYS):
        raise AdapterFormatError(f"params hold {[k for k in ADDED_KEYS if k in params]}: prompt / prefix tuning "
                                 "cannot be written as a LoRA / IA3 adapter")
    if not found:
        raise AdapterFormatError("params hold no adapter leaves to export")
    kinds = {type(leaf) for parts in found.values() for leaf in parts if leaf is not None}
    if kinds <= {LoraWeight, DoraWeight}:
        config, tensors = _lora_export(params, cfg, found, use_rslora)
    elif kinds == {IA3Weight}:
        config, tensors = _ia3_export(params, cfg, found)
    else:
        raise AdapterFormatError(f"cannot export adapter leaves of types {sorted(t.__name__ for t in kinds)} as one "
                                 "PEFT adapter (supported: LoraWeight / DoraWeight, or IA3Weight)")
    # BERT's heads (MLM, pre-training) have no PEFT task type: the adapter goes on the model as loaded
    task_type = None if cfg.family == "bert" else "CAUSAL_LM"
    config = {"base_model_name_or_path": base_model_name_or_path, "revision": None, "task_type": task_type,
              "inference_mode": True, "modules_to_save": None, **config}
    if dtype is not None:
        tensors = {k: v.astype(jnp.dtype(dtype)) for k, v in tensors.items()}
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty (pass overwrite=True to replace its files; "
                              "the CLI's flag is --overwrite)")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    return directory


def _check_bases(found: dict[str, list], base_params: Any, cfg: ModelConfig) -> None:
    modules = linear_modules(cfg)
    for name, parts in sorted(found.items()):
        for k, leaf in enumerate(parts):
            if leaf is None:
                continue
            where = path_str(modules[name].paths[k])
            want = get_path(base_params, modules[name].paths[k], missing_ok=True)
            if want is None or not np.array_equal(_np(leaf.base), _np(want)):
                raise AdapterFormatError(
                    f"{where}: the adapter's base differs from base_params (a PiSSA / OLoRA residual?); a PEFT adapter "
                    "of it would not reproduce this model on that base: export it merged (save_merged_hf)")


def _most_common(values: dict[str, Any]):
    return Counter(values.values()).most_common(1)[0][0]


def _lora_export(params, cfg, found, use_rslora):
    modules = linear_modules(cfg)
    use_dora = any(isinstance(leaf, DoraWeight) for parts in found.values() for leaf in parts)
    dropouts = {leaf.dropout for parts in found.values() for leaf in parts if leaf is not None}
    if len(dropouts) > 1:
        raise AdapterFormatError(f"adapter leaves have different dropout rates {sorted(dropouts)}; a PEFT adapter has one "
                                 "lora_dropout")
    tensors, ranks, alphas = {}, {}, {}
    for name, parts in sorted(found.items()):
        lora_a, lora_b, magnitude, rank, scale = _lora_module_tensors(params, modules[name], parts, use_dora)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = lora_a
        tensors[f"{PREFIX}{name}.lora_B.weight"] = lora_b
        if magnitude is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = magnitude
        ranks[name] = rank
        alphas[name] = _tidy(scale * (math.sqrt(rank) if use_rslora else rank))
    r, alpha = _most_common(ranks), _most_common(alphas)
    conv1d = any(modules[n].conv1d for n in found)
    if conv1d and not all(modules[n].conv1d for n in found):
        raise AdapterFormatError("adapted modules mix nn.Linear and Conv1D layers; PEFT's fan_in_fan_out is one flag")
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": use_rslora, "use_dora": use_dora,
        "target_modules": compress_targets(set(found), modules), "lora_dropout": dropouts.pop(),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "fan_in_fan_out": conv1d, "bias": "none", "init_lora_weights": True,
    }
    return config, tensors


def _ia3_export(params, cfg, found):
    modules = linear_modules(cfg)
    tensors, feedforward = {}, []
    for name, parts in sorted(found.items()):
        module = modules[name]
        flags = {leaf.on_input for leaf in parts if leaf is not None}
        if len(flags) > 1:
            raise AdapterFormatError(f"module {name!r}: its parts mix input- and output-scaling IA3 vectors")
        on_input = flags.pop()
        if on_input:
            vecs = [_np(leaf.scale_vec) for leaf in parts if leaf is not None]
            if len(vecs) != len(parts) or any(not np.array_equal(v, vecs[0]) for v in vecs):
                raise AdapterFormatError(f"module {name!r}: one IA3 input-scaling vector scales all of "
                                         f"{[path_str(p) for p in module.paths]}; they must all carry the same one")
            tensors[f"{PREFIX}{name}.ia3_l"] = vecs[0].reshape(1, -1)
            feedforward.append(name)
            continue
        dtype = next(_np(leaf.scale_vec).dtype for leaf in parts if leaf is not None)
        vec = np.ones((module.out_features,), dtype)
        for k, leaf in enumerate(parts):
            if leaf is None:
                continue
            part = _np(leaf.scale_vec)
            if get_path(params, module.bias_path(k), missing_ok=True) is not None and not np.all(part == 1):
                raise AdapterFormatError(f"module {name!r}: PEFT's IA3 scales the bias of an output-scaled layer, "
                                         f"jaxtune's does not ({path_str(module.bias_path(k))}); this adapter cannot "
                                         "be written without changing the model")
            vec[module.out_slices[k]] = part
        tensors[f"{PREFIX}{name}.ia3_l"] = vec.reshape(-1, 1)
    conv1d = any(modules[n].conv1d for n in found)
    config = {
        "peft_type": "IA3", "target_modules": sorted(found), "feedforward_modules": sorted(feedforward),
        "fan_in_fan_out": conv1d, "init_ia3_weights": True,
    }
    return config, tensors


# --- merged export ------------------------------------------------------------------------------


def save_merged_hf(params: Any, cfg: ModelConfig, directory: str | os.PathLike, **save_hf_kwargs) -> Path:
    """`merge_adapters`, then `jaxtune.interop.save_hf` (a plain transformers checkpoint)."""
    return save_hf(merge_adapters(params), cfg, directory, **save_hf_kwargs)
