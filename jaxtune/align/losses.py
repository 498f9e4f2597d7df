"""Preference losses over sequence log-probabilities and reward scores, as pure functions.

Sequence log-prob of a completion: the sum of ``log p(target)`` over its masked (completion)
positions of a row in the LM layout (`jaxtune.models.scoring.completion_logps`). With
``Δ = (log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))`` per pair (chosen c, rejected r),
`preference_losses` gives:

- ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log σ(βΔ)``;
- ``conservative`` (cDPO, label smoothing ε): ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)``;
- ``robust`` (Chowdhury et al. 2024): ``(-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε)``;
- ``hinge`` (SLiC): ``max(0, 1 - βΔ)``;
- ``ipo`` (Azar et al. 2023): ``(Δ' - 1/(2β))²`` with Δ' from per-token *averaged* log-ratios
  (TRL's normalisation, confirmed by the IPO authors; ``ipo_normalize=False`` uses sums);
- ``orpo`` (Hong et al. 2024, no reference): ``NLL(y_c) - λ log σ(log odds(y_c) - log odds(y_r))``
  with ``odds = p / (1 - p)`` of the per-token *mean* log-probs and NLL the mean per token
  (``log(1 - p)`` by `log1mexp`, exact as the mean log-prob nears 0 where float32 ``1 - exp`` cancels).

``sft_weight`` adds that multiple of the chosen completion's mean per-token NLL (RPO). Reward
models: `bradley_terry` ``-log σ(r_c - r_r - margin)`` + ``centering · (r_c + r_r)²``.
Everything is per pair; the loop sums pairs and divides by their count.
"""

from __future__ import annotations

from typing import Literal, Optional

import jax
import jax.numpy as jnp

from jaxtune.utils.moved import moved_names

LossKind = Literal["sigmoid", "conservative", "robust", "hinge", "ipo", "orpo"]
LOSSES = ("sigmoid", "conservative", "robust", "hinge", "ipo", "orpo")
__getattr__ = moved_names(__name__, {"completion_logps": "jaxtune.models.scoring.completion_logps"})


def preference_losses(kind: str, chosen: jax.Array, rejected: jax.Array, ref_chosen: Optional[jax.Array] = None,
                      ref_rejected: Optional[jax.Array] = None, *, beta: float = 0.1, label_smoothing: float = 0.0,
                      chosen_tokens: Optional[jax.Array] = None, rejected_tokens: Optional[jax.Array] = None,
                      ipo_normalize: bool = True) -> jax.Array:
    """Per-pair losses [B] from summed completion log-probs (module docstring)."""
    if kind not in LOSSES:
        raise ValueError(f"preference loss must be one of {' | '.join(LOSSES)}, got {kind!r}")
    if kind == "orpo":
        mean_c, mean_r = chosen / chosen_tokens, rejected / rejected_tokens
        log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
        return -mean_c - beta * jax.nn.log_sigmoid(log_odds)
    ratio_c, ratio_r = chosen - ref_chosen, rejected - ref_rejected
    if kind == "ipo":
        if ipo_normalize:
            ratio_c, ratio_r = ratio_c / jnp.maximum(chosen_tokens, 1.0), ratio_r / jnp.maximum(rejected_tokens, 1.0)
        return jnp.square(ratio_c - ratio_r - 1.0 / (2.0 * beta))
    z = beta * (ratio_c - ratio_r)
    if kind == "sigmoid":
        return -jax.nn.log_sigmoid(z)
    if kind == "conservative":
        return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
    if kind == "robust":
        return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) + label_smoothing * jax.nn.log_sigmoid(-z)) / (
            1.0 - 2.0 * label_smoothing)
    return jax.nn.relu(1.0 - z)  # hinge


def log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate over the whole range (Mächler 2012):
    ``log(-expm1(x))`` near 0, where ``1 - exp(x)`` cancels, and ``log1p(-exp(x))`` below -ln 2.
    Each branch sees only inputs it is accurate on, so neither leaks NaN into the gradient."""
    near = x > -jnp.log(2.0)
    x_near = jnp.where(near, x, -1.0)
    x_far = jnp.where(near, -1.0, x)
    return jnp.where(near, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))


def bradley_terry(r_chosen: jax.Array, r_rejected: jax.Array, *, margin: jax.Array | float = 0.0,
                  centering: float = 0.0) -> jax.Array:
    """Per-pair reward-model loss ``-log σ(r_c - r_r - margin) + centering · (r_c + r_r)²``."""
    loss = -jax.nn.log_sigmoid(r_chosen - r_rejected - margin)
    return loss + centering * jnp.square(r_chosen + r_rejected) if centering else loss
