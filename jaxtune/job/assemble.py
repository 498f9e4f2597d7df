"""Assembling a model from a config or a directory: base weights, quantization, PEFT, heads.

`load_model(source)` -> (params, cfg, directory) from any `ModelSource`: a Hugging Face directory,
a params checkpoint (``params/`` + model_config.json), a training run (its newest readable step,
rebuilt as it trained: quantized base, then PEFT, then its head, the frozen half from its base
model), or a preset / inline config (random init). `model_for_training` is the same for a job
that is about to train (random inits stay functions, so the loop builds them on the mesh);
`with_peft` and `with_head` put the job's PEFT transform and its objective's head on.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import optax

from jaxtune.align.judges import reward_judge
from jaxtune.checkpoint.manager import restore_params as restore_run_params
from jaxtune.checkpoint.params import PARAMS_DIR, restore_params, save_params
from jaxtune.data.sources import read_text, resolve_path
from jaxtune.data.tokenizer import BYTE_TOKENIZER_FILE, CharTokenizer, load_tokenizer
from jaxtune.interop.adapters import load_adapter
from jaxtune.interop.hf_weights import load_hf
from jaxtune.job import runmeta
from jaxtune.job.schema import ModelSource, TrainJobConfig
from jaxtune.models import Model, ModelConfig
from jaxtune.models.heads import HEAD_KEYS, VALUE_MODEL, HeadSpec, add_head, head_template
from jaxtune.models.presets import preset
from jaxtune.peft.config import PeftConfig, apply_peft, peft_mask, peft_optimizer
from jaxtune.quant.weight import QuantConfig, quantize
from jaxtune.utils.partition import any_mask, mask_by_regex

Params = Any  # a param tree, or a function rng -> params (a random init the loop builds on the mesh)


def load_model(source: ModelSource) -> tuple[Any, ModelConfig, Optional[Path]]:
    """-> (params, cfg, directory) from the source, its kernels quantized by ``source.quant`` and
    ``source.adapter`` (a PEFT adapter directory) put on when given."""
    params, cfg, directory = _load_weights(source)
    if source.quant is not None and not _run_quantized(source):
        params = quantize(params, source.quant)
    if source.adapter is not None:
        params = load_adapter(params, cfg, source.adapter)
    return params, cfg, directory


def _run_quantized(source: ModelSource) -> bool:
    """Whether ``source`` is a training run whose base was already quantized by ``source.quant`` (a
    QLoRA run restored with its own recipe); a different quantization is refused, not stacked."""
    if source.checkpoint is None:
        return False
    recorded = runmeta.recorded_quant(runmeta.read_train_meta(source.checkpoint), source.checkpoint)
    if recorded is None:
        return False
    if recorded != source.quant:
        raise ValueError(f"model.quant {source.quant} differs from the quantization the run at {source.checkpoint} "
                         f"trained on ({recorded}, from {runmeta.TRAIN_META_FILE}); leave model.quant unset to "
                         "restore it as trained")
    return True


def _load_weights(source: ModelSource) -> tuple[Any, ModelConfig, Optional[Path]]:
    numerics = source.numerics
    if source.hf_dir is not None:
        params, cfg = load_hf(source.hf_dir, **numerics)
        return params, cfg, Path(source.hf_dir)
    if source.checkpoint is not None:
        directory = Path(source.checkpoint)
        cfg = runmeta.read_model_config(directory).replace(**numerics)
        if (directory / PARAMS_DIR).is_dir():  # a params checkpoint
            return restore_params(directory, jax.eval_shape(Model(cfg).init, jax.random.key(0))), cfg, directory
        return restore_run(directory, cfg, numerics), cfg, directory
    cfg = (preset(source.preset) if source.preset is not None else source.config).replace(**numerics)
    # jitted, as the training loop builds it, so a run's frozen base is re-created bit for bit
    return jax.jit(Model(cfg).init)(jax.random.key(source.init_seed)), cfg, None


def restore_run(directory: Path, cfg: ModelConfig, numerics: dict) -> Any:
    """The params of a training run's newest readable step, in the tree the run trained (quantized
    base, then PEFT, then its head); a run that froze part of its tree gets that half from its
    base model (`runmeta.recorded_base`)."""
    meta = runmeta.read_train_meta(directory)
    peft = runmeta.recorded_peft(meta, directory)
    quant = runmeta.recorded_quant(meta, directory)
    head = runmeta.recorded_head(meta, directory)
    if head is not None and head.model_config is not None:  # restored with the policy's numerics
        head = dataclasses.replace(head, model_config=head.model_config.replace(**numerics))

    def transform(p):
        p = p if quant is None else quantize(p, quant)
        p = p if peft is None else put_peft(p, peft, cfg)
        return p if head is None else {**p, head.key: head_template(head, cfg)}

    abstract = jax.eval_shape(lambda: transform(Model(cfg).init(jax.random.key(0))))
    base = None
    base_source = runmeta.recorded_base(meta, directory)
    if runmeta.froze_part(meta) and base_source is not None:
        params, base_cfg, _ = load_model(dataclasses.replace(base_source, **numerics))
        params = {k: v for k, v in params.items() if k not in other_heads(params, head)}  # as the run left them out
        base = params if peft is None else put_peft(params, peft, base_cfg)
        if head is not None:
            base = {**base, head.key: head_template(head, cfg)}
    params, _ = restore_run_params(directory, abstract, base_params=base)
    return params


def save_model(directory: str | Path, params: Any, cfg: ModelConfig, *, overwrite: bool = False) -> Path:
    """A params checkpoint: ``params/`` (Orbax) beside model_config.json. Refused in a directory
    that holds anything (unless ``overwrite``) and always in a training run's directory."""
    runmeta.refuse_run_directory(directory, "saving a params checkpoint")
    if Path(directory).is_dir() and any(Path(directory).iterdir()) and not overwrite:
        raise FileExistsError(f"{Path(directory).absolute()} exists and is not empty (the CLI replaces it with "
                              "--overwrite; from Python, overwrite=True)")
    path = save_params(directory, params, overwrite=overwrite)
    runmeta.write_model_config(path, cfg)
    return path


