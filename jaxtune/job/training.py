"""`jaxtune train`: a training job from its config -> the one loop.

`setup_training(job)` assembles everything the loop needs from the job and its objective (model,
tokenizer, PEFT, head, optimizer, loss, streams, mesh) and validates it, writing nothing;
`run_training(job)` then records the run's metadata (`jaxtune.job.runmeta`, once, when the run
really starts), saves the tokenizer beside the checkpoints and runs `jaxtune.train.loop.train`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import optax
from jax.sharding import Mesh

from jaxtune.checkpoint.manager import TrainCheckpointer
from jaxtune.job import runmeta
from jaxtune.job.assemble import job_tokenizer, model_for_training, with_head, with_peft
from jaxtune.job.objectives import Context, Objective, get_objective
from jaxtune.job.schema import TrainJobConfig
from jaxtune.job.streams import report_skipped
from jaxtune.models import ModelConfig
from jaxtune.models.heads import HeadSpec
from jaxtune.parallel.mesh import make_mesh
from jaxtune.train.loop import TrainResult, check_batch_layout, train
from jaxtune.train.losses import LossFn
from jaxtune.train.optim import build_optimizer


@dataclass
class TrainingSetup:
    """Everything `run_training` hands the loop, built and checked before anything is written."""

    job: TrainJobConfig
    objective: Objective
    cfg: ModelConfig
    tokenizer: Any
    params: Any  # a param tree, or ``rng -> params`` (built on the mesh by the loop)
    trainable_mask: Any
    head: Optional[HeadSpec]
    optimizer: optax.GradientTransformation
    schedule: Any
    loss_fn: LossFn
    stream: Any
    eval_streams: Optional[Callable[[], Iterable[dict]]]
    mesh: Mesh

    @property
    def meta(self) -> dict:
        return runmeta.run_meta(self.job, self.head)


def setup_training(job: TrainJobConfig) -> TrainingSetup:
    objective = get_objective(job.objective.kind)
    start, cfg, model_dir = model_for_training(job.model)
    cfg = objective.model_config(cfg.replace(remat=job.train.remat))
    tokenizer = job_tokenizer(job, model_dir)
    ctx = Context(job, cfg, tokenizer, start=start, network=objective.network(job))
    mesh = make_mesh(job.mesh)
    check_batch_layout(job.train, mesh)
    stream, eval_streams = objective.streams(ctx)
    optimizer, schedule = build_optimizer(job.optim, job.train.steps)
    params, mask, optimizer = with_peft(job, start, cfg, tokenizer, optimizer)
    head = objective.head(ctx)
    params, mask = with_head(job, params, cfg, mask, head, None if ctx.network is None else ctx.network.params)
    return TrainingSetup(job=job, objective=objective, cfg=cfg, tokenizer=tokenizer, params=params, trainable_mask=mask,
                         head=head, optimizer=optimizer, schedule=schedule, loss_fn=objective.loss(ctx), stream=stream,
                         eval_streams=eval_streams, mesh=mesh)


def run_training(job: TrainJobConfig, *, callbacks: Sequence[Callable[[int, dict], None]] = (),
                 checkpointer: Optional[TrainCheckpointer] = None) -> TrainResult:
    """Train ``job`` (resuming from ``checkpoint.directory`` when it holds the same run). A given
    ``checkpointer`` replaces the job's own (the caller closes it)."""
    s = setup_training(job)
    own_checkpointer = checkpointer is None
    directory = job.checkpoint.directory if own_checkpointer else checkpointer.directory
    try:
        if directory:  # the run's metadata goes where its steps go
            runmeta.start_run(directory, s.cfg, s.meta)
        if own_checkpointer:
            checkpointer = TrainCheckpointer(job.checkpoint)
        if s.tokenizer is not None and directory and jax.process_index() == 0:
            s.tokenizer.save(str(directory))  # so generate / eval on the checkpoint need no tokenizer flags
        return train(
            loss_fn=s.loss_fn, params=s.params, model_cfg=s.cfg, optimizer=s.optimizer, schedule=s.schedule,
            cfg=job.train, batches=s.stream, mesh=s.mesh, eval_batches=s.eval_streams, checkpointer=checkpointer,
            trainable_mask=s.trainable_mask, logging=job.logging, log_dir=job.logging.directory or directory,
            callbacks=callbacks,
        )
    finally:
        if hasattr(s.stream, "close"):
            s.stream.close()
        report_skipped(s.stream)
        if own_checkpointer and checkpointer is not None:
            checkpointer.close()
