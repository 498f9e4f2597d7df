"""`jaxtune train`: a training job from its config -> the one loop.

`setup_training(job)` assembles everything the loop needs from the job and its objective (model,
tokenizer, PEFT, head, optimizer, loss, streams, mesh) and validates it, writing nothing;
`run_training(job)` then takes the run directory's lock (`jaxtune.job.runlock`), runs
`jaxtune.train.loop.train`, and records the run's metadata (`jaxtune.job.runmeta`) and tokenizer
once the state is built or restored, right before the first step.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import optax
from jax.sharding import Mesh

from jaxtune.checkpoint.manager import TrainCheckpointer
from jaxtune.config import to_dict
from jaxtune.job import runmeta
from jaxtune.job.assemble import job_tokenizer, model_for_training, with_head, with_peft, without_other_heads
from jaxtune.job.explain import describe_job, describe_resume
from jaxtune.job.objectives import Context, Objective, get_objective
from jaxtune.job.runlock import RunLock
from jaxtune.job.schema import TrainJobConfig
from jaxtune.job.streams import report_skipped
from jaxtune.models import ModelConfig
from jaxtune.models.heads import HeadSpec
from jaxtune.parallel.mesh import make_mesh
from jaxtune.train.batch_checks import check_positions
from jaxtune.train.loop import TrainResult, check_batch_layout, check_steps_per_call, train
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
    cfg = objective.model_config(cfg.replace(**job.train.model_numerics))
    tokenizer = job_tokenizer(job, model_dir)
    ctx = Context(job, cfg, tokenizer, start=start, network=objective.network(job))
    mesh = make_mesh(job.mesh)
    check_batch_layout(job.train, mesh)
    check_positions(job.train, cfg)
    stream, eval_streams = objective.streams(ctx)
    check_steps_per_call(job.train, stream)
    optimizer, schedule = build_optimizer(job.optim, job.train.steps)
    head = objective.head(ctx)
    params, mask, optimizer = with_peft(job, without_other_heads(start, head), cfg, tokenizer, optimizer)
    params, mask = with_head(job, params, cfg, mask, head, None if ctx.network is None else ctx.network.params)
    return TrainingSetup(job=job, objective=objective, cfg=cfg, tokenizer=tokenizer, params=params, trainable_mask=mask,
                         head=head, optimizer=optimizer, schedule=schedule, loss_fn=objective.loss(ctx), stream=stream,
                         eval_streams=eval_streams, mesh=mesh)


def run_training(job: TrainJobConfig, *, callbacks: Sequence[Callable[[int, dict], None]] = (),
                 checkpointer: Optional[TrainCheckpointer] = None) -> TrainResult:
    """Train ``job`` (resuming from ``checkpoint.directory`` when it holds the same run). A given
    ``checkpointer`` replaces the job's own (the caller closes it).

    Nothing is written before the run is known to start: the job is validated (`setup_training`),
    a run already in the directory must be resumable by this one, the directory's lock is taken
    (a second run into it is refused), the state is restored, and a resumed PEFT run's base must be
    the one it trained on; only then are the metadata and tokenizer written (`on_start`)."""
    s = setup_training(job)
    own_checkpointer = checkpointer is None
    directory = job.checkpoint.directory if own_checkpointer else checkpointer.directory
    resuming = bool(directory) and runmeta.has_steps(directory)
    if resuming:
        runmeta.check_resumable(directory, s.cfg, s.meta)
    if jax.process_index() == 0:
        lines = describe_job(job, s.objective.name, s.objective.unit, s.cfg, s.stream, s.eval_streams,
                             runmeta.source_text(to_dict(job.model)))
        if resuming:
            lines += describe_resume(runmeta.saved_job(directory), job)
        print("\n".join(lines), file=sys.stderr, flush=True)

    def on_start(state, frozen) -> None:
        if not directory:
            return
        meta = runmeta.check_same_base(directory, s.meta, frozen)
        runmeta.start_run(directory, s.cfg, meta)  # the run's metadata goes where its steps go
        if s.tokenizer is not None and jax.process_index() == 0:
            s.tokenizer.save(str(directory))  # so generate / eval on the checkpoint need no tokenizer flags

    lock = RunLock(directory)
    interrupted = False
    try:
        lock.acquire()
        if own_checkpointer:
            checkpointer = TrainCheckpointer(job.checkpoint)
        return train(
            loss_fn=s.loss_fn, params=s.params, model_cfg=s.cfg, optimizer=s.optimizer, schedule=s.schedule,
            cfg=job.train, batches=s.stream, mesh=s.mesh, eval_batches=s.eval_streams, checkpointer=checkpointer,
            trainable_mask=s.trainable_mask, logging=job.logging, log_dir=job.logging.directory or directory,
            callbacks=callbacks, on_start=on_start, run_config=to_dict(job), weight_unit=s.objective.unit,
        )
    except KeyboardInterrupt:  # a second Ctrl-C: exit at once, without waiting for a save in flight
        interrupted = True
        raise
    finally:
        if hasattr(s.stream, "close"):
            s.stream.close()
        report_skipped(s.stream)
        if own_checkpointer and checkpointer is not None and not interrupted:
            checkpointer.close()
        lock.release()
