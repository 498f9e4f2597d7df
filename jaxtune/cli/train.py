"""`jaxtune train [CONFIG] [key=value ...]` and `jaxtune eval [CONFIG] [key=value ...]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import jax
import yaml

from jaxtune.cli.args import split_config_args
from jaxtune.config import ConfigError, load_config, to_dict
from jaxtune.eval.plot import plot_runs
from jaxtune.eval.report import format_table
from jaxtune.job import TrainJobConfig, run_eval_job, run_training, runmeta
from jaxtune.job.evaluate import write_results
from jaxtune.parallel.distributed import maybe_initialize
from jaxtune.train.stopping import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a model (resumes from checkpoint.directory if it holds a run)")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] key=value ... (e.g. train.steps=200 checkpoint.directory=runs/a)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    p.set_defaults(func=run_train)
    e = sub.add_parser("eval", help="evaluate a model: held-out loss / perplexity, generation exact match, multiple choice, classification (eval.tasks)")
    e.add_argument("args", nargs="*", help="[CONFIG.yaml] key=value ... (e.g. model.checkpoint=runs/a)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    e.set_defaults(func=run_eval)


MODEL_SOURCES = ("hf_dir", "checkpoint", "preset", "config")


def _job(args) -> TrainJobConfig:
    maybe_initialize()
    config_path, overrides = split_config_args(args.args)
    return load_config(TrainJobConfig, config_path, source_overrides(overrides))


def _eval_job(args) -> TrainJobConfig:
    """The job `jaxtune eval` runs. Without a config file, ``model.checkpoint=RUN`` evaluates as the
    run trained: its saved job (data, held-out split, eval tasks, tokenizer, numerics) with the
    overrides on top. Synthetic data for a run trained on real data is refused unless
    ``data.kind=synthetic`` is given on the command line."""
    maybe_initialize()
    config_path, overrides = split_config_args(args.args)
    overrides = source_overrides(overrides)
    run = _override(overrides, "model.checkpoint")
    saved = runmeta.read_train_meta(run).get("job") if run is not None else None
    defaults = None
    if config_path is None and saved is not None:
        defaults = {k: v for k, v in saved.items() if k not in ("checkpoint", "logging")}
        print(f"jaxtune eval: the run's own job ({run}/{runmeta.TRAIN_META_FILE}): data.kind="
              f"{saved['data']['kind']}, {len(saved['eval']['tasks']) or 'the default'} eval task(s); a config file "
              "or key=value overrides change it", file=sys.stderr, flush=True)
    job = load_config(TrainJobConfig, config_path, overrides, defaults=defaults)
    trained_on = (saved or {}).get("data", {}).get("kind", "synthetic")
    if job.data.kind == "synthetic" and trained_on != "synthetic" and _override(overrides, "data.kind") != "synthetic":
        where = f"config file {config_path}" if config_path else "the default data"
        raise ConfigError(f"model.checkpoint {run} was trained on data.kind={trained_on}, but {where} is synthetic "
                          "random tokens; leave the config file out to evaluate on the run's own data, or pass "
                          "data.kind=synthetic to mean it")
    return job


def _override(overrides: list[str], key: str) -> Optional[str]:
    """The last ``key=value`` given for ``key`` (None if none)."""
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].strip() == key]
    return values[-1] if values and values[-1] != "null" else None


def source_overrides(overrides: list[str]) -> list[str]:
    """A model source given on the command line replaces the config file's
    (``model.checkpoint=runs/a`` over a file that says ``model.preset: tiny-llama``)."""
    given = {o.split("=", 1)[0].removeprefix("model.") for o in overrides if o.startswith("model.")}
    if not given & set(MODEL_SOURCES):
        return overrides
    return [f"model.{k}=null" for k in MODEL_SOURCES if k not in given] + overrides


def print_config(job: TrainJobConfig) -> int:
    print(yaml.safe_dump(to_dict(job), sort_keys=False), end="")
    return 0


def run_train(args) -> int:
    job = _job(args)
    if args.print_config:
        return print_config(job)
    result = run_training(job)
    done = result.history[-1] if result.history else {}
    where = f"; checkpoint in {job.checkpoint.directory}" if job.checkpoint.directory else ""
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
    summary = f"step {step}"
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
    job = _eval_job(args)
    if args.print_config:
        return print_config(job)
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
