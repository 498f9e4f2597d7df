"""GRPO (Shao et al. 2024): group sampling, group-normalised advantages, a clipped token-level objective
and an optional KL penalty to the reference, as a rollout stream plus a loss for the one loop.

Rollout (`GroupRolloutStream`, the loop hands it the current policy through ``set_policy`` before
each step): ``batch_size / group_size`` prompts per step, ``group_size`` sampled completions each
(the jitted KV-cache sampler), a verifiable reward per completion (`jaxtune.align.rewards`),
advantages ``(r - mean_group) / (std_group + 1e-4)`` with the group's sample standard deviation
(Bessel's correction, as TRL; ``reward_std=population`` divides by n instead; ``scale_rewards=none``:
Dr. GRPO, no std),
and the policy's per-token log-probs at sampling time (``old_logps``). Each rollout batch is used
for ``iterations`` optimizer steps (the ratio leaves 1 after the first, so the clip matters).

Loss per completion token: ``-min(ρ A, clip(ρ, 1-ε, 1+ε_high) A) + β KL``, with ``ρ = π / π_old``
and KL the k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` (or k1, ``logp - ref``); the
reference is the adapter-disabled policy for PEFT policies, otherwise the starting weights kept
by the stream (log-probs computed at rollout). Length normalisation (``length_norm``):
``sequence`` (GRPO: each completion's mean, then the mean over completions), ``token`` (DAPO:
the mean over all completion tokens of the micro-batch) or ``constant`` (Dr. GRPO: sums divided
by ``max_new_tokens``). Metrics are per-completion means: reward, kl, clip_fraction, entropy (per
token of the policy's next-token distribution), completion_length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.align.rewards import reward_function
from jaxtune.align.rollout import (
    PolicyStream,
    empty_rollout_rows,
    prompt_items,
    prompt_order,
    sample_completions,
    write_completion,
)
from jaxtune.generate.sampling import SamplingConfig
from jaxtune.generate.text import stop_tokens_of
from jaxtune.models.scoring import jitted_token_logps, token_logps
from jaxtune.peft.core import base_model


@dataclass(frozen=True)
class GRPOConfig:
    """``objective.grpo``."""

    group_size: int = 4  # completions per prompt; train.batch_size must be a multiple
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    reward: str = "exact_number"  # a built-in reward (jaxtune.align.rewards) or "module:function"
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None  # DAPO's clip-higher (default: clip_eps)
    kl_coef: float = 0.0  # β
    kl_estimator: Literal["k3", "k1"] = "k3"
    scale_rewards: Literal["group", "none"] = "group"
    reward_std: Literal["sample", "population"] = "sample"  # the group's std: n - 1 (TRL) or n in the denominator
    length_norm: Literal["sequence", "token", "constant"] = "sequence"
    iterations: int = 1  # optimizer steps per rollout batch

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"objective.grpo.group_size must be >= 2 (advantages compare a group), got {self.group_size}")
        if self.iterations < 1 or self.max_new_tokens < 1 or self.clip_eps <= 0 or self.kl_coef < 0:
            raise ValueError("objective.grpo: iterations, max_new_tokens >= 1, clip_eps > 0, kl_coef >= 0")


def group_advantages(rewards: np.ndarray, group_size: int, scale: str = "group", std: str = "sample") -> np.ndarray:
    """``(r - mean) / (std + 1e-4)`` per group of ``group_size`` (``scale=none``: ``r - mean``); ``std``:
    sample (n - 1 in the denominator, TRL's) or population (n)."""
    if std not in ("sample", "population"):
        raise ValueError(f"objective.grpo.reward_std must be sample or population, got {std!r}")
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    centred = r - r.mean(1, keepdims=True)
    if scale == "group":
        centred = centred / (r.std(1, ddof=1 if std == "sample" else 0, keepdims=True) + 1e-4)
    return centred.reshape(-1).astype(np.float32)


def grpo_loss(model, cfg: GRPOConfig, *, reference: str):
    """The GRPO loss (module docstring); ``reference``: adapter | batch (``ref_logps``) | none."""
    high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high

    def loss_fn(params, batch, rng):
        logp, entropy, _ = token_logps(model, params, batch, rng, with_entropy=True)
        mask = batch["loss_mask"].astype(jnp.float32)
        ratio = jnp.exp(logp - batch["old_logps"])
        adv = batch["advantages"][:, None]
        per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + high) * adv)
        kl = jnp.zeros_like(logp)
        if cfg.kl_coef and reference != "none":
            if reference == "adapter":
                ref = jax.lax.stop_gradient(token_logps(model, base_model(params), batch))
            else:
                ref = batch["ref_logps"]
            d = ref - logp
            kl = jnp.exp(d) - d - 1.0 if cfg.kl_estimator == "k3" else logp - ref
            per_token = per_token + cfg.kl_coef * kl
        lengths = jnp.sum(mask, -1)
        n = jnp.asarray(mask.shape[0], jnp.float32)
        if cfg.length_norm == "sequence":
            total = jnp.sum(jnp.sum(per_token * mask, -1) / jnp.maximum(lengths, 1.0))
        elif cfg.length_norm == "token":
            total = n * jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        else:
            total = jnp.sum(per_token * mask) / cfg.max_new_tokens
        per_seq = lambda x: jnp.sum(jax.lax.stop_gradient(x) * mask, -1) / jnp.maximum(lengths, 1.0)  # noqa: E731
        clipped = ((ratio < 1.0 - cfg.clip_eps) | (ratio > 1.0 + high)).astype(jnp.float32)
        metrics = {"reward": jnp.sum(batch["rewards"]), "kl": jnp.sum(per_seq(kl)), "clip_fraction": jnp.sum(per_seq(clipped)),
                   "entropy": jnp.sum(per_seq(entropy)), "completion_length": jnp.sum(lengths)}
        return total, n, metrics

    return loss_fn


