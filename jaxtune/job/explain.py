"""A run explains itself: what the job is when it starts, and what changed when it resumes.

`describe_job` gives the lines `jaxtune train` prints before its first step: the data (examples and
tokens per epoch where the stream knows them, what is held out), what a step holds and how many
epochs the steps amount to, the model and how its base is quantized, and what trains.
`config_changes` / `describe_resume` compare a resumed run's job with the one saved beside its
steps and say, key by key, what each change does.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from jaxtune.config.loader import to_dict
from jaxtune.data.streams import TokenRowStream
from jaxtune.job.schema import TrainJobConfig
from jaxtune.models import ModelConfig

# what changing a key of a saved run does when it resumes (longest matching prefix wins)
EFFECTS = {
    "train.steps": "the learning-rate schedule is re-stretched to the new length (the rate at the resumed step "
                   "changes); the run continues to the new last step",
    "optim.warmup_steps": "the learning-rate schedule changes from the resumed step on",
    "optim.decay_steps": "the learning-rate schedule changes from the resumed step on",
    "optim.schedule": "the learning-rate schedule changes from the resumed step on",
    "optim.lr": "the learning rate changes from the resumed step on (the optimizer's moments are kept)",
    "optim": "the optimizer's settings change from the resumed step on (its saved state is kept)",
    "train.batch_size": "batches change size: the data stream continues from its saved position, but later "
                        "steps differ from the uninterrupted run's",
    "train.grad_accum": "the micro-batch split changes (the step's batch is the same rows)",
    "train.seq_len": "rows change length: later batches differ from the uninterrupted run's",
    "train.seed": "a new seed: later batch orders and dropout differ",
    "train.eval_every": "evaluations happen at other steps (training is unchanged)",
    "train.eval_batches": "evaluations cover another number of batches (training is unchanged)",
    "train.log_every": "logging only (training is unchanged)",
    "train.steps_per_call": "how many steps run per compiled call (the results are the same)",
    "train.remat": "memory / speed only (the results are the same up to rounding)",
    "train": "the training step changes from the resumed step on",
    "data": "the data changes: the stream's saved position may not carry over (a mismatch is an error)",
    "model": "the model's numerics change (dtypes, attention kernel): results differ by rounding",
    "checkpoint": "checkpointing only (training is unchanged)",
    "logging": "logging only (training is unchanged)",
    "eval": "what `jaxtune eval` runs (training is unchanged)",
    "mesh": "the device layout changes (the results are the same up to rounding)",
    "tokenizer": "the tokenizer changes: token ids may differ from those the run trained on",
    "objective": "the loss changes from the resumed step on",
}


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b.c": value}`` (lists stay values)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def config_changes(old: Optional[dict], new: Optional[dict]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every key whose value differs (a key missing on one
    side counts as None there)."""
    a, b = flatten(old or {}), flatten(new or {})
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def effect_of(key: str) -> str:
    """What changing ``key`` does to a resumed run (`EFFECTS`, longest matching prefix)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        effect = EFFECTS.get(".".join(parts[:n]))
        if effect is not None:
            return effect
    return "takes effect from the resumed step on"


def describe_resume(saved_job: Optional[dict], job: TrainJobConfig) -> list[str]:
    """The lines a resumed run prints: each setting that differs from the saved run's and what it does."""
    if saved_job is None:
        return ["resume: the run's saved job is not recorded, so changed settings cannot be listed"]
    changes = [(k, o, n) for k, o, n in config_changes(saved_job, to_dict(job)) if not k.startswith("model.")
               or k.split(".")[1] in ("param_dtype", "dtype", "attention_impl")]
    if not changes:
        return ["resume: the same settings as the saved run"]
    lines = [f"resume: {len(changes)} setting(s) differ from the saved run:"]
    lines += [f"  {k}: {o!r} -> {n!r}: {effect_of(k)}" for k, o, n in changes]
    return lines


