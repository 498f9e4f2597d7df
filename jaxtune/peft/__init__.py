"""PEFT methods as transforms of the parameter tree (``params -> params`` plus a trainable mask)."""

from jaxtune.peft.lora import (
    TARGET_PRESETS,
    LoraConfig,
    LoraWeight,
    apply_lora,
    join_lora,
    lora_mask,
    merge,
    split_lora,
)

__all__ = ["TARGET_PRESETS", "LoraConfig", "LoraWeight", "apply_lora", "join_lora", "lora_mask", "merge", "split_lora"]
