"""Hugging Face safetensors checkpoints <-> jaxtune parameter trees.

`load_hf(dir)` reads config.json and model.safetensors (or sharded
``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``) with
no pickle and no network; `save_hf(params, cfg, dir)` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads. Missing,
unexpected or mis-shaped tensors raise `CheckpointMismatchError` naming them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import jax
import numpy as np
from safetensors.numpy import save_file

from jaxtune.interop.hf_config import check_expressible, from_hf_config
from jaxtune.interop.hf_quant import companion_names, read_quantized_kernel
from jaxtune.interop.safe_files import inside_directory, read_tensor, tensor_names
from jaxtune.models import Model, ModelConfig
from jaxtune.models.heads import NSP, SCORE, HeadSpec, head_template
from jaxtune.utils.tree import get_path, path_str, set_path

SAFE_INDEX = "model.safetensors.index.json"
# Buffers some transformers versions saved that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", "embeddings.position_ids",
                     # BERT's decoder bias is cls.predictions.bias (older checkpoints saved both)
                     "cls.predictions.decoder.bias")
# Output projections a tied checkpoint may still hold (a copy of the input embedding)
_TIED_COPIES = ("lm_head.weight", "cls.predictions.decoder.weight")


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the model its config describes."""


@dataclass(frozen=True)
class TensorMap:
    """One Hugging Face tensor and the jaxtune leaves it becomes."""

    hf_name: str
    paths: tuple[tuple[str, ...], ...]
    to_jax: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]
    linear: bool = False  # an nn.Linear weight [out, in] (may be saved quantized by bitsandbytes)
    # "": part of every checkpoint of the family; otherwise the part of the model it belongs to, which
    # some architectures lack (BERT: "pooler", "mlm" head; the "nsp" and "score" heads)
    part: str = ""


def _copy(hf_name, path, part=""):
    return TensorMap(hf_name, (path,), lambda t: (t,), lambda t: t, part=part)


def _transposed(hf_name, path, part=""):
    """torch nn.Linear stores [out, in]; jaxtune kernels are [in, out]."""
    return TensorMap(hf_name, (path,), lambda t: (np.ascontiguousarray(t.T),), lambda t: np.ascontiguousarray(t.T),
                     linear=True, part=part)


def _dense(hf, path, part=""):
    """An nn.Linear with bias: ``{hf}.weight`` / ``{hf}.bias`` <-> ``path/kernel`` / ``path/bias``."""
    return [_transposed(f"{hf}.weight", path + ("kernel",), part), _copy(f"{hf}.bias", path + ("bias",), part)]


def _layer_norm(hf, path, part=""):
    return [_copy(f"{hf}.weight", path + ("scale",), part), _copy(f"{hf}.bias", path + ("bias",), part)]


def _split_last(hf_name, paths):
    """GPT-2's fused c_attn: [..., 3*embed] <-> q, k, v along the last axis."""
    n = len(paths)
    return TensorMap(hf_name, paths, lambda t: tuple(np.split(t, n, axis=-1)), lambda *ts: np.concatenate(ts, -1))


def tensor_maps(cfg: ModelConfig, parts: Optional[Iterable[str]] = None) -> list[TensorMap]:
    """The complete name mapping for a model of this config (HF -> jaxtune paths). BERT: the
    encoder and the optional ``parts`` (default: what `Model.init` builds, the pooler and the MLM head;
    `BERT_PARTS` names the parts of each Hugging Face architecture)."""
    if cfg.family == "bert":
        return _bert_maps(cfg, ("pooler", "mlm") if parts is None else tuple(parts))
    return _gpt2_maps(cfg) if cfg.family == "gpt2" else _llama_like_maps(cfg)


BERT_PARTS = {
    "BertForMaskedLM": ("mlm",),
    "BertForPreTraining": ("pooler", "mlm", "nsp"),
    "BertForSequenceClassification": ("pooler", "score"),
}
INIT_PARTS = ("pooler", "mlm")  # BERT parts `Model.init` builds: a checkpoint without them gets fresh ones


