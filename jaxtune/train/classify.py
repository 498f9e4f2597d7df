"""Sequence classification and regression over the decoder: the head transform, the loss, metrics.

``add_score_head(params, cfg, num_labels, rng)`` is a ``params -> params`` transform that puts
``params["score"]`` (kernel [hidden, num_labels], bias) beside the trunk, after any PEFT
transform, so adapter target patterns never reach it; it is always trainable. The loss
pools the hidden states of each row (`jaxtune.models.heads.pool`: the last real token, as
Hugging Face's ``*ForSequenceClassification`` do, or the mean) and takes cross-entropy over
classes, or mean squared error for regression (``num_labels`` = 1). Sums over rows follow
the loss contract of `jaxtune.train.losses`: the weight is the number of real rows.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models import Model, ModelConfig
from jaxtune.models.heads import classifier_head, init_classifier_head
from jaxtune.train.losses import LossFn

HEAD = "score"
HEAD_PATTERN = r"^score/"  # its path regex (train.trainable / masks)


def add_score_head(params: Any, cfg: ModelConfig, num_labels: int, rng: jax.Array) -> Any:
    if HEAD in params:
        raise ValueError(f'params already hold a "{HEAD}" head')
    return {**params, HEAD: init_classifier_head(rng, cfg, num_labels)}


def classification_logits(model: Model, params: Any, batch: dict, *, pooling: str = "last", rng=None) -> jax.Array:
    hidden, _ = model.hidden(params, batch["tokens"], positions=batch.get("positions"),
                             segment_ids=batch["segment_ids"], rng=rng)
    return classifier_head(params[HEAD], hidden, batch["segment_ids"], pooling)


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


def classification_report(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> dict:
    """Accuracy, macro-F1 and per-class precision / recall / F1 from predicted and true classes."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    report = {"accuracy": float(np.mean(predictions == labels)) if len(labels) else float("nan"), "examples": len(labels)}
    f1s = []
    for k in range(num_labels):
        tp = int(np.sum((predictions == k) & (labels == k)))
        fp = int(np.sum((predictions == k) & (labels != k)))
        fn = int(np.sum((predictions != k) & (labels == k)))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        report[f"class_{k}"] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
        f1s.append(f1)
    report["macro_f1"] = float(np.mean(f1s)) if f1s else float("nan")
    return report


def regression_report(predictions: np.ndarray, labels: np.ndarray) -> dict:
    predictions, labels = np.asarray(predictions, np.float64), np.asarray(labels, np.float64)
    err = predictions - labels
    corr = float(np.corrcoef(predictions, labels)[0, 1]) if len(labels) > 1 and np.std(predictions) > 0 else float("nan")
    return {"mse": float(np.mean(err ** 2)), "mae": float(np.mean(np.abs(err))), "pearson": corr, "examples": len(labels)}
