"""Prompt tuning, P-tuning and prefix tuning as added param subtrees: logit parity with PEFT
(imported adapters, and our encoders with PEFT's weights), export that PEFT loads, packing,
padding, KV-cache generation, gradients only on the added subtree, and a run of the one loop."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.generate import SamplingConfig, generate, left_pad
from jaxtune.interop import load_hf
from jaxtune.interop.peft_prompt import AdapterMismatchError, load_peft_prompt, save_peft_prompt
from jaxtune.models import Model
from jaxtune.parallel import MeshConfig, make_mesh
from jaxtune.peft.core import base_model, trainable_mask
from jaxtune.peft.prompt import (
    PrefixProjection,
    PrefixTuningConfig,
    PromptLSTMEncoder,
    PromptMLPEncoder,
    PromptTuningConfig,
    PTuningConfig,
    apply_p_tuning,
    apply_prefix_tuning,
    apply_prompt_tuning,
    flat_to_key_values,
    key_values_to_flat,
    resolve_prompt,
)
from jaxtune.train.losses import causal_lm_loss
from jaxtune.utils.partition import count, join, split
from tests.reference import require

N = 5  # virtual tokens
TOKENS = np.array([[5, 17, 33, 8, 61, 12, 9, 70], [44, 3, 90, 21, 21, 6, 30, 2]], np.int32)
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf(hf_checkpoint):
    """name -> (jaxtune params, cfg) of the tiny random HF model (llama: GQA 4/2 heads, rope; gpt2: learned)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_hf(hf_checkpoint(name)[0])
        return cache[name]

    return get


_apply = jax.jit(lambda model, params, tokens, segments: model.apply(params, tokens, segment_ids=segments),
                 static_argnums=0)


def _logits(cfg, params, tokens, segments=None):
    """Jitted ``Model(cfg).apply`` (eager Flax dispatches every op on its own: far slower)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    segments = jnp.ones_like(tokens) if segments is None else jnp.asarray(segments, jnp.int32)
    return np.asarray(_apply(Model(cfg), params, tokens, segments))


def _fresh_torch(name):
    from tests.hf_reference import make_model

    return make_model(name)  # same seed as the saved checkpoint: identical weights


def _with(kind, params, cfg, seed=1):
    """params + one prompt-side subtree of ``kind`` (our random inits)."""
    key = jax.random.key(seed)
    if kind == "prompt":
        return apply_prompt_tuning(params, cfg, PromptTuningConfig(N), key)
    if kind == "p_tuning_mlp":
        return apply_p_tuning(params, cfg, PTuningConfig(N, encoder="mlp", encoder_hidden_size=24), key)
    if kind == "p_tuning_lstm":
        return apply_p_tuning(params, cfg, PTuningConfig(N, encoder="lstm", encoder_hidden_size=12), key)
    if kind == "prefix":
        return apply_prefix_tuning(params, cfg, PrefixTuningConfig(N), key)
    if kind == "prefix_projection":
        return apply_prefix_tuning(params, cfg, PrefixTuningConfig(N, projection=True, encoder_hidden_size=24), key)
    raise KeyError(kind)


def _peft_model(name, kind):
    torch = require("torch")
    peft = require("peft")
    torch.manual_seed(7)
    configs = {
        "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
        "p_tuning_mlp": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                         encoder_hidden_size=24),
        "p_tuning_lstm": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                          encoder_hidden_size=12,
                                                          encoder_reparameterization_type="LSTM"),
        "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
        "prefix_projection": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                             prefix_projection=True, encoder_hidden_size=24),
    }
    return peft.get_peft_model(_fresh_torch(name), configs[kind]()).eval()


def _peft_logits(model, tokens, mask):
    """PEFT's logits of the real tokens (prompt tuning returns the virtual positions too)."""
    torch = require("torch")
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long)).logits
    return out[:, -tokens.shape[1]:].numpy()


def _right_padded():
    mask = np.ones_like(TOKENS)
    mask[1, 5:] = 0  # row 1: 5 real tokens then padding (HF positions stay n + index, as ours)
    return mask


@pytest.mark.parametrize("name, kind", [("llama", "prompt"), ("llama", "prefix"), ("llama", "prefix_projection"),
                                        ("llama", "p_tuning_mlp"), ("gpt2", "prompt"), ("gpt2", "prefix"),
                                        ("mistral", "prefix"), ("qwen2_sliding", "prompt")])
