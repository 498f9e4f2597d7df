"""Checks that a run's batches fit its mesh and loop, made before anything is compiled: the batch
divides over the data-parallel devices, the sequence over the context-parallel ones, and several
steps per call only for streams that can give their batches up front."""

from __future__ import annotations

from typing import Any, Optional

from jax.sharding import Mesh

from jaxtune.models.config import ModelConfig
from jaxtune.parallel.mesh import CONTEXT_AXIS, axis_size
from jaxtune.train.config import TrainConfig


def check_batch_layout(cfg: TrainConfig, mesh: Mesh) -> None:
    """Every micro-batch is split over the data-parallel devices: the batch must divide; and the
    sequence over the context-parallel devices: the sequence length must divide."""
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % (cfg.grad_accum * batch_devices):
        raise ValueError(
            f"train.batch_size ({cfg.batch_size}) must divide by train.grad_accum ({cfg.grad_accum}) x "
            f"mesh.data ({mesh.shape['data']}) x mesh.fsdp ({mesh.shape['fsdp']}): every micro-batch is split "
            "over the data-parallel devices"
        )
    contexts = axis_size(mesh, CONTEXT_AXIS)
    if cfg.seq_len % contexts:
        raise ValueError(
            f"train.seq_len ({cfg.seq_len}) must divide by mesh.context ({contexts}): every sequence is split "
            "into equal blocks over the context-parallel devices"
        )


def check_positions(cfg: TrainConfig, model_cfg: Optional[ModelConfig]) -> None:
    """A model with learned absolute positions has no embedding past ``max_position_embeddings``:
    longer rows would look up positions that do not exist (NaN losses, not an error)."""
    if model_cfg is not None and model_cfg.position == "learned" and cfg.seq_len > model_cfg.max_position_embeddings:
        raise ValueError(f"train.seq_len ({cfg.seq_len}) exceeds the model's {model_cfg.max_position_embeddings} "
                         f"learned positions (max_position_embeddings); set train.seq_len <= "
                         f"{model_cfg.max_position_embeddings}")


def check_steps_per_call(cfg: TrainConfig, batches: Any) -> None:
    """Several steps per call need their batches up front: a rollout stream (GRPO / PPO), which
    samples each batch from the policy of the step before, cannot provide them."""
    if cfg.steps_per_call > 1 and hasattr(batches, "set_policy"):
        raise ValueError(f"train.steps_per_call={cfg.steps_per_call}: this objective samples each batch from the "
                         "current policy (a rollout stream), so its steps cannot be stacked; use train.steps_per_call=1")
