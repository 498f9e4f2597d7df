"""Prompt-side PEFT as added param subtrees (DESIGN contract 3): prompt tuning, P-tuning, prefix tuning.

None of them forks the model. Each adds one top-level subtree that `jaxtune.models.Model`
reads (see `jaxtune.models.decoder`), and that subtree is trainable as a whole
(`jaxtune.peft.core.ADDED_KEYS`; `trainable_mask` marks it, `base_model` drops it):

- **prompt tuning** (Lester et al.): ``params["prompt"] = {"embedding": [n, hidden]}``, n
  virtual token embeddings in front of every document. Init as PEFT: ``random`` (N(0, 1),
  PEFT's RANDOM), ``sample_vocab`` (embeddings of random vocabulary tokens) or ``text`` (the
  embeddings of a tokenized text, truncated or repeated to n tokens, PEFT's TEXT).
- **P-tuning** (Liu et al.): ``params["prompt"]`` is a `PromptMLPEncoder` or `PromptLSTMEncoder`,
  an embedding [n, hidden] reparameterised by PEFT's ``PromptEncoder`` (MLP: Linear-ReLU-Linear-
  ReLU-Linear; LSTM: a bidirectional LSTM, then Linear-ReLU-Linear).
- **prefix tuning** (Li & Liang): ``params["prefix"] = {"keys", "values"}``, per-layer K/V
  prefixes [layers, n, kv_heads, head_dim] (used post-rotary, as a KV cache holds them), or a
  `PrefixProjection`: an embedding [n, token_dim] through PEFT's prefix_projection MLP
  (Linear-tanh-Linear to layers * 2 * kv_heads * head_dim).

The model turns a prompt into per-layer K/V by running the virtual tokens through its
blocks once (they attend only to themselves, so their K/V are the same for every row and
packed document), and treats both exactly as a prefix: every non-padding token sees it,
real tokens' positions start at n. `resolve_prompt` does that conversion explicitly (what
`jaxtune.generate` does once per call).

The encoders' maths (MLP, LSTM, projection) lives here, in registered pytree dataclasses
whose ``embeddings()`` / ``key_values(cfg)`` methods the model calls; the model never
imports this module. Flattened layout helpers (`flat_to_key_values`, `key_values_to_flat`)
follow PEFT's ``past_key_values`` order exactly, for `jaxtune.interop.peft_prompt`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import jax
import jax.numpy as jnp

from jaxtune.models import Model, ModelConfig
from jaxtune.ops import linear

Params = dict[str, Any]


# --- configs ----------------------------------------------------------------------------------


def _check_tokens(n: int, what: str) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{what}.num_virtual_tokens must be a positive integer, got {n!r}")


@dataclass(frozen=True)
class PromptTuningConfig:
    """n virtual token embeddings. init: random (N(0, init_std), PEFT: std 1) | sample_vocab |
    text (``init_text`` tokenized by the ``tokenizer`` given to `apply_prompt_tuning`)."""

    num_virtual_tokens: int = 20
    init: Literal["random", "sample_vocab", "text"] = "random"
    init_text: Optional[str] = None
    init_std: float = 1.0

    def __post_init__(self):
        _check_tokens(self.num_virtual_tokens, "prompt_tuning")
        if self.init not in ("random", "sample_vocab", "text"):
            raise ValueError(f"prompt_tuning.init: unknown init {self.init!r} (random | sample_vocab | text)")
        if self.init == "text" and not self.init_text:
            raise ValueError("prompt_tuning.init='text' needs init_text")


@dataclass(frozen=True)
class PTuningConfig:
    """P-tuning: an embedding [n, hidden] through PEFT's PromptEncoder. encoder: mlp | lstm;
    encoder_hidden_size defaults to the model's hidden size (as PEFT); encoder_num_layers: LSTM layers."""

    num_virtual_tokens: int = 20
    encoder: Literal["mlp", "lstm"] = "mlp"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2

    def __post_init__(self):
        _check_tokens(self.num_virtual_tokens, "p_tuning")
        if self.encoder not in ("mlp", "lstm"):
            raise ValueError(f"p_tuning.encoder: unknown encoder {self.encoder!r} (mlp | lstm)")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValueError(f"p_tuning.encoder_hidden_size must be >= 1, got {self.encoder_hidden_size}")
        if self.encoder_num_layers < 1:
            raise ValueError(f"p_tuning.encoder_num_layers must be >= 1, got {self.encoder_num_layers}")


