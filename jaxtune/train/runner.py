"""A training job from its config: model, streams, optimizer, checkpointer, logging -> `train`.

This is what `jaxtune train` and `jaxtune eval` run; Python users call
`run_training(job)` / `run_evaluation(job)` with a `TrainJobConfig` (and may pass
callbacks). Recipes with other losses reuse `build_streams` and the loop directly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import jax

from jaxtune.checkpoint.manager import TrainCheckpointer
from jaxtune.config.loader import to_dict
from jaxtune.config.schema import ModelSource, TrainJobConfig
from jaxtune.data.pipeline import DocumentOptions, DocumentStream
from jaxtune.data.prefetch import Prefetch
from jaxtune.data.sources import build_source, read_text, resolve_path
from jaxtune.data.streams import DataConfig, SyntheticStream, TokenRowStream, text_tokens
from jaxtune.data.tokenizer import BYTE_TOKENIZER_FILE, CharTokenizer, load_tokenizer
from jaxtune.interop.sources import load_model
from jaxtune.models import Model, ModelConfig
from jaxtune.models.presets import preset
from jaxtune.parallel.mesh import make_mesh
from jaxtune.parallel.rules import param_shardings
from jaxtune.peft.config import apply_peft, peft_mask, peft_optimizer
from jaxtune.peft.core import any_mask
from jaxtune.quant.weight import quantize
from jaxtune.train.loop import TrainResult, evaluate, train
from jaxtune.train.losses import LossFn, objective_loss
from jaxtune.train.optim import build_optimizer
from jaxtune.train.partition import mask_by_regex
from jaxtune.train.step import make_eval_step

log = logging.getLogger(__name__)
EVAL_SEED_OFFSET = 1_000_003  # the synthetic held-out stream never repeats a training batch's seed


def model_for_training(source: ModelSource) -> tuple[Any, ModelConfig, Optional[Path]]:
    """-> (params or ``rng -> params`` init function, cfg, directory). Random-init models are
    returned as an init function so the loop can build them directly on the mesh."""
    if source.adapter is not None:
        raise ValueError("model.adapter puts a fixed PEFT adapter on the weights (for generate / eval / convert); "
                         "to train from an imported adapter, set peft.adapter to its directory instead")
    numerics = source.numerics
    if source.preset is not None or source.config is not None:
        cfg = (preset(source.preset) if source.preset is not None else source.config).replace(**numerics)
        if source.quant is None:
            return (lambda _rng: Model(cfg).init(jax.random.key(source.init_seed))), cfg, None
        return (lambda _rng: quantize(Model(cfg).init(jax.random.key(source.init_seed)), source.quant)), cfg, None
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
    if d.kind == "documents":
        return document_streams(d, t.batch_size, t.seq_len, t.seed, tokenizer, vocab_size=cfg.vocab_size,
                                pad_id=cfg.pad_token_id or 0)
    if d.kind in RECORD_KINDS:
        return record_streams(job, cfg, tokenizer)
    raise ValueError(f"data.kind: unknown kind {d.kind!r} (synthetic | text | documents | {' | '.join(RECORD_KINDS)})")


RECORD_KINDS = {"sft": ("causal", "grpo", "ppo"), "classification": ("classification", "regression"), "preference": ("dpo", "reward")}


def reference_kind(job: TrainJobConfig) -> str:
    """Where a DPO job's reference log-probs come from: the adapter-disabled policy (PEFT) or a pass
    over the data with the starting weights before training (full fine-tuning)."""
    chosen = job.objective.preference.reference
    if chosen == "auto":
        return "adapter" if job.peft.active else "precomputed"
    if chosen == "adapter" and not job.peft.active:
        raise ValueError("objective.preference.reference=adapter needs a PEFT policy (peft: ...); a fully fine-tuned "
                         "policy uses reference=precomputed")
    return chosen


def record_streams(job: TrainJobConfig, cfg: ModelConfig, tokenizer, *, train: bool = True,
                   prepare: Optional[Callable[[Any], None]] = None) -> tuple[Any, Optional[Callable[[], Iterable[dict]]]]:
    """SFT (instruction), classification or preference streams over records read whole from their
    sources; held out: data.eval_sources, else the data.eval_fraction share of the sources by row
    hash. ``train=False``: only the held-out factory (the training stream is None). ``prepare``:
    called on each loaded example set (DPO: precompute the reference log-probs)."""
    from jaxtune.data.classify import LabelledStream, load_labelled
    from jaxtune.data.preference import PairStream, load_pairs
    from jaxtune.data.sft import ExampleStream, load_examples

    d, t, objective = job.data, job.train, job.objective
    if any(c.weight != 1.0 for c in d.sources):
        raise ValueError(f"data.sources: weights are for pretraining mixtures; data.kind={d.kind} reads every "
                         "record of every source once per epoch (repeat a file to weight it)")
    classify = d.kind == "classification"
    if objective.kind not in RECORD_KINDS[d.kind]:
        raise ValueError(f"data.kind={d.kind} and objective.kind={objective.kind} do not go together "
                         f"({d.kind} data trains objective {' / '.join(RECORD_KINDS[d.kind])})")
    train_sources = [build_source(c) for c in d.sources]
    splits = ("all", "all") if d.eval_sources else ("train", "eval")
    eval_sources = [build_source(c) for c in d.eval_sources] if d.eval_sources else train_sources
    pad = cfg.pad_token_id or 0
    common = dict(eval_fraction=d.eval_fraction, seq_len=t.seq_len, add_bos=d.add_bos, on_bad_row=d.on_bad_row,
                  vocab_size=cfg.vocab_size)
    if classify:
        regression = objective.kind == "regression"

        def load(sources, split, name):
            return load_labelled(sources, d.classify, tokenizer, num_labels=objective.head_labels,
                                 regression=regression, split=split, name=name, **common)

        def stream(examples, **kw):
            return LabelledStream(examples, t.batch_size, t.seq_len, regression=regression, pad_id=pad, **kw)
    elif d.kind == "preference":
        def load(sources, split, name):
            return load_pairs(sources, d.preference, tokenizer, split=split, add_eos=d.add_eos, name=name, **common)

        def stream(examples, **kw):
            return PairStream(examples, t.batch_size, t.seq_len, pad_id=pad, **kw)
    else:
        def load(sources, split, name):
            return load_examples(sources, d.sft, tokenizer, split=split, add_eos=d.add_eos,
                                 block=d.tokenize_batch, name=name, **common)

        def stream(examples, **kw):
            return ExampleStream(examples, t.batch_size, t.seq_len, packing=d.packing, pad_id=pad, **kw)

    train_examples = load(train_sources, splits[0], "data.sources") if train else None
    try:
        eval_examples = load(eval_sources, splits[1], "data.eval_sources" if d.eval_sources else "held-out records")
    except ValueError as err:
        if d.eval_sources:
            raise
        log.warning("no held-out records (%s); training without evaluation", err)
        eval_examples = None
    if prepare is not None:
        for examples in (train_examples, eval_examples):
            if examples is not None:
                prepare(examples)
    train_stream = stream(train_examples, seed=t.seed, name="data.sources") if train else None
    if eval_examples is None:
        return train_stream, None
    return train_stream, lambda: stream(eval_examples, shuffle=False, epochs=1, name="held-out records")


def owned_shards(num_shards: int) -> list[int]:
    """The logical data shards this process reads: an equal, contiguous share."""
    processes, index = jax.process_count(), jax.process_index()
    if num_shards % processes:
        raise ValueError(f"data.shards ({num_shards}) must be a multiple of the number of processes ({processes})")
    per = num_shards // processes
    return list(range(index * per, (index + 1) * per))


def document_streams(d: DataConfig, batch_size: int, seq_len: int, seed: int, tokenizer, *, vocab_size: int,
                     pad_id: int = 0) -> tuple[Any, Callable[[], Iterable[dict]]]:
    """-> (host-sharded training stream with prefetch, factory of one-pass held-out streams)."""
    num_shards = d.shards or jax.process_count()
    shards = owned_shards(num_shards)
    add_eos = d.add_eos if d.add_eos is not None else getattr(tokenizer, "eos_token_id", None) is not None
    options = DocumentOptions(add_bos=d.add_bos, add_eos=add_eos, on_bad_row=d.on_bad_row,
                              block=d.tokenize_batch, vocab_size=vocab_size)
    train_sources = [build_source(c) for c in d.sources]
    if d.eval_sources:
        eval_sources, eval_weights = [build_source(c) for c in d.eval_sources], [c.weight for c in d.eval_sources]
        train_split, eval_split = "all", "all"
    else:
        eval_sources, eval_weights = train_sources, [c.weight for c in d.sources]
        train_split, eval_split = "train", "eval"
    common = dict(batch_size=batch_size, seq_len=seq_len, packing=d.packing, options=options,
                  eval_fraction=d.eval_fraction, num_shards=num_shards, shards=shards, pad_id=pad_id)
    train_stream = DocumentStream(train_sources, [c.weight for c in d.sources], tokenizer, split=train_split,
                                  seed=seed, shuffle=d.shuffle, name="data.sources", **common)

    def eval_streams():  # one pass over the held-out documents, in order
        return DocumentStream(eval_sources, eval_weights, tokenizer, split=eval_split, seed=seed, shuffle=False,
                              epochs=1, name="data.eval_sources" if d.eval_sources else "held-out documents", **common)

    eval_streams()  # validate now (enough held-out documents per shard), not at the first evaluation
    return Prefetch(train_stream, d.prefetch), eval_streams


def _tokenizer(job: TrainJobConfig, model_dir: Optional[Path]):
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


def job_loss(job: TrainJobConfig, cfg: ModelConfig, tokenizer=None, value_cfg: Optional[ModelConfig] = None) -> LossFn:
    """The job's objective as a loss function: causal LM, or masked LM (the tokenizer's mask token
    unless ``objective.mask_token_id`` is set; its BOS/EOS/pad tokens are never masked)."""
    specials = tuple(sorted({int(i) for i in (getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad"))
                             if i is not None}))
    reference = reference_kind(job) if job.objective.kind == "dpo" else "precomputed"
    if job.objective.kind in ("grpo", "ppo"):
        reference = "adapter" if job.peft.active else ("batch" if job.objective.grpo.kl_coef else "none")
    return objective_loss(Model(cfg), job.objective, z_loss=job.train.z_loss, chunk_tokens=job.train.loss_chunk_tokens,
                          tokenizer_mask_id=getattr(tokenizer, "mask_token_id", None), special_ids=specials,
                          reference=reference, value_model=None if value_cfg is None else Model(value_cfg))


def value_model(job: TrainJobConfig) -> Optional[tuple[Any, ModelConfig]]:
    """PPO with ``objective.ppo.value_model``: (the separate value network's params, its cfg)."""
    if job.objective.kind != "ppo" or job.objective.ppo.value_model is None:
        return None
    from jaxtune.align.ppo import add_value_model

    params, cfg = add_value_model({}, job.objective.ppo.value_model, jax.random.key(job.model.init_seed + 1),
                                  **job.model.numerics)
    return params["value_model"], cfg.replace(remat=job.train.remat)


def with_peft(job: TrainJobConfig, params: Any, cfg: ModelConfig, tokenizer, optimizer):
    """-> (params or init function, trainable mask or None, optimizer) for the job's ``peft``
    section. Loaded weights are transformed here, once; a random-init model's init function
    is wrapped, so the loop still builds it straight onto the mesh. ``train.trainable``
    regexes add to the PEFT mask (like PEFT's modules_to_save)."""
    if not job.peft.active:
        return params, None, optimizer
    if callable(params):
        init = params
        params = lambda rng: apply_peft(init(rng), job.peft, model_cfg=cfg, tokenizer=tokenizer)  # noqa: E731
        abstract = jax.eval_shape(params, jax.random.key(0))
    else:
        params = abstract = apply_peft(params, job.peft, model_cfg=cfg, tokenizer=tokenizer)
    mask = peft_mask(abstract, job.peft)
    if job.train.trainable is not None:
        mask = any_mask(mask, mask_by_regex(abstract, job.train.trainable))
    return params, mask, peft_optimizer(optimizer, job.peft, job.train.steps)


def rollout_stream(job: TrainJobConfig, params: Any, cfg: ModelConfig, tokenizer, value_cfg: Optional[ModelConfig] = None):
    """GRPO / PPO: the rollout stream over the prompts of the job's records (data.kind=sft); a fully
    fine-tuned policy with a KL penalty keeps its starting weights as the reference."""
    from jaxtune.align.grpo import GroupRolloutStream
    from jaxtune.align.ppo import PPORolloutStream
    from jaxtune.data.sft import read_records

    if job.data.kind != "sft":
        raise ValueError(f"objective.kind={job.objective.kind} samples from the prompts of data.kind=sft records (prompt/completion, "
                         "Alpaca or messages; the completion is the reference answer the reward checks)")
    from collections import Counter

    counts: Counter = Counter()
    split = "all" if job.data.eval_sources else "train"
    records = read_records([build_source(c) for c in job.data.sources], split, job.data.eval_fraction,
                           on_bad_row=job.data.on_bad_row, counts=counts)
    reference = None
    kl = job.objective.grpo.kl_coef if job.objective.kind == "grpo" else job.objective.ppo.kl_coef
    if kl and not job.peft.active:
        reference = params(jax.random.key(0)) if callable(params) else params
    common = dict(batch_size=job.train.batch_size, seq_len=job.train.seq_len, seed=job.train.seed,
                  add_bos=job.data.add_bos, reference_params=reference)
    model = Model(cfg.replace(remat="none"))
    if job.objective.kind == "grpo":
        return GroupRolloutStream(records, job.objective.grpo, model, tokenizer, job.data.sft, **common)
    scorer = None
    if job.objective.ppo.reward_model is not None:
        from jaxtune.align.label import load_reward_judge

        scorer = load_reward_judge(job.objective.ppo.reward_model, tokenizer, job.train.batch_size, **job.model.numerics)
    if value_cfg is not None and value_cfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"objective.ppo.value_model {job.objective.ppo.value_model} has vocab_size {value_cfg.vocab_size}, "
                         f"the policy {cfg.vocab_size}: a value network reads the policy's tokens, so it needs its tokenizer")
    values = None if value_cfg is None else Model(value_cfg.replace(remat="none"))
    return PPORolloutStream(records, job.objective.ppo, model, tokenizer, job.data.sft, scorer=scorer,
                            value_model=values, **common)


