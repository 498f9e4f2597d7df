"""DPO-family and reward-model losses over the model, as loss functions of the one training loop.

Batches come from `jaxtune.data.preference.PairStream` (``chosen_*`` / ``rejected_*`` rows and
``pair_mask``). The policy scores both sides in one forward pass (the rows concatenated). The
reference log-probs come from

- ``adapter``: the policy with its adapters disabled (`jaxtune.peft.core.base_model`, no second
  copy of the weights; the policy must be a PEFT / QLoRA tree), or
- ``precomputed``: ``ref_chosen_logps`` / ``ref_rejected_logps`` in the batch, computed once by
  `precompute_reference` with the starting weights before training (full fine-tuning: no frozen
  copy is held during training).

ORPO needs no reference. Metrics are sums over pairs (the loop divides by the pair count):
``reward_chosen`` / ``reward_rejected`` (β · log-ratio), ``reward_margin``, ``reward_accuracy``
(chosen reward above rejected), ``logp_chosen`` / ``logp_rejected``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.align.losses import LOSSES, bradley_terry, preference_losses
from jaxtune.data.preference import PairStream
from jaxtune.models.heads import classification_logits
from jaxtune.models.scoring import completion_logps
from jaxtune.peft.core import base_model

ROW_FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@dataclass(frozen=True)
class PreferenceObjectiveConfig:
    """``objective.preference``: the DPO-family loss and the reward model's options."""

    loss: Literal["sigmoid", "conservative", "robust", "hinge", "ipo", "orpo"] = "sigmoid"
    beta: float = 0.1  # DPO's β (ORPO: λ, the odds-ratio weight)
    label_smoothing: float = 0.0  # conservative / robust: the assumed share of flipped labels
    ipo_normalize: bool = True  # IPO on per-token averaged log-ratios (TRL's choice)
    sft_weight: float = 0.0  # + this times the chosen completion's mean per-token NLL
    reference: Literal["auto", "adapter", "precomputed"] = "auto"  # auto: adapter for PEFT policies, else precomputed
    reward_margin: float = 0.0  # reward model: -log σ(r_c - r_r - margin)
    reward_centering: float = 0.0  # reward model: + coefficient · (r_c + r_r)²

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"objective.preference.loss must be one of {' | '.join(LOSSES)}, got {self.loss!r}")
        if self.beta <= 0:
            raise ValueError(f"objective.preference.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"objective.preference.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def both_sides(batch: dict) -> dict:
    """chosen_* and rejected_* rows -> one LM-layout batch [2B, S] (chosen first)."""
    return {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ROW_FIELDS}


def dpo_loss(model, cfg: PreferenceObjectiveConfig, *, reference: str):
    """The DPO-family loss function (module docstring); ``reference``: adapter | precomputed | none (ORPO)."""

    def loss_fn(params, batch, rng):
        rows = both_sides(batch)
        logp, n = completion_logps(model, params, rows, rng)
        b = batch["pair_mask"].shape[0]
        c, r, nc, nr = logp[:b], logp[b:], n[:b], n[b:]
        if cfg.loss == "orpo":
            ref_c = ref_r = jnp.zeros_like(c)
        elif reference == "adapter":
            ref_logp, _ = completion_logps(model, jax.lax.stop_gradient(base_model(params)), rows)
            ref_c, ref_r = ref_logp[:b], ref_logp[b:]
        else:
            ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        losses = preference_losses(cfg.loss, c, r, ref_c, ref_r, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                                   chosen_tokens=nc, rejected_tokens=nr, ipo_normalize=cfg.ipo_normalize)
        if cfg.sft_weight:
            losses = losses + cfg.sft_weight * (-c / jnp.maximum(nc, 1.0))
        w = batch["pair_mask"].astype(jnp.float32)
        reward_c = jax.lax.stop_gradient(cfg.beta * (c - ref_c))
        reward_r = jax.lax.stop_gradient(cfg.beta * (r - ref_r))
        metrics = {"reward_chosen": jnp.sum(w * reward_c), "reward_rejected": jnp.sum(w * reward_r),
                   "reward_margin": jnp.sum(w * (reward_c - reward_r)),
                   "reward_accuracy": jnp.sum(w * (reward_c > reward_r)),
                   "logp_chosen": jnp.sum(w * jax.lax.stop_gradient(c)),
                   "logp_rejected": jnp.sum(w * jax.lax.stop_gradient(r))}
        return jnp.sum(w * losses), jnp.sum(w), metrics

    return loss_fn


def reward_scores(model, params, batch: dict, rng=None) -> tuple[jax.Array, jax.Array]:
    """The score head at each side's last real token -> (r_chosen [B], r_rejected [B])."""
    rows = both_sides(batch)
    scores = classification_logits(model, params, rows, pooling="last", rng=rng)[:, 0]
    b = batch["pair_mask"].shape[0]
    return scores[:b], scores[b:]


def reward_loss(model, cfg: PreferenceObjectiveConfig):
    """Bradley-Terry over the score head; metrics: ``accuracy`` (r_c > r_r), ``margin`` (r_c - r_r)."""

    def loss_fn(params, batch, rng):
        rc, rr = reward_scores(model, params, batch, rng)
        margin = batch["margin"] if "margin" in batch else cfg.reward_margin  # per pair from the data (TRL's column)
        losses = bradley_terry(rc, rr, margin=margin, centering=cfg.reward_centering)
        w = batch["pair_mask"].astype(jnp.float32)
        return jnp.sum(w * losses), jnp.sum(w), {"accuracy": jnp.sum(w * (rc > rr)), "margin": jnp.sum(w * (rc - rr))}

    return loss_fn


@partial(jax.jit, static_argnums=0)
def _side_logps(model, params, batch):
    logp, _ = completion_logps(model, params, both_sides(batch))
    return logp


def precompute_reference(model, params, pairs, *, batch_size: int, seq_len: int, pad_id: int = 0) -> np.ndarray:
    """Reference log-probs [n, 2] (chosen, rejected) of every pair under ``params`` (the starting weights)."""
    out = np.zeros((len(pairs.examples), 2), np.float32)
    stream = PairStream(pairs, batch_size, seq_len, shuffle=False, epochs=1, pad_id=pad_id)
    start = 0
    for batch in stream:
        logp = np.asarray(jax.device_get(_side_logps(model, params, {k: jnp.asarray(v) for k, v in batch.items()})))
        k = int(batch["pair_mask"].sum())
        out[start: start + k, 0], out[start: start + k, 1] = logp[:k], logp[batch_size: batch_size + k]
        start += k
    return out

