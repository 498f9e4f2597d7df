"""``grpo``: group-sampled RL with verifiable rewards (GRPO, DAPO, Dr. GRPO variants).

The prompts of the job's instruction records are sampled ``group_size`` times each from the
current policy; rewards are normalised within each group; the loss is the clipped token-level
objective with an optional KL to the reference (`jaxtune.align.grpo`). No held-out stream.
"""

from __future__ import annotations

from jaxtune.align.grpo import GroupRolloutStream, grpo_loss
from jaxtune.job.objectives.base import Context, Objective, abstract_floats, register
from jaxtune.job.objectives.rollouts import prompt_records, reference_kind, rollout_options
from jaxtune.job.schema import TrainJobConfig
from jaxtune.job.streams import Streams
from jaxtune.models import Model
from jaxtune.train.losses import LossFn


@register
class GRPO(Objective):
    name = "grpo"
    generates = True
    data_kinds = ("sft",)
    unit = "completions"

    def reference(self, job: TrainJobConfig) -> str:
        return reference_kind(job, job.objective.grpo.kl_coef)

    def batch_extras(self, ctx: Context, rows: int, seq: int) -> dict:
        per_token = ("old_logps", "ref_logps") if self.reference(ctx.job) == "batch" else ("old_logps",)
        return {**abstract_floats(per_token, (rows, seq)), **abstract_floats(("rewards", "advantages"), (rows,))}

    def loss(self, ctx: Context) -> LossFn:
        return grpo_loss(Model(ctx.cfg), ctx.job.objective.grpo, reference=self.reference(ctx.job))

    def streams(self, ctx: Context, *, train: bool = True) -> Streams:
        cfg = ctx.job.objective.grpo
        records = prompt_records(ctx.job)
        if not train:
            return None, None
        stream = GroupRolloutStream(records, cfg, Model(ctx.cfg.replace(remat="none")), ctx.tokenizer, ctx.job.data.sft,
                                    **rollout_options(ctx, cfg.kl_coef))
        return stream, None