def _bert_maps(cfg: ModelConfig, parts: tuple[str, ...]) -> list[TensorMap]:
    e = "bert.embeddings"
    maps = [
        _copy(f"{e}.word_embeddings.weight", ("embed", "embedding")),
        _copy(f"{e}.position_embeddings.weight", ("pos_embed", "embedding")),
        _copy(f"{e}.token_type_embeddings.weight", ("type_embed", "embedding")),
        *_layer_norm(f"{e}.LayerNorm", ("embed_norm",)),
    ]
    for i in range(cfg.num_layers):
        hf, jx = f"bert.encoder.layer.{i}", f"layers_{i}"
        for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            maps += _dense(f"{hf}.attention.self.{name}", (jx, "attn", proj))
        maps += [*_dense(f"{hf}.attention.output.dense", (jx, "attn", "o_proj")),
                 *_layer_norm(f"{hf}.attention.output.LayerNorm", (jx, "attn_norm")),
                 *_dense(f"{hf}.intermediate.dense", (jx, "mlp", "up_proj")),
                 *_dense(f"{hf}.output.dense", (jx, "mlp", "down_proj")),
                 *_layer_norm(f"{hf}.output.LayerNorm", (jx, "mlp_norm"))]
    if "pooler" in parts:
        maps += _dense("bert.pooler.dense", ("pooler",), "pooler")
    if "mlm" in parts:
        maps += [*_dense("cls.predictions.transform.dense", ("lm_head", "transform"), "mlm"),
                 *_layer_norm("cls.predictions.transform.LayerNorm", ("lm_head", "transform_norm"), "mlm"),
                 _copy("cls.predictions.bias", ("lm_head", "bias"), "mlm")]
        if not cfg.tie_word_embeddings:
            maps.append(_transposed("cls.predictions.decoder.weight", ("lm_head", "kernel"), "mlm"))
    if "nsp" in parts:
        maps += _dense("cls.seq_relationship", (NSP,), "nsp")
    if "score" in parts:
        maps += _dense("classifier", (SCORE,), "score")
    return maps


def bert_architecture(params: dict) -> str:
    """The Hugging Face architecture that holds a BERT param tree's heads: a score head ->
    BertForSequenceClassification, an NSP head -> BertForPreTraining, else BertForMaskedLM."""
    if SCORE in params:
        return "BertForSequenceClassification"
    return "BertForPreTraining" if NSP in params else "BertForMaskedLM"


def _checkpoint_heads(cfg: ModelConfig, names: set[str]) -> tuple[str, ...]:
    """The head parts a checkpoint holds besides what `Model.init` builds (BERT's NSP / classifier)."""
    if cfg.family != "bert":
        return ()
    return tuple(p for p, name in (("nsp", "cls.seq_relationship.weight"), ("score", "classifier.weight"))
                 if name in names)


def _llama_like_maps(cfg: ModelConfig) -> list[TensorMap]:
    maps = [_copy("model.embed_tokens.weight", ("embed", "embedding"))]
    for i in range(cfg.num_layers):
        hf, jx = f"model.layers.{i}", f"layers_{i}"
        maps.append(_copy(f"{hf}.input_layernorm.weight", (jx, "attn_norm", "scale")))
        maps.append(_copy(f"{hf}.post_attention_layernorm.weight", (jx, "mlp_norm", "scale")))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            maps.append(_transposed(f"{hf}.self_attn.{proj}.weight", (jx, "attn", proj, "kernel")))
            if (cfg.o_bias if proj == "o_proj" else cfg.qkv_bias):
                maps.append(_copy(f"{hf}.self_attn.{proj}.bias", (jx, "attn", proj, "bias")))
        if cfg.qk_norm:
            maps.append(_copy(f"{hf}.self_attn.q_norm.weight", (jx, "attn", "q_norm", "scale")))
            maps.append(_copy(f"{hf}.self_attn.k_norm.weight", (jx, "attn", "k_norm", "scale")))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            maps.append(_transposed(f"{hf}.mlp.{proj}.weight", (jx, "mlp", proj, "kernel")))
            if cfg.mlp_bias:
                maps.append(_copy(f"{hf}.mlp.{proj}.bias", (jx, "mlp", proj, "bias")))
    maps.append(_copy("model.norm.weight", ("final_norm", "scale")))
    if not cfg.tie_word_embeddings:
        maps.append(_transposed("lm_head.weight", ("lm_head", "kernel")))
    return maps


