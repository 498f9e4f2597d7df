"""``masked``: BERT-style masked language modelling on a model that attends both ways.

The model's config gets ``causal=False``. Streams are the language-model ones (synthetic, text,
documents); the loss (`jaxtune.train.losses.masked_lm_loss`) masks tokens itself, with
``objective.mask_token_id`` or the tokenizer's mask token, never masking its BOS / EOS / pad.
"""

from __future__ import annotations

from jaxtune.data.masking import check_mask_token_id
from jaxtune.job.objectives.base import Context, Objective, register
from jaxtune.job.streams import LM_KINDS, Streams, check_data_kind, lm_streams
from jaxtune.models import Model, ModelConfig
from jaxtune.train.losses import LossFn, masked_lm_loss


def special_ids(tokenizer) -> tuple[int, ...]:
    """The tokenizer's BOS / EOS / pad / [CLS] / [SEP] ids (never masked)."""
    ids = (getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "cls", "sep"))
    return tuple(sorted({int(i) for i in ids if i is not None}))


def mask_token(ctx: Context) -> int:
    """``objective.mask_token_id``, else the tokenizer's mask token, checked against the vocabulary."""
    o = ctx.job.objective
    mask_token_id = o.mask_token_id if o.mask_token_id is not None else getattr(ctx.tokenizer, "mask_token_id", None)
    if mask_token_id is None:
        raise ValueError(f"objective '{o.kind}' needs a mask token: set objective.mask_token_id (the tokenizer has "
                         "no mask token)")
    source = "objective.mask_token_id" if o.mask_token_id is not None else "the tokenizer's mask token id"
    return check_mask_token_id(mask_token_id, ctx.cfg.vocab_size, name=source)


@register
class Masked(Objective):
    name = "masked"
    data_kinds = LM_KINDS

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        return cfg.replace(causal=False)  # masked LM attends both ways

    def loss(self, ctx: Context) -> LossFn:
        o, t = ctx.job.objective, ctx.job.train
        return masked_lm_loss(Model(ctx.cfg), mask_token_id=mask_token(ctx), rate=o.mask_rate, random_rate=o.random_rate,
                              keep_rate=o.keep_rate, special_ids=special_ids(ctx.tokenizer), z_loss=t.z_loss,
                              chunk_tokens=t.loss_chunk_tokens)

    def streams(self, ctx: Context, *, train: bool = True) -> Streams:
        check_data_kind(ctx.job, self.data_kinds)
        return lm_streams(ctx.job, ctx.cfg, ctx.tokenizer, train=train)
