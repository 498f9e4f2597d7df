"""Chat: conversations rendered with the tokenizer's chat template, the tokens that end a turn, and
multi-turn decoding that keeps one KV cache across turns.

`render_ids` gives exactly the ids of transformers' ``apply_chat_template(messages, tokenize=True,
add_generation_prompt=True)`` (the template writes any BOS; none is added on top). `end_of_turn_ids`
finds the special token(s) a template writes right after an assistant's content (``<|im_end|>`` for
ChatML, ``<|eot_id|>`` for Llama 3), which stop a reply as EOS does.

`chat_turn` is a pure function of a `ChatState` (the cache of one conversation and the ids it
holds): it prefills only the ids of the new rendering beyond the longest prefix it shares with the
cache, then decodes the reply into the same cache. Slot ``i`` of the cache holds ``ids[i]`` at
position ``i``; when the rendering diverges from the cache (a template that rewrites earlier turns,
a reply the template renders differently from the sampled ids) the cache is rewound to the common
prefix, whose keys and values are unchanged, and the slots after it are overwritten before any query
sees them. New tokens are right-padded (segment 0) to power-of-two lengths and the cache grows in
powers of two, so a conversation compiles a handful of programs, not one per turn. This module
holds no state between calls and prints nothing.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.generate.decode import decode_loop, resolve_prefix
from jaxtune.generate.sampling import SamplingConfig
from jaxtune.models import Model
from jaxtune.models.attention import KVCache
from jaxtune.utils.sequences import common_prefix

MIN_BUCKET = 16  # shortest padded chunk of new tokens
MIN_CACHE = 256  # smallest cache allocated (capped by the conversation's max_len)
_MARK = "Xq7Zv"  # assistant content whose end is searched for in a rendering


class ContextFull(ValueError):
    """A turn does not fit the conversation's token budget (prompt + max_new_tokens)."""


def conversations_of(value: Any, name: str = "messages") -> list[list[dict]]:
    """One conversation (a list of ``{"role", "content"}`` dicts) or a list of them -> a list of
    conversations, each message checked; errors name the conversation and message index."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name}: expected a non-empty list of messages or of conversations, got {value!r}")
    for i, item in enumerate(value):
        if not isinstance(item, (dict, list, tuple)):
            raise ValueError(f"{name}: item {i} is {item!r}, neither a message (an object with role and content) "
                             "nor a conversation (a list of them)")
    if all(isinstance(m, dict) for m in value):
        value = [value]
    elif not all(isinstance(c, (list, tuple)) for c in value):
        raise ValueError(f"{name}: give one conversation (a list of {{role, content}} objects) or a list of "
                         "conversations, not a mix of both")
    return [_checked_conversation(c, f"{name}: conversation {i}") for i, c in enumerate(value)]


def _checked_conversation(conversation: Sequence[Any], where: str) -> list[dict]:
    """The messages as plain dicts, after checking each has a non-empty string role and string content."""
    if not conversation:
        raise ValueError(f"{where} is empty")
    out = []
    for j, m in enumerate(conversation):
        if not isinstance(m, dict):
            raise ValueError(f"{where}, message {j}: expected an object with role and content, got {m!r}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}, message {j}: role must be a non-empty string, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{where}, message {j}: content must be a string, got {content!r}")
        out.append(dict(m))
    return out


def require_chat_template(tokenizer, where: str) -> None:
    """Raise unless ``tokenizer`` is a Hugging Face tokenizer with a chat template."""
    if not getattr(getattr(tokenizer, "tokenizer", None), "chat_template", None):
        kind = type(getattr(tokenizer, "tokenizer", tokenizer)).__name__
        raise ValueError(f"the tokenizer from {where} ({kind}) has no chat template, so conversations cannot be "
                         "rendered; point tokenizer.path at a tokenizer that has one, or write the prompt text "
                         "yourself with prompts=")


def render_text(tokenizer, messages: Sequence[dict]) -> str:
    """The conversation as the chat template writes it, ending in the assistant's generation prompt."""
    return tokenizer.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def render_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """transformers' ``apply_chat_template(messages, tokenize=True, add_generation_prompt=True)`` ids."""
    ids = tokenizer.tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=True,
                                                  return_dict=False)
    return [int(i) for i in ids]


def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    """The added tokens the chat template writes right after an assistant's content (whitespace
    before them skipped), found by rendering ``[user, assistant]`` (or ``[system, user, assistant]``
    for a template that refuses the first); () when it writes none or renders neither."""
    hf = tokenizer.tokenizer
    text = None
    for opening in ([], [{"role": "system", "content": "Hi"}]):
        chat = opening + [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARK}]
        try:
            text = hf.apply_chat_template(chat, tokenize=False)
            break
        except Exception:  # noqa: BLE001 (templates raise whatever they like for a chat they refuse)
            continue
    at = -1 if text is None else text.rfind(_MARK)
    if at < 0:
        return ()
    added = {i for i, t in hf.added_tokens_decoder.items() if t.content.strip()}
    found = []
    for i in hf.encode(text[at + len(_MARK):], add_special_tokens=False):
        if i in added:
            found.append(int(i))
        elif found or hf.decode([i]).strip():
            break
    return tuple(found)


