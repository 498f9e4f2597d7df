"""``reward``: a Bradley-Terry reward model on preference pairs.

Pairs (`jaxtune.data.preference`: chosen / rejected, or the HH dialogue layout) are scored by a
one-output `SCORE` head at each side's last real token; the loss is ``-log σ(r_c - r_r - margin)``
(the margin per pair from the data's ``margin`` field as TRL's, else ``objective.preference.reward_margin``)
plus ``objective.preference.reward_centering · (r_c + r_r)²`` (`jaxtune.align.preference`).
"""

from __future__ import annotations

from jaxtune.align.preference import reward_loss
from jaxtune.data.preference import PairStream, load_pairs
from jaxtune.job.objectives.base import Context, Objective, abstract_pairs, register
from jaxtune.job.streams import Streams, check_data_kind, record_options, record_streams
from jaxtune.models import Model
from jaxtune.models.heads import SCORE, HeadSpec
from jaxtune.train.losses import LossFn


def pair_streams(ctx: Context, *, train: bool = True, prepare=None) -> Streams:
    """Streams of preference pairs (data.kind=preference); ``prepare``: called on each example set."""
    job, d, t = ctx.job, ctx.job.data, ctx.job.train
    options = record_options(job, ctx.cfg)

    def load(sources, split, name):
        return load_pairs(sources, d.preference, ctx.tokenizer, split=split, add_eos=d.add_eos, name=name, **options)

    def stream(examples, **kw):
        return PairStream(examples, t.batch_size, t.seq_len, pad_id=ctx.cfg.pad_token_id or 0, **kw)

    return record_streams(job, load, stream, train=train, prepare=prepare)


@register
class Reward(Objective):
    name = "reward"
    data_kinds = ("preference",)
    unit = "pairs"

    def head(self, ctx: Context) -> HeadSpec:
        # the score is read at the last token whatever objective.pooling says; the run records it as given
        # ("auto": last)
        pooling = "last" if ctx.job.objective.pooling == "auto" else ctx.job.objective.pooling
        return HeadSpec(SCORE, outputs=1, pooling=pooling)

    def batch_extras(self, ctx: Context, rows: int, seq: int) -> dict:
        return abstract_pairs(rows, seq)

    def loss(self, ctx: Context) -> LossFn:
        return reward_loss(Model(ctx.cfg), ctx.job.objective.preference)

    def streams(self, ctx: Context, *, train: bool = True) -> Streams:
        check_data_kind(ctx.job, self.data_kinds)
        scalar = ctx.job.objective.preference.reward_margin

        def one_margin(examples):
            if scalar and examples.examples and examples.examples[0].margin is not None:
                raise ValueError(f"the pairs carry reward margins (field {ctx.job.data.preference.margin!r}) and "
                                 f"objective.preference.reward_margin={scalar}: set one of them (the field, or "
                                 "data.preference.margin=null)")

        return pair_streams(ctx, train=train, prepare=one_margin)
