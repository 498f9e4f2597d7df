"""BERT-style token masking for the masked-language-model objective (jit-able, in JAX).

Each real token (``segment_ids != 0`` and not one of ``special_ids``) is selected
independently with probability ``rate`` (a Bernoulli draw per token, as Hugging Face's
``DataCollatorForLanguageModeling`` does). A selected token is replaced by the mask
token with probability ``1 - random_rate - keep_rate``, by a token drawn uniformly
from ``[0, vocab_size)`` with probability ``random_rate`` (which may happen to be the
original token), and left unchanged otherwise. The model must predict the original
token at every selected position.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp


def check_masking_rates(
    rate: float, random_rate: float, keep_rate: float, *, names: tuple[str, str, str] = ("rate", "random_rate", "keep_rate")
) -> None:
    """Raise ValueError unless 0 < rate < 1, random_rate, keep_rate >= 0 and random_rate + keep_rate <= 1.
    ``names``: how the three values are called in the messages."""
    rate_name, random_name, keep_name = names
    if not 0.0 < float(rate) < 1.0:
        raise ValueError(f"{rate_name} must lie in (0, 1), got {rate}")
    for name, value in ((random_name, random_rate), (keep_name, keep_rate)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    if float(random_rate) + float(keep_rate) > 1.0 + 1e-9:
        raise ValueError(
            f"{random_name} + {keep_name} must be <= 1 (the rest of the selected tokens become the mask "
            f"token), got {random_rate} + {keep_rate}"
        )


def check_mask_token_id(mask_token_id: Optional[int], vocab_size: int, *, name: str = "mask_token_id") -> int:
    """The mask id as an int, after checking it indexes the model's vocabulary."""
    if mask_token_id is None:
        raise ValueError(f"{name} is required for masked-LM training")
    if isinstance(mask_token_id, bool) or int(mask_token_id) != mask_token_id:
        raise ValueError(f"{name} must be an integer, got {mask_token_id!r}")
    if not 0 <= int(mask_token_id) < int(vocab_size):
        raise ValueError(f"{name} ({mask_token_id}) must lie in [0, vocab_size={vocab_size})")
    return int(mask_token_id)


def mask_tokens(
    tokens: jax.Array,
    segment_ids: jax.Array,
    rng: jax.Array,
    *,
    mask_token_id: int,
    vocab_size: int,
    rate: float = 0.15,
    random_rate: float = 0.1,
    keep_rate: float = 0.1,
    special_ids: Sequence[int] = (),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """tokens, segment_ids: [..., seq] int; rng: a PRNG key (typed or raw uint32).

    -> (inputs, targets, loss_mask): ``inputs`` are the tokens with the selected ones
    masked / randomised / kept, ``targets`` the original tokens, ``loss_mask`` float32,
    1.0 at selected positions. Everything after ``rng`` is static (Python values), so
    under ``jax.jit`` pass them through ``functools.partial`` or ``static_argnames``.
    """
    check_masking_rates(rate, random_rate, keep_rate)
    mask_token_id = check_mask_token_id(mask_token_id, vocab_size)
    tokens = jnp.asarray(tokens)
    segment_ids = jnp.asarray(segment_ids)
    if tokens.shape != segment_ids.shape:
        raise ValueError(f"segment_ids shape {segment_ids.shape} != tokens shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")

    eligible = segment_ids != 0
    special_ids = tuple(int(s) for s in special_ids)
    if special_ids:
        eligible = eligible & ~jnp.isin(tokens, jnp.asarray(special_ids, tokens.dtype))

    select_key, kind_key, random_key = jax.random.split(rng, 3)
    selected = jax.random.bernoulli(select_key, rate, tokens.shape) & eligible
    # One uniform draw per token splits the selected ones into mask | random | keep.
    u = jax.random.uniform(kind_key, tokens.shape)
    mask_share = max(0.0, 1.0 - random_rate - keep_rate)
    to_mask = selected & (u < mask_share)
    to_random = selected & (u >= mask_share) & (u < mask_share + random_rate)
    random_tokens = jax.random.randint(random_key, tokens.shape, 0, vocab_size, dtype=tokens.dtype)

    inputs = jnp.where(to_mask, jnp.asarray(mask_token_id, tokens.dtype), jnp.where(to_random, random_tokens, tokens))
    return inputs, tokens, selected.astype(jnp.float32)
