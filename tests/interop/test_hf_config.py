"""config.json fields jaxtune reads must mean what transformers makes of them, defaults included.

Each case writes a config the way transformers does, drops or sets a field, and
compares jaxtune's reading with the value transformers' own config class
derives from the same dict.
"""

import pytest

from jaxtune.interop.hf_config import UnsupportedModelError, check_expressible, from_hf_config
from jaxtune.models import ModelConfig
from tests.reference import require

transformers = require("transformers")

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=30,
            num_attention_heads=4, num_key_value_heads=2)


def hf_dict(config_cls, drop=(), **fields):
    d = config_cls(**fields).to_dict()
    for key in drop:
        d.pop(key, None)
    return d


def reparsed(d):
    """What transformers makes of a config dict."""
    return transformers.AutoConfig.for_model(**d)


def test_gpt2_activation_default_is_gelu_new():
    d = hf_dict(transformers.GPT2Config, drop=["activation_function"], n_embd=64, n_layer=2, n_head=4)
    assert reparsed(d).activation_function == "gelu_new"
    assert from_hf_config(d).activation == "gelu_tanh"


def test_qwen2_max_window_layers_default():
    d = hf_dict(transformers.Qwen2Config, drop=["max_window_layers", "layer_types"], use_sliding_window=True,
                sliding_window=8, **BASE)
    hf_types = reparsed(d).layer_types
    ours = from_hf_config(d)
    assert [ours.window_for_layer(i) is not None for i in range(30)] == [t == "sliding_attention" for t in hf_types]
    assert ours.window_for_layer(29) == 8 and ours.window_for_layer(0) is None


def test_qwen3_head_dim_default():
    d = hf_dict(transformers.Qwen3Config, drop=["head_dim"], **BASE)
    assert from_hf_config(d).head_dim == reparsed(d).head_dim


def test_mistral_sliding_window_default_and_explicit_null():
    d = hf_dict(transformers.MistralConfig, drop=["sliding_window"], **BASE)
    assert from_hf_config(d).sliding_window == reparsed(d).sliding_window
    d["sliding_window"] = None
    assert from_hf_config(d).sliding_window is None


def test_llama_ignores_sliding_window_like_transformers():
    d = hf_dict(transformers.LlamaConfig, **BASE)
    d["sliding_window"] = 3
    assert from_hf_config(d).sliding_window is None
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        check_expressible(ModelConfig(family="llama", num_layers=2, sliding_window=3))


def test_llama3_rope_falls_back_to_max_positions_and_names_missing_fields():
    d = hf_dict(transformers.LlamaConfig, **BASE)
    d["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0}
    assert from_hf_config(d).rope.original_max_position == d["max_position_embeddings"]
    d["rope_parameters"] = {"rope_type": "linear", "rope_theta": 1e4}
    with pytest.raises(UnsupportedModelError, match="needs field 'factor'"):
        from_hf_config(d)


def test_all_sliding_qwen_is_expressible_and_llama_head_rule_enforced():
    cfg = ModelConfig(family="qwen2", qkv_bias=True, num_layers=2, sliding_window=3)
    assert from_hf_config(check_expressible(cfg)) == cfg
    with pytest.raises(UnsupportedModelError, match="multiple of num_heads"):
        check_expressible(ModelConfig(family="llama", hidden_size=64, num_heads=6, num_kv_heads=6, head_dim=16))
