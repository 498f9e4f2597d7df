"""The decoder trunk (Flax Linen) and the pure-function model API users call.

    model = Model(cfg)
    params = model.init(rng)                               # nested dict of leaves
    logits = model.apply(params, tokens)                   # [batch, seq, vocab] float32
    logits, cache = model.apply(params, tokens, positions=pos, cache=cache)

`segment_ids` ([batch, seq] int, 0 = padding) encode padding and packing;
`positions` default to the index within each segment. Nothing is stored between
calls: the KV cache is an explicit pytree argument and return value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.models.attention import KVCache, attention_mask, init_cache
from jaxtune.models.config import ModelConfig
from jaxtune.models.layers import Embed, block_class, make_norm
from jaxtune.models.rope import inverse_frequencies, rotary_tables
from jaxtune.ops import linear
from jaxtune.parallel.rules import constrain

Params = dict[str, Any]


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Index of each token within its segment. segment_ids: [batch, seq] -> [batch, seq] int32."""
    seq = segment_ids.shape[1]
    index = jnp.arange(seq, dtype=jnp.int32)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - segment_start


class Decoder(nn.Module):
    """Embeddings, blocks and final norm. Returns hidden states [batch, seq, embed]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, segment_ids, cache: Optional[KVCache] = None):
        cfg = self.cfg
        if cache is not None and not cfg.causal:
            raise ValueError(
                "KV-cache decoding needs a causal model: this ModelConfig has causal=False (bidirectional "
                "attention), so every position attends to later ones; run the full sequence without a cache"
            )
        x = Embed(cfg.vocab_size, cfg.hidden_size, cfg, name="embed")(tokens)
        if cfg.position == "learned":
            x = x + Embed(cfg.max_position_embeddings, cfg.hidden_size, cfg, name="pos_embed")(positions)
        rotary = rotary_tables(positions, inverse_frequencies(cfg.rope, cfg.head_dim)) if cfg.position == "rope" else None

        seq = tokens.shape[1]
        if cache is None:
            q_index = k_index = jnp.arange(seq, dtype=jnp.int32)
            k_segments, end = segment_ids, None
        else:
            end = cache.end
            q_index = end + jnp.arange(seq, dtype=jnp.int32)
            k_index = jnp.arange(cache.max_len, dtype=jnp.int32)
            k_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32), (0, end))
        x = constrain(x)
        block = block_class(cfg)
        masks = {}
        new_keys, new_values = [], []
        for i in range(cfg.num_layers):
            window = cfg.window_for_layer(i)
            if window not in masks:
                masks[window] = attention_mask(segment_ids, k_segments, q_index, k_index, window, causal=cfg.causal)
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x, updated = block(cfg, name=f"layers_{i}")(x, rotary, masks[window], layer_cache, end)
            x = constrain(x)
            if updated is not None:
                new_keys.append(updated[0])
                new_values.append(updated[1])
        x = make_norm(cfg, "final_norm")(x)
        if cache is None:
            return x, None
        return x, KVCache(tuple(new_keys), tuple(new_values), k_segments, end + seq)


def _check_cache_room(cache: KVCache, new_tokens: int) -> None:
    """Refuse writes past the end of the cache (dynamic_update_slice would clamp them onto
    the last slots). Checked whenever ``cache.end`` is a concrete value; under jit the caller
    sizes the cache, as `jaxtune.generate` does."""
    if new_tokens > cache.max_len:
        raise ValueError(f"{new_tokens} tokens do not fit a cache of length {cache.max_len}")
    try:
        end = int(cache.end)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError, TypeError):
        return
    if end + new_tokens > cache.max_len:
        raise ValueError(f"cache holds {end} of {cache.max_len} slots; {new_tokens} more tokens do not fit")


def lm_head(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """hidden: [..., embed] -> logits [..., vocab] float32 (tied heads reuse the embedding)."""
    if cfg.tie_word_embeddings:
        kernel = params["embed"]["embedding"].T
    else:
        kernel = params["lm_head"]["kernel"]
    return linear(hidden, kernel, dtype=cfg.compute_dtype).astype(jnp.float32)


@dataclass(frozen=True)
class Model:
    """Pure functions of a decoder LM for one `ModelConfig`; holds no parameters."""

    cfg: ModelConfig

    @property
    def _decoder(self) -> Decoder:
        return Decoder(self.cfg)

    def init(self, rng: jax.Array) -> Params:
        tokens = jnp.zeros((1, 1), jnp.int32)
        decoder_rng, head_rng = jax.random.split(rng)
        params = dict(self._decoder.init(decoder_rng, tokens, tokens, tokens)["params"])
        if not self.cfg.tie_word_embeddings:
            init = nn.initializers.normal(self.cfg.initializer_range)
            shape = (self.cfg.hidden_size, self.cfg.vocab_size)
            params["lm_head"] = {"kernel": init(head_rng, shape, self.cfg.weight_dtype)}
        return params

    def hidden(
        self,
        params: Params,
        tokens: jax.Array,
        *,
        positions: Optional[jax.Array] = None,
        segment_ids: Optional[jax.Array] = None,
        cache: Optional[KVCache] = None,
        rng: Optional[jax.Array] = None,
    ) -> tuple[jax.Array, Optional[KVCache]]:
        """tokens: [batch, seq] -> (hidden [batch, seq, embed], updated cache or None).
        ``rng``: a key in training steps, for weight leaves with dropout (LoRA); None (the
        default) runs deterministically."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        if segment_ids.shape != tokens.shape:
            raise ValueError(f"segment_ids shape {segment_ids.shape} != tokens shape {tokens.shape}")
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required when decoding with a cache")
            positions = positions_from_segments(segment_ids)
        if cache is not None:
            _check_cache_room(cache, tokens.shape[1])
        decoder_params = {k: v for k, v in params.items() if k != "lm_head"}
        rngs = None if rng is None else {"dropout": rng}
        return self._decoder.apply({"params": decoder_params}, tokens, positions, segment_ids, cache, rngs=rngs)

    def logits(self, params: Params, hidden: jax.Array) -> jax.Array:
        return lm_head(params, hidden, self.cfg)

    def apply(self, params: Params, tokens: jax.Array, *, positions=None, segment_ids=None, cache=None):
        """Logits [batch, seq, vocab] float32; with a cache, (logits, updated cache)."""
        hidden, new_cache = self.hidden(params, tokens, positions=positions, segment_ids=segment_ids, cache=cache)
        logits = self.logits(params, hidden)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        cfg = self.cfg
        return init_cache(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype or cfg.compute_dtype)


def init(rng: jax.Array, cfg: ModelConfig) -> Params:
    """Functional alias: ``init(rng, cfg) -> params``."""
    return Model(cfg).init(rng)


def apply(params: Params, tokens: jax.Array, *, cfg: ModelConfig, positions=None, segment_ids=None, cache=None):
    """Functional alias of `Model.apply`; ``cfg`` is hashable, so jit it as a static argument."""
    return Model(cfg).apply(params, tokens, positions=positions, segment_ids=segment_ids, cache=cache)
