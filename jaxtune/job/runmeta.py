"""Run metadata: the JSON files beside a run's (or a params checkpoint's) Orbax steps that explain it.

    model_config.json   the ModelConfig of the model trained / saved (jaxtune's, not Hugging Face's)
    train_meta.json     a training run's job: ``job`` (the whole config), ``base`` (where the base
                        weights come from: the frozen half of a PEFT run is rebuilt from it),
                        ``trainable`` (train.trainable patterns), ``peft`` (the peft section of a
                        PEFT run), ``head`` (``key``, ``num_labels``, ``pooling``, ``kind`` and, for
                        a separate value network, its ``model_config``), ``base_checksums`` (of
                        the frozen half: a resumed run must be on the same base weights)

This module writes, reads and validates them; everything else asks it. Writes are atomic (a
reader on another host never sees a partial file) and happen only once a run really starts.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional

import jax
from etils import epath

from jaxtune.config.loader import from_dict, to_dict
from jaxtune.job.explain import config_changes
from jaxtune.job.schema import ModelSource, TrainJobConfig
from jaxtune.models.config import ModelConfig
from jaxtune.models.heads import SCORE, VALUE_MODEL, HeadSpec
from jaxtune.peft.config import PeftConfig, for_restore
from jaxtune.quant.weight import QuantConfig
from jaxtune.utils.fingerprint import leaf_checksums, mismatches

MODEL_CONFIG_FILE = "model_config.json"
TRAIN_META_FILE = "train_meta.json"
NUMERICS = ("param_dtype", "dtype", "attention_impl", "remat", "mlp_chunk_tokens")  # may change between runs of one model
MATCH_ON_RESUME = ("trainable", "peft", "head")  # train_meta keys a resumed run must keep
BASE_CHECKSUMS = "base_checksums"  # train_meta key: the frozen half's checksums when the run started


def _path(directory: str | os.PathLike) -> epath.Path:
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def read_model_config(directory: str | os.PathLike) -> ModelConfig:
    path = _path(directory) / MODEL_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no {MODEL_CONFIG_FILE} (not a jaxtune checkpoint)")
    return from_dict(ModelConfig, json.loads(path.read_text()), prefix=str(path))


def saved_job(directory: str | os.PathLike) -> Optional[dict]:
    """The job a run was started with (its config as plain data), or None."""
    return read_train_meta(directory).get("job")


def read_train_meta(directory: str | os.PathLike) -> dict:
    """The run's train_meta.json ({} for a params checkpoint or a run without one)."""
    path = _path(directory) / TRAIN_META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def run_meta(job: TrainJobConfig, head: Optional[HeadSpec]) -> dict:
    """The train_meta.json of a run of ``job`` whose objective adds ``head``."""
    head_meta = None
    if head is not None:
        head_meta = {"kind": job.objective.kind, "num_labels": head.outputs, "pooling": head.pooling, "key": head.key}
        if head.model_config is not None:
            head_meta["model_config"] = to_dict(head.model_config)
    return {"job": to_dict(job), "base": to_dict(job.model),
            "trainable": None if job.train.trainable is None else list(job.train.trainable),
            "peft": to_dict(job.peft) if job.peft.active else None, "head": head_meta}


def check_resumable(directory: str | os.PathLike, cfg: ModelConfig, meta: dict) -> None:
    """Refuse (before anything is written) to resume a run of another model or another
    trainable/frozen split: its steps would fail to restore and its config would be lost. Steps
    without the model_config.json that says what they are are refused too."""
    directory = _path(directory)
    path = directory / MODEL_CONFIG_FILE
    if not path.exists():
        raise ValueError(f"checkpoint.directory {directory} holds checkpoint steps but no {MODEL_CONFIG_FILE}, so "
                         "what they are a run of is unknown; restore that file or use a new directory")
    old, new = json.loads(path.read_text()), to_dict(cfg)
    changed = sorted(k for k in set(old) | set(new) if k not in NUMERICS and old.get(k) != new.get(k))
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise ValueError(f"checkpoint.directory {directory} holds a run of another model ({detail}); "
                         "use a new directory or the same model")
    old_meta = read_train_meta(directory)
    for key in MATCH_ON_RESUME:
        if key in old_meta and key in meta and old_meta[key] != meta[key]:
            changes = config_changes({key: old_meta[key]}, {key: meta[key]})
            detail = ", ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in changes[:8])
            more = f" and {len(changes) - 8} more" if len(changes) > 8 else ""
            raise ValueError(f"checkpoint.directory {directory} was trained with other {key} settings ({detail}{more}); "
                             f"resume with the run's {key} settings or use a new directory")