def reference_pass(job: TrainJobConfig, params: Any, cfg: ModelConfig) -> Optional[Callable[[Any], None]]:
    """DPO with reference=precomputed: a function that scores every pair of an example set with the
    starting weights (``params``, before any training) and keeps the log-probs on it."""
    if job.objective.kind != "dpo" or job.objective.preference.loss == "orpo" or reference_kind(job) != "precomputed":
        return None
    from jaxtune.align.objectives import precompute_reference

    start = params(jax.random.key(0)) if callable(params) else params
    model = Model(cfg.replace(remat="none"))

    def prepare(examples):
        examples.reference = precompute_reference(model, start, examples, batch_size=job.train.batch_size,
                                                  seq_len=job.train.seq_len, pad_id=cfg.pad_token_id or 0)

    return prepare


def head_key(job: TrainJobConfig) -> Optional[str]:
    """The top-level key of the job's head: score (classification, regression, reward), value_head
    or value_model (PPO), None."""
    if job.objective.kind == "ppo":
        return "value_head" if job.objective.ppo.value_model is None else "value_model"
    return "score" if job.objective.head_labels else None


def with_head(job: TrainJobConfig, params: Any, cfg: ModelConfig, mask: Any, value: Any = None) -> tuple[Any, Any]:
    """Classification / regression / reward jobs: the score head; PPO: the value head, or ``value``
    (the separate value network). Added after PEFT (so adapter patterns never reach it) and always
    trainable, next to whatever else trains."""
    name = head_key(job)
    if name is None:
        return params, mask
    from jaxtune.align.ppo import VALUE_HEAD, add_value_head
    from jaxtune.train.classify import add_score_head

    key = jax.random.key(job.model.init_seed + 1)

    def add(p):
        if name == "value_model":
            return {**p, name: value}
        return add_value_head(p, cfg, key) if name == VALUE_HEAD else add_score_head(p, cfg, job.objective.head_labels, key)

    if callable(params):
        init = params
        params = lambda rng: add(init(rng))  # noqa: E731
        abstract = jax.eval_shape(params, jax.random.key(0))
    else:
        params = abstract = add(params)
    base_mask = mask if mask is not None else mask_by_regex(abstract, job.train.trainable)
    if mask is not None and jax.tree.structure(mask) != jax.tree.structure(abstract):
        base_mask = {**mask, name: jax.tree.map(lambda _: False, abstract[name])}
    return params, any_mask(base_mask, mask_by_regex(abstract, [f"^{name}/"]))


