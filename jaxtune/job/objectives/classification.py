"""``classification`` and ``regression``: a score head over the pooled hidden states.

Records with a text and a label (`jaxtune.data.classify`) become one padded row each (``[CLS] text
[SEP]`` for BERT, with its tokenizer's tokens); the `SCORE` head (``objective.num_labels`` outputs,
or one for regression) reads the last real token, the mean, or the first token through the model's
pooler (``objective.pooling``; ``auto``: the pooler where the model has one); the loss is cross-entropy over classes or squared error
(`jaxtune.train.classify`). `eval_metrics` reports accuracy, macro-F1 and per-class precision /
recall / F1, or MSE / MAE / Pearson's r, of a restored model.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.data.classify import LabelledStream, load_labelled
from jaxtune.eval.metrics import classification_report, regression_report
from jaxtune.job.objectives.base import Context, Objective, register
from jaxtune.job.streams import Streams, check_data_kind, record_options, record_streams
from jaxtune.models import Model
from jaxtune.models.heads import SCORE, HeadSpec, classification_logits
from jaxtune.train.classify import classification_loss
from jaxtune.train.losses import LossFn


def pooling(ctx: Context) -> str:
    """``objective.pooling``, with ``auto`` resolved: the pooler over [CLS] for a model that has one
    (BERT), else the last real token (decoders, as Hugging Face's *ForSequenceClassification)."""
    how = ctx.job.objective.pooling
    if how == "auto":
        return "cls" if ctx.cfg.pooler else "last"
    return how


@register
class Classification(Objective):
    name = "classification"
    data_kinds = ("classification",)
    unit = "examples"
    regression = False

    def outputs(self, ctx: Context) -> int:
        n = ctx.job.objective.num_labels
        if n < 2:
            raise ValueError(f"objective.num_labels must be >= 2 for classification, got {n}")
        return n

    def head(self, ctx: Context) -> HeadSpec:
        return HeadSpec(SCORE, outputs=self.outputs(ctx), pooling=pooling(ctx))

    def batch_extras(self, ctx: Context, rows: int, seq: int) -> dict:
        extras = {"labels": jax.ShapeDtypeStruct((rows,), jnp.float32 if self.regression else jnp.int32),
                  "row_mask": jax.ShapeDtypeStruct((rows,), jnp.float32)}
        if ctx.job.data.classify.text_pair:
            extras["token_types"] = jax.ShapeDtypeStruct((rows, seq), jnp.int32)
        return extras

    def loss(self, ctx: Context) -> LossFn:
        return classification_loss(Model(ctx.cfg), num_labels=self.outputs(ctx), pooling=pooling(ctx),
                                   regression=self.regression)

    def streams(self, ctx: Context, *, train: bool = True) -> Streams:
        check_data_kind(ctx.job, self.data_kinds)
        job, t = ctx.job, ctx.job.train
        options = record_options(job, ctx.cfg)

        def load(sources, split, name):
            return load_labelled(sources, job.data.classify, ctx.tokenizer, num_labels=self.outputs(ctx),
                                 regression=self.regression, split=split, name=name, cls_sep=ctx.cfg.pooler,
                                 **options)

        def stream(examples, **kw):
            return LabelledStream(examples, t.batch_size, t.seq_len, regression=self.regression,
                                  pad_id=ctx.cfg.pad_token_id or 0, **kw)

        return record_streams(job, load, stream, train=train)

    def eval_metrics(self, ctx: Context, params: Any, batches: Iterable[dict], limit: Optional[int]) -> dict:
        if SCORE not in params:
            raise ValueError("eval task classify: the restored model has no score head (was it trained for classification?)")
        model, how = Model(ctx.cfg), pooling(ctx)
        logits_fn = jax.jit(lambda p, b: classification_logits(model, p, b, pooling=how))
        preds, labels = [], []
        for batch in batches:
            keep = batch["row_mask"] > 0
            logits = np.asarray(jax.device_get(logits_fn(params, batch)))[keep]
            preds.append(logits[:, 0] if self.regression else logits.argmax(-1))
            labels.append(batch["labels"][keep])
            if limit is not None and sum(map(len, labels)) >= limit:
                break
        preds, labels = np.concatenate(preds)[:limit], np.concatenate(labels)[:limit]
        if self.regression:
            return regression_report(preds, labels)
        return classification_report(preds, labels, self.outputs(ctx))


@register
class Regression(Classification):
    name = "regression"
    regression = True

    def outputs(self, ctx: Context) -> int:
        return 1
