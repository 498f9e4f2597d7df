"""Turn a `ModelSource` (config) into (params, ModelConfig, directory) from any supported origin."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax

from jaxtune.checkpoint import restore_params, restore_train_params
from jaxtune.checkpoint.params import PARAMS_DIR
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
            params, cfg, _ = restore_train_params(source.checkpoint, **numerics)
        return params, cfg, Path(source.checkpoint)
    cfg = (preset(source.preset) if source.preset is not None else source.config).replace(**numerics)
    return Model(cfg).init(jax.random.key(source.init_seed)), cfg, None