def model_for_training(source: ModelSource) -> tuple[Params, ModelConfig, Optional[Path]]:
    """-> (params or ``rng -> params`` init function, cfg, directory). Random-init models are
    returned as an init function so the loop can build them directly on the mesh."""
    if source.adapter is not None:
        raise ValueError("model.adapter puts a fixed PEFT adapter on the weights (for generate / eval / convert); "
                         "to train from an imported adapter, set peft.adapter to its directory instead")
    if source.preset is not None or source.config is not None:
        cfg = (preset(source.preset) if source.preset is not None else source.config).replace(**source.numerics)
        return _random_init(cfg, source.init_seed, source.quant), cfg, None
    return load_model(source)


def _random_init(cfg: ModelConfig, seed: int, quant: Optional[QuantConfig]) -> Callable[[jax.Array], Any]:
    if quant is None:
        return lambda _rng: Model(cfg).init(jax.random.key(seed))
    return lambda _rng: quantize(Model(cfg).init(jax.random.key(seed)), quant)


def transformed(params: Params, fn: Callable[[Any], Any]) -> tuple[Params, Any]:
    """-> (``fn`` applied to params, or composed into the init function; the abstract result)."""
    if callable(params):
        init = params
        params = lambda rng: fn(init(rng))  # noqa: E731
        return params, jax.eval_shape(params, jax.random.key(0))
    params = fn(params)
    return params, params


def put_peft(params: Any, peft: PeftConfig, cfg: ModelConfig, tokenizer=None) -> Any:
    """``params -> params``: the ``peft`` section's adapter directory (if any), then its transforms."""
    if peft.adapter is not None:
        params = load_adapter(params, cfg, peft.adapter)
    return apply_peft(params, dataclasses.replace(peft, adapter=None), model_cfg=cfg, tokenizer=tokenizer)


def with_peft(job: TrainJobConfig, params: Params, cfg: ModelConfig, tokenizer,
              optimizer: optax.GradientTransformation) -> tuple[Params, Any, optax.GradientTransformation]:
    """-> (params or init function, trainable mask or None, optimizer) for the job's ``peft``
    section. Loaded weights are transformed here, once; a random-init model's init function
    is wrapped, so the loop still builds it straight onto the mesh. ``train.trainable``
    regexes add to the PEFT mask (like PEFT's modules_to_save)."""
    if not job.peft.active:
        return params, None, optimizer
    params, abstract = transformed(params, lambda p: put_peft(p, job.peft, cfg, tokenizer))
    mask = peft_mask(abstract, job.peft)
    if job.train.trainable is not None:
        mask = any_mask(mask, mask_by_regex(abstract, job.train.trainable))
    return params, mask, peft_optimizer(optimizer, job.peft, job.train.steps)


