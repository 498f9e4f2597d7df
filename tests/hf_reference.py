"""Small random Hugging Face (PyTorch) models used as the reference in tests.

Each config is tiny but keeps what distinguishes its family (GQA, biases, q/k
norm, sliding windows, rope scaling, tied heads, learned positions). Every
weight, norm scales and biases included, is perturbed away from its init so a
wrong mapping cannot hide behind ones and zeros.
"""

from __future__ import annotations

from tests.reference import require

torch = require("torch")
transformers = require("transformers")

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**BASE),
    "llama_bias": lambda: transformers.LlamaConfig(**BASE, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "llama3_rope": lambda: transformers.LlamaConfig(**BASE, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "llama_linear_rope": lambda: transformers.LlamaConfig(**BASE, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "mistral": lambda: transformers.MistralConfig(**BASE, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**BASE, tie_word_embeddings=True),
    "qwen2_sliding": lambda: transformers.Qwen2Config(**BASE, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": lambda: transformers.Qwen3Config(**BASE, head_dim=24),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                            bos_token_id=1, eos_token_id=2),
}


def make_model(name: str, seed: int = 0):
    """A random HF causal LM (eval mode, fp32, eager attention)."""
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def save_model(name: str, directory, seed: int = 0):
    model = make_model(name, seed)
    model.save_pretrained(directory)
    return model
