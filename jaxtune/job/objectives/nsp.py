"""``nsp``: BERT's pre-training, masked language modelling plus next-sentence prediction.

The model attends both ways (``causal=False``) and gets the `NSP` head over its pooled first token.
Data are sentence pairs (``data.kind: sentence_pairs``, `jaxtune.data.sentence_pairs`): documents
split into sentences, ``[CLS] A [SEP] B [SEP]`` with token types, B the text that followed A or,
for ``data.pairs.random_next`` of the pairs, a sentence of another document. The loss
(`jaxtune.train.bert`) masks tokens as the ``masked`` objective does (never [CLS], [SEP], padding)
and adds ``objective.mlm_weight`` * MLM and ``objective.nsp_weight`` * NSP cross-entropy; the
held-out figures report ``mlm_loss``, ``masked_accuracy``, ``nsp_loss`` and ``nsp_accuracy``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.data.sentence_pairs import SentencePairStream, load_sentence_documents
from jaxtune.job.objectives.base import Context, Objective, register
from jaxtune.job.objectives.masked import mask_token, special_ids
from jaxtune.job.streams import Streams, check_data_kind, record_streams
from jaxtune.models import Model, ModelConfig
from jaxtune.models.heads import NSP, HeadSpec
from jaxtune.train.bert import nsp_pretraining_loss
from jaxtune.train.losses import LossFn


@register
class NextSentence(Objective):
    name = "nsp"
    data_kinds = ("sentence_pairs",)
    unit = "pairs"

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        return cfg.replace(causal=False)  # the masked LM half attends both ways

    def head(self, ctx: Context) -> HeadSpec:
        return HeadSpec(NSP, outputs=2)

    def batch_extras(self, ctx: Context, rows: int, seq: int) -> dict:
        return {"token_types": jax.ShapeDtypeStruct((rows, seq), jnp.int32),
                "nsp_labels": jax.ShapeDtypeStruct((rows,), jnp.int32),
                "row_mask": jax.ShapeDtypeStruct((rows,), jnp.float32)}

    def loss(self, ctx: Context) -> LossFn:
        o, t = ctx.job.objective, ctx.job.train
        return nsp_pretraining_loss(Model(ctx.cfg), mask_token_id=mask_token(ctx), rate=o.mask_rate,
                                    random_rate=o.random_rate, keep_rate=o.keep_rate,
                                    special_ids=special_ids(ctx.tokenizer), mlm_weight=o.mlm_weight,
                                    nsp_weight=o.nsp_weight, z_loss=t.z_loss, chunk_tokens=t.loss_chunk_tokens)

    def streams(self, ctx: Context, *, train: bool = True) -> Streams:
        check_data_kind(ctx.job, self.data_kinds)
        job, tokenizer = ctx.job, ctx.tokenizer
        d, t = job.data, job.train
        if tokenizer is None:
            raise ValueError("objective nsp: sentence pairs need a tokenizer with [CLS] / [SEP] tokens")

        def load(sources, split, name):
            return load_sentence_documents(sources, d.pairs, tokenizer, split=split, eval_fraction=d.eval_fraction,
                                           on_bad_row=d.on_bad_row, vocab_size=ctx.cfg.vocab_size,
                                           block=d.tokenize_batch, name=name)

        def stream(documents, **kw):
            return SentencePairStream(documents, t.batch_size, t.seq_len, cls_id=getattr(tokenizer, "cls_token_id", None),
                                      sep_id=getattr(tokenizer, "sep_token_id", None), pad_id=ctx.cfg.pad_token_id or 0,
                                      random_next=d.pairs.random_next, short_seq_prob=d.pairs.short_seq_prob, **kw)

        return record_streams(job, load, stream, train=train)
