"""``dpo``: the DPO family (sigmoid, cDPO, robust, hinge, IPO, ORPO; + an SFT term) on preference pairs.

The reference log-probs come from the adapter-disabled policy (a PEFT / QLoRA policy: no second
copy of the weights) or are precomputed once with the starting weights before training (full
fine-tuning: no frozen copy is held); ORPO needs none (`jaxtune.align.preference`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax

from jaxtune.align.preference import dpo_loss, precompute_reference
from jaxtune.job.objectives.base import Context, Objective, abstract_floats, abstract_pairs, register
from jaxtune.job.objectives.reward import pair_streams
from jaxtune.job.schema import TrainJobConfig
from jaxtune.job.streams import Streams, check_data_kind
from jaxtune.models import Model
from jaxtune.train.losses import LossFn


@register
class DPO(Objective):
    name = "dpo"
    generates = True
    data_kinds = ("preference",)
    unit = "pairs"

    def reference(self, job: TrainJobConfig) -> str:
        """adapter (PEFT policies) or precomputed (full fine-tuning) under ``reference: auto``;
        none for ORPO."""
        chosen = job.objective.preference.reference
        if chosen == "adapter" and not job.peft.active:
            raise ValueError("objective.preference.reference=adapter needs a PEFT policy (peft: ...); a fully "
                             "fine-tuned policy uses reference=precomputed")
        if job.objective.preference.loss == "orpo":
            return "none"
        if chosen == "auto":
            return "adapter" if job.peft.active else "precomputed"
        return chosen

    def batch_extras(self, ctx: Context, rows: int, seq: int) -> dict:
        reference = self.reference(ctx.job) == "precomputed"
        return {**abstract_pairs(rows, seq),
                **abstract_floats(("ref_chosen_logps", "ref_rejected_logps") if reference else (), (rows,))}

    def loss(self, ctx: Context) -> LossFn:
        return dpo_loss(Model(ctx.cfg), ctx.job.objective.preference, reference=self.reference(ctx.job))

    def streams(self, ctx: Context, *, train: bool = True) -> Streams:
        check_data_kind(ctx.job, self.data_kinds)
        return pair_streams(ctx, train=train, prepare=self._reference_pass(ctx))

    def _reference_pass(self, ctx: Context) -> Optional[Callable[[Any], None]]:
        """reference=precomputed: score every pair of an example set with the starting weights
        (before any training) and keep the log-probs on it."""
        if self.reference(ctx.job) != "precomputed":
            return None
        start = ctx.start(jax.random.key(0)) if callable(ctx.start) else ctx.start
        model, t = Model(ctx.cfg.replace(remat="none")), ctx.job.train

        def prepare(examples):
            examples.reference = precompute_reference(model, start, examples, batch_size=t.batch_size,
                                                      seq_len=t.seq_len, pad_id=ctx.cfg.pad_token_id or 0)

        return prepare
