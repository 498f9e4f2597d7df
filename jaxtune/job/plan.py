"""A job's training step as abstract values (`jaxtune estimate`): the model built with no weights
read, quantized and PEFT-transformed as the job says, with its objective's head, split, sharded and
traced with its loss -> a `jaxtune.train.memory.StepPlan` that `estimate` / `compiled` measure."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Optional

import jax
from jax.sharding import AbstractMesh

from jaxtune.interop.hf_config import from_hf_config
from jaxtune.interop.hf_quant import bnb_quant_config
from jaxtune.interop.hf_weights import read_config
from jaxtune.job import runmeta
from jaxtune.job.assemble import job_tokenizer, with_head, with_peft, without_other_heads
from jaxtune.job.objectives import Context, Network, get_objective
from jaxtune.job.schema import TrainJobConfig
from jaxtune.models import Model, ModelConfig
from jaxtune.models.heads import value_network_template
from jaxtune.models.presets import preset
from jaxtune.parallel.mesh import AXES, make_mesh
from jaxtune.quant.weight import quantize
from jaxtune.train.memory import StepPlan
from jaxtune.train.optim import build_optimizer
from jaxtune.train.step import abstract_layout
from jaxtune.utils.partition import mask_by_regex


def abstract_model(job: TrainJobConfig) -> tuple[Any, ModelConfig]:
    """-> (``rng -> params`` built with no weights read, cfg) for any model source; an HF
    checkpoint saved by bitsandbytes pre-quantized counts as quantized."""
    source = job.model
    numerics = source.numerics
    quant = source.quant
    if source.hf_dir is not None:
        hf = read_config(source.hf_dir)
        cfg = from_hf_config(hf, **numerics)
        quant = quant or bnb_quant_config(hf)
    elif source.checkpoint is not None:
        cfg = runmeta.read_model_config(source.checkpoint).replace(**numerics)
    else:
        cfg = (preset(source.preset) if source.preset is not None else source.config).replace(**numerics)
    cfg = cfg.replace(**job.train.model_numerics)
    init = Model(cfg).init
    return (init if quant is None else (lambda rng: quantize(init(rng), quant))), cfg


def _tokenizer(job: TrainJobConfig):
    """The job's tokenizer where its files are at hand (a masked LM reads its mask and special ids
    from it; the step's shapes do not depend on it), else None."""
    directory = job.model.hf_dir or job.model.checkpoint
    try:
        return job_tokenizer(job, Path(directory) if directory else None)
    except (OSError, ValueError):
        return None


def without_text_init(peft):
    """Prompt sections initialised from text, initialised at random instead: without the tokenizer's
    files the text cannot be read, and the step's shapes do not depend on the init's values."""
    changes = {name: dataclasses.replace(section, init="random", init_text=None)
               for name in ("prompt_tuning", "p_tuning", "prefix_tuning")
               if getattr(section := getattr(peft, name), "init", None) == "text"}
    return dataclasses.replace(peft, **changes) if changes else peft


def plan_step(job: TrainJobConfig, devices: Optional[int] = None) -> StepPlan:
    """The job's train step as abstract values. ``devices``: how many devices the mesh spans
    (default: this process's); the estimate needs no real devices, compiling does."""
    objective = get_objective(job.objective.kind)
    init, cfg = abstract_model(job)
    cfg = objective.model_config(cfg)
    network_cfg = objective.network_config(job)
    network = None
    if network_cfg is not None:
        network = Network(value_network_template(network_cfg), network_cfg.replace(**job.train.model_numerics))
    ctx = Context(job, cfg, tokenizer=_tokenizer(job), network=network)
    optimizer, schedule = build_optimizer(job.optim, job.train.steps)
    head = objective.head(ctx)
    peft_job = job if ctx.tokenizer is not None else dataclasses.replace(job, peft=without_text_init(job.peft))
    init, mask, optimizer = with_peft(peft_job, without_other_heads(init, head), cfg, ctx.tokenizer, optimizer)
    init, mask = with_head(job, init, cfg, mask, head, None if network is None else network.params)
    params = jax.eval_shape(init, jax.random.key(0)) if callable(init) else init
    if mask is None:
        mask = mask_by_regex(params, job.train.trainable)
    n = devices or jax.device_count()
    shape = job.mesh.resolve(n)
    mesh = make_mesh(job.mesh) if n == jax.device_count() else None
    spec_mesh = mesh if mesh is not None else AbstractMesh(shape, AXES)
    trainable, frozen, state, state_specs, frozen_specs = abstract_layout(params, mask, optimizer, spec_mesh)

    @functools.lru_cache(maxsize=None)
    def with_layers(layers: int, remat: str = "none") -> StepPlan:
        small = cfg.replace(num_layers=layers, remat=remat, layer_types=cfg.layer_types[:layers])
        model = dataclasses.replace(job.model, hf_dir=None, checkpoint=None, preset=None, config=small)
        return plan_step(dataclasses.replace(job, model=model, train=dataclasses.replace(job.train, remat=remat)),
                         devices=n)

    return StepPlan(train=job.train, cfg=cfg, params=params, trainable=trainable, frozen=frozen, state=state,
                    state_specs=state_specs, frozen_specs=frozen_specs, optimizer=optimizer, schedule=schedule,
                    loss_fn=objective.loss(ctx), mesh_shape=dict(zip(AXES, shape)), mesh=mesh, with_layers=with_layers,
                    extra_batch=lambda rows, seq: objective.batch_extras(ctx, rows, seq))
