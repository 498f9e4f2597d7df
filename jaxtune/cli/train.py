"""`jaxtune train [CONFIG] [key=value ...]` and `jaxtune eval [CONFIG] [key=value ...]`."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from jaxtune.cli.args import split_config_args
from jaxtune.config import load_config
from jaxtune.eval.plot import plot_runs
from jaxtune.eval.report import format_table
from jaxtune.job import TrainJobConfig, run_eval_job, run_training
from jaxtune.job.evaluate import write_results
from jaxtune.parallel.distributed import maybe_initialize
from jaxtune.train.stopping import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a model (resumes from checkpoint.directory if it holds a run)")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] key=value ... (e.g. train.steps=200 checkpoint.directory=runs/a)")
    p.set_defaults(func=run_train)
    e = sub.add_parser("eval", help="evaluate a model: held-out loss / perplexity, generation exact match, multiple choice, classification (eval.tasks)")
    e.add_argument("args", nargs="*", help="[CONFIG.yaml] key=value ... (e.g. model.checkpoint=runs/a)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=run_eval)


MODEL_SOURCES = ("hf_dir", "checkpoint", "preset", "config")


def _job(args) -> TrainJobConfig:
    maybe_initialize()
    config_path, overrides = split_config_args(args.args)
    return load_config(TrainJobConfig, config_path, source_overrides(overrides))


def source_overrides(overrides: list[str]) -> list[str]:
    """A model source given on the command line replaces the config file's
    (``model.checkpoint=runs/a`` over a file that says ``model.preset: tiny-llama``)."""
    given = {o.split("=", 1)[0].removeprefix("model.") for o in overrides if o.startswith("model.")}
    if not given & set(MODEL_SOURCES):
        return overrides
    return [f"model.{k}=null" for k in MODEL_SOURCES if k not in given] + overrides


def run_train(args) -> int:
    job = _job(args)
    result = run_training(job)
    done = result.history[-1] if result.history else {}
    where = f"; checkpoint in {job.checkpoint.directory}" if job.checkpoint.directory else ""
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else ""
    step = int(result.state.step)
    if result.status == "preempted":
        print(f"jaxtune train: preempted (SIGTERM) at step {step}; state saved{where}. Run the same command to resume.",
              flush=True)
        return PREEMPTED_EXIT_CODE
    if result.status == "interrupted":
        saved = (f"state saved in {job.checkpoint.directory}. Run the same command to resume." if job.checkpoint.directory
                 else "no checkpoint.directory was set, so nothing was saved.")
        print(f"jaxtune train: interrupted (Ctrl-C) at step {step}; {saved}", flush=True)
        return INTERRUPTED_EXIT_CODE
    summary = f"step {step}{resumed}"
    if done:
        summary += f", last loss {done['loss']:.4f}, skipped {int(done['skipped'])}"
    if result.evals:
        summary += f", eval loss {result.evals[-1]['loss']:.4f}"
    print(f"jaxtune train: done: {summary}{where}", flush=True)
    log_dir = job.logging.directory or job.checkpoint.directory
    if log_dir and job.logging.jsonl and jax.process_index() == 0:
        picture = Path(log_dir) / "loss.png"  # redrawn from the whole log each time the run ends
        plot_runs([log_dir], picture, title=Path(log_dir).name)
        print(f"loss curves: {picture}", flush=True)
    return 0


def run_eval(args) -> int:
    job = _job(args)
    results = run_eval_job(job)
    path = None
    if jax.process_index() == 0:
        path = write_results(job, results)
    if args.json:
        print(json.dumps(results, default=float))
    else:
        print(format_table(results))
        if path is not None:
            print(f"results: {path}")
    return 0
