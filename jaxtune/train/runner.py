"""A training job from its config: model, streams, optimizer, checkpointer, logging -> `train`.

This is what `jaxtune train` and `jaxtune eval` run; Python users call
`run_training(job)` / `run_evaluation(job)` with a `TrainJobConfig` (and may pass
callbacks). Recipes with other losses reuse `build_streams` and the loop directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import jax

from jaxtune.checkpoint.manager import TrainCheckpointer
from jaxtune.config.loader import to_dict
from jaxtune.config.schema import ModelSource, TrainJobConfig
from jaxtune.data.streams import SyntheticStream, TokenRowStream, resolve_path, text_tokens
from jaxtune.data.tokenizer import BYTE_TOKENIZER_FILE, CharTokenizer, load_tokenizer
from jaxtune.interop.sources import load_model
from jaxtune.models import Model, ModelConfig
from jaxtune.models.presets import preset
from jaxtune.parallel.mesh import make_mesh
from jaxtune.parallel.rules import param_shardings
from jaxtune.train.loop import TrainResult, evaluate, train
from jaxtune.train.losses import causal_lm_loss
from jaxtune.train.optim import build_optimizer
from jaxtune.train.step import make_eval_step

EVAL_SEED_OFFSET = 1_000_003  # the synthetic held-out stream never repeats a training batch's seed


def model_for_training(source: ModelSource) -> tuple[Any, ModelConfig, Optional[Path]]:
    """-> (params or ``rng -> params`` init function, cfg, directory). Random-init models are
    returned as an init function so the loop can build them directly on the mesh."""
    numerics = dict(param_dtype=source.param_dtype, dtype=source.dtype, attention_impl=source.attention_impl)
    if source.preset is not None or source.config is not None:
        cfg = (preset(source.preset) if source.preset is not None else source.config).replace(**numerics)
        return (lambda _rng: Model(cfg).init(jax.random.key(source.init_seed))), cfg, None
    return load_model(source)


def build_streams(job: TrainJobConfig, cfg: ModelConfig, tokenizer=None) -> tuple[Any, Callable[[], Iterable[dict]]]:
    """-> (training stream, factory of fresh held-out streams)."""
    t, d = job.train, job.data
    if d.kind == "synthetic":
        pad = cfg.pad_token_id or 0
        train_stream = SyntheticStream(t.batch_size, t.seq_len, cfg.vocab_size, seed=t.seed, pad_fraction=d.pad_fraction, pad_id=pad)
        return train_stream, lambda: SyntheticStream(
            t.batch_size, t.seq_len, cfg.vocab_size, seed=t.seed + EVAL_SEED_OFFSET, pad_fraction=d.pad_fraction, pad_id=pad
        )
    if d.kind == "text":
        if d.path is None:
            raise ValueError("data.path: required when data.kind is 'text'")
        tokens = text_tokens(d.path, tokenizer)
        if d.eval_path is not None:
            held_out = text_tokens(d.eval_path, tokenizer)
        else:
            cut = int(len(tokens) * (1.0 - d.eval_fraction))
            tokens, held_out = tokens[:cut], tokens[cut:]
        for name, ids in ((d.path, tokens), (d.eval_path or f"{d.path} (held-out tail)", held_out)):
            if len(ids) and int(ids.max()) >= cfg.vocab_size:
                raise ValueError(f"data: {name} has token id {int(ids.max())} >= the model's vocab_size {cfg.vocab_size}")
        pad = cfg.pad_token_id or 0
        train_stream = TokenRowStream(tokens, t.batch_size, t.seq_len, seed=t.seed, pad_id=pad, name=str(d.path))
        held_out_name = str(d.eval_path or f"{d.path} (held-out tail, data.eval_fraction={d.eval_fraction})")

        def eval_streams():  # one pass over the held-out rows, in order
            return TokenRowStream(held_out, t.batch_size, t.seq_len, shuffle=False, epochs=1, pad_id=pad, name=held_out_name)

        eval_streams()  # validate now, not at the first evaluation
        return train_stream, eval_streams
    raise ValueError(f"data.kind: unknown kind {d.kind!r} (synthetic | text)")


def _tokenizer(job: TrainJobConfig, model_dir: Optional[Path]):
    if job.data.kind != "text":
        return None
    directory = job.tokenizer.path or model_dir
    if job.tokenizer.kind == "char" and not (directory and (Path(directory) / BYTE_TOKENIZER_FILE).exists()):
        # nanoGPT's character-level setup: the vocabulary is every character of the whole file
        # (train and held-out alike); it is saved beside the checkpoints.
        return CharTokenizer.from_text(resolve_path(job.data.path).read_text(encoding="utf-8"))
    return load_tokenizer(directory, job.tokenizer.kind)


def run_training(job: TrainJobConfig, *, callbacks: Sequence[Callable[[int, dict], None]] = (),
                 checkpointer: Optional[TrainCheckpointer] = None) -> TrainResult:
    params, cfg, model_dir = model_for_training(job.model)
    cfg = cfg.replace(remat=job.train.remat)
    tokenizer = _tokenizer(job, model_dir)
    stream, eval_streams = build_streams(job, cfg, tokenizer)
    optimizer, schedule = build_optimizer(job.optim, job.train.steps)
    mesh = make_mesh(job.mesh)
    own_checkpointer = checkpointer is None
    if own_checkpointer:
        meta = {"job": to_dict(job), "base": to_dict(job.model),
                "trainable": None if job.train.trainable is None else list(job.train.trainable)}
        checkpointer = TrainCheckpointer(job.checkpoint, cfg, extra_meta=meta)
    if tokenizer is not None and job.checkpoint.directory and jax.process_index() == 0:
        tokenizer.save(job.checkpoint.directory)  # so generate / eval on the checkpoint need no tokenizer flags
    try:
        return train(
            loss_fn=causal_lm_loss(Model(cfg), z_loss=job.train.z_loss, chunk_tokens=job.train.loss_chunk_tokens),
            params=params, model_cfg=cfg, optimizer=optimizer, schedule=schedule, cfg=job.train,
            batches=stream, mesh=mesh, eval_batches=eval_streams, checkpointer=checkpointer,
            logging=job.logging, log_dir=job.logging.directory or job.checkpoint.directory, callbacks=callbacks,
        )
    finally:
        if own_checkpointer:
            checkpointer.close()


def run_evaluation(job: TrainJobConfig) -> dict:
    """Restore ``job.model`` (a checkpoint, HF directory or preset) on ``job.mesh`` and evaluate it
    on the held-out stream: token-weighted loss and perplexity over ``train.eval_batches`` batches."""
    params, cfg, model_dir = load_model(job.model)
    mesh = make_mesh(job.mesh)
    params = jax.device_put(params, param_shardings(params, mesh, warn=False))
    _, eval_streams = build_streams(job, cfg, _tokenizer(job, model_dir))
    loss_fn = causal_lm_loss(Model(cfg), z_loss=job.train.z_loss, chunk_tokens=job.train.loss_chunk_tokens)
    from jaxtune.parallel.mesh import batch_sharding

    step = make_eval_step(loss_fn, mesh=mesh, params_shardings=param_shardings(params, mesh, warn=False), batch_shardings=batch_sharding(mesh))
    return evaluate(step, params, eval_streams(), mesh, job.train.eval_batches)