def _example_tokens(example: Any) -> int:
    """Tokens of one loaded example: an SFT / classification example's, or a pair's prompt and both
    completions."""
    if hasattr(example, "chosen"):
        return len(example.prompt) + len(example.chosen) + len(example.rejected)
    return len(example.tokens)


def epoch_size(stream: Any) -> Optional[tuple[int, int, str]]:
    """(examples, tokens, what an example is) in one epoch of a stream that knows them, else None
    (streamed documents, rollouts)."""
    if isinstance(stream, TokenRowStream):
        return stream.num_rows, int(np.sum(stream.lengths - 1)), "rows"
    examples = getattr(stream, "examples", None)
    if isinstance(examples, list) and examples:
        return len(examples), sum(_example_tokens(e) for e in examples), "examples"
    return None


def _held_out(eval_streams) -> Optional[tuple[int, int, str]]:
    if eval_streams is None:
        return None
    stream = eval_streams()
    try:
        return epoch_size(stream)
    finally:
        if hasattr(stream, "close"):
            stream.close()


def _quant_text(job: TrainJobConfig) -> Optional[str]:
    q = job.model.quant
    if q is None:
        return None
    parts = [f"{q.kind}"] + [f"{k}={v}" for k, v in to_dict(q).items() if k != "kind" and v not in (None, False)]
    return "base quantized: " + ", ".join(parts) + " (frozen; adapters train in the compute dtype)"


def _peft_text(job: TrainJobConfig) -> Optional[str]:
    if not job.peft.active:
        return None
    def given(value):
        if isinstance(value, dict):
            kept = {k: given(v) for k, v in value.items() if v not in (None, False, {}, [])}
            return ", ".join(f"{k} {v}" for k, v in kept.items())
        return value

    sections = {k: v for k, v in to_dict(job.peft).items() if v not in (None, False, {}, [])}
    text = "; ".join(f"{k}: {given(v)}" for k, v in sections.items())
    return f"trains: PEFT ({text}); the base is frozen"


def describe_job(job: TrainJobConfig, objective_name: str, unit: str, cfg: ModelConfig, stream: Any,
                 eval_streams, source_text: str) -> list[str]:
    """The lines `jaxtune train` prints before its first step (module docstring)."""
    t, d = job.train, job.data
    lines = [f"job: objective {objective_name} on data.kind={d.kind}; model {cfg.family} "
             f"({cfg.num_layers} layers x {cfg.hidden_size}) from {source_text}"]
    size = epoch_size(stream)
    held = _held_out(eval_streams) if d.kind in ("text", "sft", "preference", "classification") else None
    if size is not None:
        n, tokens, what = size
        text = f"data: {n:,} training {what} ({tokens:,} tokens) per epoch"
        if held is not None:
            text += f"; {held[0]:,} {held[2]} ({held[1]:,} tokens) held out"
        lines.append(text)
    step_rows = f"step: {t.batch_size} rows of {t.seq_len} tokens"
    if t.grad_accum > 1:
        step_rows += f" in {t.grad_accum} micro-batches"
    if size is not None:
        n, tokens, what = size
        packed = getattr(stream, "packing", "pad") == "pack"
        rows = math.ceil(tokens / t.seq_len) if packed else n  # packed rows: about tokens / seq_len
        epochs = t.steps * t.batch_size / max(rows, 1)
        about = "about " if packed else ""
        step_rows += (f"; {t.steps:,} steps = {about}{epochs:.2f} epochs ({about}{math.ceil(rows / t.batch_size):,} "
                      "steps per epoch)")
    else:
        step_rows += f"; {t.steps:,} steps (the epoch size of this stream is not known up front)"
    lines.append(step_rows + f"; the loss is weighted by {unit}")
    for extra in (_quant_text(job), _peft_text(job)):
        if extra is not None:
            lines.append(extra)
    if not job.peft.active and job.train.trainable is not None:
        lines.append(f"trains: the params matching train.trainable {list(job.train.trainable)}")
    return lines
