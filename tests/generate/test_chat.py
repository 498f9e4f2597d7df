"""Chat decoding with one KV cache across turns: each turn equals decoding its whole conversation
from scratch; only the new tokens are prefilled; a diverging rendering rewinds to the common prefix.
And the chat-template helpers: messages checked, the end-of-turn token found."""

import jax
import numpy as np
import pytest

from jaxtune.generate import SamplingConfig, generate, left_pad
from jaxtune.generate import chat
from jaxtune.generate.chat import ContextFull, chat_turn, conversations_of, end_of_turn_ids, start_chat
from jaxtune.models import Model, ModelConfig
from tests.data.tokenizer_kinds import CHATML, LLAMA2, build
from tests.reference import require

SAMPLING = SamplingConfig(max_new_tokens=5, greedy=True, pad_token_id=0)


def prompt_tuned():
    """A two-layer model with perturbed weights (clear argmax margins) and a prompt of 3 virtual tokens."""
    model = Model(ModelConfig(vocab_size=48, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                              intermediate_size=64, max_position_embeddings=96))
    noise = np.random.default_rng(1)
    params = jax.tree.map(lambda x: 0.3 * noise.standard_normal(x.shape).astype(x.dtype),
                          jax.eval_shape(model.init, jax.random.key(0)))
    return model, {**params, "prompt": {"embedding": noise.standard_normal((3, 32)).astype(np.float32)}}


def from_scratch(model, params, prompt):
    """The greedy reply to ``prompt`` decoded with a fresh cache (`generate`, left-padded to one length)."""
    tokens, mask = left_pad([prompt], length=32)
    out = jax.device_get(generate(model, params, tokens, mask, jax.random.key(0), SAMPLING))
    return out.tokens[0, : out.lengths[0]].tolist()


def test_turns_reuse_the_cache_and_equal_decoding_from_scratch(monkeypatch):
    """With prompt-tuning params (their virtual tokens resolved once) and a cache that starts at 16
    slots and grows; tests/cli/test_chat.py checks plain params against transformers."""
    monkeypatch.setattr(chat, "MIN_CACHE", 16)
    model, params = prompt_tuned()
    state = start_chat(model, params)
    assert state.max_len == 96 - 3  # the virtual tokens take positions too
    first = [5, 9, 14, 3, 22, 7]
    turn = chat_turn(model, state, first, jax.random.key(0), SAMPLING)
    assert (turn.reused, turn.prefilled) == (0, len(first))
    assert turn.tokens == from_scratch(model, params, first)
    # the next rendering extends prompt + reply: only its new tokens are run
    second = first + turn.tokens + [11, 12, 13, 4]
    turn = chat_turn(model, turn.state, second, jax.random.key(0), SAMPLING)
    assert (turn.reused, turn.prefilled) == (len(second) - 4, 4)
    assert turn.tokens == from_scratch(model, params, second)
    assert turn.state.ids == tuple(second + turn.tokens) and turn.state.cache.max_len == 32  # grown from 16
    # a rendering that differs from the cache after token 8: rewound there, the rest run again
    third = second[:8] + [(second[8] + 1) % 48, 31, 32]
    turn = chat_turn(model, turn.state, third, jax.random.key(0), SAMPLING)
    assert (turn.reused, turn.prefilled) == (8, 3)
    assert turn.tokens == from_scratch(model, params, third)
    with pytest.raises(ContextFull, match="exceed the conversation's"):
        chat_turn(model, turn.state, list(range(1, 40)) * 3, jax.random.key(0), SAMPLING)


def test_messages_are_checked_naming_conversation_and_message():
    one = [{"role": "user", "content": "Hi"}]
    assert conversations_of(one) == [one] and conversations_of([one, one]) == [one, one]
    with pytest.raises(ValueError, match="conversation 1, message 0: content must be a string"):
        conversations_of([one, [{"role": "user", "content": 3}]])
    with pytest.raises(ValueError, match="conversation 0, message 1: role must be a non-empty string"):
        conversations_of(one + [{"content": "x"}])
    with pytest.raises(ValueError, match="not a mix"):
        conversations_of([one[0], one])
    with pytest.raises(ValueError, match="item 0 is 'hello'"):
        conversations_of(["hello"])
    with pytest.raises(ValueError, match="conversation 0 is empty"):
        conversations_of([[]])


LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize("kind, template, end", [
    ("byte_bpe", CHATML, "<|im_end|>"), ("byte_bpe", LLAMA3, "<|eot_id|>"), ("metaspace_first", LLAMA2, "</s>"),
    ("byte_bpe", PLAIN, None),
], ids=["chatml", "llama3", "llama2", "none"])
def test_end_of_turn_token_follows_the_assistant_content(tmp_path, kind, template, end):
    require("transformers")
    from jaxtune.data import load_tokenizer

    tokenizer = load_tokenizer(build(kind, tmp_path, chat_template=template))
    expected = () if end is None else (tokenizer.tokenizer.convert_tokens_to_ids(end),)
    assert end_of_turn_ids(tokenizer) == expected
