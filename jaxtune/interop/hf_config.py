"""Hugging Face ``config.json`` <-> `ModelConfig`, for Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, GPT-2, BERT.

Reads both the transformers 4 layout (``rope_theta`` + ``rope_scaling``) and the
transformers 5 layout (``rope_parameters``); writes both so either version loads
the export. Anything jaxtune cannot reproduce exactly raises, naming the field.
"""

from __future__ import annotations

from typing import Any, Optional

from jaxtune.models.config import ModelConfig, RopeConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertForMaskedLM",
}
# BERT's architectures: which heads beside the encoder each one has (`jaxtune.interop.hf_weights`)
BERT_ARCHITECTURES = ("BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
_ACTIVATIONS_OUT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or a field of its config is not supported."""


def from_hf_config(hf: dict[str, Any], **overrides) -> ModelConfig:
    """Build a ModelConfig from a parsed config.json. ``overrides`` set jaxtune-only fields (dtypes...)."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"config.json: unsupported architecture model_type={model_type!r} "
            f"(architectures={hf.get('architectures')}); supported: {', '.join(ARCHITECTURES)}"
        )
    if model_type == "gpt2":
        fields = _gpt2_fields(hf)
    elif model_type == "bert":
        fields = _bert_fields(hf)
    else:
        fields = _llama_like_fields(hf, model_type)
    fields.update(
        family=model_type,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_as_tuple(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def _require(hf: dict, key: str):
    if hf.get(key) is None:
        raise UnsupportedModelError(f"config.json: missing required field {key!r}")
    return hf[key]


def _activation(hf: dict, key: str, default: str) -> str:
    name = hf.get(key, default)
    if name not in _ACTIVATIONS:
        raise UnsupportedModelError(f"config.json: unsupported {key}={name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _rope(hf: dict) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {**legacy, **params} if params else dict(legacy)
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"

    def field(name, default=None):
        value = scaling.get(name, default)
        if value is None:
            raise UnsupportedModelError(f"config.json: rope_parameters.rope_type={kind!r} needs field {name!r}")
        return value

    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind == "linear":
        return RopeConfig(kind="linear", theta=float(theta), factor=float(field("factor")))
    if kind == "llama3":
        # transformers falls back to max_position_embeddings when the original length is absent
        original = field("original_max_position_embeddings", hf.get("max_position_embeddings"))
        return RopeConfig(
            kind="llama3", theta=float(theta), factor=float(field("factor")),
            low_freq_factor=float(field("low_freq_factor")), high_freq_factor=float(field("high_freq_factor")),
            original_max_position=int(original),
        )
    raise UnsupportedModelError(
        f"config.json: unsupported rope_parameters.rope_type={kind!r}; supported: default, linear, llama3"
    )


def _layer_types(hf: dict, num_layers: int) -> tuple[str, ...]:
    types = hf.get("layer_types")
    if not types:
        return ()
    names = {"full_attention": "full", "sliding_attention": "sliding"}
    unknown = sorted({t for t in types if t not in names})
    if unknown:
        raise UnsupportedModelError(f"config.json: unsupported layer_types {unknown}")
    if len(types) != num_layers:
        raise UnsupportedModelError(f"config.json: layer_types has {len(types)} entries for {num_layers} layers")
    return tuple(names[t] for t in types)


def _sliding(hf: dict, model_type: str, layers: int) -> tuple[Optional[int], tuple[str, ...]]:
    """(sliding_window, layer_types) as transformers applies them for this family."""
    if model_type == "llama":  # LlamaModel ignores sliding_window / layer_types
        return None, ()
    if model_type == "mistral":
        window = hf.get("sliding_window", 4096)  # MistralConfig's default; explicit null = no window
        layer_types = _layer_types(hf, layers)
    else:  # qwen2 / qwen3
        if not hf.get("use_sliding_window", False):
            return None, ()
        window = hf.get("sliding_window")
        layer_types = _layer_types(hf, layers)
        if not layer_types:
            max_window = int(hf.get("max_window_layers", 28))  # transformers' default
            layer_types = tuple("sliding" if i >= max_window else "full" for i in range(layers))
    if window is None or (layer_types and "sliding" not in layer_types):
        return None, ()
    if layer_types and all(t == "sliding" for t in layer_types):
        layer_types = ()  # every layer slides: the plain sliding_window form
    return int(window), layer_types


def _llama_like_fields(hf: dict, model_type: str) -> dict:
    hidden = int(_require(hf, "hidden_size"))
    heads = int(_require(hf, "num_attention_heads"))
    layers = int(_require(hf, "num_hidden_layers"))
    if hf.get("pretraining_tp", 1) not in (1, None):
        raise UnsupportedModelError(f"config.json: pretraining_tp={hf['pretraining_tp']} is not supported (use 1)")
    attention_bias = bool(hf.get("attention_bias", False))
    qkv_bias, o_bias = {
        "llama": (attention_bias, attention_bias),
        "mistral": (False, False),
        "qwen2": (True, False),
        "qwen3": (attention_bias, attention_bias),
    }[model_type]
    sliding_window, layer_types = _sliding(hf, model_type, layers)
    # transformers' per-family defaults when config.json omits head_dim
    head_dim = hf.get("head_dim") or (128 if model_type == "qwen3" else hidden // heads)
    return dict(
        vocab_size=int(_require(hf, "vocab_size")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        intermediate_size=int(_require(hf, "intermediate_size")),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mlp="gated",
        activation=_activation(hf, "hidden_act", "silu"),
        position="rope",
        rope=_rope(hf),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=sliding_window,
        layer_types=layer_types,
    )


def _gpt2_fields(hf: dict) -> dict:
    _refuse_flags(hf, "GPT-2", (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True)))
    hidden = int(_require(hf, "n_embd"))
    return dict(
        **_learned_position_mha(hidden, int(_require(hf, "n_head"))),
        vocab_size=int(_require(hf, "vocab_size")),
        num_layers=int(_require(hf, "n_layer")),
        intermediate_size=int(hf.get("n_inner") or 4 * hidden),
        max_position_embeddings=int(_require(hf, "n_positions")),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        activation=_activation(hf, "activation_function", "gelu_new"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _refuse_flags(hf: dict, name: str, flags: tuple[tuple[str, bool], ...], why: str = "") -> None:
    """Refuse a config whose boolean ``flags`` differ from the values jaxtune reproduces."""
    for key, ok in flags:
        if bool(hf.get(key, ok)) != ok:
            raise UnsupportedModelError(f"config.json: {name} with {key}={hf[key]} is not supported{why}")


def _learned_position_mha(hidden: int, heads: int) -> dict:
    """The fields GPT-2 and BERT share: multi-head attention with biases, learned absolute positions,
    LayerNorm and a plain (two-matrix) MLP with biases."""
    return dict(hidden_size=hidden, num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads, norm="layernorm",
                mlp="plain", position="learned", qkv_bias=True, o_bias=True, mlp_bias=True)


def _bert_fields(hf: dict) -> dict:
    _refuse_flags(hf, "BERT", (("is_decoder", False), ("add_cross_attention", False)), " (an encoder only)")
    position = hf.get("position_embedding_type", "absolute")
    if position not in (None, "absolute"):
        raise UnsupportedModelError(f"config.json: BERT with position_embedding_type={position!r} is not supported "
                                    "(absolute)")
    hidden = int(_require(hf, "hidden_size"))
    heads = int(_require(hf, "num_attention_heads"))
    if hidden % heads:
        raise UnsupportedModelError(f"config.json: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    return dict(
        **_learned_position_mha(hidden, heads),
        vocab_size=int(_require(hf, "vocab_size")),
        num_layers=int(_require(hf, "num_hidden_layers")),
        intermediate_size=int(_require(hf, "intermediate_size")),
        max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        norm_placement="post",
        activation=_activation(hf, "hidden_act", "gelu"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        causal=False,
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
        lm_head_transform=True,
        lm_head_bias=True,
        pooler=True,
    )


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _eos_out(cfg: ModelConfig):
    if not cfg.eos_token_id:
        return None
    return cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else list(cfg.eos_token_id)


def to_hf_config(cfg: ModelConfig, torch_dtype: str = "float32", *, architecture: Optional[str] = None,
                 num_labels: Optional[int] = None) -> dict[str, Any]:
    """A config.json dict that transformers' AutoModelForCausalLM (BERT: the Auto class of
    ``architecture``, one of `BERT_ARCHITECTURES`; ``num_labels`` for a sequence classifier) loads as
    the same model."""
    if cfg.family == "bert":
        return _bert_config(cfg, torch_dtype, architecture or ARCHITECTURES["bert"], num_labels)
    if not cfg.causal:
        raise UnsupportedModelError(
            f"ModelConfig cannot be exported as a Hugging Face {cfg.family!r} model: it has causal=False "
            "(bidirectional attention, e.g. trained with a masked-LM objective), and the Hugging Face "
            f"{ARCHITECTURES[cfg.family]} architecture always applies a causal mask"
        )
    common = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": _eos_out(cfg),
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
    if cfg.family == "gpt2":
        return {
            **common,
            "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
            "n_inner": cfg.intermediate_size, "n_positions": cfg.max_position_embeddings,
            "n_ctx": cfg.max_position_embeddings, "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": _ACTIVATIONS_OUT[cfg.activation],
        }
    rope = {"rope_type": cfg.rope.kind, "rope_theta": cfg.rope.theta}
    if cfg.rope.kind == "linear":
        rope["factor"] = cfg.rope.factor
    if cfg.rope.kind == "llama3":
        rope.update(factor=cfg.rope.factor, low_freq_factor=cfg.rope.low_freq_factor,
                    high_freq_factor=cfg.rope.high_freq_factor,
                    original_max_position_embeddings=cfg.rope.original_max_position)
    out = {
        **common,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_eps,
        "hidden_act": _ACTIVATIONS_OUT[cfg.activation],
        "rope_theta": cfg.rope.theta,
        "rope_scaling": None if cfg.rope.kind == "default" else dict(rope),
        "rope_parameters": rope,
    }
    if cfg.family in ("llama", "qwen3"):
        out["attention_bias"] = cfg.qkv_bias
    if cfg.family == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    layer_types = cfg.layer_types or ("sliding" if cfg.sliding_window else "full",) * cfg.num_layers
    out["sliding_window"] = cfg.sliding_window
    if cfg.family in ("qwen2", "qwen3"):
        out["use_sliding_window"] = cfg.sliding_window is not None
        out["max_window_layers"] = next((i for i, t in enumerate(layer_types) if t == "sliding"), cfg.num_layers)
    if cfg.family != "mistral" or cfg.layer_types:
        out["layer_types"] = [{"full": "full_attention", "sliding": "sliding_attention"}[t] for t in layer_types]
    return out


def _bert_config(cfg: ModelConfig, torch_dtype: str, architecture: str, num_labels: Optional[int]) -> dict[str, Any]:
    if architecture not in BERT_ARCHITECTURES:
        raise UnsupportedModelError(f"BERT export: unknown architecture {architecture!r} ({' | '.join(BERT_ARCHITECTURES)})")
    if cfg.causal:
        raise UnsupportedModelError("ModelConfig cannot be exported as a Hugging Face 'bert' model: it has causal=True, "
                                    "and BERT always attends both ways")
    out = {
        "architectures": [architecture], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size, "hidden_act": _ACTIVATIONS_OUT[cfg.activation],
        "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps, "initializer_range": cfg.initializer_range, "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings, "position_embedding_type": "absolute",
        "torch_dtype": torch_dtype, "dtype": torch_dtype,
    }
    if architecture == "BertForSequenceClassification":
        if not num_labels:
            raise UnsupportedModelError("BertForSequenceClassification export needs num_labels (the score head's outputs)")
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        if num_labels == 1:
            out["problem_type"] = "regression"
    return out


_NON_ARCHITECTURE = ("param_dtype", "dtype", "attention_impl", "initializer_range")


def check_expressible(cfg: ModelConfig, **export) -> dict[str, Any]:
    """to_hf_config(cfg, **export), after checking transformers would rebuild exactly this architecture."""
    if cfg.family == "llama" and cfg.hidden_size % cfg.num_heads:
        raise UnsupportedModelError(
            f"ModelConfig cannot be exported as a Hugging Face 'llama' model: transformers requires hidden_size "
            f"({cfg.hidden_size}) to be a multiple of num_heads ({cfg.num_heads}); use family 'qwen3' for free head_dim"
        )
    hf = to_hf_config(cfg, **export)
    back = from_hf_config(hf, **{k: getattr(cfg, k) for k in _NON_ARCHITECTURE})
    if back != cfg:
        diffs = [f.name for f in cfg.__dataclass_fields__.values() if getattr(cfg, f.name) != getattr(back, f.name)]
        raise UnsupportedModelError(
            f"ModelConfig cannot be exported as a Hugging Face {cfg.family!r} model: fields {diffs} "
            "have no equivalent there"
        )
    return hf
