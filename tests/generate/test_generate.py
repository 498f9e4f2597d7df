"""Decoding: greedy parity with transformers, cache consistency, sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.generate import SamplingConfig, filter_logits, generate, left_pad, sample_next
from jaxtune.interop import load_hf
from jaxtune.models import Model
from tests.reference import require

PROMPTS = [[5, 17, 33, 8, 61, 12, 9], [44, 3, 90], [70, 21, 21, 6, 30]]


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_greedy_matches_transformers_generate(hf_checkpoint, name):
    torch = require("torch")
    directory, torch_model = hf_checkpoint(name)
    params, cfg = load_hf(directory)
    tokens, mask = left_pad(PROMPTS)
    eos = 40
    ours = generate(Model(cfg), params, tokens, mask, jax.random.key(0),
                    SamplingConfig(max_new_tokens=12, greedy=True, stop_tokens=(eos,), pad_token_id=0))
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                                   attention_mask=torch.tensor(mask, dtype=torch.long),
                                   do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    ref_new = ref[:, tokens.shape[1]:].numpy()
    ours_tokens = np.asarray(ours.tokens)[:, : ref_new.shape[1]]
    np.testing.assert_array_equal(ours_tokens, ref_new)
    assert (np.asarray(ours.tokens)[:, ref_new.shape[1]:] == 0).all()


def test_cached_log_probs_equal_full_forward(hf_checkpoint):
    """Teacher-forcing the generated text through the uncached model reproduces every log-prob."""
    directory, _ = hf_checkpoint("qwen3")
    params, cfg = load_hf(directory)
    model = Model(cfg)
    tokens, mask = left_pad(PROMPTS)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.9)
    out = generate(model, params, tokens, mask, jax.random.key(3), sampling)
    full = np.concatenate([tokens, np.asarray(out.tokens)], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(out.tokens)], axis=1)
    logits = model.apply(params, jnp.asarray(full), segment_ids=jnp.asarray(full_mask))
    log_probs = jax.nn.log_softmax(np.asarray(logits) / 0.7, axis=-1)
    p = tokens.shape[1]
    for step in range(8):
        expected = np.take_along_axis(np.asarray(log_probs[:, p + step - 1]), full[:, p + step, None], 1)[:, 0]
        np.testing.assert_allclose(np.asarray(out.log_probs[:, step]), expected, atol=2e-5)
        # every sampled token lies inside the top-k set of its step
        topk = np.argsort(-np.asarray(logits[:, p + step - 1]), axis=1)[:, :20]
        assert all(full[b, p + step] in topk[b] for b in range(len(PROMPTS)))


def test_stop_tokens_pad_and_lengths():
    from jaxtune.models import ModelConfig

    cfg = ModelConfig(vocab_size=32, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                      intermediate_size=64)
    model = Model(cfg)
    params = model.init(jax.random.key(0))
    tokens, mask = left_pad([[1, 2, 3], [4]])
    free = generate(model, params, tokens, mask, jax.random.key(0), SamplingConfig(max_new_tokens=6, greedy=True))
    stop = int(free.tokens[0, 2])
    out = generate(model, params, tokens, mask, jax.random.key(0),
                   SamplingConfig(max_new_tokens=6, greedy=True, stop_tokens=(stop,), pad_token_id=31))
    first = list(np.asarray(free.tokens[0])).index(stop)
    assert int(out.lengths[0]) == first + 1 and bool(out.stopped[0])
    assert (np.asarray(out.tokens[0, first + 1:]) == 31).all()
    assert (np.asarray(out.log_probs[0, first + 1:]) == 0).all()


def test_rejects_right_padded_prompts():
    from jaxtune.models import ModelConfig

    model = Model(ModelConfig(num_layers=1))
    params = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match="row 1 is not left-padded"):
        generate(model, params, np.ones((2, 3), np.int32), np.array([[1, 1, 1], [1, 1, 0]]), jax.random.key(0),
                 SamplingConfig(max_new_tokens=2, greedy=True))


def test_temperature_sampling_follows_softmax():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]] * 20000)
    tokens, logp = sample_next(logits, jax.random.key(1), SamplingConfig(temperature=2.0))
    freq = np.bincount(np.asarray(tokens), minlength=4) / 20000
    expected = np.exp(np.array([2.0, 1.0, 0.0, -1.0]) / 2) / np.exp(np.array([2.0, 1.0, 0.0, -1.0]) / 2).sum()
    np.testing.assert_allclose(freq, expected, atol=0.015)
    np.testing.assert_allclose(np.asarray(logp), np.log(expected)[np.asarray(tokens)], rtol=1e-5)


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(np.asarray(filter_logits(logits, 2, 1.0))).tolist() == [[True, True, False, False]]
    # nucleus 0.7: 0.5 alone < 0.7, so 0.3 is needed too; 0.15 is not
    assert np.isfinite(np.asarray(filter_logits(logits, 0, 0.7))).tolist() == [[True, True, False, False]]
    assert np.isfinite(np.asarray(filter_logits(logits, 0, 0.81))).tolist() == [[True, True, True, False]]
    assert np.isfinite(np.asarray(filter_logits(logits, 0, 1e-6))).tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.3), (0, 0.9), (12, 0.8)])
def test_filters_match_transformers_warpers(top_k, top_p):
    torch = require("torch")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32) * 3
    ref = torch.tensor(logits)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref.numpy()))


def test_sliding_context_generation_past_learned_positions():
    """sampling.slide: a learned-position model (context 12) generates 30 tokens; greedy tokens and
    log-probs equal a cache-free reference that applies the same window policy token by token."""
    from jaxtune.models import ModelConfig

    cfg = ModelConfig(family="gpt2", vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                      head_dim=8, intermediate_size=64, max_position_embeddings=12, norm="layernorm", mlp="plain",
                      activation="gelu", position="learned", tie_word_embeddings=True)
    model = Model(cfg)
    params = model.init(jax.random.key(3))
    prompts = [[5, 17, 33, 8, 1], [44, 3]]
    tokens, mask = left_pad(prompts)
    with pytest.raises(ValueError, match="sampling.slide=true"):
        generate(model, params, tokens, mask, jax.random.key(0), SamplingConfig(max_new_tokens=30, greedy=True))
    out = generate(model, params, tokens, mask, jax.random.key(0),
                   SamplingConfig(max_new_tokens=30, greedy=True, slide=True))
    assert out.tokens.shape == (2, 30) and np.asarray(out.lengths).tolist() == [30, 30]
    forward = jax.jit(lambda t: jax.nn.log_softmax(model.apply(params, t)[0, -1]))
    # Windows are shared by the batch: the first fills the context of the longest prompt (12 - 5 = 7
    # new tokens); each later one restarts from a row's last 6 tokens and adds 6.
    starts = {7 + 6 * k for k in range(5)}
    for i, prompt in enumerate(prompts):
        history, window_start, produced = list(prompt), 0, 0
        while produced < 30:
            if produced in starts:
                window_start = len(history) - 6
            window = history[window_start:]
            logp = np.asarray(forward(jnp.asarray([window])))
            token = int(np.argmax(logp))
            assert int(out.tokens[i, produced]) == token, (i, produced)
            np.testing.assert_allclose(float(out.log_probs[i, produced]), logp[token], atol=1e-5)
            history.append(token)
            produced += 1
