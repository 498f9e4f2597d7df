"""The decoder trunk (Flax Linen) and the pure-function model API users call.

    model = Model(cfg)
    params = model.init(rng)                               # nested dict of leaves
    logits = model.apply(params, tokens)                   # [batch, seq, vocab] float32
    logits, cache = model.apply(params, tokens, positions=pos, cache=cache)

`segment_ids` ([batch, seq] int, 0 = padding) encode padding and packing;
`positions` default to the index within each segment. Nothing is stored between
calls: the KV cache is an explicit pytree argument and return value.

Prompt-side PEFT (`jaxtune.peft.prompt`) adds a top-level subtree the model reads:

- ``params["prefix"]``: per-layer key/value prefixes, either the plain dict
  ``{"keys", "values"}`` ([layers, n, kv_heads, head_dim] each, used as given: already
  rotated, as a KV cache stores them) or any pytree node with a method
  ``key_values(cfg) -> (keys, values)`` (a reparameterisation, e.g. an MLP);
- ``params["prompt"]``: n virtual token embeddings that come before every document,
  either ``{"embedding": [n, hidden]}`` or a node with ``embeddings() -> [n, hidden]``
  (P-tuning's encoders). The virtual tokens attend only to themselves, so their per-layer
  K/V are the same for every row and packed document: the model runs them through the
  blocks once (batch 1, positions 0..n-1) and uses the result exactly like a prefix.

Every non-padding token sees all n prefix columns (each packed document as if it were
alone behind the prefix; sliding-window layers only those within the window of the
token's position), and real tokens' positions are shifted by n (as Hugging Face
/ PEFT do: the prefix occupies positions 0..n-1), whether positions are given or derived
from the segments. A KV cache holds real tokens only; `Model.resolve_prefix` turns a
"prompt" into a plain "prefix" once, so decoding does not recompute it per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtune.models.attention import KVCache, init_cache
from jaxtune.models.config import ModelConfig
from jaxtune.models.layers import ACTIVATIONS, Embed, block_class, make_norm
from jaxtune.models.masks import MaskInfo
from jaxtune.models.norms import layer_norm
from jaxtune.models.rope import inverse_frequencies, rotary_tables
from jaxtune.ops import linear
from jaxtune.parallel.rules import constrain
from jaxtune.utils.moved import moved_names

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
    def __call__(self, tokens, positions, segment_ids, cache: Optional[KVCache] = None, prefix=None, embeds=None,
                 token_types=None):
        """prefix: optional per-layer (keys, values) [layers, n, kv_heads, head_dim] at positions
        0..n-1 that every non-padding query sees (``positions`` then already count them: real
        tokens start at n); embeds: optional [batch, seq, embed] used instead of looking
        ``tokens`` up (learned positions are still added); token_types: [batch, seq] ids of the
        token-type embedding (``cfg.type_vocab_size`` > 0; default all 0)."""
        cfg = self.cfg
        if cache is not None and not cfg.causal:
            raise ValueError(
                "KV-cache decoding needs a causal model: this ModelConfig has causal=False (bidirectional "
                "attention), so every position attends to later ones; run the full sequence without a cache"
            )
        if embeds is None:
            x = Embed(cfg.vocab_size, cfg.hidden_size, cfg, name="embed")(tokens)
        else:
            x = embeds.astype(cfg.compute_dtype)
        if cfg.position == "learned":
            x = x + Embed(cfg.max_position_embeddings, cfg.hidden_size, cfg, name="pos_embed")(positions)
        if cfg.type_vocab_size:
            if token_types is None:
                token_types = jnp.zeros(positions.shape, jnp.int32)
            x = x + Embed(cfg.type_vocab_size, cfg.hidden_size, cfg, name="type_embed")(token_types)
        elif token_types is not None:
            raise ValueError("token_types given, but this ModelConfig has no token-type embedding (type_vocab_size=0)")
        if cfg.norm_placement == "post":  # BERT: the summed embeddings are normed; the blocks end in norms
            x = make_norm(cfg, "embed_norm")(x)
        rotary = rotary_tables(positions, inverse_frequencies(cfg.rope, cfg.head_dim)) if cfg.position == "rope" else None

        seq = x.shape[1]
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
                masks[window] = MaskInfo(segment_ids.astype(jnp.int32), k_segments.astype(jnp.int32), q_index, k_index,
                                         q_positions=None if prefix is None else positions, causal=cfg.causal,
                                         window=window, num_prefix=0 if prefix is None else prefix[0].shape[1],
                                         cached=cache is not None)
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            layer_prefix = None if prefix is None else (prefix[0][i], prefix[1][i])
            x, updated = block(cfg, name=f"layers_{i}")(x, rotary, masks[window], layer_cache, end, layer_prefix)
            x = constrain(x)
            if updated is not None:
                new_keys.append(updated[0])
                new_values.append(updated[1])
        if cfg.norm_placement == "pre":
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


__getattr__ = moved_names(__name__, {"HEAD_KEYS": "jaxtune.models.heads.HEAD_KEYS"})
PREFIX_KEYS = ("prompt", "prefix")  # top-level subtrees the model reads besides its own weights
TRUNK_KEYS = ("embed", "pos_embed", "type_embed", "embed_norm", "final_norm")  # the blocks' own subtrees besides layers_<i>


def is_trunk_key(key: str) -> bool:
    """Whether a top-level params key belongs to the decoder's blocks (not the LM head, a prompt /
    prefix subtree or a head over the hidden states, `jaxtune.models.heads`)."""
    return key in TRUNK_KEYS or key.startswith("layers_")


def prompt_embeddings(prompt: Any) -> jax.Array:
    """The virtual token embeddings [n, hidden] of a ``params["prompt"]`` subtree."""
    if hasattr(prompt, "embeddings"):
        return prompt.embeddings()
    if isinstance(prompt, dict) and set(prompt) == {"embedding"}:
        return prompt["embedding"]
    raise TypeError(f'params["prompt"] must be {{"embedding": [n, hidden]}} or have an embeddings() method, '
                    f"got {type(prompt).__name__}{sorted(prompt) if isinstance(prompt, dict) else ''}")


def prefix_key_values(prefix: Any, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """The per-layer (keys, values) [layers, n, kv_heads, head_dim] of a ``params["prefix"]`` subtree."""
    if hasattr(prefix, "key_values"):
        return tuple(prefix.key_values(cfg))
    if isinstance(prefix, dict) and set(prefix) == {"keys", "values"}:
        return prefix["keys"], prefix["values"]
    raise TypeError(f'params["prefix"] must be {{"keys", "values"}} or have a key_values(cfg) method, '
                    f"got {type(prefix).__name__}{sorted(prefix) if isinstance(prefix, dict) else ''}")


def lm_head(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """hidden: [..., embed] -> logits [..., vocab] float32 (tied heads reuse the embedding; BERT's
    head first transforms the hidden states, dense + activation + LayerNorm, and adds a bias)."""
    head = params.get("lm_head", {})
    if cfg.lm_head_transform:
        dense, norm = head["transform"], head["transform_norm"]
        hidden = linear(hidden, dense["kernel"], dtype=cfg.compute_dtype) + dense["bias"].astype(cfg.compute_dtype)
        hidden = layer_norm(ACTIVATIONS[cfg.activation](hidden), norm["scale"], norm["bias"], cfg.norm_eps,
                            cfg.compute_dtype)
    kernel = params["embed"]["embedding"].T if cfg.tie_word_embeddings else head["kernel"]
    logits = linear(hidden, kernel, dtype=cfg.compute_dtype).astype(jnp.float32)
    return logits + head["bias"].astype(jnp.float32) if cfg.lm_head_bias else logits


def init_lm_head(rng: jax.Array, cfg: ModelConfig) -> Params:
    """Fresh params of the LM head beside the trunk ({} for a plain tied head)."""
    init = nn.initializers.normal(cfg.initializer_range)
    transform_rng = jax.random.fold_in(rng, 1)
    head = {}
    if not cfg.tie_word_embeddings:
        head["kernel"] = init(rng, (cfg.hidden_size, cfg.vocab_size), cfg.weight_dtype)
    if cfg.lm_head_transform:
        head["transform"] = {"kernel": init(transform_rng, (cfg.hidden_size, cfg.hidden_size), cfg.weight_dtype),
                             "bias": jnp.zeros((cfg.hidden_size,), cfg.weight_dtype)}
        head["transform_norm"] = {"scale": jnp.ones((cfg.hidden_size,), cfg.weight_dtype),
                                  "bias": jnp.zeros((cfg.hidden_size,), cfg.weight_dtype)}
    if cfg.lm_head_bias:
        head["bias"] = jnp.zeros((cfg.vocab_size,), cfg.weight_dtype)
    return head


def init_pooler(rng: jax.Array, cfg: ModelConfig) -> Params:
    """Fresh params of BERT's pooler: dense [embed, embed] + bias, tanh over the first token."""
    kernel = nn.initializers.normal(cfg.initializer_range)(rng, (cfg.hidden_size, cfg.hidden_size), cfg.weight_dtype)
    return {"kernel": kernel, "bias": jnp.zeros((cfg.hidden_size,), cfg.weight_dtype)}


