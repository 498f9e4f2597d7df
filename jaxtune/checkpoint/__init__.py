"""Orbax checkpoints: params-only (`params`) and training state with keep-N and resume (`manager`)."""

from jaxtune.checkpoint.manager import CheckpointConfig, NonFiniteStateError, TrainCheckpointer
from jaxtune.checkpoint.manager import restore_params as restore_train_params
from jaxtune.checkpoint.params import MODEL_CONFIG_FILE, load_model_config, restore_params, save_params

__all__ = [
    "CheckpointConfig", "MODEL_CONFIG_FILE", "NonFiniteStateError", "TrainCheckpointer", "load_model_config",
    "restore_params", "restore_train_params", "save_params",
]
