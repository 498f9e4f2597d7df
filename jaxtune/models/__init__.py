"""Decoder language models as pure functions over parameter pytrees."""

from jaxtune.models.attention import KVCache
from jaxtune.models.config import FAMILIES, ModelConfig, RopeConfig
from jaxtune.models.decoder import Model, apply, init, lm_head, positions_from_segments
from jaxtune.models.heads import (
    classifier_head,
    init_classifier_head,
    init_scalar_head,
    scalar_head,
    sequence_scores,
)

__all__ = [
    "FAMILIES", "KVCache", "Model", "ModelConfig", "RopeConfig", "apply", "classifier_head",
    "init", "init_classifier_head", "init_scalar_head", "lm_head", "positions_from_segments",
    "scalar_head", "sequence_scores",
]