def other_heads(params: Any, head: Optional[HeadSpec]) -> list[str]:
    """The named heads in ``params`` other than ``head``'s."""
    return [k for k in HEAD_KEYS if k in params and (head is None or k != head.key)]


def without_other_heads(params: Params, head: Optional[HeadSpec]) -> Params:
    """``params`` without the named heads the starting model holds that the job's objective does
    not train (a BERT pre-training checkpoint's NSP head under classification), each named on
    stderr; a head of the objective's own kind stays (`with_head` keeps it)."""
    abstract = jax.eval_shape(params, jax.random.key(0)) if callable(params) else params
    extra = other_heads(abstract, head)
    if not extra:
        return params
    print(f"model: the starting weights' {', '.join(extra)} head(s) are not used by this objective: left out",
          file=sys.stderr)
    return transformed(params, lambda p: {k: v for k, v in p.items() if k not in extra})[0]


def _put_head(params: Any, head: HeadSpec, cfg: ModelConfig, rng: jax.Array, network: Any) -> Any:
    """`add_head`, or the starting weights' own head of this kind when its shapes fit (a BERT
    pre-training checkpoint's NSP head; a sequence classifier's score head)."""
    if head.key not in params or head.key == VALUE_MODEL:
        return add_head(params, head, cfg, rng, network)
    have = jax.tree.map(lambda a: tuple(a.shape), params[head.key])
    want = jax.tree.map(lambda a: tuple(a.shape), head_template(head, cfg))
    if have != want:
        raise ValueError(f"the starting weights hold a {head.key!r} head of shapes {have}; objective "
                         f"{head.key} needs {want} (e.g. objective.num_labels differs from the checkpoint's)")
    return params


def with_head(job: TrainJobConfig, params: Params, cfg: ModelConfig, mask: Any, head: Optional[HeadSpec],
              network: Any = None) -> tuple[Params, Any]:
    """The objective's head (`jaxtune.models.heads`; ``network``: a separate value network's
    params), added after PEFT (so adapter patterns never reach it) and always trainable, next to
    whatever else trains. Starting weights that already hold it (shapes checked) keep theirs."""
    if head is None:
        return params, mask
    key = jax.random.key(job.model.init_seed + 1)
    if mask is not None:
        abstract_before = jax.eval_shape(params, key) if callable(params) else params
        if head.key in abstract_before:  # PEFT's mask covered the starting head: it is replaced below
            mask = {k: v for k, v in mask.items() if k != head.key}
    params, abstract = transformed(params, lambda p: _put_head(p, head, cfg, key, network))
    base_mask = mask if mask is not None else mask_by_regex(abstract, job.train.trainable)
    if mask is not None and jax.tree.structure(mask) != jax.tree.structure(abstract):
        base_mask = {**mask, head.key: jax.tree.map(lambda _: False, abstract[head.key])}
    return params, any_mask(base_mask, mask_by_regex(abstract, [head.pattern]))


def job_tokenizer(job: TrainJobConfig, model_dir: Optional[Path]):
    """The job's tokenizer: ``tokenizer.path`` or the model's directory (HF files or a saved
    built-in one), a character vocabulary built from ``data.path`` (``tokenizer.kind=char``),
    bytes otherwise; None for synthetic data."""
    if job.data.kind == "synthetic":
        return None
    directory = job.tokenizer.path or model_dir
    if job.tokenizer.kind == "char" and not (directory and (Path(directory) / BYTE_TOKENIZER_FILE).exists()):
        if job.data.kind != "text":
            raise ValueError("tokenizer.kind=char builds its vocabulary from data.path (data.kind=text); for "
                             "documents, save a character vocabulary first or use tokenizer.kind byte / hf")
        # nanoGPT's character-level setup: the vocabulary is every character of the whole file
        # (train and held-out alike); it is saved beside the checkpoints.
        return CharTokenizer.from_text(read_text(resolve_path(job.data.path)))
    return load_tokenizer(directory, job.tokenizer.kind)


def load_reward_judge(directory: str, tokenizer, batch_size: int, **numerics):
    """`jaxtune.align.judges.reward_judge` of the reward-model run at ``directory`` (it must share the
    policy's tokenizer); ``numerics``: param_dtype / dtype / attention_impl to restore it with."""
    params, cfg, _ = load_model(ModelSource(checkpoint=directory, **numerics))
    return reward_judge(Model(cfg), params, tokenizer, batch_size)
