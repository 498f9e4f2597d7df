"""Loss functions the training loop plugs in, and the contract they follow.

A loss function is ``loss_fn(params, batch, rng) -> (loss_sum, weight, metrics)``;
``rng`` is a fresh key in every training micro-batch and None in evaluation, where the
loss must be deterministic (no dropout; the masked LM then draws its masks from key 0):

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

The masked-LM objective (`masked_lm_loss`, for ``ModelConfig(causal=False)``)
reads only ``tokens``, ``segment_ids`` and ``positions`` from that layout and
draws its masks from the loss's ``rng``, which the train step splits per step
and per micro-batch.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.data.masking import check_mask_token_id, check_masking_rates, mask_tokens
from jaxtune.models import Model
from jaxtune.models.decoder import lm_head
from jaxtune.models.heads import batch_hidden
from jaxtune.parallel.rules import context_size
from jaxtune.utils.moved import moved_names

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, jax.Array, dict]]
__getattr__ = moved_names(__name__, {
    "ObjectiveConfig": "jaxtune.job.ObjectiveConfig",
    "objective_loss": "jaxtune.job.objectives.get_objective(job.objective.kind).loss(Context(job, cfg, tokenizer))",
})


@jax.custom_vjp
def nll_and_z_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of masked ``lse - logit[target]``, sum of masked ``lse²``) over rows of ``logits`` [n, vocab].

    Its own VJP: ``d logits = mask · (softmax · (g_nll + 2 g_z lse) - g_nll · onehot(target))``, the
    one-hot from a compare against an iota (fused into one pass), not the scatter that the gradient
    of a gather is."""
    return _nll_and_z(logits, targets, mask)[0]


def _nll_and_z(logits, targets, mask):
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return (jnp.sum((lse - target_logit) * mask), jnp.sum(jnp.square(lse) * mask)), lse


def _nll_and_z_fwd(logits, targets, mask):
    sums, lse = _nll_and_z(logits, targets, mask)
    return sums, (logits, targets, mask, lse)


def _nll_and_z_bwd(residuals, grads):
    logits, targets, mask, lse = residuals
    g_nll, g_z = grads
    softmax = jnp.exp(logits - lse[:, None])
    onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == targets[:, None]
    per_row = (g_nll + 2.0 * g_z * lse) * mask
    d_logits = softmax * per_row[:, None] - jnp.where(onehot, (g_nll * mask)[:, None], 0.0)
    zero_targets = np.zeros(targets.shape, jax.dtypes.float0)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    d_mask = g_nll * (lse - target_logit) + g_z * jnp.square(lse)  # the sums are linear in the mask
    return d_logits.astype(logits.dtype), zero_targets, d_mask.astype(mask.dtype)


nll_and_z_sums.defvjp(_nll_and_z_fwd, _nll_and_z_bwd)


