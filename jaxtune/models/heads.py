"""Heads over decoder hidden states, as pure functions over their own small param dicts.

- value / reward head: hidden [batch, seq, embed] -> [batch, seq] scalars
  (PPO values per token; a reward model reads the last real token).
- sequence classification: pooled hidden -> [batch, num_labels] logits
  (pooling: the last non-padding token, as Hugging Face does, or the mean).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from jaxtune.models.config import ModelConfig
from jaxtune.ops import linear


def init_scalar_head(rng: jax.Array, cfg: ModelConfig) -> dict:
    """Params of a value/reward head: {'kernel': [embed, 1], 'bias': [1]}."""
    kernel = jax.random.normal(rng, (cfg.hidden_size, 1), jnp.float32) / jnp.sqrt(cfg.hidden_size + 1.0)
    return {"kernel": kernel.astype(cfg.weight_dtype), "bias": jnp.zeros((1,), cfg.weight_dtype)}


def scalar_head(head: dict, hidden: jax.Array) -> jax.Array:
    """hidden: [batch, seq, embed] -> [batch, seq] float32."""
    out = linear(hidden.astype(jnp.float32), head["kernel"], dtype=jnp.float32) + head["bias"].astype(jnp.float32)
    return out[..., 0]


def init_classifier_head(rng: jax.Array, cfg: ModelConfig, num_labels: int) -> dict:
    """Params of a classification head: {'kernel': [embed, num_labels], 'bias': [num_labels]}."""
    kernel = jax.random.normal(rng, (cfg.hidden_size, num_labels), jnp.float32) * cfg.initializer_range
    return {"kernel": kernel.astype(cfg.weight_dtype), "bias": jnp.zeros((num_labels,), cfg.weight_dtype)}


def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """Index of the last non-padding token of each row. segment_ids: [batch, seq] -> [batch]."""
    index = jnp.arange(segment_ids.shape[1])[None, :]
    return jnp.max(jnp.where(segment_ids != 0, index, -1), axis=1).clip(0)


def pool(hidden: jax.Array, segment_ids: jax.Array, how: Literal["last", "mean"] = "last") -> jax.Array:
    """hidden: [batch, seq, embed]; segment_ids: [batch, seq] -> [batch, embed] float32."""
    hidden = hidden.astype(jnp.float32)
    if how == "last":
        return jnp.take_along_axis(hidden, last_token_index(segment_ids)[:, None, None], axis=1)[:, 0]
    if how == "mean":
        mask = (segment_ids != 0).astype(jnp.float32)[..., None]
        return (hidden * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
    raise ValueError(f"pooling: unknown method {how!r} (last | mean)")


def classifier_head(head: dict, hidden: jax.Array, segment_ids: jax.Array, how: str = "last") -> jax.Array:
    """-> logits [batch, num_labels] float32 (for regression, num_labels = 1)."""
    pooled = pool(hidden, segment_ids, how)
    return linear(pooled, head["kernel"], dtype=jnp.float32) + head["bias"].astype(jnp.float32)


def sequence_scores(head: dict, hidden: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Reward-model score of each sequence: the scalar head at its last real token. -> [batch]."""
    values = scalar_head(head, hidden)
    return jnp.take_along_axis(values, last_token_index(segment_ids)[:, None], axis=1)[:, 0]
