"""PEFT-format adapters in and out: LoRA, DoRA and (IA)^3, plus merged-model export.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with
tensors named after the Hugging Face module they adapt::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight          [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight          [out, r]
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector  [out]    (DoRA)
    base_model.model.model.layers.0.mlp.down_proj.ia3_l                     [1, in] feed-forward, else [out, 1]

- `save_peft_adapter(params, cfg, dir)` writes the adapter leaves of a jaxtune tree (`LoraWeight`,
  `DoraWeight`, or `IA3Weight`) so that ``peft.PeftModel.from_pretrained(model, dir)`` on the
  transformers model of the same base (what `jaxtune.interop.save_hf` exports) computes the same
  function.
- `load_peft_adapter(params, cfg, dir)` puts a PEFT adapter (LoRA, DoRA, IA3) onto base params.
- `merge_adapters(params)` folds every adapter leaf into a plain kernel; `save_merged_hf` then
  writes the merged model in Hugging Face format.

Module names map both ways through `jaxtune.interop.hf_weights.tensor_maps` (no second table;
`jaxtune.interop.peft_modules` derives them):
every map whose HF tensor is a ``.weight`` and whose jaxtune leaves are kernels is a linear
module, and how its output features are laid out over the jaxtune kernels (transposed
``nn.Linear``, GPT-2's ``Conv1D``, GPT-2's fused ``c_attn`` split into q/k/v) is read off the
map's own ``to_jax`` by feeding it index arrays (`linear_modules`).

GPT-2's fused ``c_attn`` (one module, three jaxtune kernels): importing is always exact (the
shared ``lora_A`` is copied into q, k and v; ``lora_B``, the magnitude and IA3's vector are split
by output feature; DoRA's norm is per output feature, so it splits too). Exporting is exact as
well: if q, k and v carry adapters with one shared A and scale, the module gets that A and the
stacked B (rank r); otherwise A is stacked along the rank and B is block-diagonal (rank = sum of
the parts' ranks, per-part scales folded into B), which computes the same function. DoRA exports
give un-adapted parts (and LoRA leaves in a DoRA export) the magnitude ``||W + sAB||``, which makes
DoRA equal to the plain (LoRA) layer. An (IA)^3 feed-forward (input-scaling) vector on a fused
module must be the same for all parts, and output scaling of a layer with a bias cannot be
exported (PEFT scales that bias too; jaxtune's IA3 does not): both raise, naming the module.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxtune.interop.hf_weights import save_hf
from jaxtune.interop.peft_modules import (
    AdapterFormatError,
    LinearModule,
    compress_targets,
    linear_modules,
    modules_by_path,
    pattern_value,
    peft_targets,
)
from jaxtune.models import ModelConfig
from jaxtune.peft.core import ADDED_KEYS, is_adapter, merge_adapters
from jaxtune.peft.dora import DoraWeight, weight_norm
from jaxtune.peft.ia3 import IA3Weight
from jaxtune.peft.lora import LoraWeight
from jaxtune.utils.tree import get_path, keypath_str, path_str

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


# --- reading an adapter directory ---------------------------------------------------------------

# Keys of adapter_config.json that change nothing at inference (or are checked separately). Any
# other key with a truthy value is an option we do not implement: refused, never ignored.
_LORA_KEYS = {
    "peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "use_rslora", "use_dora",
    "rank_pattern", "alpha_pattern", "init_lora_weights", "layers_to_transform", "layers_pattern", "bias",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size", "megatron_core",
    "ensure_weight_tying", "runtime_config",
}
_IA3_KEYS = {
    "peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
    "target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights",
}
# LoRA inits that rewrite the base weight: their adapters only fit that rewritten base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def read_adapter_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{path}: not valid JSON ({e})") from None


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    path = directory / ADAPTER_WEIGHTS
    if not path.exists():
        pickled = [p.name for p in directory.glob("adapter_model.bin")]
        hint = f" (found {pickled}: pickle files are refused; re-save with safe_serialization=True)" if pickled else ""
        raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS}{hint}")
    with safe_open(path, framework="numpy") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _check_options(config: dict, allowed: set[str], source: str) -> None:
    bad = {k: v for k, v in config.items() if k not in allowed and v not in (None, False, {}, [], "", "none", 0)}
    if config.get("bias", "none") not in (None, "none"):
        bad["bias"] = config["bias"]
    if config.get("modules_to_save"):
        bad["modules_to_save"] = config["modules_to_save"]
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        bad["init_lora_weights"] = init
    if bad:
        raise AdapterFormatError(
            f"{source}: unsupported adapter options {bad} (jaxtune reads LoRA / DoRA / IA3 adapters that "
            "change only the targeted linear layers; PiSSA / OLoRA / CorDA / LoftQ adapters must be converted "
            "with PEFT's path_initial_model_for_weight_conversion first)"
        )


def _split_names(tensors: dict[str, np.ndarray], suffixes: tuple[str, ...], modules: dict[str, LinearModule],
                 source: str) -> dict[str, dict[str, np.ndarray]]:
    """{module name: {suffix: tensor}}, checking every name; a checkpoint of the bare model (no
    'model.' / 'transformer.' root) is accepted."""
    out: dict[str, dict[str, np.ndarray]] = {}
    roots = {n.split(".")[0] + "." for n in modules if "." in n}
    for name, tensor in tensors.items():
        if not name.startswith(PREFIX):
            raise AdapterFormatError(f"{source}: tensor {name!r} does not start with {PREFIX!r}")
        rest = name[len(PREFIX):]
        suffix = next((s for s in suffixes if rest.endswith("." + s)), None)
        if suffix is None:
            raise AdapterFormatError(f"{source}: tensor {name!r} is not one of the adapter tensors jaxtune reads "
                                     f"({', '.join(suffixes)})")
        module = rest[: -len(suffix) - 1]
        if module not in modules:
            module = next((r + module for r in roots if r + module in modules), module)
        if module not in modules:
            raise AdapterFormatError(f"{source}: tensor {name!r} adapts {module!r}, which is not a linear layer of this "
                                     f"model (linear layers look like {next(iter(modules))!r})")
        if suffix in out.setdefault(module, {}):
            raise AdapterFormatError(f"{source}: tensor {name!r} given twice")
        out[module][suffix] = tensor
    return out


def _check_modules(found: set[str], wanted: set[str], source: str, what: str) -> None:
    missing, extra = sorted(wanted - found), sorted(found - wanted)
    if missing:
        raise AdapterFormatError(f"{source}: missing {what} tensors for modules {missing[:6]}"
                                 f"{' ...' if len(missing) > 6 else ''} (target_modules selects them)")
    if extra:
        raise AdapterFormatError(f"{source}: tensors for modules {extra[:6]}{' ...' if len(extra) > 6 else ''} "
                                 "that target_modules does not select")


def _shape_check(tensor: np.ndarray, want: tuple[int, ...], name: str, source: str) -> None:
    if tuple(tensor.shape) != tuple(want):
        raise AdapterFormatError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model needs {tuple(want)}")


def _cast(t: np.ndarray, dtype) -> jax.Array:
    return jnp.asarray(t if dtype is None else t.astype(jnp.dtype(dtype)))


def load_peft_adapter(params: Any, cfg: ModelConfig, directory: str | os.PathLike, *,
                      dtype: Optional[str] = None) -> Any:
    """``params`` (the base model of ``cfg``, plain kernels) with the PEFT adapter in ``directory``
    put on: `LoraWeight` (LoRA), `DoraWeight` (LoRA with ``use_dora``) or `IA3Weight` leaves.

    ``dtype``: of the adapter arrays (None keeps the file's). Raises `AdapterFormatError` naming
    the file / tensor for unsupported adapter types or options, tensors of unknown modules,
    missing tensors, and shape or rank mismatches. For IA3 on an output-scaled layer with a bias
    (GPT-2 c_attn, Qwen2 k/v), PEFT scales the bias as well; that factor is folded into the bias
    leaf (exact; the bias stays frozen, so `base_model` of the result keeps the scaled bias)."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    source = str(directory / ADAPTER_WEIGHTS)
    peft_type = config.get("peft_type")
    if peft_type == "LORA":
        _check_options(config, _LORA_KEYS, str(directory / ADAPTER_CONFIG))
        replacements = _lora_leaves(params, cfg, config, _read_tensors(directory), source, dtype)
    elif peft_type == "IA3":
        _check_options(config, _IA3_KEYS, str(directory / ADAPTER_CONFIG))
        replacements = _ia3_leaves(params, cfg, config, _read_tensors(directory), source, dtype)
    else:
        raise AdapterFormatError(f"{directory / ADAPTER_CONFIG}: peft_type={peft_type!r} is not supported "
                                 "(LORA, including DoRA via use_dora, and IA3)")
    return _replace(params, replacements)


def _kernel(params: Any, module: LinearModule, k: int) -> Any:
    where = path_str(module.paths[k])
    kernel = get_path(params, module.paths[k], missing_ok=True)
    if kernel is None:
        raise AdapterFormatError(f"params: no leaf {where} for module {module.name!r} (params of another model?)")
    if is_adapter(kernel):
        raise AdapterFormatError(f"params: {where} already has an adapter ({type(kernel).__name__})")
    want = (module.in_features, module.out_slices[k].stop - module.out_slices[k].start)
    if isinstance(kernel, (jax.Array, np.ndarray)) and tuple(kernel.shape) != want:  # typed (quantized) bases pass
        raise AdapterFormatError(f"params: {where} has shape {tuple(kernel.shape)}, the config implies {want}")
    return kernel


def _lora_leaves(params, cfg, config, tensors, source, dtype) -> dict[str, Any]:
    modules = linear_modules(cfg)
    use_dora = bool(config.get("use_dora"))
    suffixes = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_magnitude_vector.weight")
    found = _split_names(tensors, suffixes, modules, source)
    _check_modules(set(found), peft_targets(config, modules, source), source, "LoRA")
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    dropout = float(config.get("lora_dropout") or 0.0)
    out = {}
    for name, parts in sorted(found.items()):
        module = modules[name]
        full = lambda s: f"{PREFIX}{name}.{s}"  # noqa: E731
        for s in ("lora_A.weight", "lora_B.weight"):
            if s not in parts:
                raise AdapterFormatError(f"{source}: missing tensor {full(s)!r}")
        mags = [s for s in ("lora_magnitude_vector", "lora_magnitude_vector.weight") if s in parts]
        if use_dora and not mags:
            raise AdapterFormatError(f"{source}: missing tensor {full('lora_magnitude_vector')!r} (use_dora is set)")
        if mags and not use_dora:
            raise AdapterFormatError(f"{source}: tensor {full(mags[0])!r} present but use_dora is not set")
        rank = int(pattern_value(config.get("rank_pattern"), name, r_default))
        alpha = float(pattern_value(config.get("alpha_pattern"), name, alpha_default))
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        _shape_check(a, (rank, module.in_features), full("lora_A.weight"), source)
        _shape_check(b, (module.out_features, rank), full("lora_B.weight"), source)
        m = None
        if use_dora:
            m = parts[mags[0]].reshape(-1) if parts[mags[0]].ndim == 2 and 1 in parts[mags[0]].shape else parts[mags[0]]
            _shape_check(m, (module.out_features,), full(mags[0]), source)
        a_jax = _cast(np.ascontiguousarray(a.T), dtype)
        for k, idx in enumerate(module.out_slices):
            kernel = _kernel(params, module, k)
            b_k = _cast(np.ascontiguousarray(b[idx].T), dtype)
            if use_dora:
                leaf = DoraWeight(base=kernel, a=a_jax, b=b_k, magnitude=_cast(m[idx], dtype),
                                  scale=scale, dropout=dropout)
            else:
                leaf = LoraWeight(base=kernel, a=a_jax, b=b_k, scale=scale, dropout=dropout)
            out[path_str(module.paths[k])] = leaf
    return out


def _ia3_leaves(params, cfg, config, tensors, source, dtype) -> dict[str, Any]:
    modules = linear_modules(cfg)
    found = _split_names(tensors, ("ia3_l",), modules, source)
    _check_modules(set(found), peft_targets(config, modules, source), source, "IA3")
    ff = config.get("feedforward_modules") or []
    out = {}
    for name, parts in sorted(found.items()):
        module = modules[name]
        tensor_name = f"{PREFIX}{name}.ia3_l"
        vec = parts["ia3_l"]
        # PEFT's _check_target_module_feedforward: a regex string fullmatches, a list matches by endswith.
        on_input = bool(re.fullmatch(ff, name)) if isinstance(ff, str) else any(name.endswith(t) for t in ff)
        want = (1, module.in_features) if on_input else (module.out_features, 1)
        if tuple(vec.shape) != want:
            kind = "feed-forward (input-scaling)" if on_input else "output-scaling"
            raise AdapterFormatError(f"{source}: tensor {tensor_name!r} has shape {tuple(vec.shape)}; {name!r} is "
                                     f"{kind} by feedforward_modules={ff!r}, so it must be {want}")
        vec = vec.reshape(-1)
        for k, idx in enumerate(module.out_slices):
            kernel = _kernel(params, module, k)
            part = vec if on_input else vec[idx]
            out[path_str(module.paths[k])] = IA3Weight(base=kernel, scale_vec=_cast(part, dtype), on_input=on_input)
            bias = get_path(params, module.bias_path(k), missing_ok=True)
            if bias is not None and not on_input:  # PEFT: (x W + bias) * l -> fold l into the bias
                folded = (np.asarray(jax.device_get(bias), np.float32) * part.astype(np.float32)).astype(bias.dtype)
                out[path_str(module.bias_path(k))] = jnp.asarray(folded)
    return out


def _replace(params: Any, replacements: dict[str, Any]) -> Any:
    left = dict(replacements)

    def put(path, x):
        where = keypath_str(path)
        return left.pop(where) if where in left else x

    out = jax.tree_util.tree_map_with_path(put, params, is_leaf=is_adapter)
    if left:
        raise AdapterFormatError(f"params: no leaves at {sorted(left)[:6]} (params of another model?)")
    return out


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
    config = {"base_model_name_or_path": base_model_name_or_path, "revision": None, "task_type": "CAUSAL_LM",
              "inference_mode": True, "modules_to_save": None, **config}
    if dtype is not None:
        tensors = {k: v.astype(jnp.dtype(dtype)) for k, v in tensors.items()}
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty (pass overwrite=True to replace its files)")
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
