"""Turn a `ModelSource` (config) into (params, ModelConfig, directory) from any supported origin."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import jax

from jaxtune.checkpoint import restore_params, restore_train_params
from jaxtune.checkpoint.manager import TRAIN_META_FILE
from jaxtune.checkpoint.params import PARAMS_DIR
from jaxtune.config.loader import from_dict
from jaxtune.config.schema import ModelSource
from jaxtune.interop.hf_weights import load_hf
from jaxtune.models import Model, ModelConfig
from jaxtune.models.presets import preset


def load_model(source: ModelSource) -> tuple[Any, ModelConfig, Optional[Path]]:
    numerics = dict(param_dtype=source.param_dtype, dtype=source.dtype, attention_impl=source.attention_impl)
    if source.hf_dir is not None:
        params, cfg = load_hf(source.hf_dir, **numerics)
        return params, cfg, Path(source.hf_dir)
    if source.checkpoint is not None:
        # A params checkpoint (params/ beside model_config.json) or a training run's directory
        # (numbered steps; the newest readable one is used).
        if (Path(source.checkpoint) / PARAMS_DIR).is_dir():
            params, cfg = restore_params(source.checkpoint, **numerics)
        else:
            base = _frozen_base(Path(source.checkpoint), source)
            params, cfg, _ = restore_train_params(source.checkpoint, base_params=base, **numerics)
        return params, cfg, Path(source.checkpoint)
    cfg = (preset(source.preset) if source.preset is not None else source.config).replace(**numerics)
    return Model(cfg).init(jax.random.key(source.init_seed)), cfg, None


def _frozen_base(directory: Path, source: ModelSource) -> Optional[Any]:
    """The base model of a training run that froze some params (its checkpoints hold only the
    trainable half); None for runs that trained everything."""
    meta_path = directory / TRAIN_META_FILE
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("trainable") is None or meta.get("base") is None:
        return None
    base_source = from_dict(ModelSource, meta["base"], prefix=f"{meta_path}: base")
    base_source = dataclasses.replace(base_source, param_dtype=source.param_dtype, dtype=source.dtype,
                                      attention_impl=source.attention_impl)
    params, _, _ = load_model(base_source)
    return params