def run_training(job: TrainJobConfig, *, callbacks: Sequence[Callable[[int, dict], None]] = (),
                 checkpointer: Optional[TrainCheckpointer] = None) -> TrainResult:
    params, cfg, model_dir = model_for_training(job.model)
    cfg = cfg.replace(remat=job.train.remat)
    if job.objective.kind == "masked":
        cfg = cfg.replace(causal=False)  # masked LM attends both ways
    tokenizer = _tokenizer(job, model_dir)
    value = value_model(job)
    value_cfg = None if value is None else value[1]
    if job.objective.kind in ("grpo", "ppo"):
        stream, eval_streams = rollout_stream(job, params, cfg, tokenizer, value_cfg), None
    elif job.data.kind in RECORD_KINDS:
        stream, eval_streams = record_streams(job, cfg, tokenizer, prepare=reference_pass(job, params, cfg))
    else:
        stream, eval_streams = build_streams(job, cfg, tokenizer)
    optimizer, schedule = build_optimizer(job.optim, job.train.steps)
    params, trainable_mask, optimizer = with_peft(job, params, cfg, tokenizer, optimizer)
    params, trainable_mask = with_head(job, params, cfg, trainable_mask, None if value is None else value[0])
    mesh = make_mesh(job.mesh)
    own_checkpointer = checkpointer is None
    if own_checkpointer:
        meta = {"job": to_dict(job), "base": to_dict(job.model),
                "trainable": None if job.train.trainable is None else list(job.train.trainable),
                "peft": to_dict(job.peft) if job.peft.active else None,
                "head": None if head_key(job) is None else {
                    "kind": job.objective.kind, "num_labels": job.objective.head_labels or 1, "pooling": job.objective.pooling,
                    "key": head_key(job), **({} if value_cfg is None else {"model_config": to_dict(value_cfg)})}}
        checkpointer = TrainCheckpointer(job.checkpoint, cfg, extra_meta=meta)
    if tokenizer is not None and job.checkpoint.directory and jax.process_index() == 0:
        tokenizer.save(job.checkpoint.directory)  # so generate / eval on the checkpoint need no tokenizer flags
    try:
        return train(
            loss_fn=job_loss(job, cfg, tokenizer, value_cfg), params=params, model_cfg=cfg, optimizer=optimizer, schedule=schedule, cfg=job.train,
            batches=stream, mesh=mesh, eval_batches=eval_streams, checkpointer=checkpointer, trainable_mask=trainable_mask,
            logging=job.logging, log_dir=job.logging.directory or job.checkpoint.directory, callbacks=callbacks,
        )
    finally:
        if hasattr(stream, "close"):
            stream.close()
        _report_skipped(stream)
        if own_checkpointer:
            checkpointer.close()


def _report_skipped(stream) -> None:
    skipped = stream.skipped() if hasattr(stream, "skipped") else {}
    if skipped:
        log.warning("data: this process skipped %d bad rows (data.on_bad_row=skip): %s", sum(skipped.values()),
                    ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items())))


def run_evaluation(job: TrainJobConfig) -> dict:
    """Restore ``job.model`` (a checkpoint, HF directory or preset) on ``job.mesh`` and evaluate it
    on the held-out stream: token-weighted loss and perplexity over ``train.eval_batches`` batches."""
    params, cfg, model_dir = load_model(job.model)
    mesh = make_mesh(job.mesh)
    params = jax.device_put(params, param_shardings(params, mesh, warn=False))
    tokenizer = _tokenizer(job, model_dir)
    _, eval_streams = build_streams(job, cfg, tokenizer)
    loss_fn = job_loss(job, cfg, tokenizer)
    from jaxtune.parallel.mesh import batch_sharding

    step = make_eval_step(loss_fn, mesh=mesh, params_shardings=param_shardings(params, mesh, warn=False), batch_shardings=batch_sharding(mesh))
    return evaluate(step, params, eval_streams(), mesh, job.train.eval_batches)
