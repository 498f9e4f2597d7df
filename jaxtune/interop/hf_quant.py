"""Kernels of Hugging Face checkpoints saved pre-quantized by bitsandbytes -> `QuantizedWeight`.

transformers saves a bitsandbytes-quantized ``nn.Linear`` weight ``W^T: [out, in]`` as

- 4-bit (``load_in_4bit``, NF4 or FP4): ``<name>`` (the packed codes, uint8 ``[n/2, 1]`` or
  another ``quant_storage`` dtype viewed as bytes), ``<name>.absmax``, ``<name>.quant_map``,
  ``<name>.quant_state.bitsandbytes__<nf4|fp4>`` (a JSON blob: quant_type, blocksize, shape,
  dtype, and with double quantization nested_blocksize and nested_offset), and with double
  quantization ``<name>.nested_absmax`` / ``<name>.nested_quant_map``;
- 8-bit (``load_in_8bit``, LLM.int8): ``<name>`` int8 ``[out, in]``, ``<module>.SCB`` (row absmax,
  float32) and ``<module>.weight_format``.

`read_quantized_kernel` turns those tensors into a `QuantizedWeight` with the bytes as they are
(no 16-bit round trip). The code maps must be the standard NF4 / FP4 / dynamic maps (a custom
map would be silently misread otherwise, so it is an error naming the tensor).
"""

from __future__ import annotations

import json
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

from jaxtune.quant import codes as C
from jaxtune.quant.weight import QuantConfig, QuantizedWeight

QUANT_STATE = ".quant_state.bitsandbytes__"


class QuantizedCheckpointError(ValueError):
    """A bitsandbytes-quantized tensor group is incomplete or not in a supported format."""


def bnb_quant_config(hf_config: dict) -> Optional[QuantConfig]:
    """The `QuantConfig` of a checkpoint transformers saved quantized by bitsandbytes (its
    config.json ``quantization_config``), or None for a dense one."""
    q = hf_config.get("quantization_config") or {}
    if q.get("quant_method") != "bitsandbytes":
        return None
    if q.get("load_in_4bit"):
        return QuantConfig(kind=q.get("bnb_4bit_quant_type", "nf4"), double_quant=bool(q.get("bnb_4bit_use_double_quant")))
    if q.get("load_in_8bit"):
        return QuantConfig(kind="int8", double_quant=False)
    return None


def bnb_load_config(quant: QuantConfig) -> Optional[dict]:
    """The ``BitsAndBytesConfig`` arguments that quantize a dense base as ``quant`` does (bitsandbytes'
    4-bit blocks are 64 wide, its 8-bit is LLM.int8 with outliers in 16-bit: only close), or None
    where bitsandbytes has no equivalent (int4, other block sizes)."""
    if quant.kind in ("nf4", "fp4") and quant.blocksize == 64:
        return {"load_in_4bit": True, "bnb_4bit_quant_type": quant.kind,
                "bnb_4bit_use_double_quant": bool(quant.double_quant)}
    return None


def companion_names(name: str, names: set[str]) -> list[str]:
    """The extra tensors bitsandbytes saved beside kernel ``name`` (empty for a dense kernel)."""
    module = name[: -len(".weight")] if name.endswith(".weight") else name
    found = [n for n in names if n.startswith(name + ".") and (n[len(name):].startswith((".absmax", ".quant_map",
                                                                                         ".nested_", QUANT_STATE)))]
    found += [n for n in (f"{module}.SCB", f"{module}.weight_format") if n in names]
    return sorted(found)


def read_quantized_kernel(name: str, names: set[str], get: Callable[[str], np.ndarray], shape_in_out: tuple[int, int],
                          source: str = "checkpoint") -> Optional[QuantizedWeight]:
    """The `QuantizedWeight` for HF kernel ``name`` (``[out, in]`` in torch, ``shape_in_out`` in
    jaxtune), or None when the checkpoint holds it dense."""
    n_in, n_out = shape_in_out
    states = [n for n in names if n.startswith(name + QUANT_STATE)]
    module = name[: -len(".weight")] if name.endswith(".weight") else name
    if states:
        return _read_4bit(name, states[0], names, get, n_in, n_out, source)
    if f"{module}.SCB" in names:
        return _read_int8(name, module, get, n_in, n_out, source)
    if f"{name}.absmax" in names:
        raise QuantizedCheckpointError(f"{source}: {name} has an absmax but no {name}{QUANT_STATE}<type> tensor")
    return None


