"""`jaxtune eval`: restore a model (a full or PEFT run, a params checkpoint, an HF directory) on the
job's mesh, run the ``eval.tasks`` (`jaxtune.eval.config`), print a table, write a JSON report.

The held-out ``loss`` and ``classify`` come from the job's objective (its loss and held-out stream,
its metrics); ``generate`` / ``choice`` / ``score`` / ``reward`` read records (the job's held-out
split or the task's own sources) and run the functions of `jaxtune.eval`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import jax

from jaxtune.align.judges import reward_judge
from jaxtune.config.loader import to_dict
from jaxtune.data.sft import read_records
from jaxtune.data.sources import build_source
from jaxtune.eval.config import EvalTaskConfig
from jaxtune.eval.policy import policy_reward
from jaxtune.eval.report import unused_path, write_report
from jaxtune.eval.tasks import exact_match, multiple_choice, response_scores
from jaxtune.job.assemble import job_tokenizer, load_model, load_reward_judge
from jaxtune.job.objectives import Context, Objective, get_objective
from jaxtune.job.schema import ModelSource, TrainJobConfig
from jaxtune.models import Model
from jaxtune.parallel.mesh import batch_sharding, make_mesh
from jaxtune.parallel.rules import param_shardings
from jaxtune.train.batch_checks import check_positions
from jaxtune.train.loop import evaluate
from jaxtune.train.step import make_eval_step


def task_records(job: TrainJobConfig, task: EvalTaskConfig, counts: Counter) -> tuple[list, list]:
    """-> (records to evaluate, pool of shot records). Default: the job's held-out split, and its
    training split for shots."""
    d = job.data
    common = dict(on_bad_row=d.on_bad_row, counts=counts)
    if task.sources:
        records = read_records([build_source(c) for c in task.sources], "all", d.eval_fraction, **common)
    elif d.eval_sources:
        records = read_records([build_source(c) for c in d.eval_sources], "all", d.eval_fraction, **common)
    elif d.sources:
        records = read_records([build_source(c) for c in d.sources], "eval", d.eval_fraction, **common)
    else:
        raise ValueError(f"eval task {task.label}: give its sources (or data.sources / data.eval_sources)")
    if task.limit is not None:
        records = records[: task.limit]
    pool: list = []
    if task.shots:
        if task.shots_sources:
            pool = read_records([build_source(c) for c in task.shots_sources], "all", d.eval_fraction, **common)
        elif d.sources:
            split = "all" if d.eval_sources else "train"
            pool = read_records([build_source(c) for c in d.sources], split, d.eval_fraction, **common)
        else:
            raise ValueError(f"eval task {task.label}: shots > 0 needs shots_sources or data.sources")
    if not records:
        raise ValueError(f"eval task {task.label}: no records to evaluate")
    return records, pool


def _held_out(objective: Objective, ctx: Context, task: EvalTaskConfig):
    """The objective's held-out stream factory (``task.sources`` replace data.eval_sources)."""
    if task.sources:
        job = ctx.job
        ctx = dataclasses.replace(ctx, job=dataclasses.replace(job, data=dataclasses.replace(job.data,
                                                                                              eval_sources=task.sources)))
    _, eval_streams = objective.streams(ctx, train=False)
    if eval_streams is None:
        raise ValueError(f"eval task {task.label}: the job's data has no held-out split")
    return ctx, eval_streams


def held_out_loss(objective: Objective, ctx: Context, task: EvalTaskConfig, params: Any, mesh) -> dict:
    ctx, eval_streams = _held_out(objective, ctx, task)
    step = make_eval_step(objective.loss(ctx), mesh=mesh, params_shardings=param_shardings(params, mesh, warn=False),
                          batch_shardings=batch_sharding(mesh))
    batches = task.limit or math.inf  # a full pass unless the task says otherwise (train.eval_batches is training's)
    result = evaluate(step, params, eval_streams(), mesh, batches, objective.unit)
    if not result:
        raise ValueError("eval task loss: the held-out stream produced no batches with real tokens")
    return result