@dataclass(frozen=True)
class PrefixTuningConfig:
    """Per-layer K/V prefixes. projection=True reparameterises them as PEFT's prefix_projection:
    an embedding [n, token_dim] (token_dim = kv_heads * head_dim, as PEFT) through
    Linear(token_dim, encoder_hidden_size) - tanh - Linear(-, layers * 2 * token_dim);
    encoder_hidden_size defaults to token_dim (as PEFT). init: random (PEFT's default) | zero
    (PEFT's init_weights="zero": zero K/V, or a zero last projection layer) | text (no projection:
    the K/V the model computes for ``init_text``'s tokens at positions 0..n-1)."""

    num_virtual_tokens: int = 20
    projection: bool = False
    encoder_hidden_size: Optional[int] = None
    init: Literal["random", "zero", "text"] = "random"
    init_text: Optional[str] = None

    def __post_init__(self):
        _check_tokens(self.num_virtual_tokens, "prefix_tuning")
        if self.init not in ("random", "zero", "text"):
            raise ValueError(f"prefix_tuning.init: unknown init {self.init!r} (random | zero | text)")
        if self.init == "text" and (self.projection or not self.init_text):
            raise ValueError("prefix_tuning.init='text' needs init_text and projection=False")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValueError(f"prefix_tuning.encoder_hidden_size must be >= 1, got {self.encoder_hidden_size}")


# --- reparameterised subtrees -----------------------------------------------------------------


def _dense(x: jax.Array, layer: dict) -> jax.Array:
    return linear(x, layer["kernel"], dtype=jnp.float32) + layer["bias"].astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclass
class PromptMLPEncoder:
    """P-tuning, PEFT's MLP PromptEncoder: ``embedding`` [n, hidden] -> Linear(hidden, h) - ReLU -
    Linear(h, h) - ReLU - Linear(h, hidden). ``layers``: three ``{"kernel": [in, out], "bias": [out]}``."""

    embedding: Any
    layers: tuple

    def embeddings(self) -> jax.Array:
        x = self.embedding.astype(jnp.float32)
        *hidden, last = self.layers
        for layer in hidden:
            x = jax.nn.relu(_dense(x, layer))
        return _dense(x, last)


