"""PEFT-format adapters in and out: LoRA, DoRA and (IA)^3, plus merged-model export.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with
tensors named after the Hugging Face module they adapt::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight          [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight          [out, r]
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector  [out]    (DoRA)
    base_model.model.model.layers.0.mlp.down_proj.ia3_l                     [1, in] feed-forward, else [out, 1]

- `save_peft_adapter(params, cfg, dir)` (in `jaxtune.interop.peft_export`) writes the adapter leaves of a jaxtune tree (`LoraWeight`,
  `DoraWeight`, or `IA3Weight`) so that ``peft.PeftModel.from_pretrained(model, dir)`` on the
  transformers model of the same base (what `jaxtune.interop.save_hf` exports) computes the same
  function.
- `load_peft_adapter(params, cfg, dir)` puts a PEFT adapter (LoRA, DoRA, IA3) onto base params.
- `merge_adapters(params)` folds every adapter leaf into a plain kernel; `save_merged_hf`
  (`jaxtune.interop.peft_export`) then writes the merged model in Hugging Face format.

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
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.interop.peft_modules import (
    AdapterFormatError,
    LinearModule,
    linear_modules,
    pattern_value,
    peft_targets,
)
from jaxtune.interop.safe_files import read_all
from jaxtune.models import ModelConfig
from jaxtune.peft.core import is_adapter
from jaxtune.peft.dora import DoraWeight
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
    return read_all(path)


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
