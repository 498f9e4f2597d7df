"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus).

`sample_next` returns the token and its log-probability under the
temperature-scaled distribution *before* top-k/top-p filtering; that is the
policy log-prob PPO/GRPO ratios need. Filtering only restricts which tokens can
be drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. greedy=True ignores temperature/top_k/top_p."""

    max_new_tokens: int = 32
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    stop_tokens: tuple[int, ...] = ()
    pad_token_id: int = 0
    # Past the model's context (learned positions, max_position_embeddings): keep going with the last
    # half of the context as a new prompt, re-prefilled every half context (nanoGPT-style cropping).
    # Off: such a request is an error.
    slide: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature} (use greedy=True)")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Set logits outside the top-k / nucleus to -inf. logits: [batch, vocab] float32."""
    neg_inf = jnp.float32(-jnp.inf)
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep a token while the mass of strictly more likely tokens is below top_p
        # (the most likely token is always kept).
        keep_sorted = mass_before < top_p
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def sample_next(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """logits: [batch, vocab] -> (tokens [batch] int32, log-probs [batch] float32)."""
    logits = logits.astype(jnp.float32)
    if cfg.greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / jnp.float32(cfg.temperature)
        log_probs = jax.nn.log_softmax(scaled, axis=-1)
        filtered = filter_logits(scaled, cfg.top_k, cfg.top_p)
        tokens = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
    chosen = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen
