"""Loss functions the training loop plugs in, and the contract they follow.

A loss function is ``loss_fn(params, batch, rng) -> (loss_sum, weight, metrics)``:

- ``loss_sum``: float32 scalar, the *sum* of per-example (or per-token) losses;
- ``weight``: float32 scalar, what the sum is normalised by (real target
  tokens for language modelling, pairs for preference losses);
- ``metrics``: dict of float32 scalar *sums*, reported divided by the total weight.

The loop sums all three over gradient-accumulation micro-batches and divides
once, so an accumulated step equals the big-batch step even when micro-batches
hold different numbers of real tokens. Losses must not normalise themselves.

Batches for language modelling are dicts of ``[batch, seq]`` arrays:
``tokens`` (inputs), ``targets`` (the token to predict at each position),
``loss_mask`` (1 where the target counts), ``segment_ids`` (0 = padding;
packed documents get distinct ids) and optionally ``positions``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxtune.models import Model
from jaxtune.models.decoder import lm_head

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, jax.Array, dict]]


def token_cross_entropy(
    params: Any, hidden: jax.Array, targets: jax.Array, mask: jax.Array, model: Model, *, chunk_tokens: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Sums of masked next-token NLL and of logsumexp^2 (for z-loss), from hidden states.

    hidden: [batch, seq, embed]; targets, mask: [batch, seq]. The float32
    logits ``[tokens, vocab]`` exist only ``chunk_tokens`` rows at a time when
    ``chunk_tokens > 0`` (each chunk is recomputed in the backward pass), so
    a large vocabulary does not hold a full logits tensor for the backward.
    """
    embed = hidden.shape[-1]
    h = hidden.reshape(-1, embed)
    t = targets.reshape(-1)
    m = mask.reshape(-1).astype(jnp.float32)

    def chunk_sums(h, t, m):
        logits = lm_head(params, h, model.cfg)  # [n, vocab] float32
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        return jnp.sum((lse - target_logit) * m), jnp.sum(jnp.square(lse) * m)

    n = h.shape[0]
    if chunk_tokens <= 0 or n <= chunk_tokens:
        return chunk_sums(h, t, m)
    pad = -n % chunk_tokens
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, chunk_tokens, embed)
    t = jnp.pad(t, (0, pad)).reshape(-1, chunk_tokens)
    m = jnp.pad(m, (0, pad)).reshape(-1, chunk_tokens)
    body = jax.checkpoint(lambda carry, xs: (jax.tree.map(jnp.add, carry, chunk_sums(*xs)), None))
    zero = jnp.zeros((), jnp.float32)
    (nll, z), _ = jax.lax.scan(body, (zero, zero), (h, t, m))
    return nll, z


def causal_lm_loss(model: Model, *, z_loss: float = 0.0, chunk_tokens: int = 0) -> LossFn:
    """Next-token cross-entropy (+ ``z_loss * logsumexp^2``, PaLM's z-loss) over masked targets."""

    def loss_fn(params, batch, rng):
        del rng
        hidden, _ = model.hidden(params, batch["tokens"], positions=batch.get("positions"), segment_ids=batch["segment_ids"])
        mask = batch["loss_mask"]
        nll, z = token_cross_entropy(params, hidden, batch["targets"], mask, model, chunk_tokens=chunk_tokens)
        total = nll + z_loss * z if z_loss else nll
        weight = jnp.sum(mask.astype(jnp.float32))
        metrics = {"nll": nll}
        if z_loss:
            metrics["z_loss"] = z
        return total, weight, metrics

    return loss_fn
