"""Sequence classification and regression over the decoder: the score head and the loss.

``add_score_head(params, cfg, num_labels, rng)`` is a ``params -> params`` transform that puts
the `SCORE` head (kernel [hidden, num_labels], bias) beside the trunk (`jaxtune.models.heads`),
after any PEFT transform, so adapter target patterns never reach it; it is always trainable. The
loss pools the hidden states of each row (`jaxtune.models.heads.pool`: the last real token, as
Hugging Face's ``*ForSequenceClassification`` do, or the mean) and takes cross-entropy over
classes, or mean squared error for regression (``num_labels`` = 1). Sums over rows follow
the loss contract of `jaxtune.train.losses`: the weight is the number of real rows. Accuracy,
F1 and regression reports of predictions are `jaxtune.eval.metrics`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxtune.models import Model, ModelConfig
from jaxtune.models.heads import SCORE, HeadSpec, add_head, classification_logits
from jaxtune.train.losses import LossFn
from jaxtune.utils.moved import moved_names

__getattr__ = moved_names(__name__, {"classification_report": "jaxtune.eval.metrics.classification_report",
                                     "regression_report": "jaxtune.eval.metrics.regression_report",
                                     "HEAD": "jaxtune.models.heads.SCORE", "HEAD_PATTERN": "HeadSpec(SCORE).pattern"})


def add_score_head(params: Any, cfg: ModelConfig, num_labels: int, rng: jax.Array) -> Any:
    """``params -> params`` with a fresh `SCORE` head of ``num_labels`` outputs."""
    return add_head(params, HeadSpec(SCORE, outputs=num_labels), cfg, rng)


def classification_loss(model: Model, *, num_labels: int, pooling: str = "last", regression: bool = False) -> LossFn:
    """Cross-entropy (classes) or squared error (``regression``) per row; metrics: accuracy / mae."""

    def loss_fn(params, batch, rng):
        logits = classification_logits(model, params, batch, pooling=pooling, rng=rng)
        weight = batch["row_mask"].astype(jnp.float32)
        if regression:
            err = logits[:, 0] - batch["labels"].astype(jnp.float32)
            loss = jnp.sum(weight * jnp.square(err))
            return loss, jnp.sum(weight), {"mse": loss, "mae": jnp.sum(weight * jnp.abs(err))}
        labels = batch["labels"].astype(jnp.int32)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        loss = jnp.sum(weight * nll)
        return loss, jnp.sum(weight), {"cross_entropy": loss, "accuracy": jnp.sum(weight * correct)}

    return loss_fn
