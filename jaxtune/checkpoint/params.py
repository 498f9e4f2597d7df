"""Save and restore a parameter tree with Orbax, next to the `ModelConfig` that explains it.

Layout of a params checkpoint directory::

    model_config.json   the ModelConfig (jaxtune's, not Hugging Face's)
    params/             Orbax PyTree checkpoint of the param tree
    (tokenizer files)   optional, so generate/eval need no extra flags

Restoring reads shapes and dtypes from the config, so any device count or mesh
can restore it (pass ``shardings`` to place leaves as you like).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from jaxtune.config.loader import from_dict, to_dict
from jaxtune.models import Model, ModelConfig

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def save_params(directory: str | Path, params: Any, cfg: ModelConfig, *, overwrite: bool = False) -> Path:
    directory = Path(directory).absolute()
    if (directory / PARAMS_DIR).exists() and not overwrite:
        raise FileExistsError(f"{directory / PARAMS_DIR} exists (pass overwrite=True to replace it)")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params, force=overwrite)
        checkpointer.wait_until_finished()
    return directory


def load_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / MODEL_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no {MODEL_CONFIG_FILE} (not a jaxtune params checkpoint)")
    return from_dict(ModelConfig, json.loads(path.read_text()), prefix="model_config")


def restore_params(directory: str | Path, *, shardings: Optional[Any] = None, **config_overrides) -> tuple[Any, ModelConfig]:
    """-> (params, cfg). ``config_overrides`` change numerics only (dtype, attention_impl)."""
    directory = Path(directory).absolute()
    cfg = load_model_config(directory).replace(**config_overrides)
    abstract = jax.eval_shape(Model(cfg).init, jax.random.key(0))
    if shardings is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    if not (directory / PARAMS_DIR).exists():
        raise FileNotFoundError(f"{directory}: no {PARAMS_DIR}/ directory")
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / PARAMS_DIR, abstract)
    return params, cfg