def test_imported_peft_adapter_matches_peft_logits(hf, tmp_path, name, kind):
    """PEFT trains nothing here: its random prompt/prefix is saved with save_pretrained, imported
    onto the HF-loaded params, and our logits equal PEFT's forward (real tokens, padding included).
    gpt2 learns positions (real tokens start at n); mistral / qwen2_sliding have sliding windows
    (4-5 < n + 8 tokens: later tokens no longer see the first prefix columns, as in HF)."""
    params, cfg = hf(name)
    peft_model = _peft_model(name, kind)
    mask = _right_padded()
    ref = _peft_logits(peft_model, TOKENS, mask)
    peft_model.save_pretrained(tmp_path)
    loaded = load_peft_prompt(tmp_path, params, cfg)
    key = "prefix" if kind.startswith("prefix") else "prompt"
    assert set(loaded) - set(params) == {key}
    ours = _logits(cfg, loaded, TOKENS, mask)
    real = mask.astype(bool)
    err = float(np.abs(ours - ref)[real].max())
    print(f"{name} {kind}: max |ours - peft| = {err:.2e}")
    assert err < ATOL
    # the adapter matters: without it the logits are far from PEFT's
    assert float(np.abs(_logits(cfg, params, TOKENS, mask) - ref)[real].max()) > 0.1


def _copy_encoder(kind, peft_model):
    """Our reparameterised subtree holding the weights of PEFT's (trainable) prompt encoder."""
    sd = {k: v.detach().numpy() for k, v in peft_model.prompt_encoder["default"].state_dict().items()}
    lin = lambda p: {"kernel": jnp.asarray(sd[f"{p}.weight"].T), "bias": jnp.asarray(sd[f"{p}.bias"])}  # noqa: E731
    emb = jnp.asarray(sd["embedding.weight"])
    if kind == "p_tuning_mlp":
        return "prompt", PromptMLPEncoder(embedding=emb, layers=(lin("mlp_head.0"), lin("mlp_head.2"),
                                                                 lin("mlp_head.4")))
    if kind == "p_tuning_lstm":
        layers = []
        for i in range(2):
            def direction(suffix, i=i):  # torch: weight_ih_l{i}[_reverse] [4h, in]; two biases, summed
                w = lambda what: sd[f"lstm_head.{what}_l{i}{suffix}"]  # noqa: E731
                return {"w_ih": jnp.asarray(w("weight_ih").T), "w_hh": jnp.asarray(w("weight_hh").T),
                        "bias": jnp.asarray(w("bias_ih") + w("bias_hh"))}
            layers.append({"fwd": direction(""), "bwd": direction("_reverse")})
        head = (lin("mlp_head.0"), lin("mlp_head.2"))
        return "prompt", PromptLSTMEncoder(embedding=emb, lstm=tuple(layers), head=head)
    return "prefix", PrefixProjection(embedding=emb, hidden=lin("transform.0"), out=lin("transform.2"))


@pytest.mark.parametrize("kind", ["p_tuning_mlp", "p_tuning_lstm", "prefix_projection"])
def test_reparameterised_encoders_match_peft(hf, kind):
    """Our MLP / bidirectional-LSTM P-tuning encoders and the prefix projection, given the weights
    of PEFT's trainable encoders, give PEFT's logits (the maths, not only the saved output)."""
    params, cfg = hf("llama")
    peft_model = _peft_model("llama", kind)
    mask = np.ones_like(TOKENS)
    ref = _peft_logits(peft_model, TOKENS, mask)
    key, subtree = _copy_encoder(kind, peft_model)
    ours = _logits(cfg, {**params, key: subtree}, TOKENS)
    err = float(np.abs(ours - ref).max())
    print(f"{kind}: max |ours - peft| = {err:.2e}")
    assert err < ATOL


