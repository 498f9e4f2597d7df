"""``causal``: next-token prediction, the pretraining objective (also SFT's loss, `sft`).

Streams: synthetic sequences, a text file cut into rows, documents (packed or padded), or
instruction records (data.kind=sft, with their completion / assistant masks). Loss:
`jaxtune.train.losses.causal_lm_loss` with the job's z-loss and logits chunking.
"""

from __future__ import annotations

from jaxtune.job.objectives.base import Context, Objective, register
from jaxtune.job.objectives.sft import instruction_streams
from jaxtune.job.streams import LM_KINDS, Streams, check_data_kind, lm_streams
from jaxtune.models import Model
from jaxtune.train.losses import LossFn, causal_lm_loss


@register
class Causal(Objective):
    name = "causal"
    generates = True
    data_kinds = (*LM_KINDS, "sft")

    def loss(self, ctx: Context) -> LossFn:
        t = ctx.job.train
        return causal_lm_loss(Model(ctx.cfg), z_loss=t.z_loss, chunk_tokens=t.loss_chunk_tokens)

    def streams(self, ctx: Context, *, train: bool = True) -> Streams:
        check_data_kind(ctx.job, self.data_kinds)
        if ctx.job.data.kind == "sft":
            return instruction_streams(ctx, train=train)
        return lm_streams(ctx.job, ctx.cfg, ctx.tokenizer, train=train)