def _gpt2_maps(cfg: ModelConfig) -> list[TensorMap]:
    maps = [
        _copy("transformer.wte.weight", ("embed", "embedding")),
        _copy("transformer.wpe.weight", ("pos_embed", "embedding")),
    ]
    for i in range(cfg.num_layers):
        hf, jx = f"transformer.h.{i}", f"layers_{i}"
        qkv = tuple((jx, "attn", p) for p in ("q_proj", "k_proj", "v_proj"))
        maps += [
            _copy(f"{hf}.ln_1.weight", (jx, "attn_norm", "scale")),
            _copy(f"{hf}.ln_1.bias", (jx, "attn_norm", "bias")),
            _split_last(f"{hf}.attn.c_attn.weight", tuple(p + ("kernel",) for p in qkv)),
            _split_last(f"{hf}.attn.c_attn.bias", tuple(p + ("bias",) for p in qkv)),
            # GPT-2's Conv1D already stores [in, out]: no transpose.
            _copy(f"{hf}.attn.c_proj.weight", (jx, "attn", "o_proj", "kernel")),
            _copy(f"{hf}.attn.c_proj.bias", (jx, "attn", "o_proj", "bias")),
            _copy(f"{hf}.ln_2.weight", (jx, "mlp_norm", "scale")),
            _copy(f"{hf}.ln_2.bias", (jx, "mlp_norm", "bias")),
            _copy(f"{hf}.mlp.c_fc.weight", (jx, "mlp", "up_proj", "kernel")),
            _copy(f"{hf}.mlp.c_fc.bias", (jx, "mlp", "up_proj", "bias")),
            _copy(f"{hf}.mlp.c_proj.weight", (jx, "mlp", "down_proj", "kernel")),
            _copy(f"{hf}.mlp.c_proj.bias", (jx, "mlp", "down_proj", "bias")),
        ]
    maps += [_copy("transformer.ln_f.weight", ("final_norm", "scale")),
             _copy("transformer.ln_f.bias", ("final_norm", "bias"))]
    if not cfg.tie_word_embeddings:
        maps.append(_transposed("lm_head.weight", ("lm_head", "kernel")))
    return maps


class SafetensorsReader:
    """Read-only view of every tensor in a checkpoint directory (single file or sharded)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / SAFE_INDEX
        if index.exists():
            self.files = {name: self._shard(index, name, entry) for name, entry in read_index(index).items()}
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                pickled = [p.name for p in self.directory.glob("*.bin")] + [p.name for p in self.directory.glob("*.pt*")]
                hint = f" (found {pickled}: pickle checkpoints are refused; re-save with safe_serialization)" if pickled else ""
                raise FileNotFoundError(f"{self.directory}: no *.safetensors files{hint}")
            self.files = {}
            for f in files:
                if not inside_directory(self.directory, f):
                    raise ValueError(f"{f}: a link to {f.resolve()}, outside {self.directory}; jaxtune loads only "
                                     "files inside the model directory")
                for name in tensor_names(f):
                    if name in self.files:
                        raise CheckpointMismatchError(f"tensor {name!r} appears in both {self.files[name].name} and {f.name}")
                    self.files[name] = f

    def _shard(self, index: Path, name: str, entry: str) -> Path:
        """The file an index's weight_map entry names: a relative path inside the directory."""
        path = self.directory / entry
        if Path(entry).is_absolute() or ".." in Path(entry).parts or not inside_directory(self.directory, path):
            raise ValueError(f"{index}: weight_map entry {name!r}: {entry!r} lies outside {self.directory}; jaxtune "
                             "loads only files inside the model directory")
        if not path.is_file():
            raise FileNotFoundError(f"{index}: weight_map entry {name!r}: no file {entry!r} in {self.directory}")
        return path

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> np.ndarray:
        """One tensor, checked to be finite (NaN / inf raise naming the file and the tensor)."""
        return read_tensor(self.files[name], name)


