"""Hugging Face formats in and out: config.json, safetensors checkpoints."""

from jaxtune.interop.hf_config import UnsupportedModelError, from_hf_config, to_hf_config
from jaxtune.interop.hf_weights import CheckpointMismatchError, load_hf, save_hf

__all__ = ["CheckpointMismatchError", "UnsupportedModelError", "from_hf_config", "load_hf", "save_hf", "to_hf_config"]