def _policy_reward(job: TrainJobConfig, task: EvalTaskConfig, model: Model, params: Any, tokenizer, records, sft):
    """Eval task ``reward``, its reward model and KL reference loaded with the job's numerics."""
    numerics = job.model.numerics
    scorer = None
    if task.reward_model is not None:
        scorer = load_reward_judge(task.reward_model, tokenizer, task.batch_size, **numerics)
    reference = None
    if task.reference is not None and task.reference != "base":
        ref_params, ref_cfg, _ = load_model(ModelSource(checkpoint=task.reference, **numerics))
        if ref_cfg.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"eval task {task.label}: reference {task.reference} has vocab_size {ref_cfg.vocab_size}, "
                             f"the policy {model.cfg.vocab_size} (the KL needs the same tokenizer)")
        reference = (Model(ref_cfg.replace(remat="none")), ref_params)
    return policy_reward(task, model, params, tokenizer, records, sft, add_bos=job.data.add_bos, scorer=scorer,
                         reference=reference)


def run_task(job: TrainJobConfig, objective: Objective, ctx: Context, task: EvalTaskConfig, params: Any, mesh) -> dict:
    """One eval task's metrics (plus ``skipped_rows`` where bad rows were skipped)."""
    if task.kind == "loss":
        return held_out_loss(objective, ctx, task, params, mesh)
    if task.kind == "classify":
        ctx, eval_streams = _held_out(objective, ctx, task)
        return objective.eval_metrics(ctx, params, eval_streams(), task.limit)
    tokenizer, model = ctx.tokenizer, Model(ctx.cfg)
    if tokenizer is None:
        raise ValueError(f"eval task {task.label}: needs a tokenizer (data.kind synthetic has none)")
    counts: Counter = Counter()
    records, pool = task_records(job, task, counts)
    sft = task.sft or job.data.sft
    if task.kind == "score":
        metrics = response_scores(task, reward_judge(model, params, tokenizer, task.batch_size), records,
                                  job.data.preference)
    elif task.kind == "reward":
        metrics = _policy_reward(job, task, model, params, tokenizer, records, sft)
    else:
        fn = exact_match if task.kind == "generate" else multiple_choice
        metrics = fn(task, model, params, tokenizer, records, pool, sft, add_bos=job.data.add_bos)
    if counts:
        metrics["skipped_rows"] = dict(counts)
    return metrics


def run_eval_job(job: TrainJobConfig) -> dict:
    """Run every task of ``job.eval`` (default: the held-out loss) -> {task label: metrics}."""
    tasks = job.eval.tasks or (EvalTaskConfig(kind="loss"),)
    labels = [t.label for t in tasks]
    if len(set(labels)) != len(labels):
        raise ValueError(f"eval.tasks: names must be unique (got {labels}); set name on each")
    objective = get_objective(job.objective.kind)
    params, cfg, model_dir = load_model(job.model)
    cfg = objective.model_config(cfg)
    check_positions(job.train, cfg)
    mesh = make_mesh(job.mesh)
    params = jax.device_put(params, param_shardings(params, mesh, warn=False))
    ctx = Context(job, cfg, job_tokenizer(job, model_dir), start=params)
    results = {}
    for task in tasks:
        start = time.perf_counter()
        metrics = run_task(job, objective, ctx, task, params, mesh)
        metrics["seconds"] = time.perf_counter() - start
        results[task.label] = metrics
    return results


def results_path(job: TrainJobConfig) -> Path:
    """``eval.output`` (never overwritten), else ``<checkpoint or .>/eval/<UTC time>.json``."""
    if job.eval.output is not None:
        path = Path(job.eval.output)
        if path.exists():
            raise FileExistsError(f"eval.output {path} exists; give a new path (results are never overwritten)")
        return path
    return unused_path(Path(job.model.checkpoint or ".") / "eval")


def write_results(job: TrainJobConfig, results: dict, path: Optional[Path] = None) -> Path:
    return write_report(path or results_path(job), results, model=to_dict(job.model), eval=to_dict(job.eval))
