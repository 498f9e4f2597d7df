"""Turn a `ModelSource` (config) into (params, ModelConfig, directory) from any supported origin."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import jax

from jaxtune.checkpoint import restore_params, restore_train_params
from jaxtune.checkpoint.manager import TRAIN_META_FILE
from jaxtune.checkpoint.params import PARAMS_DIR
from jaxtune.config.loader import from_dict
from jaxtune.config.schema import ModelSource
from jaxtune.interop.hf_weights import load_hf
from jaxtune.models import Model, ModelConfig
from jaxtune.models.presets import preset
from jaxtune.peft.config import PeftConfig, apply_peft, for_restore
from jaxtune.quant.weight import QuantConfig, quantize


def load_model(source: ModelSource) -> tuple[Any, ModelConfig, Optional[Path]]:
    """-> (params, cfg, directory) from the source, its kernels quantized by ``source.quant`` and
    ``source.adapter`` (a PEFT adapter directory) put on when given."""
    params, cfg, directory = _load_weights(source)
    if source.quant is not None and not _run_quantized(source, params):
        params = quantize(params, source.quant)
    if source.adapter is not None:
        from jaxtune.interop.adapters import load_adapter

        params = load_adapter(params, cfg, source.adapter)
    return params, cfg, directory


def _run_quantized(source: ModelSource, params: Any) -> bool:
    """Whether ``source`` is a training run whose base was already quantized by ``source.quant`` (a
    QLoRA run restored with its own recipe); a different quantization is refused, not stacked."""
    if source.checkpoint is None:
        return False
    meta = _train_meta(Path(source.checkpoint))
    recorded = _base_quant(meta, Path(source.checkpoint))
    if recorded is None:
        return False
    if recorded != source.quant:
        raise ValueError(f"model.quant {source.quant} differs from the quantization the run at {source.checkpoint} "
                         f"trained on ({recorded}, from {TRAIN_META_FILE}); leave model.quant unset to restore it as trained")
    return True


def _load_weights(source: ModelSource) -> tuple[Any, ModelConfig, Optional[Path]]:
    numerics = source.numerics
    if source.hf_dir is not None:
        params, cfg = load_hf(source.hf_dir, **numerics)
        return params, cfg, Path(source.hf_dir)
    if source.checkpoint is not None:
        # A params checkpoint (params/ beside model_config.json) or a training run's directory
        # (numbered steps; the newest readable one is used).
        if (Path(source.checkpoint) / PARAMS_DIR).is_dir():
            params, cfg = restore_params(source.checkpoint, **numerics)
        else:
            meta = _train_meta(Path(source.checkpoint))
            peft = _peft_config(meta, Path(source.checkpoint))
            quant = _base_quant(meta, Path(source.checkpoint))
            head = _head(meta, numerics)
            transform = None
            if peft is not None or quant is not None or head is not None:
                def transform(p, c):  # the tree the run trained: quantized base, then PEFT, then a score head
                    p = p if quant is None else quantize(p, quant)
                    p = p if peft is None else apply_peft(p, peft, model_cfg=c)
                    return p if head is None else head(p)
            base = _frozen_base(Path(source.checkpoint), source, meta, peft)
            if base is not None and head is not None:
                base = head(base)
            params, cfg, _ = restore_train_params(source.checkpoint, base_params=base, transform=transform, **numerics)
        return params, cfg, Path(source.checkpoint)
    cfg = (preset(source.preset) if source.preset is not None else source.config).replace(**numerics)
    # jitted, as the training loop builds it, so a run's frozen base is re-created bit for bit
    return jax.jit(Model(cfg).init)(jax.random.key(source.init_seed)), cfg, None


def _train_meta(directory: Path) -> dict:
    meta_path = directory / TRAIN_META_FILE
    return json.loads(meta_path.read_text()) if meta_path.exists() else {}


def _peft_config(meta: dict, directory: Path) -> Optional[PeftConfig]:
    """The PEFT transform a run trained under (from its train_meta.json), or None."""
    if not meta.get("peft"):
        return None
    return for_restore(from_dict(PeftConfig, meta["peft"], prefix=f"{directory / TRAIN_META_FILE}: peft"))


def _head(meta: dict, numerics: Optional[dict] = None):
    """``params -> params`` adding the run's classification / reward head (None without one); its
    values come from the checkpoint, so zeros here only give the structure."""
    spec = meta.get("head")
    if not spec:
        return None
    from jaxtune.train.classify import HEAD

    key = spec.get("key", HEAD)
    if key == "value_model":  # PPO's separate value network: its own architecture, from the meta
        from jaxtune.align.ppo import value_network

        vcfg = from_dict(ModelConfig, spec["model_config"], prefix=f"{TRAIN_META_FILE}: head.model_config")
        vcfg = vcfg.replace(**(numerics or {}))  # restored with the policy's numerics (a changed param_dtype casts)
        shape = jax.eval_shape(lambda: value_network(Model(vcfg).init(jax.random.key(0)), vcfg, jax.random.key(0)))
        return lambda p: {**p, key: jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype), shape)}

    def add(p):
        dtype = p["embed"]["embedding"].dtype
        hidden = p["embed"]["embedding"].shape[-1]
        n = int(spec["num_labels"])
        return {**p, key: {"kernel": jax.numpy.zeros((hidden, n), dtype), "bias": jax.numpy.zeros((n,), dtype)}}

    return add


def _base_quant(meta: dict, directory: Path) -> Optional[QuantConfig]:
    """The quantization of a run's base model (QLoRA), from its train_meta.json, or None."""
    quant = (meta.get("base") or {}).get("quant")
    return None if not quant else from_dict(QuantConfig, quant, prefix=f"{directory / TRAIN_META_FILE}: base.quant")


def _frozen_base(directory: Path, source: ModelSource, meta: dict, peft: Optional[PeftConfig]) -> Optional[Any]:
    """The frozen half's source for a training run whose checkpoints hold only the trainable
    half: its base model (loaded from the reference in train_meta.json), with the run's PEFT
    transform applied; None for runs that trained everything."""
    if (meta.get("trainable") is None and peft is None) or meta.get("base") is None:
        return None
    base_source = from_dict(ModelSource, meta["base"], prefix=f"{directory / TRAIN_META_FILE}: base")
    base_source = dataclasses.replace(base_source, **source.numerics)
    params, cfg, _ = load_model(base_source)
    return params if peft is None else apply_peft(params, peft, model_cfg=cfg)
