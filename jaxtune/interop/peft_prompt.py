"""PEFT-format prompt-learning adapters <-> jaxtune "prompt" / "prefix" subtrees.

A PEFT prompt-learning adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` with one tensor, ``prompt_embeddings``:

- PROMPT_TUNING and P_TUNING: [n, hidden], the virtual token embeddings. For P-tuning PEFT
  saves the prompt encoder's *output* (its MLP / LSTM are not stored), so both import as
  ``params["prompt"] = {"embedding": ...}``.
- PREFIX_TUNING: [n, layers * 2 * token_dim], the flattened past_key_values (with
  ``prefix_projection`` PEFT saves the projection's output, not the MLP), where for GQA
  models token_dim = num_key_value_heads * head_dim and ``num_attention_heads`` is
  num_key_value_heads. It imports as ``params["prefix"] = {"keys", "values"}`` via
  `jaxtune.peft.prompt.flat_to_key_values` (PEFT's view/permute/split order).

`save_peft_prompt` writes the same format (``inference_mode: true``, as PEFT saves), so
``peft.PeftModel.from_pretrained`` loads a jaxtune-trained prompt. No pickle: an
``adapter_model.bin`` is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxtune.interop.safe_files import read_all
from jaxtune.models import Model, ModelConfig
from jaxtune.models.decoder import prompt_embeddings
from jaxtune.peft.prompt import (
    PrefixProjection,
    PromptLSTMEncoder,
    PromptMLPEncoder,
    flat_to_key_values,
    key_values_to_flat,
    prompt_subtree,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TENSOR = "prompt_embeddings"
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


class AdapterMismatchError(ValueError):
    """A PEFT adapter does not fit the model (or is not a prompt-learning adapter)."""


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """-> (adapter_config.json as a dict, {tensor name: array}) of a PEFT adapter directory."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        pickled = " (found adapter_model.bin: pickle files are refused; re-save with safe_serialization)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_FILE}{pickled}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from None
    return config, read_all(weights)


def _expect(config: dict, key: str, want: Any, source: str) -> None:
    got = config.get(key)
    if got is not None and got != want:
        raise AdapterMismatchError(f"{source}: {key} = {got!r}, but this model has {want!r}")


def peft_prompt_subtree(config: dict, tensors: dict[str, np.ndarray], cfg: ModelConfig,
                        *, source: str = "adapter") -> tuple[str, dict]:
    """A PEFT prompt-learning adapter (config + tensors) -> ("prompt" | "prefix", plain subtree)."""
    peft_type = config.get("peft_type")
    if peft_type not in PROMPT_TYPES:
        raise AdapterMismatchError(f"{source}: peft_type {peft_type!r} is not a prompt-learning adapter "
                                   f"({' | '.join(PROMPT_TYPES)})")
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise AdapterMismatchError(f"{source}: task_type {task!r}; jaxtune imports CAUSAL_LM prompt adapters")
    if config.get("num_transformer_submodules", 1) not in (None, 1):
        raise AdapterMismatchError(f"{source}: num_transformer_submodules = {config['num_transformer_submodules']} "
                                   "(an encoder-decoder adapter); decoder-only models need 1")
    unexpected = sorted(set(tensors) - {TENSOR})
    if unexpected or TENSOR not in tensors:
        raise AdapterMismatchError(f"{source}: expected exactly one tensor {TENSOR!r}, found {sorted(tensors)}")
    n = config.get("num_virtual_tokens")
    if not isinstance(n, int) or n < 1:
        raise AdapterMismatchError(f"{source}: num_virtual_tokens = {n!r}")
    _expect(config, "num_layers", cfg.num_layers, source)
    table = np.asarray(tensors[TENSOR], np.float32)
    if peft_type == "PREFIX_TUNING":
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        _expect(config, "token_dim", kv_dim, source)
        _expect(config, "num_attention_heads", cfg.num_kv_heads, source)
        want = (n, cfg.num_layers * 2 * kv_dim)
        if table.shape != want:
            raise AdapterMismatchError(f"{source}: {TENSOR} has shape {table.shape}; a prefix for this model "
                                       f"needs {want} (num_virtual_tokens, layers * 2 * kv_heads * head_dim)")
        keys, values = flat_to_key_values(jnp.asarray(table), cfg)
        return "prefix", {"keys": keys, "values": values}
    _expect(config, "token_dim", cfg.hidden_size, source)
    if table.shape != (n, cfg.hidden_size):
        raise AdapterMismatchError(f"{source}: {TENSOR} has shape {table.shape}; this model needs "
                                   f"({n}, hidden={cfg.hidden_size})")
    return "prompt", {"embedding": jnp.asarray(table)}


