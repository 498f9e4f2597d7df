"""The config tree of a jaxtune job (what YAML files in configs/ describe).

Sections land as their engines do: `model`, `tokenizer`, `sampling` and
`prompts` drive `jaxtune generate`; training sections join with the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from jaxtune.generate.sampling import SamplingConfig
from jaxtune.models.config import ModelConfig


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: exactly one of hf_dir, checkpoint, preset, config."""

    hf_dir: Optional[str] = None  # local Hugging Face directory (config.json + safetensors)
    checkpoint: Optional[str] = None  # jaxtune Orbax params checkpoint directory
    preset: Optional[str] = None  # built-in architecture, random init (jaxtune.models.presets)
    config: Optional[ModelConfig] = None  # inline architecture, random init
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention_impl: Literal["dpa", "cudnn", "xla"] = "dpa"
    init_seed: int = 0

    def __post_init__(self):
        given = [k for k in ("hf_dir", "checkpoint", "preset", "config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"model: set exactly one of hf_dir, checkpoint, preset, config (got {given or 'none'})"
            )


@dataclass(frozen=True)
class TokenizerConfig:
    kind: Literal["auto", "byte", "hf"] = "auto"  # auto: HF files beside the model, else bytes
    path: Optional[str] = None  # defaults to the model's directory


@dataclass(frozen=True)
class JobConfig:
    model: ModelSource = field(default_factory=lambda: ModelSource(preset="tiny-llama"))
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompts: tuple[str, ...] = ("To be, or not to be",)
    seed: int = 0