class GroupRolloutStream(PolicyStream):
    """Rollout batches for GRPO (module docstring). ``records``: (record, where) with prompts;
    ``reference_params``: the starting weights, kept for the KL of a fully fine-tuned policy."""

    def __init__(self, records, cfg: GRPOConfig, model, tokenizer, sft, *, batch_size: int, seq_len: int, seed: int = 0,
                 add_bos: bool = False, reference_params: Any = None):
        if batch_size % cfg.group_size:
            raise ValueError(f"train.batch_size ({batch_size}) must be a multiple of objective.grpo.group_size "
                             f"({cfg.group_size})")
        self.cfg, self.model, self.tokenizer, self.reward_fn = cfg, model, tokenizer, reward_function(cfg.reward)
        self.batch_size, self.seq_len, self.seed, self.reference_params = batch_size, seq_len, seed, reference_params
        self.items = prompt_items(records, sft, tokenizer, add_bos=add_bos, max_new_tokens=cfg.max_new_tokens,
                                  seq_len=seq_len)
        self.rollouts, self.iteration, self._batch = 0, 0, None

    def _prompts(self, rollout: int) -> list[int]:
        per = self.batch_size // self.cfg.group_size
        return prompt_order(self.seed, len(self.items), rollout * per, per)

    def __next__(self) -> dict:
        if self._batch is not None and self.iteration < self.cfg.iterations:
            self.iteration += 1
            return self._batch
        self.require_policy()
        self._batch = self.rollout(self.rollouts)
        self.rollouts += 1
        self.iteration = 1
        return self._batch

    def rollout(self, index: int) -> dict:
        cfg, g = self.cfg, self.cfg.group_size
        chosen = [i for i in self._prompts(index) for _ in range(g)]
        pad = int(self.model.cfg.pad_token_id or 0)
        stops = stop_tokens_of(self.tokenizer, self.model.cfg)
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  stop_tokens=stops, pad_token_id=pad)
        key = jax.random.fold_in(jax.random.key(self.seed), index)
        out = sample_completions(self.model, self.policy, [self.items[i].ids for i in chosen], key, sampling)
        rows = empty_rollout_rows(self.batch_size, self.seq_len)
        rewards = np.zeros(self.batch_size, np.float32)
        for row, i in enumerate(chosen):
            completion = [int(t) for t in out.tokens[row, : out.lengths[row]]]
            item = self.items[i]
            rewards[row] = float(self.reward_fn(self.tokenizer.decode([t for t in completion if t not in stops]),
                                                item.reference, item.record))
            write_completion(rows, row, item.ids, completion)
        batch = {**rows, "rewards": rewards, "advantages": group_advantages(rewards, g, cfg.scale_rewards, cfg.reward_std)}
        batch["old_logps"] = np.asarray(jitted_token_logps(self.model, self.policy, rows))
        if self.reference_params is not None and cfg.kl_coef:
            batch["ref_logps"] = np.asarray(jitted_token_logps(self.model, self.reference_params, rows))
        return batch

    def get_state(self) -> dict:
        return {"kind": "grpo", "rollouts": self.rollouts, "iteration": self.iteration, "seed": self.seed,
                "prompts": len(self.items)}

    def set_state(self, state: dict) -> None:
        if state.get("kind") != "grpo" or state.get("seed") != self.seed or state.get("prompts") != len(self.items):
            raise ValueError(f"data state {state} does not match this GRPO stream ({len(self.items)} prompts, seed {self.seed})")
        # a resumed run starts a fresh rollout (the interrupted one's batch is not in the checkpoint)
        self.rollouts, self.iteration, self._batch = int(state["rollouts"]), 0, None

