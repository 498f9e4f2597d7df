"""`jaxtune eval`: restore a model (Orbax checkpoint of a full or PEFT run, params checkpoint, HF
directory) on the job's mesh, run the ``eval.tasks``, print a table, write a JSON report."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from jaxtune.config.loader import to_dict
from jaxtune.config.schema import TrainJobConfig
from jaxtune.data.sft import read_records
from jaxtune.data.sources import build_source
from jaxtune.eval.config import EvalTaskConfig
from jaxtune.eval.policy import policy_reward
from jaxtune.eval.tasks import exact_match, multiple_choice
from jaxtune.interop.sources import load_model
from jaxtune.models import Model
from jaxtune.parallel.mesh import batch_sharding, make_mesh
from jaxtune.parallel.rules import param_shardings


def task_records(job: TrainJobConfig, task: EvalTaskConfig, counts) -> tuple[list, list]:
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


def held_out_loss(job: TrainJobConfig, task: EvalTaskConfig, params: Any, cfg, tokenizer, mesh) -> dict:
    from jaxtune.train.loop import evaluate
    from jaxtune.train.runner import RECORD_KINDS, build_streams, job_loss, record_streams, reference_pass
    from jaxtune.train.step import make_eval_step

    if task.sources:
        job = dataclasses.replace(job, data=dataclasses.replace(job.data, eval_sources=task.sources))
    if job.data.kind in RECORD_KINDS:
        _, eval_streams = record_streams(job, cfg, tokenizer, train=False, prepare=reference_pass(job, params, cfg))
    else:
        _, eval_streams = build_streams(job, cfg, tokenizer)
    if eval_streams is None:
        raise ValueError("eval task loss: the job's data has no held-out split")
    step = make_eval_step(job_loss(job, cfg, tokenizer), mesh=mesh, params_shardings=param_shardings(params, mesh, warn=False),
                          batch_shardings=batch_sharding(mesh))
    batches = task.limit or job.train.eval_batches or math.inf
    result = evaluate(step, params, eval_streams(), mesh, batches)
    if not result:
        raise ValueError("eval task loss: the held-out stream produced no batches with real tokens")
    return result


def classify(job: TrainJobConfig, task: EvalTaskConfig, params: Any, cfg, tokenizer) -> dict:
    from jaxtune.data.classify import LabelledStream
    from jaxtune.train.classify import classification_logits, classification_report, regression_report
    from jaxtune.train.runner import record_streams

    objective = job.objective
    if not objective.head_labels:
        raise ValueError("eval task classify needs a classification job (objective.kind classification / regression)")
    if "score" not in params:
        raise ValueError("eval task classify: the restored model has no score head (was it trained for classification?)")
    if task.sources:
        job = dataclasses.replace(job, data=dataclasses.replace(job.data, eval_sources=task.sources))
    _, eval_streams = record_streams(job, cfg, tokenizer, train=False)
    if eval_streams is None:
        raise ValueError("eval task classify: no held-out records")
    model = Model(cfg)
    logits_fn = jax.jit(lambda p, b: classification_logits(model, p, b, pooling=objective.pooling))
    stream: LabelledStream = eval_streams()
    preds, labels = [], []
    for batch in stream:
        keep = batch["row_mask"] > 0
        logits = np.asarray(jax.device_get(logits_fn(params, batch)))[keep]
        preds.append(logits[:, 0] if objective.kind == "regression" else logits.argmax(-1))
        labels.append(batch["labels"][keep])
        if task.limit is not None and sum(map(len, labels)) >= task.limit:
            break
    preds, labels = np.concatenate(preds), np.concatenate(labels)
    if task.limit is not None:
        preds, labels = preds[: task.limit], labels[: task.limit]
    if objective.kind == "regression":
        return regression_report(preds, labels)
    return classification_report(preds, labels, objective.num_labels)


def reward_scores_task(job: TrainJobConfig, task: EvalTaskConfig, params: Any, cfg, tokenizer) -> dict:
    """Score single responses, or preference pairs, with the restored reward model."""
    from collections import Counter

    from jaxtune.align.label import reward_judge

    counts: Counter = Counter()
    records, _ = task_records(job, task, counts)
    pc = job.data.preference
    score = reward_judge(Model(cfg), params, tokenizer, task.batch_size)
    prompt_of = lambda r: pc.prompt_format.format(prompt=r.get(pc.prompt, ""))  # noqa: E731
    if all(pc.chosen in r and pc.rejected in r for r, _ in records):
        prompts = [prompt_of(r) for r, _ in records]
        chosen = score(prompts, [r[pc.chosen] for r, _ in records])
        rejected = score(prompts, [r[pc.rejected] for r, _ in records])
        return {"pairs": len(records), "accuracy": float(np.mean(chosen > rejected)),
                "margin": float(np.mean(chosen - rejected)), "chosen_mean": float(np.mean(chosen)),
                "rejected_mean": float(np.mean(rejected))}
    missing = [w for r, w in records if task.response_field not in r]
    if missing:
        raise ValueError(f"{missing[0]}: no field {task.response_field!r} (eval task score: responses, or "
                         f"{pc.chosen!r} / {pc.rejected!r} pairs)")
    scores = score([prompt_of(r) for r, _ in records], [r[task.response_field] for r, _ in records])
    return {"responses": len(records), "mean": float(np.mean(scores)), "std": float(np.std(scores)),
            "samples": [{"where": w, "score": float(s)} for (_, w), s in zip(records[: task.samples], scores)]}


def run_eval_job(job: TrainJobConfig) -> dict:
    """Run every task of ``job.eval`` (default: the held-out loss) -> {task label: metrics}."""
    from jaxtune.train.runner import _tokenizer

    params, cfg, model_dir = load_model(job.model)
    mesh = make_mesh(job.mesh)
    params = jax.device_put(params, param_shardings(params, mesh, warn=False))
    tokenizer = _tokenizer(job, model_dir)
    model = Model(cfg)
    tasks = job.eval.tasks or (EvalTaskConfig(kind="loss"),)
    labels = [t.label for t in tasks]
    if len(set(labels)) != len(labels):
        raise ValueError(f"eval.tasks: names must be unique (got {labels}); set name on each")
    results = {}
    for task in tasks:
        start = time.perf_counter()
        if task.kind == "loss":
            metrics = held_out_loss(job, task, params, cfg, tokenizer, mesh)
        elif task.kind == "score":
            metrics = reward_scores_task(job, task, params, cfg, tokenizer)
        elif task.kind == "classify":
            metrics = classify(job, task, params, cfg, tokenizer)
        else:
            if tokenizer is None:
                raise ValueError(f"eval task {task.label}: needs a tokenizer (data.kind synthetic has none)")
            from collections import Counter

            counts: Counter = Counter()
            records, pool = task_records(job, task, counts)
            sft = task.sft or job.data.sft
            if task.kind == "reward":
                metrics = policy_reward(task, model, params, tokenizer, records, sft, add_bos=job.data.add_bos,
                                        numerics=job.model.numerics)
            else:
                fn = exact_match if task.kind == "generate" else multiple_choice
                metrics = fn(task, model, params, tokenizer, records, pool, sft, add_bos=job.data.add_bos)
            if counts:
                metrics["skipped_rows"] = dict(counts)
        metrics["seconds"] = time.perf_counter() - start
        results[task.label] = metrics
    return results


def results_path(job: TrainJobConfig) -> Path:
    if job.eval.output is not None:
        path = Path(job.eval.output)
        if path.exists():
            raise FileExistsError(f"eval.output {path} exists; give a new path (results are never overwritten)")
        return path
    base = Path(job.model.checkpoint or ".") / "eval"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path, n = base / f"{stamp}.json", 1
    while path.exists():
        path, n = base / f"{stamp}-{n}.json", n + 1
    return path


def write_results(job: TrainJobConfig, results: dict, path: Optional[Path] = None) -> Path:
    path = path or results_path(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": to_dict(job.model), "eval": to_dict(job.eval), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "results": results}
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    return path


def format_table(results: dict) -> str:
    rows = [("task", "metric", "value")]
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key == "samples" or isinstance(value, dict):
                continue
            rows.append((task, key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
