"""What the RL objectives (GRPO, PPO) share: prompts from the job's instruction records, the
policy model the rollouts sample from, and the starting weights kept as the reference of a fully
fine-tuned policy."""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

import jax

from jaxtune.data.sft import read_records
from jaxtune.data.sources import build_source
from jaxtune.job.objectives.base import Context
from jaxtune.job.schema import TrainJobConfig


def reference_kind(job: TrainJobConfig, kl_coef: float) -> str:
    """adapter (a PEFT policy's adapter-disabled self) | batch (the starting weights' log-probs,
    computed at rollout) | none (no KL penalty)."""
    return "adapter" if job.peft.active else ("batch" if kl_coef else "none")


def prompt_records(job: TrainJobConfig) -> list[tuple[dict, str]]:
    """(record, where) of the training split of the job's instruction records (data.kind=sft)."""
    if job.data.kind != "sft":
        raise ValueError(f"objective.kind={job.objective.kind} samples from the prompts of data.kind=sft records "
                         "(prompt/completion, Alpaca or messages; the completion is the reference answer the reward "
                         "checks)")
    split = "all" if job.data.eval_sources else "train"
    return read_records([build_source(c) for c in job.data.sources], split, job.data.eval_fraction,
                        on_bad_row=job.data.on_bad_row, counts=Counter())


def frozen_reference(ctx: Context, kl_coef: float) -> Optional[Any]:
    """The starting weights of a fully fine-tuned policy with a KL penalty (kept for its reference)."""
    if not kl_coef or ctx.job.peft.active:
        return None
    return ctx.start(jax.random.key(0)) if callable(ctx.start) else ctx.start


def rollout_options(ctx: Context, kl_coef: float) -> dict:
    job = ctx.job
    return dict(batch_size=job.train.batch_size, seq_len=job.train.seq_len, seed=job.train.seed,
                add_bos=job.data.add_bos, reference_params=frozen_reference(ctx, kl_coef))
