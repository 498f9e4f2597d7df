"""Orbax checkpoints of jaxtune parameters (the training-state manager builds on this)."""

from jaxtune.checkpoint.params import MODEL_CONFIG_FILE, load_model_config, restore_params, save_params

__all__ = ["MODEL_CONFIG_FILE", "load_model_config", "restore_params", "save_params"]