def check_same_base(directory: str | os.PathLike, meta: dict, frozen) -> dict:
    """A run that froze part of its tree resumes only on the base it trained on: the frozen half's
    checksums (`jaxtune.utils.fingerprint`) must equal those recorded when it started (a leaf
    whose dtype changed, e.g. another ``model.param_dtype``, is not compared). Returns ``meta``
    with this run's checksums under ``base_checksums`` (None for a run that trains everything)."""
    checksums = leaf_checksums(frozen) if froze_part(meta) else None
    old_meta = read_train_meta(directory) if has_steps(directory) else {}
    recorded = old_meta.get(BASE_CHECKSUMS)
    if checksums is not None and recorded:
        bad = mismatches(recorded, checksums)
        if bad:
            raise ValueError(f"checkpoint.directory {_path(directory)} was trained on the base model "
                             f"{source_text(old_meta.get('base'))}; this run's base {source_text(meta.get('base'))} "
                             f"has other weights ({bad[0]} differs{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}"
                             "). Resume on the run's own base or use a new directory")
    return {**meta, BASE_CHECKSUMS: checksums}


def source_text(base: Optional[dict]) -> str:
    """Where a model comes from, in words (``hf_dir=/models/x``), from a recorded ``model`` section."""
    if not base:
        return "(unrecorded)"
    given = {k: v for k, v in base.items() if k in ("hf_dir", "checkpoint", "preset") and v is not None}
    if "config" in base and base["config"] is not None and "preset" not in given:
        given["config"] = "inline"
    if "preset" in given or "config" in given:  # a random init: its seed says which
        given["init_seed"] = base.get("init_seed", 0)
    return ", ".join(f"{k}={v}" for k, v in given.items()) or "(unrecorded)"


def refuse_run_directory(directory: str | os.PathLike, command: str) -> None:
    """``command`` (an export, a conversion) never writes into a training run's directory: it would
    replace the files that say what the run is, and the run could no longer resume."""
    directory = _path(directory)
    if (directory / TRAIN_META_FILE).exists() or has_steps(directory):
        raise ValueError(f"{directory} holds a training run ({TRAIN_META_FILE} / checkpoint steps); {command} never "
                         "writes into a run: choose a new destination")


def has_steps(directory: str | os.PathLike) -> bool:
    directory = _path(directory)
    return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())


def start_run(directory: str | os.PathLike, cfg: ModelConfig, meta: dict) -> None:
    """A run starts in ``directory`` (called once its state is built or restored, right before its
    first step): a run already there must be resumable by this one (`check_resumable`, checked on
    every process so all fail alike); process 0 then writes model_config.json and
    train_meta.json, each atomically."""
    if has_steps(directory):
        check_resumable(directory, cfg, meta)
    if jax.process_index() == 0:
        directory = _path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_model_config(directory, cfg)
        replace_text(directory / TRAIN_META_FILE, json.dumps(meta, indent=2) + "\n")


def write_model_config(directory: str | os.PathLike, cfg: ModelConfig) -> None:
    path = _path(directory) / MODEL_CONFIG_FILE
    new = to_dict(cfg)
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            warnings.warn(f"{path}: the model differs from the saved config in {', '.join(changed)}; rewriting it",
                          stacklevel=3)
    replace_text(path, json.dumps(new, indent=2) + "\n")


def replace_text(path: epath.Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader never sees a partial file: other processes of
    a multi-host run read these files while process 0 (re)writes them on resume. An unchanged
    file is left alone; a changed one is written beside it and renamed over it."""
    path = epath.Path(path)
    if path.exists() and path.read_text() == text:
        return
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(path)


def recorded_peft(meta: dict, directory: str | os.PathLike) -> Optional[PeftConfig]:
    """The PEFT transform a run trained under (rebuildable without its tokenizer), or None."""
    if not meta.get("peft"):
        return None
    return for_restore(from_dict(PeftConfig, meta["peft"], prefix=f"{Path(directory) / TRAIN_META_FILE}: peft"))


def recorded_quant(meta: dict, directory: str | os.PathLike) -> Optional[QuantConfig]:
    """The quantization of a run's base model (QLoRA), or None."""
    quant = (meta.get("base") or {}).get("quant")
    return None if not quant else from_dict(QuantConfig, quant, prefix=f"{Path(directory) / TRAIN_META_FILE}: base.quant")


def recorded_base(meta: dict, directory: str | os.PathLike) -> Optional[ModelSource]:
    """Where a run's base weights come from, or None (a run without the record)."""
    if meta.get("base") is None:
        return None
    return from_dict(ModelSource, meta["base"], prefix=f"{Path(directory) / TRAIN_META_FILE}: base")


def recorded_head(meta: dict, directory: str | os.PathLike) -> Optional[HeadSpec]:
    """The head a run added (classification / reward score, PPO value head or value network), or None."""
    spec = meta.get("head")
    if not spec:
        return None
    key = spec.get("key", SCORE)
    model_config = None
    if key == VALUE_MODEL:
        model_config = from_dict(ModelConfig, spec["model_config"],
                                 prefix=f"{Path(directory) / TRAIN_META_FILE}: head.model_config")
    return HeadSpec(key, outputs=int(spec.get("num_labels", 1)), pooling=spec.get("pooling", "last"),
                    model_config=model_config)


def froze_part(meta: dict) -> bool:
    """Whether the run trained only part of its tree (PEFT or train.trainable): its checkpoints then
    hold only the trainable half, and the frozen half comes from its base model."""
    return meta.get("trainable") is not None or bool(meta.get("peft"))
