"""Any PEFT-format adapter directory in or out, whatever its method.

`load_adapter` reads ``adapter_config.json`` and hands the directory to the module for its
``peft_type``: LoRA / DoRA / IA3 (`jaxtune.interop.peft_adapters`) or prompt tuning, P-tuning
and prefix tuning (`jaxtune.interop.peft_prompt`). `save_adapter` writes whichever kind of
adapter a param tree carries. Both work on any base the HF mapping covers (llama-like, gpt2).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from jaxtune.interop.peft_adapters import ADAPTER_CONFIG, load_peft_adapter
from jaxtune.interop.peft_export import save_peft_adapter
from jaxtune.interop.peft_prompt import PROMPT_TYPES, load_peft_prompt, save_peft_prompt
from jaxtune.models import ModelConfig
from jaxtune.peft.core import ADDED_KEYS, adapter_leaves


def adapter_type(directory: str | os.PathLike) -> str:
    """The ``peft_type`` of a PEFT adapter directory (raises naming the file if it is not one)."""
    return str(adapter_config(directory)["peft_type"])


def adapter_config(directory: str | os.PathLike) -> dict:
    """``adapter_config.json`` of a PEFT adapter directory (raises naming the file if it is not one)."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"{path}: no 'peft_type' field")
    return config


def load_adapter(params: Any, cfg: ModelConfig, directory: str | os.PathLike, *, dtype: Optional[str] = None) -> Any:
    """``params`` (a base model of ``cfg``) with the PEFT adapter in ``directory`` put on."""
    if adapter_type(directory) in PROMPT_TYPES:
        return load_peft_prompt(directory, params, cfg)
    return load_peft_adapter(params, cfg, directory, dtype=dtype)


def save_adapter(params: Any, cfg: ModelConfig, directory: str | os.PathLike, *, overwrite: bool = False,
                 base_model_name_or_path: Optional[str] = None, use_rslora: bool = False) -> Path:
    """Write the adapter ``params`` carries (LoRA / DoRA / IA3 leaves, or a prompt / prefix
    subtree, not both) as a PEFT adapter directory. ``use_rslora``: the LoRA leaves were made
    with rsLoRA scaling (alpha / sqrt(r)); the adapter says so and keeps that alpha."""
    added = [k for k in ADDED_KEYS if isinstance(params, dict) and k in params]
    if added and adapter_leaves(params):
        raise ValueError(f"params carry both {added} and adapter leaves; PEFT stores one method per adapter "
                         "directory (export them separately)")
    if added:
        return save_peft_prompt(params, cfg, directory, base_model_name_or_path=base_model_name_or_path,
                                overwrite=overwrite)
    return save_peft_adapter(params, cfg, directory, base_model_name_or_path=base_model_name_or_path,
                             overwrite=overwrite, use_rslora=use_rslora)