def pooled_output(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """BERT's pooler: tanh(dense(hidden of the first token)). hidden: [batch, seq, embed] -> [batch, embed]
    float32. A model without a pooler (``cfg.pooler`` False) gives the first token's hidden state."""
    first = hidden[:, 0].astype(jnp.float32)
    if not cfg.pooler:
        return first
    pooler = params["pooler"]
    return jnp.tanh(linear(first, pooler["kernel"], dtype=jnp.float32) + pooler["bias"].astype(jnp.float32))


@dataclass(frozen=True)
class Model:
    """Pure functions of a decoder LM for one `ModelConfig`; holds no parameters."""

    cfg: ModelConfig

    @property
    def _decoder(self) -> Decoder:
        return Decoder(self.cfg)

    def init(self, rng: jax.Array) -> Params:
        """Fresh params from ``rng`` (jitted: one program, not hundreds of eager initializer ops;
        inside a traced function it is inlined as any nested jit)."""
        return _init(self.cfg, rng)

    def hidden(
        self,
        params: Params,
        tokens: jax.Array,
        *,
        positions: Optional[jax.Array] = None,
        segment_ids: Optional[jax.Array] = None,
        cache: Optional[KVCache] = None,
        rng: Optional[jax.Array] = None,
        token_types: Optional[jax.Array] = None,
    ) -> tuple[jax.Array, Optional[KVCache]]:
        """tokens: [batch, seq] -> (hidden [batch, seq, embed], updated cache or None).
        ``rng``: a key in training steps, for weight leaves with dropout (LoRA); None (the
        default) runs deterministically. ``token_types``: [batch, seq] segment A / B ids for a
        model with a token-type embedding (BERT; default 0). With a "prompt" / "prefix" subtree (module docstring)
        ``positions`` count real tokens within their document and are shifted by n here."""
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
        prefix_rng = None
        if rng is not None and "prompt" in params:
            rng, prefix_rng = jax.random.split(rng)
        prefix = self.prefix_kv(params, rng=prefix_rng)
        if prefix is not None:  # the prefix holds positions 0..n-1
            positions = jnp.asarray(positions) + prefix[0].shape[1]
        if token_types is not None and token_types.shape != tokens.shape:
            raise ValueError(f"token_types shape {token_types.shape} != tokens shape {tokens.shape}")
        args = (self._decoder_params(params), tokens, positions, segment_ids, cache, prefix, rng, token_types)
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
            return _run_decoder(self.cfg, *args)  # inside a traced program (jit, grad, eval_shape): inline
        return _run_decoder_jitted(self.cfg, *args)  # called eagerly: one compiled program, not op by op

    @staticmethod
    def _decoder_params(params: Params) -> Params:
        return {k: v for k, v in params.items() if is_trunk_key(k)}

    def prefix_kv(self, params: Params, *, rng: Optional[jax.Array] = None) -> Optional[tuple[jax.Array, jax.Array]]:
        """The per-layer (keys, values) [layers, n, kv_heads, head_dim] every real token sees, from
        ``params["prefix"]`` or (run through the blocks once) ``params["prompt"]``; None without either."""
        cfg = self.cfg
        if "prompt" in params and "prefix" in params:
            raise ValueError('params hold both a "prompt" and a "prefix" subtree; use one prompt-side method')
        if "prefix" in params:
            keys, values = prefix_key_values(params["prefix"], cfg)
            source = 'params["prefix"]'
        elif "prompt" in params:
            keys, values = self._prompt_key_values(params, rng)
            source = 'params["prompt"]'
        else:
            return None
        for name, x in (("keys", keys), ("values", values)):
            if x.ndim != 4 or x.shape[0] != cfg.num_layers or x.shape[2:] != (cfg.num_kv_heads, cfg.head_dim):
                raise ValueError(f"{source}: {name} have shape {tuple(x.shape)}; this model needs "
                                 f"[layers={cfg.num_layers}, n, kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}]")
        if keys.shape != values.shape:
            raise ValueError(f"{source}: keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in shape")
        return keys, values

    def _prompt_key_values(self, params: Params, rng: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Run the n virtual tokens through the decoder (batch 1, positions 0..n-1, causal among
        themselves) and collect their per-layer K/V (post-rotary, as a cache holds them)."""
        cfg = self.cfg
        embeddings = prompt_embeddings(params["prompt"])
        if embeddings.ndim != 2 or embeddings.shape[1] != cfg.hidden_size:
            raise ValueError(f'params["prompt"]: embeddings have shape {tuple(embeddings.shape)}; this model needs '
                             f"[n, hidden={cfg.hidden_size}]")
        if not cfg.causal:
            raise ValueError("prompt tuning needs a causal model: with causal=False the virtual tokens would attend "
                             "to the text after them, so they are not a fixed prefix")
        n = embeddings.shape[0]
        cache = self.init_cache(1, n)
        positions = jnp.arange(n, dtype=jnp.int32)[None]
        rngs = None if rng is None else {"dropout": rng}
        _, cache = self._decoder.apply({"params": self._decoder_params(params)}, None, positions,
                                       jnp.ones((1, n), jnp.int32), cache, None, embeddings[None], rngs=rngs)
        return jnp.stack(cache.keys)[:, 0], jnp.stack(cache.values)[:, 0]

    def resolve_prefix(self, params: Params) -> Params:
        """``params`` with any "prompt" or reparameterised "prefix" replaced by the plain per-layer
        ``{"prefix": {"keys", "values"}}`` it amounts to (unchanged without either). Do this once
        before decoding many steps; it is differentiable like everything else."""
        kv = self.prefix_kv(params)
        if kv is None:
            return params
        out = {k: v for k, v in params.items() if k not in PREFIX_KEYS}
        out["prefix"] = {"keys": kv[0], "values": kv[1]}
        return out

    def num_prefix_tokens(self, params: Params) -> int:
        """n, the number of prefix positions ``params`` put before every document (0 without any)."""
        if "prefix" in params:
            return int(jax.eval_shape(lambda p: prefix_key_values(p, self.cfg), params["prefix"])[0].shape[1])
        if "prompt" in params:
            return int(jax.eval_shape(prompt_embeddings, params["prompt"]).shape[0])
        return 0

    def logits(self, params: Params, hidden: jax.Array) -> jax.Array:
        return lm_head(params, hidden, self.cfg)

    def apply(self, params: Params, tokens: jax.Array, *, positions=None, segment_ids=None, cache=None,
              token_types=None):
        """Logits [batch, seq, vocab] float32; with a cache, (logits, updated cache)."""
        hidden, new_cache = self.hidden(params, tokens, positions=positions, segment_ids=segment_ids, cache=cache,
                                        token_types=token_types)
        logits = self.logits(params, hidden)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        cfg = self.cfg
        return init_cache(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype or cfg.compute_dtype)


def _run_decoder(cfg: ModelConfig, params, tokens, positions, segment_ids, cache, prefix, rng, token_types=None):
    rngs = None if rng is None else {"dropout": rng}
    return Decoder(cfg).apply({"params": params}, tokens, positions, segment_ids, cache, prefix, None, token_types,
                              rngs=rngs)


_run_decoder_jitted = jax.jit(_run_decoder, static_argnums=0)


@partial(jax.jit, static_argnums=0)
def _init(cfg: ModelConfig, rng: jax.Array) -> Params:
    tokens = jnp.zeros((1, 1), jnp.int32)
    decoder_rng, head_rng = jax.random.split(rng)
    pooler_rng = jax.random.fold_in(rng, 2)
    params = dict(Decoder(cfg).init(decoder_rng, tokens, tokens, tokens)["params"])
    head = init_lm_head(head_rng, cfg)
    if head:
        params["lm_head"] = head
    if cfg.pooler:
        params["pooler"] = init_pooler(pooler_rng, cfg)
    return params


def init(rng: jax.Array, cfg: ModelConfig) -> Params:
    """Functional alias: ``init(rng, cfg) -> params``."""
    return Model(cfg).init(rng)


def apply(params: Params, tokens: jax.Array, *, cfg: ModelConfig, positions=None, segment_ids=None, cache=None):
    """Functional alias of `Model.apply`; ``cfg`` is hashable, so jit it as a static argument."""
    return Model(cfg).apply(params, tokens, positions=positions, segment_ids=segment_ids, cache=cache)
