"""Named small architectures for demos, tests and benchmarks (random init, no download).

Vocab 259 matches jaxtune's byte tokenizer (256 bytes + pad, bos, eos).
"""

from __future__ import annotations

from jaxtune.models.config import ModelConfig, RopeConfig

BYTE_VOCAB = 259

PRESETS: dict[str, ModelConfig] = {
    "tiny-llama": ModelConfig(
        family="llama", vocab_size=BYTE_VOCAB, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=32, intermediate_size=352, max_position_embeddings=1024, bos_token_id=257,
        eos_token_id=(258,), pad_token_id=256,
    ),
    "tiny-gpt2": ModelConfig(
        family="gpt2", vocab_size=BYTE_VOCAB, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4,
        head_dim=32, intermediate_size=512, max_position_embeddings=1024, norm="layernorm", norm_eps=1e-5,
        mlp="plain", activation="gelu_tanh", position="learned", qkv_bias=True, o_bias=True, mlp_bias=True,
        tie_word_embeddings=True, bos_token_id=257, eos_token_id=(258,), pad_token_id=256,
    ),
    # The throughput benchmark's model (31 M parameters).
    "bench-llama-31m": ModelConfig(
        family="llama", vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
        head_dim=64, intermediate_size=1408, max_position_embeddings=2048,
    ),
    # Published architectures (their config.json), for the memory estimator and abstract
    # compilation: random init, never downloaded. Fine-tune the real weights with model.hf_dir.
    "llama-3.1-8b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, intermediate_size=14336, max_position_embeddings=131072, norm_eps=1e-5,
        rope=RopeConfig(kind="llama3", theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position=8192),
        bos_token_id=128000, eos_token_id=(128001,),
    ),
    "qwen2.5-7b": ModelConfig(
        family="qwen2", vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
        head_dim=128, intermediate_size=18944, max_position_embeddings=131072, norm_eps=1e-6, qkv_bias=True,
        rope=RopeConfig(theta=1000000.0), bos_token_id=151643, eos_token_id=(151643,),
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
