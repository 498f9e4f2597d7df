"""``sft``: supervised fine-tuning, next-token prediction on instruction records only.

Records (prompt / completion, Alpaca, chat messages; `jaxtune.data.sft`) become packed or padded
rows whose loss mask covers the completions (or assistant turns); the loss is the causal LM's.
`objective.kind: causal` with ``data.kind: sft`` trains the same.
"""

from __future__ import annotations

from jaxtune.data.sft import ExampleStream, load_examples
from jaxtune.job.objectives.base import Context, Objective, register
from jaxtune.job.streams import Streams, check_data_kind, record_options, record_streams
from jaxtune.models import Model
from jaxtune.train.losses import LossFn, causal_lm_loss


def instruction_streams(ctx: Context, *, train: bool = True) -> Streams:
    """Streams of instruction records (data.kind=sft) for a causal LM loss."""
    job, d, t = ctx.job, ctx.job.data, ctx.job.train
    options = record_options(job, ctx.cfg)

    def load(sources, split, name):
        return load_examples(sources, d.sft, ctx.tokenizer, split=split, add_eos=d.add_eos, block=d.tokenize_batch,
                             name=name, **options)

    def stream(examples, **kw):
        return ExampleStream(examples, t.batch_size, t.seq_len, packing=d.packing, pad_id=ctx.cfg.pad_token_id or 0, **kw)

    return record_streams(job, load, stream, train=train)


@register
class SFT(Objective):
    name = "sft"
    generates = True
    data_kinds = ("sft",)

    def loss(self, ctx: Context) -> LossFn:
        t = ctx.job.train
        return causal_lm_loss(Model(ctx.cfg), z_loss=t.z_loss, chunk_tokens=t.loss_chunk_tokens)

    def streams(self, ctx: Context, *, train: bool = True) -> Streams:
        check_data_kind(ctx.job, self.data_kinds)
        return instruction_streams(ctx, train=train)
