"""Named small architectures for demos, tests and benchmarks (random init, no download).

Vocab 259 matches jaxtune's byte tokenizer (256 bytes + pad, bos, eos).
"""

from __future__ import annotations

from jaxtune.models.config import ModelConfig

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
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