def load_peft_prompt(directory: str | os.PathLike, params: dict, cfg: ModelConfig) -> dict:
    """params + the PEFT prompt-tuning / P-tuning / prefix-tuning adapter in ``directory``, as a
    plain "prompt" or "prefix" subtree (float32)."""
    if "prompt" in params or "prefix" in params:
        raise ValueError('params already hold a "prompt" / "prefix" subtree')
    config, tensors = read_adapter(directory)
    key, subtree = peft_prompt_subtree(config, tensors, cfg, source=str(directory))
    return {**params, key: subtree}


def peft_prompt_tensors(params: dict, cfg: ModelConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """-> (adapter_config fields, {"prompt_embeddings": array}) for params with a prompt-side subtree."""
    key, subtree = prompt_subtree(params)
    n = Model(cfg).num_prefix_tokens(params)
    common = {"task_type": "CAUSAL_LM", "num_virtual_tokens": n, "num_layers": cfg.num_layers,
              "num_transformer_submodules": 1, "inference_mode": True}
    if key == "prompt":
        table = prompt_embeddings(subtree)
        if isinstance(subtree, (PromptMLPEncoder, PromptLSTMEncoder)):
            if isinstance(subtree, PromptMLPEncoder):
                hidden, kind, layers = subtree.layers[0]["kernel"].shape[1], "MLP", 2
            else:
                hidden, kind, layers = subtree.lstm[0]["fwd"]["w_hh"].shape[0], "LSTM", len(subtree.lstm)
            config = {"peft_type": "P_TUNING", "encoder_reparameterization_type": kind,
                      "encoder_hidden_size": int(hidden), "encoder_num_layers": layers, "encoder_dropout": 0.0}
        else:
            config = {"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM"}
        config.update(token_dim=cfg.hidden_size, num_attention_heads=cfg.num_heads)
    else:
        keys, values = Model(cfg).prefix_kv(params)
        table = key_values_to_flat(keys, values)
        projection = isinstance(subtree, PrefixProjection)
        config = {"peft_type": "PREFIX_TUNING", "prefix_projection": projection,
                  "token_dim": cfg.num_kv_heads * cfg.head_dim, "num_attention_heads": cfg.num_kv_heads,
                  "encoder_hidden_size": int(subtree.hidden["kernel"].shape[1]) if projection
                  else cfg.num_kv_heads * cfg.head_dim}
    array = np.ascontiguousarray(np.asarray(jax.device_get(table), np.float32))
    return {**common, **config}, {TENSOR: array}


def save_peft_prompt(params: dict, cfg: ModelConfig, directory: str | os.PathLike, *,
                     base_model_name_or_path: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write the "prompt" / "prefix" subtree of ``params`` as a PEFT adapter directory
    (reparameterised forms are saved as their output, exactly as PEFT saves them)."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty (pass overwrite=True to replace its files; "
                              "the CLI's flag is --overwrite)")
    config, tensors = peft_prompt_tensors(params, cfg)
    config["base_model_name_or_path"] = base_model_name_or_path
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory


__all__ = ["AdapterMismatchError", "load_peft_prompt", "peft_prompt_subtree", "peft_prompt_tensors",
           "read_adapter", "save_peft_prompt"]
