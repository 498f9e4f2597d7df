"""``ppo``: RLHF with a value function, GAE and a KL-shaped reward (`jaxtune.align.ppo`).

Completions of the job's instruction prompts are scored by a reward model run
(``objective.ppo.reward_model``) or a Python reward; values come from a `VALUE_HEAD` on the
policy's trunk, or from a separate value network (``objective.ppo.value_model``: a run whose
weights, adapters merged and kernels dequantized, start it; its reward head starts the value head)
trained fully beside the policy. No held-out stream.
"""

from __future__ import annotations

from typing import Optional

import jax

from jaxtune.align.ppo import PPORolloutStream, ppo_loss, value_network
from jaxtune.job.assemble import load_model, load_reward_judge
from jaxtune.job.objectives.base import Context, Network, Objective, abstract_floats, register
from jaxtune.job.objectives.rollouts import prompt_records, reference_kind, rollout_options
from jaxtune.job.runmeta import read_model_config
from jaxtune.job.schema import ModelSource, TrainJobConfig
from jaxtune.job.streams import Streams
from jaxtune.models import Model, ModelConfig
from jaxtune.models.heads import VALUE_HEAD, VALUE_MODEL, HeadSpec
from jaxtune.train.losses import LossFn


@register
class PPO(Objective):
    name = "ppo"
    generates = True
    data_kinds = ("sft",)
    unit = "completions"

    def reference(self, job: TrainJobConfig) -> str:
        return reference_kind(job, job.objective.ppo.kl_coef)

    def network(self, job: TrainJobConfig) -> Optional[Network]:
        """The separate value network of ``objective.ppo.value_model`` (with the policy's numerics)."""
        directory = job.objective.ppo.value_model
        if directory is None:
            return None
        loaded, cfg, _ = load_model(ModelSource(checkpoint=directory, **job.model.numerics))
        params = value_network(loaded, cfg, jax.random.key(job.model.init_seed + 1))
        return Network(params, cfg.replace(**job.train.model_numerics))

    def network_config(self, job: TrainJobConfig) -> Optional[ModelConfig]:
        directory = job.objective.ppo.value_model
        return None if directory is None else read_model_config(directory).replace(**job.model.numerics)

    def head(self, ctx: Context) -> HeadSpec:
        # unused by value heads (they read every token); recorded as given, as runs always did ("auto": last)
        pooling = "last" if ctx.job.objective.pooling == "auto" else ctx.job.objective.pooling
        if ctx.network is None:
            return HeadSpec(VALUE_HEAD, pooling=pooling)
        return HeadSpec(VALUE_MODEL, pooling=pooling, model_config=ctx.network.cfg)

    def batch_extras(self, ctx: Context, rows: int, seq: int) -> dict:
        return {**abstract_floats(("old_logps", "old_values", "advantages", "returns"), (rows, seq)),
                **abstract_floats(("scores", "kl", "explained_variance"), (rows,))}

    def loss(self, ctx: Context) -> LossFn:
        values = None if ctx.network is None else Model(ctx.network.cfg)
        return ppo_loss(Model(ctx.cfg), ctx.job.objective.ppo, value_model=values)

    def streams(self, ctx: Context, *, train: bool = True) -> Streams:
        job, cfg = ctx.job, ctx.job.objective.ppo
        records = prompt_records(job)
        if not train:
            return None, None
        scorer = None
        if cfg.reward_model is not None:
            scorer = load_reward_judge(cfg.reward_model, ctx.tokenizer, job.train.batch_size, **job.model.numerics)
        values = None
        if ctx.network is not None:
            if ctx.network.cfg.vocab_size != ctx.cfg.vocab_size:
                raise ValueError(f"objective.ppo.value_model {cfg.value_model} has vocab_size {ctx.network.cfg.vocab_size}, "
                                 f"the policy {ctx.cfg.vocab_size}: a value network reads the policy's tokens, so it "
                                 "needs its tokenizer")
            values = Model(ctx.network.cfg.replace(remat="none"))
        stream = PPORolloutStream(records, cfg, Model(ctx.cfg.replace(remat="none")), ctx.tokenizer, job.data.sft,
                                  scorer=scorer, value_model=values, **rollout_options(ctx, cfg.kl_coef))
        return stream, None