class ChatState(NamedTuple):
    """One conversation's decoding state: ``cache`` (None before the first turn) holds ``ids``,
    slot i the token ids[i] at position i. ``params`` are the session's params, a prompt or
    prefix already resolved into per-layer keys and values."""

    params: Any
    cache: Optional[KVCache]
    ids: tuple[int, ...]
    max_len: int


class Turn(NamedTuple):
    """One reply: ``tokens`` (the stop token included when one ended it) and their ``log_probs``;
    ``stopped`` whether a stop token ended it; ``reused`` the cached tokens kept, ``prefilled`` the
    new ones run; ``state`` the conversation after it (the reply in the cache)."""

    tokens: list[int]
    log_probs: list[float]
    stopped: bool
    reused: int
    prefilled: int
    state: ChatState


def start_chat(model: Model, params, max_len: Optional[int] = None) -> ChatState:
    """An empty conversation of at most ``max_len`` tokens (default: the model's
    max_position_embeddings less any prompt/prefix virtual tokens)."""
    params = resolve_prefix(model, params)
    limit = model.cfg.max_position_embeddings - model.num_prefix_tokens(params)
    max_len = limit if max_len is None else min(max_len, limit)
    if max_len < 2:
        raise ValueError(f"a conversation of {max_len} tokens cannot hold a prompt and a reply")
    return ChatState(params, None, (), max_len)


def reset_chat(state: ChatState) -> ChatState:
    """The same session with an empty conversation (the cache's memory is kept for reuse)."""
    return state._replace(ids=())


def chat_turn(model: Model, state: ChatState, prompt_ids: Sequence[int], rng: jax.Array,
              sampling: SamplingConfig) -> Turn:
    """Generate the reply to ``prompt_ids`` (the whole conversation rendered with its generation
    prompt), prefilling only the ids after the longest prefix shared with the cache. Raises
    `ContextFull` when prompt + ``sampling.max_new_tokens`` exceed ``state.max_len``. The cache of
    ``state`` is donated to the computation: go on from the returned ``Turn.state``."""
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise ValueError("the rendered conversation has no tokens")
    need = len(prompt_ids) + sampling.max_new_tokens
    if need > state.max_len:
        raise ContextFull(f"{len(prompt_ids)} prompt tokens + max_new_tokens {sampling.max_new_tokens} exceed "
                          f"the conversation's {state.max_len} tokens")
    reused = min(common_prefix(state.ids, prompt_ids), len(prompt_ids) - 1)
    new = prompt_ids[reused:]
    cache = _cache_with_room(model, state, need)
    bucket = min(_next_power_of_two(len(new), MIN_BUCKET), cache.max_len - reused)
    tokens = np.full((1, bucket), sampling.pad_token_id, np.int32)
    tokens[0, : len(new)] = new
    segments = (np.arange(bucket) < len(new)).astype(np.int32)[None]
    positions = np.where(segments, reused + np.arange(bucket), 0).astype(np.int32)
    cache = cache._replace(end=jnp.asarray(reused, jnp.int32))
    out, cache = _prefill_and_decode(model, sampling, state.params, cache, jnp.asarray(tokens),
                                     jnp.asarray(segments), jnp.asarray(positions), jnp.int32(len(new)), rng)
    out = jax.device_get(out)
    length = int(out.lengths[0])
    reply = out.tokens[0, :length].tolist()
    state = state._replace(cache=cache, ids=tuple(prompt_ids + reply))
    return Turn(reply, out.log_probs[0, :length].tolist(), bool(out.stopped[0]), reused, len(new), state)


def _next_power_of_two(n: int, floor: int) -> int:
    """The smallest power of two >= ``n``, at least ``floor``."""
    return max(floor, 1 << max(n - 1, 0).bit_length())


def _cache_with_room(model: Model, state: ChatState, need: int) -> KVCache:
    """``state``'s cache, or a new or longer one (a power of two, at most ``state.max_len``) with
    room for ``need`` slots; the slots it holds are kept."""
    cache = state.cache
    if cache is not None and cache.max_len >= need:
        return cache
    length = min(_next_power_of_two(need, MIN_CACHE), state.max_len)
    if cache is None:
        return model.init_cache(1, length)
    return _grow(cache, length)


@partial(jax.jit, static_argnums=1)
def _grow(cache: KVCache, length: int) -> KVCache:
    """``cache`` padded with empty slots (segment 0) to ``length``."""
    def pad(x):
        return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return KVCache(tuple(map(pad, cache.keys)), tuple(map(pad, cache.values)), pad(cache.segment_ids), cache.end)


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _prefill_and_decode(model: Model, sampling: SamplingConfig, params, cache: KVCache, tokens, segments, positions,
                        count, rng):
    """tokens/segments/positions: [1, bucket], the first ``count`` real (written from slot
    ``cache.end``), the rest padding -> (Generation, cache holding the real tokens and the reply)."""
    start = cache.end
    logits, cache = model.apply(params, tokens, positions=positions, segment_ids=segments, cache=cache)
    cache = cache._replace(end=start + count)  # the padding's slots are overwritten by what follows
    last = jax.lax.dynamic_index_in_dim(logits, count - 1, axis=1, keepdims=False)
    return decode_loop(model, sampling, params, cache, last, (start + count)[None], rng)