def read_index(index: Path) -> dict[str, str]:
    """``weight_map`` of a ``model.safetensors.index.json``: {tensor name: shard file}."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{index}: not a safetensors index ({err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
    return weight_map


def _bare_model_prefix(names: set[str], maps: list[TensorMap]) -> str:
    """Checkpoints of the bare model (LlamaModel, GPT2Model) lack the 'model.' / 'transformer.'
    prefix; return the prefix to strip from our names ('' for a full *ForCausalLM checkpoint)."""
    embed = maps[0].hf_name
    prefix = embed.split(".")[0] + "."
    return prefix if embed not in names and embed[len(prefix):] in names else ""


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(config).__name__}")
    return config


def load_hf(directory: str | os.PathLike, *, param_dtype: str = "float32", dtype: Optional[str] = None,
            **overrides) -> tuple[dict, ModelConfig]:
    """Load a local Hugging Face checkpoint -> (params, cfg). No pickle, no network."""
    cfg = from_hf_config(read_config(directory), param_dtype=param_dtype, dtype=dtype or param_dtype, **overrides)
    reader = SafetensorsReader(directory)
    params = params_from_tensors(reader.names(), reader.get, cfg, source=str(directory))
    return params, cfg


def params_from_tensors(names: set[str], get: Callable[[str], np.ndarray], cfg: ModelConfig, *, source: str = "checkpoint") -> dict:
    """Assemble the jaxtune param tree from named HF tensors, checking names and shapes. BERT: the
    NSP / classifier heads a checkpoint holds become the `NSP` / `SCORE` heads; a pooler or MLM head
    it lacks (BertForMaskedLM has no pooler, BertForSequenceClassification no MLM head) is freshly
    initialised, as transformers does, and named on stderr."""
    heads = _checkpoint_heads(cfg, names)
    maps = tensor_maps(cfg, INIT_PARTS + heads) if cfg.family == "bert" else tensor_maps(cfg)
    strip = _bare_model_prefix(names, maps)
    expected = dict(jax.eval_shape(Model(cfg).init, jax.random.key(0)))
    if "nsp" in heads:
        expected[NSP] = head_template(HeadSpec(NSP, outputs=2), cfg)
    if "score" in heads:
        expected[SCORE] = head_template(HeadSpec(SCORE, outputs=int(np.prod(get("classifier.bias").shape))), cfg)
    params: dict = {}
    used: set[str] = set()
    missing, fresh = [], []
    for m in maps:
        name = m.hf_name[len(strip):] if strip and m.hf_name.startswith(strip) else m.hf_name
        if name not in names:
            (fresh if m.part in INIT_PARTS else missing).append(m)
            continue
        used.add(name)
        extra = companion_names(name, names)
        if extra:  # saved quantized by bitsandbytes: keep the bytes as they are
            if not m.linear:
                raise CheckpointMismatchError(f"{source}: {name} is saved quantized ({extra[0]}), which jaxtune reads "
                                              f"for nn.Linear kernels only, not for {cfg.family}'s {name}")
            want = get_path(expected, m.paths[0])
            set_path(params, m.paths[0], read_quantized_kernel(name, names, get, tuple(want.shape), source))
            used.update(extra)
            continue
        for path, value in zip(m.paths, m.to_jax(get(name))):
            want = get_path(expected, path)
            if tuple(value.shape) != tuple(want.shape):
                raise CheckpointMismatchError(
                    f"{source}: tensor {name!r} -> {path_str(path)} has shape {tuple(value.shape)}, "
                    f"config.json implies {tuple(want.shape)}"
                )
            set_path(params, path, jax.numpy.asarray(value, dtype=cfg.weight_dtype))
    if missing:
        missing = [m.hf_name for m in missing]
        raise CheckpointMismatchError(f"{source}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if fresh:
        init = Model(cfg).init(jax.random.key(0))
        for m in fresh:
            for path in m.paths:
                set_path(params, path, get_path(init, path))
        print(f"{source}: no {', '.join(sorted({m.part for m in fresh}))} weights in the checkpoint "
              f"({', '.join(m.hf_name for m in fresh[:3])}{' ...' if len(fresh) > 3 else ''}): newly initialised "
              "(seed 0), as transformers does", file=sys.stderr)
    unexpected = sorted(n for n in names - used if not n.endswith(_IGNORED_SUFFIXES) and not (cfg.tie_word_embeddings and n in _TIED_COPIES))
    if unexpected:
        raise CheckpointMismatchError(
            f"{source}: unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
            f"(not part of a {cfg.family} model with this config.json)"
        )
    return params


def hf_tensors(params: dict, cfg: ModelConfig, dtype: Optional[str] = None, *,
               architecture: Optional[str] = None) -> dict[str, np.ndarray]:
    """The HF-named tensors of a plain (merged, unquantized) param tree (BERT: of ``architecture``,
    default `bert_architecture`)."""
    out = {}
    parts = BERT_PARTS[architecture or bert_architecture(params)] if cfg.family == "bert" else None
    for m in tensor_maps(cfg, parts):
        leaves = []
        for path in m.paths:
            leaf = get_path(params, path, missing_ok=True)
            if leaf is None:
                raise CheckpointMismatchError(f"params: missing leaf {path_str(path)} needed for {m.hf_name!r}")
            if not isinstance(leaf, (jax.Array, np.ndarray)):
                raise TypeError(
                    f"params: leaf {path_str(path)} is a {type(leaf).__name__}, not an array; merge adapters "
                    "or dequantize before exporting to Hugging Face format"
                )
            leaves.append(np.asarray(jax.device_get(leaf)))
        tensor = m.to_hf(*leaves)
        out[m.hf_name] = np.ascontiguousarray(tensor.astype(jax.numpy.dtype(dtype)) if dtype else tensor)
    return out


def save_hf(params: dict, cfg: ModelConfig, directory: str | os.PathLike, *, dtype: Optional[str] = None,
            max_shard_bytes: int = 5 * 2**30, overwrite: bool = False, architecture: Optional[str] = None) -> Path:
    """Write config.json + safetensors (sharded above max_shard_bytes) that transformers loads.
    BERT: as ``architecture`` (`BERT_ARCHITECTURES`; default from the heads, `bert_architecture`)."""
    export = {}
    if cfg.family == "bert":
        architecture = architecture or bert_architecture(params)
        if architecture not in BERT_PARTS:
            raise ValueError(f"architecture {architecture!r}: BERT exports as {' | '.join(BERT_PARTS)}")
        export = {"architecture": architecture}
        if architecture == "BertForSequenceClassification":
            if SCORE not in params:
                raise ValueError("BertForSequenceClassification export: the params have no score head")
            export["num_labels"] = int(np.shape(params[SCORE]["bias"])[0])
    elif architecture is not None:
        raise ValueError(f"architecture={architecture!r} is for BERT exports; a {cfg.family} model has one architecture")
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty (pass overwrite=True to replace its files; "
                              "the CLI's flag is --overwrite)")
    tensors = hf_tensors(params, cfg, dtype, architecture=architecture)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("*.safetensors"), directory / SAFE_INDEX, directory / "config.json"]:
        stale.unlink(missing_ok=True)  # overwrite=True: no shard of an earlier export may survive
    torch_dtype = str(np.dtype(next(iter(tensors.values())).dtype)) if dtype is None else dtype
    hf_config = check_expressible(cfg, **export)
    hf_config["torch_dtype"] = hf_config["dtype"] = torch_dtype
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    shards = list(_shard(tensors, max_shard_bytes))
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in shard})
    total = sum(t.nbytes for t in tensors.values())
    (directory / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return directory


def _shard(tensors: dict[str, np.ndarray], max_bytes: int) -> Iterable[dict[str, np.ndarray]]:
    shard, size = {}, 0
    for name, t in tensors.items():
        if shard and size + t.nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = t
        size += t.nbytes
    if shard:
        yield shard