def _read_4bit(name, state_name, names, get, n_in, n_out, source) -> QuantizedWeight:
    def need(suffix):
        full = name + suffix
        if full not in names:
            raise QuantizedCheckpointError(f"{source}: {name} is 4-bit quantized but {full} is missing")
        return np.asarray(get(full))

    state = json.loads(bytes(np.asarray(get(state_name), np.uint8)).decode("utf-8"))
    kind = state.get("quant_type")
    if kind not in C.CODES_4BIT:
        raise QuantizedCheckpointError(f"{source}: {state_name}: quant_type {kind!r} is not nf4 or fp4")
    blocksize = int(state["blocksize"])
    if tuple(state.get("shape", ())) != (n_out, n_in):
        raise QuantizedCheckpointError(f"{source}: {name} was quantized with shape {state.get('shape')}, "
                                       f"config.json implies {[n_out, n_in]}")
    if blocksize not in C.BLOCKSIZES:
        raise QuantizedCheckpointError(f"{source}: {name}: blocksize {blocksize} is not supported ({C.BLOCKSIZES})")
    if not np.array_equal(need(".quant_map").astype(np.float32), C.CODES_4BIT[kind]):
        raise QuantizedCheckpointError(f"{source}: {name}.quant_map is not the standard {kind} table")
    packed = np.ascontiguousarray(get(name)).reshape(-1).view(np.uint8)
    n = n_in * n_out
    n_blocks = -(-n // blocksize)
    if packed.size != -(-n // 2):
        raise QuantizedCheckpointError(f"{source}: {name} holds {packed.size} bytes, {n} 4-bit values need {-(-n // 2)}")
    absmax = need(".absmax").reshape(-1)
    if absmax.size != n_blocks:
        raise QuantizedCheckpointError(f"{source}: {name}.absmax has {absmax.size} entries, expected {n_blocks}")
    nested = offset = None
    if "nested_offset" in state:
        if int(state.get("nested_blocksize", C.NESTED_BLOCKSIZE)) != C.NESTED_BLOCKSIZE:
            raise QuantizedCheckpointError(f"{source}: {name}: nested_blocksize {state['nested_blocksize']} is not 256")
        if not np.array_equal(need(".nested_quant_map").astype(np.float32), C.DYNAMIC_SIGNED):
            raise QuantizedCheckpointError(f"{source}: {name}.nested_quant_map is not the standard dynamic map")
        nested = jnp.asarray(need(".nested_absmax").astype(np.float32).reshape(-1))
        offset = jnp.asarray(np.float32(state["nested_offset"]))
        absmax = absmax.astype(np.uint8)
    else:
        absmax = absmax.astype(np.float32)
    if n_in % blocksize == 0:  # the 2-D layout of QuantizedWeight (same bytes)
        packed, absmax = packed.reshape(n_out, n_in // 2), absmax.reshape(n_out, n_in // blocksize)
    return QuantizedWeight(codes=jnp.asarray(packed), scales=jnp.asarray(absmax), nested_scales=nested, offset=offset,
                           kind=kind, shape=(n_in, n_out), orig_dtype=_dtype_name(state.get("dtype", "float32")),
                           blocksize=blocksize)


def _read_int8(name, module, get, n_in, n_out, source) -> QuantizedWeight:
    codes = np.asarray(get(name))
    if codes.dtype != np.int8 or codes.shape != (n_out, n_in):
        raise QuantizedCheckpointError(f"{source}: {name} should be int8 [{n_out}, {n_in}] beside {module}.SCB, "
                                       f"got {codes.dtype} {list(codes.shape)}")
    scb = np.asarray(get(f"{module}.SCB"), np.float32).reshape(-1)
    if scb.size != n_out:
        raise QuantizedCheckpointError(f"{source}: {module}.SCB has {scb.size} entries, expected {n_out}")
    return QuantizedWeight(codes=jnp.asarray(codes), scales=jnp.asarray(scb), kind="int8", shape=(n_in, n_out),
                           orig_dtype="float32", blocksize=0)


def _dtype_name(torch_name: str) -> str:
    name = str(torch_name).replace("torch.", "")
    return {"half": "float16", "float": "float32", "bfloat16": "bfloat16"}.get(name, name)
