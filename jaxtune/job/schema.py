"""The config trees of jaxtune jobs (what YAML files in configs/ describe).

`JobConfig` drives `jaxtune generate` (model, tokenizer, sampling, prompts); `TrainJobConfig`
drives `jaxtune train` / `jaxtune eval` (model, tokenizer, data, objective, peft, train, optim,
mesh, checkpoint, logging, eval). Each section is the dataclass of the module that consumes it;
`ObjectiveConfig` selects one of the registered objectives (`jaxtune.job.objectives`).
"""

from __future__ import annotations

import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from jaxtune.align.grpo import GRPOConfig
from jaxtune.align.ppo import PPOConfig
from jaxtune.align.preference import PreferenceObjectiveConfig
from jaxtune.checkpoint.manager import CheckpointConfig
from jaxtune.data.masking import check_masking_rates
from jaxtune.data.streams import DataConfig
from jaxtune.eval.config import EvalConfig
from jaxtune.generate.chat import conversations_of
from jaxtune.generate.sampling import SamplingConfig
from jaxtune.models.config import ModelConfig
from jaxtune.parallel.mesh import MeshConfig
from jaxtune.peft.config import PeftConfig
from jaxtune.quant.weight import QuantConfig
from jaxtune.train.config import LoggingConfig, TrainConfig
from jaxtune.train.optim import OptimConfig

ObjectiveKind = Literal["causal", "masked", "nsp", "sft", "classification", "regression", "dpo", "reward", "grpo",
                        "ppo"]
OBJECTIVES: tuple[str, ...] = typing.get_args(ObjectiveKind)


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: exactly one of hf_dir, checkpoint, preset, config."""

    hf_dir: Optional[str] = None  # local Hugging Face directory (config.json + safetensors)
    checkpoint: Optional[str] = None  # jaxtune Orbax params checkpoint or training run directory
    preset: Optional[str] = None  # built-in architecture, random init (jaxtune.models.presets)
    config: Optional[ModelConfig] = None  # inline architecture, random init
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention_impl: Literal["auto", "blockwise", "splash", "flash", "cudnn", "dpa", "xla"] = "auto"
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
class ObjectiveConfig:
    """Training objective (one module each in `jaxtune.job.objectives`). causal: next-token
    prediction (pretraining streams, or data.kind=sft records); sft: the same loss on data.kind=sft
    records only. masked: BERT-style masked LM (the model attends both ways): each real token is
    selected with probability ``mask_rate``; of those, ``random_rate`` become a uniformly random
    token, ``keep_rate`` stay as they are and the rest become ``mask_token_id`` (default: the
    tokenizer's mask token). nsp: BERT's pre-training, masked LM (the same masking) plus
    next-sentence prediction on data.kind=sentence_pairs, ``mlm_weight * MLM + nsp_weight * NSP``.
    classification / regression: a score head over the pooled hidden states (``pooling``: the last
    real token, the mean, or ``cls``: the first token through the model's pooler, as BERT does;
    ``auto``: cls for a model with a pooler, else last), cross-entropy over ``num_labels``
    classes or squared error (data.kind=classification). dpo: a DPO-family loss on preference
    pairs; reward: a Bradley-Terry reward model (a one-output score head at the last token); both
    read ``preference`` and data.kind=preference. grpo: group-sampled RL with verifiable rewards on
    the prompts of data.kind=sft records. ppo: RLHF with a value head, GAE and a KL-shaped reward."""

    kind: ObjectiveKind = "causal"
    mask_rate: float = 0.15
    random_rate: float = 0.1
    keep_rate: float = 0.1
    mask_token_id: Optional[int] = None
    mlm_weight: float = 1.0  # nsp: weight of the masked-LM loss
    nsp_weight: float = 1.0  # nsp: weight of the next-sentence loss
    num_labels: int = 2  # classification: number of classes (regression uses 1)
    pooling: Literal["auto", "last", "mean", "cls"] = "auto"
    preference: PreferenceObjectiveConfig = field(default_factory=PreferenceObjectiveConfig)  # dpo / reward
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # grpo: sampling, reward, clipping, KL, normalisation
    ppo: PPOConfig = field(default_factory=PPOConfig)  # ppo: reward (function or model), KL, GAE, clipping, epochs

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise ValueError(f"ObjectiveConfig.kind: unknown objective {self.kind!r} ({' | '.join(OBJECTIVES)})")
        check_masking_rates(
            self.mask_rate, self.random_rate, self.keep_rate,
            names=("ObjectiveConfig.mask_rate", "ObjectiveConfig.random_rate", "ObjectiveConfig.keep_rate"),
        )
        if self.mlm_weight < 0 or self.nsp_weight < 0 or self.mlm_weight + self.nsp_weight <= 0:
            raise ValueError(f"ObjectiveConfig.mlm_weight ({self.mlm_weight}) and nsp_weight ({self.nsp_weight}) must "
                             "be >= 0, not both 0")
        if self.mask_token_id is not None and (
            isinstance(self.mask_token_id, bool) or not isinstance(self.mask_token_id, numbers.Integral)
            or self.mask_token_id < 0
        ):
            raise ValueError(f"ObjectiveConfig.mask_token_id must be a non-negative integer, got {self.mask_token_id!r}")


@dataclass(frozen=True)
class JobConfig:
    """What `jaxtune generate` decodes: ``prompts`` (text, continued as written), or ``messages``:
    one conversation (a list of {role, content}) or a list of them, each rendered with the
    tokenizer's chat template and answered by the assistant."""

    model: ModelSource = field(default_factory=lambda: ModelSource(preset="tiny-llama"))
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompts: tuple[str, ...] = ("To be, or not to be",)
    messages: Optional[tuple[Any, ...]] = None
    seed: int = 0

    def __post_init__(self):
        if self.messages is not None:
            if self.prompts != JobConfig.prompts:
                raise ValueError("give prompts or messages, not both")
            object.__setattr__(self, "messages", tuple(tuple(c) for c in conversations_of(self.messages)))


@dataclass(frozen=True)
class TrainJobConfig:
    model: ModelSource = field(default_factory=lambda: ModelSource(preset="tiny-llama"))
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # what the loss is (jaxtune.job.objectives)
    peft: PeftConfig = field(default_factory=PeftConfig)  # LoRA & co.; nothing set = train the whole model
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # what `jaxtune eval` runs (default: the held-out loss)
