"""Batched KV-cache decoding as one jitted `lax.while_loop` (no Python loop per token).

Prompts are left-padded ([batch, prompt_len] with a 0/1 mask whose zeros come
first), so every row's next token is written to the same cache slot. The loop
stops when every row has emitted a stop token or max_new_tokens is reached;
finished rows emit ``pad_token_id`` with log-prob 0.

Params with a "prompt" or "prefix" subtree (prompt tuning, P-tuning, prefix tuning) are
resolved once per call into plain per-layer prefix K/V (`Model.resolve_prefix`); the cache
holds real tokens only and the model puts the prefix in front at every step.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.generate.sampling import SamplingConfig, sample_next
from jaxtune.models import Model


class Generation(NamedTuple):
    """tokens/log_probs: [batch, max_new_tokens]; lengths: [batch] tokens emitted, the stop
    token included; stopped: [batch] whether a stop token ended the row."""

    tokens: jax.Array
    log_probs: jax.Array
    lengths: jax.Array
    stopped: jax.Array


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int = 0, length: Optional[int] = None):
    """Token lists -> (tokens [batch, length] int32, mask [batch, length] int32), left-padded."""
    if not prompts:
        raise ValueError("no prompts given")
    longest = max(len(p) for p in prompts)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"prompt of {longest} tokens does not fit length {length}")
    tokens = np.full((len(prompts), length), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        tokens[i, length - len(p):] = p
        mask[i, length - len(p):] = 1
    return tokens, mask


def check_left_padded(mask: np.ndarray) -> None:
    mask = np.asarray(mask)
    for i, row in enumerate(mask):
        if not row.any():
            raise ValueError(f"prompt row {i} has no tokens")
        first = int(np.argmax(row != 0))
        if not row[first:].all():
            raise ValueError(f"prompt row {i} is not left-padded (padding after its first token)")


def generate(model: Model, params, prompt_tokens, prompt_mask, rng: jax.Array, sampling: SamplingConfig,
             *, max_cache_len: Optional[int] = None) -> Generation:
    """Decode up to ``sampling.max_new_tokens`` tokens after each left-padded prompt."""
    prompt_tokens = np.asarray(prompt_tokens, np.int32)
    prompt_mask = np.asarray(prompt_mask, np.int32)
    check_left_padded(prompt_mask)
    cache_len = prompt_tokens.shape[1] + sampling.max_new_tokens
    if max_cache_len is not None and cache_len > max_cache_len:
        raise ValueError(f"prompt ({prompt_tokens.shape[1]}) + max_new_tokens ({sampling.max_new_tokens}) "
                         f"exceeds the cache limit {max_cache_len}")
    params = resolve_prefix(model, params)  # a prompt's K/V once per call, not per step
    virtual = model.num_prefix_tokens(params)
    longest = int(prompt_mask.sum(1).max()) + sampling.max_new_tokens + virtual
    if model.cfg.position == "learned" and longest > model.cfg.max_position_embeddings:
        if sampling.slide and virtual < model.cfg.max_position_embeddings - 1:
            return generate_sliding(model, params, prompt_tokens, prompt_mask, rng, sampling,
                                    context=model.cfg.max_position_embeddings - virtual)
        prefix_note = f" ({virtual} of them the prompt/prefix's virtual tokens)" if virtual else ""
        raise ValueError(f"{longest} positions{prefix_note} exceed the model's max_position_embeddings "
                         f"{model.cfg.max_position_embeddings} (sampling.slide=true keeps generating with a "
                         "sliding context)")
    return _generate(model, sampling, params, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask), rng)


@partial(jax.jit, static_argnums=(0,))
def _resolve_prefix_jit(model: Model, params):
    return model.resolve_prefix(params)


def resolve_prefix(model: Model, params):
    """Plain per-layer prefix K/V for params with a "prompt" or reparameterised "prefix"."""
    if "prompt" in params or ("prefix" in params and not _is_plain_prefix(params["prefix"])):
        return _resolve_prefix_jit(model, params)
    return params


def _is_plain_prefix(prefix) -> bool:
    return isinstance(prefix, dict) and set(prefix) == {"keys", "values"}


def generate_sliding(model: Model, params, prompt_tokens, prompt_mask, rng: jax.Array, sampling: SamplingConfig,
                     *, context: int, keep: Optional[int] = None) -> Generation:
    """Generate past a ``context``-token window: the first window holds the prompt (its last
    ``context - 1`` tokens at most) and fills the context; every later window starts from the last
    ``keep`` tokens (default ``context // 2``) and generates ``context - keep`` more with a fresh KV
    cache. Each new token so sees between ``keep`` and ``context - 1`` tokens before it (nanoGPT
    crops to the last ``context`` for every token, re-running the whole window each time).
    ``context`` counts real tokens: a prompt/prefix of n virtual tokens comes on top of it."""
    keep = context // 2 if keep is None else keep
    if not 0 < keep < context:
        raise ValueError(f"keep must be in (0, {context}), got {keep}")
    params = resolve_prefix(model, params)
    prompt_tokens, prompt_mask = np.asarray(prompt_tokens), np.asarray(prompt_mask)
    check_left_padded(prompt_mask)
    history = [row[m != 0].tolist()[-(context - 1):] for row, m in zip(prompt_tokens, prompt_mask)]
    batch, total = len(history), sampling.max_new_tokens
    tokens = np.full((batch, total), sampling.pad_token_id, np.int32)
    log_probs = np.zeros((batch, total), np.float32)
    lengths = np.zeros(batch, np.int32)
    stopped = np.zeros(batch, bool)
    done = 0
    while done < total and not stopped.all():
        tails = [h[-keep:] if done else h for h in history]
        room = context - max(len(t) for t in tails)
        n = min(room, total - done)
        window_tokens, window_mask = left_pad(tails, sampling.pad_token_id)
        rng, key = jax.random.split(rng)
        out = jax.device_get(_generate(model, dataclasses.replace(sampling, max_new_tokens=n), params,
                                       jnp.asarray(window_tokens), jnp.asarray(window_mask), key))
        for i in range(batch):
            if stopped[i]:
                continue
            k = int(out.lengths[i])
            tokens[i, done: done + k] = out.tokens[i, :k]
            log_probs[i, done: done + k] = out.log_probs[i, :k]
            lengths[i] = done + k
            stopped[i] = bool(out.stopped[i])
            history[i].extend(out.tokens[i, :k].tolist())
        done += n
    return Generation(jnp.asarray(tokens), jnp.asarray(log_probs), jnp.asarray(lengths), jnp.asarray(stopped))


@partial(jax.jit, static_argnums=(0, 1))
def _generate(model: Model, sampling: SamplingConfig, params, prompt_tokens, prompt_mask, rng) -> Generation:
    batch, prompt_len = prompt_tokens.shape
    params = model.resolve_prefix(params)  # no-op when generate() already resolved it
    cache = model.init_cache(batch, prompt_len + sampling.max_new_tokens)
    positions = jnp.clip(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    logits, cache = model.apply(params, prompt_tokens, positions=positions, segment_ids=prompt_mask, cache=cache)
    out, _ = decode_loop(model, sampling, params, cache, logits[:, -1], prompt_mask.sum(1).astype(jnp.int32), rng)
    return out


def decode_loop(model: Model, sampling: SamplingConfig, params, cache, last_logits, next_pos, rng):
    """The token-by-token loop after a prefill (traced inside a caller's jit): ``last_logits``
    [batch, vocab] predict each row's first new token, which goes to position ``next_pos`` [batch]
    and cache slot ``cache.end``. Every emitted token, a stop token included, is written to the
    cache. -> (Generation, the cache after the last emitted token)."""
    batch = last_logits.shape[0]
    steps = sampling.max_new_tokens
    stop = jnp.asarray(sampling.stop_tokens or (-1,), jnp.int32)

    def cond(state):
        step, *_, done = state
        return (step < steps) & ~jnp.all(done)

    def body(state):
        step, cache, last_logits, next_pos, rng, out_tokens, out_logps, done = state
        rng, key = jax.random.split(rng)
        token, logp = sample_next(last_logits, key, sampling)
        token = jnp.where(done, sampling.pad_token_id, token)
        logp = jnp.where(done, 0.0, logp)
        out_tokens = out_tokens.at[:, step].set(token)
        out_logps = out_logps.at[:, step].set(logp)
        done = done | jnp.isin(token, stop)
        ones = jnp.ones((batch, 1), jnp.int32)
        logits, cache = model.apply(params, token[:, None], positions=next_pos[:, None], segment_ids=ones, cache=cache)
        return step + 1, cache, logits[:, -1], next_pos + 1, rng, out_tokens, out_logps, done

    state = (
        jnp.zeros((), jnp.int32), cache, last_logits, next_pos, rng,
        jnp.full((batch, steps), sampling.pad_token_id, jnp.int32), jnp.zeros((batch, steps), jnp.float32),
        jnp.zeros((batch,), bool),
    )
    step, cache, _, _, _, tokens, log_probs, done = jax.lax.while_loop(cond, body, state)
    is_stop = jnp.isin(tokens, stop) & (jnp.arange(steps)[None, :] < step)
    first_stop = jnp.argmax(is_stop, axis=1)
    lengths = jnp.where(done, first_stop + 1, step).astype(jnp.int32)
    return Generation(tokens, log_probs, lengths, done), cache