def token_cross_entropy(
    params: Any,
    hidden: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    model: Model,
    *,
    chunk_tokens: int = 0,
    count_correct: bool = False,
) -> tuple[jax.Array, ...]:
    """Sums of masked token NLL and of logsumexp^2 (for z-loss), from hidden states.

    hidden: [batch, seq, embed]; targets, mask: [batch, seq]. The float32
    logits ``[tokens, vocab]`` exist only ``chunk_tokens`` rows at a time when
    ``chunk_tokens > 0`` (each chunk is recomputed in the backward pass), so
    a large vocabulary does not hold a full logits tensor for the backward.
    ``count_correct``: also return the masked count of positions whose argmax is the
    target, as a third float32 sum ``(nll, z, correct)``.
    """
    embed = hidden.shape[-1]
    batch, seq = targets.shape

    def chunk_sums(h, t, m):
        h, t, m = h.reshape(-1, embed), t.reshape(-1), m.reshape(-1)
        logits = lm_head(params, h, model.cfg)  # [n, vocab] float32
        sums = nll_and_z_sums(logits, t, m)
        if count_correct:
            hit = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1) == t)
            sums = (*sums, jnp.sum(hit.astype(jnp.float32) * m))
        return sums

    m = mask.astype(jnp.float32)
    if chunk_tokens <= 0 or batch * seq <= chunk_tokens:
        return chunk_sums(hidden, targets, m)
    if context_size() > 1:
        # The sequence is split over devices: chunk i takes every n-th position of each row (each
        # device's share of a chunk stays its own; flattening [batch, seq] would gather it).
        n = min(seq, -(-batch * seq // chunk_tokens))
        pad = -seq % n
        split = lambda x: jnp.moveaxis(jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)).reshape(  # noqa: E731
            (batch, (seq + pad) // n, n) + x.shape[2:]), 2, 0)
        h, t, m = split(hidden), split(targets), split(m)
    else:
        pad = -(batch * seq) % chunk_tokens
        h = jnp.pad(hidden.reshape(-1, embed), ((0, pad), (0, 0))).reshape(-1, chunk_tokens, embed)
        t = jnp.pad(targets.reshape(-1), (0, pad)).reshape(-1, chunk_tokens)
        m = jnp.pad(m.reshape(-1), (0, pad)).reshape(-1, chunk_tokens)
    body = jax.checkpoint(lambda carry, xs: (jax.tree.map(jnp.add, carry, chunk_sums(*xs)), None))
    zeros = tuple(jnp.zeros((), jnp.float32) for _ in range(3 if count_correct else 2))
    sums, _ = jax.lax.scan(body, zeros, (h, t, m))
    return sums


def selection_cap(seq: int, rate: float) -> int:
    """How many positions per row `selected_cross_entropy` gathers for masked-LM targets drawn with
    probability ``rate``: the mean plus four standard deviations (a row of 128 at 15%: 37 of 128)."""
    mean = seq * rate
    return min(seq, math.ceil(mean + 4.0 * math.sqrt(mean * (1.0 - rate))) + 1)


def selected_cross_entropy(params: Any, hidden: jax.Array, targets: jax.Array, selected: jax.Array, model: Model, *,
                           cap: int, chunk_tokens: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`token_cross_entropy` (with ``count_correct``) of a masked LM, whose targets are a few positions
    per row: each row's selected positions (at most ``cap``) are gathered first, so the LM head (a
    vocabulary-wide projection, often most of a small encoder's FLOPs) runs on ``cap`` rows per sequence
    instead of all of them. Exact: a batch where some row has more than ``cap`` selected positions
    takes the full computation instead (`jax.lax.cond`). hidden: [batch, seq, embed]; targets,
    selected: [batch, seq]."""
    batch, seq = targets.shape
    full = functools.partial(token_cross_entropy, params, model=model, chunk_tokens=chunk_tokens, count_correct=True)
    if cap >= seq:
        return full(hidden, targets, selected)
    chosen = selected > 0
    counts = jnp.sum(chosen, axis=1)

    def gathered(operands):
        hidden, targets, selected = operands
        index = jax.vmap(lambda row: jnp.nonzero(row, size=cap, fill_value=0)[0])(chosen)  # [batch, cap]
        valid = (jnp.arange(cap)[None, :] < counts[:, None]).astype(jnp.float32)
        rows = jnp.take_along_axis(hidden, index[..., None], axis=1)
        return full(rows, jnp.take_along_axis(targets, index, axis=1),
                    valid * jnp.take_along_axis(selected.astype(jnp.float32), index, axis=1))

    return jax.lax.cond(jnp.all(counts <= cap), gathered, lambda ops: full(*ops), (hidden, targets, selected))


def causal_lm_loss(model: Model, *, z_loss: float = 0.0, chunk_tokens: int = 0) -> LossFn:
    """Next-token cross-entropy (+ ``z_loss * logsumexp^2``, PaLM's z-loss) over masked targets."""
    if not model.cfg.causal:
        raise ValueError(
            "objective 'causal' needs a causal model, but ModelConfig.causal is False: with bidirectional "
            "attention every position sees the token it is asked to predict"
        )

    def loss_fn(params, batch, rng):
        hidden, _ = model.hidden(params, batch["tokens"], positions=batch.get("positions"),
                                 segment_ids=batch["segment_ids"], rng=rng)
        mask = batch["loss_mask"]
        nll, z = token_cross_entropy(params, hidden, batch["targets"], mask, model, chunk_tokens=chunk_tokens)
        total = nll + z_loss * z if z_loss else nll
        weight = jnp.sum(mask.astype(jnp.float32))
        metrics = {"nll": nll}
        if z_loss:
            metrics["z_loss"] = z
        return total, weight, metrics

    return loss_fn


def masked_lm_loss(
    model: Model,
    *,
    mask_token_id: int,
    rate: float = 0.15,
    random_rate: float = 0.1,
    keep_rate: float = 0.1,
    special_ids: Sequence[int] = (),
    z_loss: float = 0.0,
    chunk_tokens: int = 0,
) -> LossFn:
    """Masked-LM cross-entropy (+ ``z_loss * logsumexp^2``) at the tokens `mask_tokens` selects.

    Uses ``batch["tokens"]``, ``batch["segment_ids"]`` (and ``positions`` if present);
    ``targets`` and ``loss_mask`` of the LM layout are ignored. The masks come from the
    loss's ``rng`` (key 0 in evaluation, so held-out figures are comparable). Returns (NLL sum, number of selected tokens, {"nll", "masked_accuracy"
    (selected tokens whose argmax is the original token), "z_loss" when z_loss > 0}).
    """
    if model.cfg.causal:
        raise ValueError(
            "masked_lm_loss needs a bidirectional model: set ModelConfig.causal=False (a causal model "
            "cannot see the context to the right of a masked token)"
        )
    mask_token_id = check_mask_token_id(mask_token_id, model.cfg.vocab_size)
    check_masking_rates(rate, random_rate, keep_rate)
    special_ids = tuple(int(s) for s in special_ids)
    masking = dict(mask_token_id=mask_token_id, vocab_size=model.cfg.vocab_size, rate=rate,
                   random_rate=random_rate, keep_rate=keep_rate, special_ids=special_ids)

    def loss_fn(params, batch, rng):
        if rng is None:  # evaluation: the same masks every time, no dropout
            mask_rng, dropout_rng = jax.random.key(0), None
        else:
            mask_rng, dropout_rng = rng, jax.random.fold_in(rng, 1)
        segment_ids = batch["segment_ids"]
        inputs, targets, selected = mask_tokens(batch["tokens"], segment_ids, mask_rng, **masking)
        hidden = batch_hidden(model, params, batch, rng=dropout_rng, tokens=inputs)
        nll, z, correct = selected_cross_entropy(params, hidden, targets, selected, model,
                                                 cap=selection_cap(targets.shape[1], rate), chunk_tokens=chunk_tokens)
        total = nll + z_loss * z if z_loss else nll
        metrics = {"nll": nll, "masked_accuracy": correct}
        if z_loss:
            metrics["z_loss"] = z
        return total, jnp.sum(selected), metrics

    return loss_fn