def _lstm_direction(x: jax.Array, p: dict, reverse: bool) -> jax.Array:
    """One direction of a torch.nn.LSTM layer (gates i, f, g, o). x: [n, in] -> [n, h]."""
    hidden = p["w_hh"].shape[0]
    gates_x = linear(x, p["w_ih"], dtype=jnp.float32) + p["bias"].astype(jnp.float32)  # [n, 4h]
    w_hh = p["w_hh"].astype(jnp.float32)

    def step(carry, gx):
        h, c = carry
        g = gx + h @ w_hh
        i, f, cand, o = jnp.split(g, 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(cand)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((hidden,), jnp.float32)
    _, out = jax.lax.scan(step, (zeros, zeros), gates_x, reverse=reverse)
    return out


@jax.tree_util.register_dataclass
@dataclass
class PromptLSTMEncoder:
    """P-tuning, PEFT's LSTM PromptEncoder: ``embedding`` [n, hidden] -> bidirectional LSTM
    (``lstm``: per layer ``{"fwd", "bwd"}``, each ``{"w_ih": [in, 4h], "w_hh": [h, 4h], "bias": [4h]}``,
    torch's gate order i, f, g, o, its two biases summed) -> Linear(2h, 2h) - ReLU - Linear(2h, hidden)."""

    embedding: Any
    lstm: tuple
    head: tuple

    def embeddings(self) -> jax.Array:
        x = self.embedding.astype(jnp.float32)
        for layer in self.lstm:
            x = jnp.concatenate([_lstm_direction(x, layer["fwd"], False), _lstm_direction(x, layer["bwd"], True)], -1)
        return _dense(jax.nn.relu(_dense(x, self.head[0])), self.head[1])


@jax.tree_util.register_dataclass
@dataclass
class PrefixProjection:
    """Prefix tuning with PEFT's prefix_projection: ``embedding`` [n, token_dim] -> Linear - tanh -
    Linear to [n, layers * 2 * kv_heads * head_dim], read in PEFT's past_key_values order."""

    embedding: Any
    hidden: dict  # {"kernel": [token_dim, h], "bias": [h]}
    out: dict  # {"kernel": [h, layers * 2 * kv_dim], "bias": [layers * 2 * kv_dim]}

    def flat(self) -> jax.Array:
        return _dense(jnp.tanh(_dense(self.embedding.astype(jnp.float32), self.hidden)), self.out)

    def key_values(self, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
        return flat_to_key_values(self.flat(), cfg)


# --- PEFT's flattened past_key_values layout --------------------------------------------------


def flat_to_key_values(flat: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """PEFT's prefix [n, layers * 2 * kv_heads * head_dim] -> (keys, values) [layers, n, kv_heads, head_dim].

    PEFT views it as [n, layers * 2, heads, head_dim] (heads = num_key_value_heads for GQA
    models), permutes to [layers * 2, heads, n, head_dim] and splits pairs: entry 2l is layer
    l's keys, 2l + 1 its values."""
    n = flat.shape[0]
    want = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
    if flat.ndim != 2 or flat.shape[1] != want:
        raise ValueError(f"prefix: flattened K/V have shape {tuple(flat.shape)}; this model needs "
                         f"[n, layers * 2 * kv_heads * head_dim = {want}]")
    x = flat.reshape(n, cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim)
    x = jnp.transpose(x, (2, 1, 0, 3, 4))  # [2, layers, n, kv_heads, head_dim]
    return x[0], x[1]


def key_values_to_flat(keys: jax.Array, values: jax.Array) -> jax.Array:
    """Inverse of `flat_to_key_values`: [layers, n, kv_heads, head_dim] x 2 -> [n, layers * 2 * kv_dim]."""
    layers, n = keys.shape[:2]
    x = jnp.stack([keys, values])  # [2, layers, n, kv_heads, head_dim]
    return jnp.transpose(x, (2, 1, 0, 3, 4)).reshape(n, -1)


# --- transforms -------------------------------------------------------------------------------


def _check_free(params: Params) -> None:
    taken = [k for k in ("prompt", "prefix") if k in params]
    if taken:
        raise ValueError(f'params already hold a "{taken[0]}" subtree (one prompt-side method at a time)')


def _torch_linear(key: jax.Array, fan_in: int, fan_out: int, zero: bool = False) -> dict:
    """torch.nn.Linear's default init: kernel and bias ~ U(-1/sqrt(in), 1/sqrt(in)); kernel [in, out]."""
    if zero:
        return {"kernel": jnp.zeros((fan_in, fan_out), jnp.float32), "bias": jnp.zeros((fan_out,), jnp.float32)}
    bound = 1.0 / math.sqrt(fan_in)
    kk, kb = jax.random.split(key)
    return {"kernel": jax.random.uniform(kk, (fan_in, fan_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound)}


def text_token_ids(tokenizer: Any, text: str, n: int, vocab_size: int) -> list[int]:
    """``tokenizer.encode(text)`` truncated or repeated to n ids (PEFT's TEXT init)."""
    if tokenizer is None:
        raise ValueError("init='text' needs a tokenizer (anything with encode(text) -> ids)")
    ids = tokenizer.encode(text)
    ids = list(getattr(ids, "ids", ids))
    if not ids:
        raise ValueError(f"init_text {text!r} tokenizes to no tokens")
    bad = [i for i in ids if not 0 <= int(i) < vocab_size]
    if bad:
        raise ValueError(f"init_text token ids {bad[:5]} lie outside the model's vocabulary ({vocab_size})")
    ids = ids * math.ceil(n / len(ids))
    return [int(i) for i in ids[:n]]


def _embed_ids(params: Params, ids: Sequence[int] | jax.Array) -> jax.Array:
    table = params["embed"]["embedding"]
    return jnp.take(table, jnp.asarray(ids, jnp.int32), axis=0).astype(jnp.float32)


def apply_prompt_tuning(params: Params, model_cfg: ModelConfig, cfg: PromptTuningConfig, rng: jax.Array,
                        tokenizer: Any = None) -> Params:
    """params + ``"prompt": {"embedding": [n, hidden]}`` (float32), initialised per ``cfg.init``."""
    _check_free(params)
    n = cfg.num_virtual_tokens
    if cfg.init == "random":
        emb = cfg.init_std * jax.random.normal(rng, (n, model_cfg.hidden_size), jnp.float32)
    elif cfg.init == "sample_vocab":
        emb = _embed_ids(params, jax.random.randint(rng, (n,), 0, model_cfg.vocab_size))
    else:
        emb = _embed_ids(params, text_token_ids(tokenizer, cfg.init_text, n, model_cfg.vocab_size))
    return {**params, "prompt": {"embedding": emb}}


def apply_p_tuning(params: Params, model_cfg: ModelConfig, cfg: PTuningConfig, rng: jax.Array) -> Params:
    """params + ``"prompt"``: a `PromptMLPEncoder` or `PromptLSTMEncoder` with PEFT's (torch's) inits."""
    _check_free(params)
    d, n = model_cfg.hidden_size, cfg.num_virtual_tokens
    h = cfg.encoder_hidden_size or d
    keys = iter(jax.random.split(rng, 4 + 2 * cfg.encoder_num_layers))
    emb = jax.random.normal(next(keys), (n, d), jnp.float32)
    if cfg.encoder == "mlp":
        layers = (_torch_linear(next(keys), d, h), _torch_linear(next(keys), h, h), _torch_linear(next(keys), h, d))
        return {**params, "prompt": PromptMLPEncoder(embedding=emb, layers=layers)}
    bound = 1.0 / math.sqrt(h)

    def direction(key, fan_in):
        k1, k2, k3 = jax.random.split(key, 3)
        u = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -bound, bound)  # noqa: E731
        # torch has bias_ih + bias_hh, each U(-b, b); their sum is what the maths uses
        return {"w_ih": u(k1, (fan_in, 4 * h)), "w_hh": u(k2, (h, 4 * h)),
                "bias": u(k3, (4 * h,)) + u(jax.random.fold_in(k3, 1), (4 * h,))}

    lstm = []
    for i in range(cfg.encoder_num_layers):
        fan_in = d if i == 0 else 2 * h
        kf, kb = jax.random.split(next(keys))
        lstm.append({"fwd": direction(kf, fan_in), "bwd": direction(kb, fan_in)})
    head = (_torch_linear(next(keys), 2 * h, 2 * h), _torch_linear(next(keys), 2 * h, d))
    return {**params, "prompt": PromptLSTMEncoder(embedding=emb, lstm=tuple(lstm), head=head)}


def apply_prefix_tuning(params: Params, model_cfg: ModelConfig, cfg: PrefixTuningConfig, rng: jax.Array,
                        tokenizer: Any = None) -> Params:
    """params + ``"prefix"``: plain ``{"keys", "values"}`` [layers, n, kv_heads, head_dim] (float32)
    or, with ``cfg.projection``, a `PrefixProjection`."""
    _check_free(params)
    n = cfg.num_virtual_tokens
    kv_dim = model_cfg.num_kv_heads * model_cfg.head_dim
    if cfg.projection:
        h = cfg.encoder_hidden_size or kv_dim
        k_emb, k_hidden, k_out = jax.random.split(rng, 3)
        prefix = PrefixProjection(
            embedding=jax.random.normal(k_emb, (n, kv_dim), jnp.float32),
            hidden=_torch_linear(k_hidden, kv_dim, h),
            out=_torch_linear(k_out, h, model_cfg.num_layers * 2 * kv_dim, zero=cfg.init == "zero"),
        )
        return {**params, "prefix": prefix}
    shape = (model_cfg.num_layers, n, model_cfg.num_kv_heads, model_cfg.head_dim)
    if cfg.init == "random":
        k_keys, k_values = jax.random.split(rng)
        keys, values = jax.random.normal(k_keys, shape, jnp.float32), jax.random.normal(k_values, shape, jnp.float32)
    elif cfg.init == "zero":
        keys = values = jnp.zeros(shape, jnp.float32)
    else:
        ids = text_token_ids(tokenizer, cfg.init_text, n, model_cfg.vocab_size)
        prompt_params = {**params, "prompt": {"embedding": _embed_ids(params, ids)}}
        keys, values = jax.jit(lambda p: Model(model_cfg).prefix_kv(p))(prompt_params)
        keys, values = keys.astype(jnp.float32), values.astype(jnp.float32)
    return {**params, "prefix": {"keys": keys, "values": values}}


def resolve_prompt(params: Params, model: Model) -> Params:
    """``params`` with "prompt" (or a reparameterised "prefix") replaced by the equivalent plain
    ``"prefix": {"keys", "values"}``: the per-layer K/V of the virtual tokens, computed once."""
    return model.resolve_prefix(params)


def prompt_subtree(params: Params) -> tuple[str, Any]:
    """-> ("prompt" | "prefix", subtree) of a tree holding exactly one of them."""
    found = [(k, params[k]) for k in ("prompt", "prefix") if k in params]
    if len(found) != 1:
        raise ValueError(f'expected one "prompt" or "prefix" subtree, found {[k for k, _ in found]}')
    return found[0]


def num_virtual_tokens(params: Params, model_cfg: ModelConfig) -> int:
    return Model(model_cfg).num_prefix_tokens(params)


__all__ = [
    "PTuningConfig", "PrefixProjection", "PrefixTuningConfig", "PromptLSTMEncoder", "PromptMLPEncoder",
    "PromptTuningConfig", "apply_p_tuning", "apply_prefix_tuning", "apply_prompt_tuning", "flat_to_key_values",
    "key_values_to_flat", "num_virtual_tokens", "prompt_subtree", "resolve_prompt", "text_token_ids",
]
