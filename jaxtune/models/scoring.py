"""Log-likelihood of target tokens under a model: per position (`token_logps`: RL rollouts and
losses), per row (`completion_logps`: preference losses; `sequence_logprobs`: multiple choice and
judges), and the rows that score a continuation after a context (`continuation_rows`).

Rows are in the LM batch layout (``tokens``, ``targets``, ``loss_mask``, ``segment_ids``,
optional ``positions``); a row's score is the sum of ``log p(target | prefix)`` over its
masked positions.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.models.decoder import Model


def token_logps(model: Model, params, rows: dict, rng=None, *, with_entropy: bool = False):
    """``log p(target)`` per position [B, S] (0 where loss_mask is 0); ``with_entropy``: also the
    entropy of each position's next-token distribution [B, S] and the hidden states."""
    hidden, _ = model.hidden(params, rows["tokens"], positions=rows.get("positions"), segment_ids=rows["segment_ids"],
                             rng=rng)
    logsm = jax.nn.log_softmax(model.logits(params, hidden), -1)
    logp = jnp.where(rows["loss_mask"] > 0, jnp.take_along_axis(logsm, rows["targets"][..., None], -1)[..., 0], 0.0)
    if not with_entropy:
        return logp
    return logp, -jnp.sum(jnp.exp(logsm) * logsm, -1), hidden


jitted_token_logps = jax.jit(token_logps, static_argnums=0)  # host side: e.g. a rollout's old / reference log-probs


def completion_logps(model: Model, params, rows: dict, rng=None) -> tuple[jax.Array, jax.Array]:
    """-> (summed log-probs of the masked targets [N], their count [N]) for LM-layout ``rows``."""
    mask = rows["loss_mask"].astype(jnp.float32)
    return jnp.sum(token_logps(model, params, rows, rng) * mask, -1), jnp.sum(mask, -1)


@partial(jax.jit, static_argnums=0)
def sequence_logprobs(model: Model, params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """-> (sum of masked target log-probs [batch], whether every masked target is the argmax [batch])."""
    hidden, _ = model.hidden(params, batch["tokens"], positions=batch.get("positions"), segment_ids=batch["segment_ids"])
    logits = model.logits(params, hidden)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"] > 0
    greedy = jnp.all(jnp.where(mask, jnp.argmax(logits, -1) == batch["targets"], True), axis=-1)
    return jnp.sum(jnp.where(mask, logp, 0.0), -1), greedy


def continuation_rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, pad_id: int = 0) -> dict:
    """(context ids, continuation ids) pairs -> right-padded LM rows whose loss mask covers the
    continuation only (the first continuation token is predicted from the last context token)."""
    rows = {k: np.zeros((len(pairs), seq_len), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    rows["tokens"][:] = pad_id
    rows["loss_mask"] = np.zeros((len(pairs), seq_len), np.float32)
    for i, (context, continuation) in enumerate(pairs):
        ids = list(context) + list(continuation)
        n = len(ids) - 1
        if not context or not continuation:
            raise ValueError(f"row {i}: context and continuation must both be non-empty")
        if n > seq_len:
            raise ValueError(f"row {i}: {len(ids)} tokens do not fit {seq_len + 1}")
        rows["tokens"][i, :n] = ids[:-1]
        rows["targets"][i, :n] = ids[1:]
        rows["segment_ids"][i, :n] = 1
        rows["positions"][i, :n] = np.arange(n)
        rows["loss_mask"][i, len(context) - 1: n] = 1.0
    return rows
