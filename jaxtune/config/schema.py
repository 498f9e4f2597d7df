"""The config trees of jaxtune jobs (what YAML files in configs/ describe).

`JobConfig` drives `jaxtune generate` (model, tokenizer, sampling, prompts);
`TrainJobConfig` drives `jaxtune train` / `jaxtune eval` (model, tokenizer,
data, objective, peft, train, optim, mesh, checkpoint, logging). Each section is the dataclass
of the module that consumes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from jaxtune.checkpoint.manager import CheckpointConfig
from jaxtune.data.streams import DataConfig
from jaxtune.eval.config import EvalConfig
from jaxtune.generate.sampling import SamplingConfig
from jaxtune.models.config import ModelConfig
from jaxtune.parallel.mesh import MeshConfig
from jaxtune.peft.config import PeftConfig
from jaxtune.quant.weight import QuantConfig
from jaxtune.train.config import LoggingConfig, TrainConfig
from jaxtune.train.losses import ObjectiveConfig
from jaxtune.train.optim import OptimConfig


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
    adapter: Optional[str] = None  # a PEFT-format adapter directory put onto these weights (LoRA, DoRA, IA3, prompt, prefix)
    quant: Optional[QuantConfig] = None  # hold the kernels quantized (nf4 / fp4 / int8 / int4): QLoRA's frozen base

    @property
    def numerics(self) -> dict:
        """param_dtype / dtype / attention_impl: how the model runs (the other models a job loads, a
        value network or a reward model, run alike)."""
        return dict(param_dtype=self.param_dtype, dtype=self.dtype, attention_impl=self.attention_impl)

    def __post_init__(self):
        given = [k for k in ("hf_dir", "checkpoint", "preset", "config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"model: set exactly one of hf_dir, checkpoint, preset, config (got {given or 'none'})"
            )


@dataclass(frozen=True)
class TokenizerConfig:
    kind: Literal["auto", "byte", "char", "hf"] = "auto"  # auto: HF files or a saved built-in tokenizer beside the model, else bytes
    path: Optional[str] = None  # defaults to the model's directory


@dataclass(frozen=True)
class JobConfig:
    model: ModelSource = field(default_factory=lambda: ModelSource(preset="tiny-llama"))
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompts: tuple[str, ...] = ("To be, or not to be",)
    seed: int = 0


@dataclass(frozen=True)
class TrainJobConfig:
    model: ModelSource = field(default_factory=lambda: ModelSource(preset="tiny-llama"))
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # causal LM, or masked LM (bidirectional)
    peft: PeftConfig = field(default_factory=PeftConfig)  # LoRA & co.; nothing set = train the whole model
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # what `jaxtune eval` runs (default: the held-out loss)
