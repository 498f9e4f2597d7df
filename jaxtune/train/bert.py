"""BERT's pre-training loss: masked language modelling plus next-sentence prediction.

Batches are sentence pairs (`jaxtune.data.sentence_pairs`): ``tokens`` ``[CLS] A [SEP] B [SEP]``,
``segment_ids`` (0 = padding), ``positions``, ``token_types`` (0 for A, 1 for B), ``nsp_labels``
(0: B is the text that followed A, 1: B is a random sentence; Hugging Face's convention) and
``row_mask``. The loss masks tokens itself (`jaxtune.data.masking.mask_tokens`: 15% of the real,
non-special tokens, 80 / 10 / 10), as `masked_lm_loss` does.

The figure is Hugging Face ``BertForPreTraining``'s: ``mlm_weight * mean MLM cross-entropy over
the masked tokens + nsp_weight * mean NSP cross-entropy over the pairs``. Under the loss contract
(`jaxtune.train.losses`: sums, one weight) the weight is the number of pairs and the MLM sum is
scaled by ``pairs / masked tokens`` of the micro-batch, so a step of one micro-batch is exactly
that figure; with gradient accumulation each micro-batch's MLM mean is weighted by its pairs.
Metrics (per pair, so reported as means): ``mlm_loss``, ``masked_accuracy``, ``nsp_loss``,
``nsp_accuracy``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from jaxtune.data.masking import check_mask_token_id, check_masking_rates, mask_tokens
from jaxtune.models import Model
from jaxtune.models.heads import batch_hidden, nsp_logits
from jaxtune.train.losses import LossFn, selected_cross_entropy, selection_cap


def pretraining_loss(model: Model, params: Any, batch: dict, targets: jax.Array, selected: jax.Array, *,
                     mlm_weight: float = 1.0, nsp_weight: float = 1.0, rng=None, z_loss: float = 0.0,
                     chunk_tokens: int = 0, cap: Optional[int] = None) -> tuple[jax.Array, jax.Array, dict]:
    """The loss of already-masked inputs: ``batch["tokens"]`` are the inputs, ``targets`` [batch, seq]
    the original tokens and ``selected`` [batch, seq] (1 where a token was picked for prediction).
    ``cap``: the LM head runs on at most this many gathered positions per row
    (`jaxtune.train.losses.selected_cross_entropy`, exact either way); None: on every position.
    -> (loss sum, pairs, metric sums) (module docstring)."""
    hidden = batch_hidden(model, params, batch, rng=rng)
    nll, z, correct = selected_cross_entropy(params, hidden, targets, selected, model, chunk_tokens=chunk_tokens,
                                             cap=targets.shape[1] if cap is None else cap)
    rows = batch["row_mask"].astype(jnp.float32)
    pairs = jnp.sum(rows)
    scale = pairs / jnp.maximum(jnp.sum(selected.astype(jnp.float32)), 1.0)
    logits = nsp_logits(model, params, hidden)
    labels = batch["nsp_labels"].astype(jnp.int32)
    nsp_nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]
    nsp_sum = jnp.sum(rows * nsp_nll)
    hits = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    mlm = scale * (nll + z_loss * z if z_loss else nll)
    metrics = {"mlm_loss": scale * nll, "masked_accuracy": scale * correct, "nsp_loss": nsp_sum,
               "nsp_accuracy": jnp.sum(rows * hits)}
    if z_loss:
        metrics["z_loss"] = scale * z
    return mlm_weight * mlm + nsp_weight * nsp_sum, pairs, metrics


def nsp_pretraining_loss(model: Model, *, mask_token_id: int, rate: float = 0.15, random_rate: float = 0.1,
                         keep_rate: float = 0.1, special_ids: Sequence[int] = (), mlm_weight: float = 1.0,
                         nsp_weight: float = 1.0, z_loss: float = 0.0, chunk_tokens: int = 0) -> LossFn:
    """The training loss of the ``nsp`` objective: mask the pair's tokens (never ``special_ids``:
    [CLS], [SEP], padding), then `pretraining_loss`. Masks come from the loss's ``rng`` (key 0 in
    evaluation, so held-out figures are comparable)."""
    if model.cfg.causal:
        raise ValueError("next-sentence pre-training needs a bidirectional model (ModelConfig.causal=False)")
    mask_token_id = check_mask_token_id(mask_token_id, model.cfg.vocab_size)
    check_masking_rates(rate, random_rate, keep_rate)
    if mlm_weight < 0 or nsp_weight < 0 or mlm_weight + nsp_weight <= 0:
        raise ValueError(f"mlm_weight ({mlm_weight}) and nsp_weight ({nsp_weight}) must be >= 0, not both 0")
    masking = dict(mask_token_id=mask_token_id, vocab_size=model.cfg.vocab_size, rate=rate, random_rate=random_rate,
                   keep_rate=keep_rate, special_ids=tuple(int(s) for s in special_ids))

    def loss_fn(params, batch, rng):
        if rng is None:
            mask_rng, dropout_rng = jax.random.key(0), None
        else:
            mask_rng, dropout_rng = rng, jax.random.fold_in(rng, 1)
        inputs, targets, selected = mask_tokens(batch["tokens"], batch["segment_ids"], mask_rng, **masking)
        return pretraining_loss(model, params, {**batch, "tokens": inputs}, targets, selected, mlm_weight=mlm_weight,
                                nsp_weight=nsp_weight, rng=dropout_rng, z_loss=z_loss, chunk_tokens=chunk_tokens,
                                cap=selection_cap(targets.shape[1], rate))

    return loss_fn
