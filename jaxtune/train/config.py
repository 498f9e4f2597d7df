"""Config sections of a training run (plain frozen dataclasses, loaded from YAML)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal, Optional


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100  # optimizer steps (batches consumed)
    batch_size: int = 8  # global rows per optimizer step, summed over devices and micro-batches
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    # rematerialisation of each block: none | full | offload (block inputs in pinned host memory, brought
    # back for the backward; GPUs / TPUs, and CPU) | save_dots | save_layer_inputs (jaxtune.models.layers.REMAT)
    remat: Literal["none", "full", "offload", "save_dots", "save_layer_inputs"] = "none"
    z_loss: float = 0.0  # PaLM z-loss coefficient on logsumexp^2
    loss_chunk_tokens: int = 0  # >0: logits for the loss are built this many tokens at a time
    mlp_chunk_tokens: int = 0  # >0: each block's MLP runs this many tokens at a time (recomputed per chunk)
    trainable: Optional[tuple[str, ...]] = None  # regexes over param paths; None = every parameter
    max_nonfinite_in_row: int = 10  # stop after this many consecutive skipped (NaN/inf) steps
    log_every: int = 10
    eval_every: int = 0  # 0 = evaluate only at the end (when there is an eval stream)
    eval_batches: int = 4
    seed: int = 0  # RNG of the train state (dropout, sampling); init uses model.init_seed
    offload_optimizer: bool = False  # optimizer state lives in pinned host memory, streamed to the device each step
    # optimizer steps per jitted call (a lax.scan over a stack of batches): one dispatch and one
    # metrics fetch per call instead of per step; logs, evaluations, checkpoints and SIGTERM / Ctrl-C
    # act at call boundaries (a call never crosses an evaluation or a save). Every step's metrics
    # are still logged. Small models on CPU gain most; a fixed batch stream is needed (not GRPO / PPO).
    steps_per_call: int = 1

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "max_nonfinite_in_row",
                     "steps_per_call"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size ({self.batch_size}) must divide by train.grad_accum ({self.grad_accum})")
        for name in ("eval_every", "eval_batches", "loss_chunk_tokens", "mlp_chunk_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.z_loss < 0:
            raise ValueError(f"train.z_loss must be >= 0, got {self.z_loss}")

    @property
    def model_numerics(self) -> dict:
        """The ModelConfig fields this section sets for the trained model (``cfg.replace(**...)``)."""
        return dict(remat=self.remat, mlp_chunk_tokens=self.mlp_chunk_tokens)


@dataclass(frozen=True)
class WandbConfig:
    """``logging.wandb``: the same scalars and the run's config to Weights & Biases (``jaxtune[wandb]``)."""

    project: str = "jaxtune"
    name: Optional[str] = None  # the run's display name (default: W&B's)
    entity: Optional[str] = None
    mode: Literal["online", "offline", "disabled"] = "online"  # offline: local files only (`wandb sync` later)
    directory: Optional[str] = None  # where W&B keeps its files; default: the run's log directory

    def __post_init__(self):
        if importlib.util.find_spec("wandb") is None:
            raise ValueError("logging.wandb needs the wandb package: pip install 'jaxtune[wandb]'")


@dataclass(frozen=True)
class LoggingConfig:
    directory: Optional[str] = None  # metrics.jsonl + TensorBoard events; default: the checkpoint directory
    tensorboard: bool = True
    jsonl: bool = True
    progress: bool = True
    peak_flops: Optional[float] = None  # per-device peak FLOP/s for MFU; default: looked up by device kind
    wandb: Optional[WandbConfig] = None  # also log to Weights & Biases
