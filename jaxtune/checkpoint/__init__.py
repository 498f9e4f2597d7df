"""Orbax checkpoints of pytrees: one params tree (`params`) and the training state with keep-N and
resume (`manager`). The metadata that explains a checkpoint lives in `jaxtune.job.runmeta`."""

from jaxtune.checkpoint.manager import CheckpointConfig, NonFiniteStateError, TrainCheckpointer
from jaxtune.checkpoint.manager import restore_params as restore_train_params
from jaxtune.checkpoint.params import PARAMS_DIR, restore_params, save_params
from jaxtune.utils.moved import moved_names

__all__ = [
    "CheckpointConfig", "NonFiniteStateError", "PARAMS_DIR", "TrainCheckpointer", "restore_params",
    "restore_train_params", "save_params",
]
__getattr__ = moved_names(__name__, {"load_model_config": "jaxtune.job.runmeta.read_model_config",
                                     "MODEL_CONFIG_FILE": "jaxtune.job.runmeta.MODEL_CONFIG_FILE"})