@pytest.mark.parametrize("name, kind", [("llama", "prefix_projection"), ("llama", "p_tuning_mlp"), ("gpt2", "prompt")])
def test_export_loads_in_peft(hf, tmp_path, name, kind):
    """A jaxtune prompt/prefix saved in PEFT format loads with PeftModel.from_pretrained and gives our logits."""
    peft = require("peft")
    params, cfg = hf(name)
    adapted = _with(kind, params, cfg)
    save_peft_prompt(adapted, cfg, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["num_virtual_tokens"] == N and config["inference_mode"] is True
    peft_model = peft.PeftModel.from_pretrained(_fresh_torch(name), tmp_path).eval()
    ref = _peft_logits(peft_model, TOKENS, np.ones_like(TOKENS))
    ours = _logits(cfg, adapted, TOKENS)
    err = float(np.abs(ours - ref).max())
    print(f"export {name} {kind}: max |ours - peft| = {err:.2e}")
    assert err < ATOL
    # and back: the import is the plain form of the same prompt/prefix
    again = load_peft_prompt(tmp_path, params, cfg)
    np.testing.assert_allclose(_logits(cfg, again, TOKENS), ours, atol=1e-5)


def test_flat_layout_round_trip_and_gqa_order(hf):
    """PEFT's flat prefix: entry (layer l, keys|values, kv head h) is the block at
    [(2l + kv) * kv_dim + h * head_dim, + head_dim)."""
    _, cfg = hf("llama")
    kv_dim = cfg.num_kv_heads * cfg.head_dim
    flat = jnp.arange(N * cfg.num_layers * 2 * kv_dim, dtype=jnp.float32).reshape(N, -1)
    keys, values = flat_to_key_values(flat, cfg)
    assert keys.shape == (cfg.num_layers, N, cfg.num_kv_heads, cfg.head_dim)
    layer, token, head = 1, 3, 1
    start = (2 * layer + 1) * kv_dim + head * cfg.head_dim
    np.testing.assert_array_equal(values[layer, token, head], flat[token, start:start + cfg.head_dim])
    np.testing.assert_array_equal(key_values_to_flat(keys, values), flat)


def test_prompt_from_text_equals_prepending_the_text(hf):
    """Closed form: a prompt initialised from text t (PEFT's TEXT init) gives the real tokens the
    logits the base model gives them after t itself (positions included: gpt2 learns them)."""
    from jaxtune.data.tokenizer import ByteTokenizer

    class Tok:  # byte ids modulo a 97-token vocabulary
        def encode(self, text):
            return [b % 97 for b in ByteTokenizer().encode(text)]

    for name in ("llama", "gpt2"):
        params, cfg = hf(name)
        text_ids = Tok().encode("hi!")  # 3 ids, repeated to N = 5 as PEFT does
        adapted = apply_prompt_tuning(params, cfg, PromptTuningConfig(N, init="text", init_text="hi!"),
                                      jax.random.key(0), tokenizer=Tok())
        ids = (text_ids * 2)[:N]
        np.testing.assert_array_equal(adapted["prompt"]["embedding"], params["embed"]["embedding"][jnp.asarray(ids)])
        ours = _logits(cfg, adapted, TOKENS)
        full = _logits(cfg, params, np.concatenate([np.tile(ids, (2, 1)), TOKENS], 1))[:, N:]
        np.testing.assert_allclose(ours, full, atol=1e-5)
        # the same text as a prefix of K/V (prefix tuning's text init) is the same model
        as_prefix = apply_prefix_tuning(params, cfg, PrefixTuningConfig(N, init="text", init_text="hi!"),
                                        jax.random.key(0), tokenizer=Tok())
        np.testing.assert_allclose(_logits(cfg, as_prefix, TOKENS), full, atol=1e-5)


@pytest.mark.parametrize("name, kind", [("llama", "prompt"), ("llama", "prefix"), ("gpt2", "prompt")])
def test_packed_documents_each_see_the_prefix_as_if_alone(hf, name, kind):
    params, cfg = hf(name)
    adapted = _with(kind, params, cfg)
    a, b = [5, 17, 33, 8, 61, 12], [44, 3, 90, 21, 21, 6]
    tokens = np.array([a + b + [0, 0], [0] + b + a + [0]], np.int32)
    segments = np.array([[1] * 6 + [2] * 6 + [0, 0], [0] + [1] * 6 + [2] * 6 + [0]], np.int32)
    packed = _logits(cfg, adapted, tokens, segments)
    alone = _logits(cfg, adapted, [a, b])  # each document alone in its row
    errs = [np.abs(packed[0, :6] - alone[0]).max(), np.abs(packed[0, 6:12] - alone[1]).max(),
            np.abs(packed[1, 1:7] - alone[1]).max(), np.abs(packed[1, 7:13] - alone[0]).max()]
    assert max(errs) < 2e-5, errs
    # the prefix is really there (and differs from the base model)
    assert np.abs(alone - _logits(cfg, params, [a, b])).max() > 1e-2


def test_padding_does_not_change_real_tokens(hf):
    """Left and right padding around a row leave its logits as they are alone (the prefix columns
    are visible to real tokens only; padding queries see nothing and stay finite)."""
    params, cfg = hf("llama")
    adapted = _with("prompt", params, cfg)
    row = [5, 17, 33, 8, 61, 12]
    tokens = np.array([row + [0, 0, 0], [0, 0, 0] + row], np.int32)
    mask = (np.arange(9)[None] < 6).astype(np.int32)
    mask = np.stack([mask[0], mask[0][::-1]])
    padded = _logits(cfg, adapted, tokens, mask)
    alone = _logits(cfg, adapted, [row])[0]
    np.testing.assert_allclose(padded[0, :6], alone, atol=2e-5)
    np.testing.assert_allclose(padded[1, 3:], alone, atol=2e-5)
    assert np.isfinite(padded).all()


@pytest.mark.parametrize("name, kind", [("llama", "prompt"), ("llama", "prefix_projection"), ("gpt2", "prompt")])
def test_kv_cache_generation_equals_cache_free_reference(hf, name, kind):
    """Greedy decoding with the prompt/prefix (left-padded batch, KV cache of real tokens only):
    every token is the argmax of a cache-free forward (unresolved params, each row's text from
    its first token) and its log-prob matches."""
    params, cfg = hf(name)
    adapted = _with(kind, params, cfg)
    model = Model(cfg)
    prompts = [[5, 17, 33, 8, 61, 12, 9], [44, 3, 90], [70, 21, 21, 6, 30]]
    tokens, mask = left_pad(prompts)
    steps = 8
    sampling = SamplingConfig(max_new_tokens=steps, greedy=True)
    out = generate(model, adapted, tokens, mask, jax.random.key(0), sampling)
    # teacher forcing: each row's prompt + generated text from slot 0 (right padding after it)
    width = max(map(len, prompts)) + steps
    full = np.zeros((len(prompts), width), np.int32)
    segments = np.zeros_like(full)
    for i, prompt in enumerate(prompts):
        text = prompt + np.asarray(out.tokens[i]).tolist()
        full[i, :len(text)], segments[i, :len(text)] = text, 1
    log_probs = np.asarray(jax.nn.log_softmax(_logits(cfg, adapted, full, segments), axis=-1))
    for i, prompt in enumerate(prompts):
        for k in range(steps):
            at = len(prompt) - 1 + k
            assert int(out.tokens[i, k]) == int(np.argmax(log_probs[i, at])), (i, k)
            np.testing.assert_allclose(float(out.log_probs[i, k]), log_probs[i, at, full[i, at + 1]], atol=2e-5)


def test_resolved_prompt_is_the_same_model_and_generate_checks_positions(hf):
    """resolve_prompt (what generate does once per call) turns a P-tuning prompt into plain
    per-layer K/V that give the same logits."""
    params, cfg = hf("gpt2")
    model = Model(cfg)
    adapted = _with("p_tuning_mlp", params, cfg)
    resolved = jax.jit(resolve_prompt, static_argnums=1)(adapted, model)
    assert set(resolved["prefix"]) == {"keys", "values"} and "prompt" not in resolved
    assert resolved["prefix"]["keys"].shape == (cfg.num_layers, N, cfg.num_kv_heads, cfg.head_dim)
    np.testing.assert_allclose(_logits(cfg, resolved, TOKENS), _logits(cfg, adapted, TOKENS), atol=1e-5)
    # learned positions: the n virtual tokens count against max_position_embeddings (128)
    tokens, mask = left_pad([[1] * 10])
    with pytest.raises(ValueError, match="129 positions .5 of them the prompt/prefix's virtual tokens"):
        generate(model, adapted, tokens, mask, jax.random.key(0), SamplingConfig(max_new_tokens=114, greedy=True))


@pytest.mark.parametrize("kind", ["prompt", "p_tuning_mlp", "prefix_projection"])
def test_gradients_reach_only_the_added_subtree(hf, kind):
    params, cfg = hf("llama")
    adapted = _with(kind, params, cfg)
    key = "prefix" if kind.startswith("prefix") else "prompt"
    mask = trainable_mask(adapted)
    assert not any(jax.tree.leaves({k: v for k, v in mask.items() if k != key}))
    assert all(jax.tree.leaves(mask[key]))
    trainable, frozen = split(adapted, mask)
    assert count(trainable) == count(adapted[key]) and count(trainable) > 0
    model = Model(cfg)
    batch = {"tokens": jnp.asarray(TOKENS[:, :-1]), "targets": jnp.asarray(TOKENS[:, 1:]),
             "loss_mask": jnp.ones((2, 7), jnp.int32), "segment_ids": jnp.ones((2, 7), jnp.int32)}
    loss = causal_lm_loss(model)
    grads = jax.jit(jax.grad(lambda t, f: loss(join(t, f), batch, None)[0]))(trainable, frozen)
    leaves = [g for g in jax.tree.leaves(grads) if g is not None]
    assert len(leaves) == len(jax.tree.leaves(adapted[key]))
    assert all(float(jnp.abs(g).max()) > 0 for g in leaves)  # through the encoders and the virtual-token pass
    for a, b in zip(jax.tree.leaves(base_model(adapted)), jax.tree.leaves(params)):
        assert a is b  # the base is the very same arrays


def test_prompt_tuning_through_the_loop_beats_the_frozen_base(hf):
    from jaxtune.data.streams import SyntheticStream
    from jaxtune.train.config import TrainConfig
    from jaxtune.train.loop import train
    from jaxtune.train.optim import OptimConfig, build_optimizer

    params, cfg = hf("llama")
    model = Model(cfg)
    adapted = _with("prompt", params, cfg)
    batch = SyntheticStream(8, 24, cfg.vocab_size, seed=4).batch_at(0)
    loss = causal_lm_loss(model)
    base_sum, weight, _ = loss(params, {k: jnp.asarray(v) for k, v in batch.items()}, None)
    base_loss = float(base_sum / weight)
    opt, schedule = build_optimizer(OptimConfig(lr=1e-1, warmup_steps=2, weight_decay=0.0, schedule="constant"),
                                    total_steps=15)
    result = train(loss_fn=loss, params=adapted, model_cfg=cfg, optimizer=opt, schedule=schedule,
                   cfg=TrainConfig(steps=15, batch_size=8, seq_len=24, log_every=5), batches=itertools.repeat(batch),
                   mesh=make_mesh(MeshConfig(data=1)), trainable_mask=trainable_mask(adapted))
    losses = [h["loss"] for h in result.history]
    print(f"frozen base {base_loss:.3f}; prompt tuning {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < base_loss - 1.0, (base_loss, losses)  # 5.77 -> ~4.3 measured
    assert count(result.state.params) == N * cfg.hidden_size  # the optimizer saw the prompt only
    trained = result.params
    for a, b in zip(jax.tree.leaves(base_model(trained)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(trained["prompt"]["embedding"] - adapted["prompt"]["embedding"]).max()) > 1e-2


def test_bad_inputs_fail_clearly(hf, tmp_path):
    params, cfg = hf("llama")
    model = Model(cfg)
    adapted = _with("prompt", params, cfg)
    with pytest.raises(ValueError, match="already hold"):
        apply_prefix_tuning(adapted, cfg, PrefixTuningConfig(N), jax.random.key(0))
    with pytest.raises(ValueError, match="both a \"prompt\" and a \"prefix\""):
        model.apply({**adapted, "prefix": _with("prefix", params, cfg)["prefix"]}, jnp.asarray(TOKENS))
    bad = {**params, "prefix": {"keys": jnp.zeros((cfg.num_layers, N, cfg.num_heads, cfg.head_dim)),
                                "values": jnp.zeros((cfg.num_layers, N, cfg.num_heads, cfg.head_dim))}}
    with pytest.raises(ValueError, match="kv_heads=2"):
        model.apply(bad, jnp.asarray(TOKENS))
    with pytest.raises(ValueError, match="hidden=64"):
        model.apply({**params, "prompt": {"embedding": jnp.zeros((N, 32))}}, jnp.asarray(TOKENS))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        apply_prompt_tuning(params, cfg, PromptTuningConfig(N, init="text", init_text="x"), jax.random.key(0))
    with pytest.raises(ValueError, match="unknown init"):
        PromptTuningConfig(N, init="vocab")
    with pytest.raises(ValueError, match="positive integer"):
        PrefixTuningConfig(0)
    # adapters that do not fit
    save_peft_prompt(adapted, cfg, tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    with pytest.raises(AdapterMismatchError, match="num_layers = 2, but this model has 3"):
        load_peft_prompt(tmp_path / "ok", params, cfg.replace(num_layers=3))
    with pytest.raises(AdapterMismatchError, match="token_dim = 64, but this model has 32"):
        load_peft_prompt(tmp_path / "ok", params, cfg.replace(hidden_size=32))
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    weights = (tmp_path / "ok" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "lora" / "adapter_model.safetensors").write_bytes(weights)
    with pytest.raises(AdapterMismatchError, match="not a prompt-learning adapter"):
        load_peft_prompt(tmp_path / "lora", params, cfg)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_prompt(tmp_path, params, cfg)
    with pytest.raises(ValueError, match="already hold"):
        load_peft_prompt(tmp_path / "ok", adapted, cfg)
