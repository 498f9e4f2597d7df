"""A job's batch streams from its ``data`` section: the language-model streams of pretraining
(synthetic, one text file, documents) and the record streams objectives build their rows from
(instruction, labelled, preference records), each with a factory of fresh held-out streams."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Optional

import jax

from jaxtune.data.pipeline import DocumentOptions, DocumentStream
from jaxtune.data.prefetch import Prefetch
from jaxtune.data.sources import build_source
from jaxtune.data.streams import DataConfig, SyntheticStream, TokenRowStream, text_tokens
from jaxtune.job.schema import TrainJobConfig
from jaxtune.models import ModelConfig

log = logging.getLogger(__name__)
EVAL_SEED_OFFSET = 1_000_003  # the synthetic held-out stream never repeats a training batch's seed
LM_KINDS = ("synthetic", "text", "documents")
Streams = tuple[Any, Optional[Callable[[], Iterable[dict]]]]  # (training stream, factory of held-out streams)


def check_data_kind(job: TrainJobConfig, kinds: tuple[str, ...]) -> None:
    """The objective trains on ``kinds`` of data; anything else is an error naming both keys."""
    if job.data.kind not in kinds:
        raise ValueError(f"data.kind={job.data.kind} and objective.kind={job.objective.kind} do not go together "
                         f"(objective {job.objective.kind} trains on data.kind {' | '.join(kinds)})")


def lm_streams(job: TrainJobConfig, cfg: ModelConfig, tokenizer=None, *, train: bool = True) -> Streams:
    """Language-model rows (tokens, targets, loss_mask, segment_ids, positions) from synthetic
    sequences, one text file cut into rows, or documents. ``train=False``: no training stream of
    documents is opened (its prefetch thread would never be closed)."""
    t, d = job.train, job.data
    pad = cfg.pad_token_id or 0
    if d.kind == "synthetic":
        train_stream = SyntheticStream(t.batch_size, t.seq_len, cfg.vocab_size, seed=t.seed, pad_fraction=d.pad_fraction,
                                       pad_id=pad)
        # the held-out set: train.eval_batches batches (4 when 0) of another seed; synthetic data has no end
        return train_stream, lambda: SyntheticStream(
            t.batch_size, t.seq_len, cfg.vocab_size, seed=t.seed + EVAL_SEED_OFFSET, pad_fraction=d.pad_fraction,
            pad_id=pad, batches=t.eval_batches or 4,
        )
    if d.kind == "text":
        return _text_streams(job, cfg, tokenizer)
    if d.kind == "documents":
        return document_streams(d, t.batch_size, t.seq_len, t.seed, tokenizer, vocab_size=cfg.vocab_size, pad_id=pad,
                                train=train)
    raise ValueError(f"data.kind: {d.kind!r} is not a language-model stream ({' | '.join(LM_KINDS)})")


def _text_streams(job: TrainJobConfig, cfg: ModelConfig, tokenizer) -> Streams:
    t, d = job.train, job.data
    if d.path is None:
        raise ValueError("data.path: required when data.kind is 'text'")
    tokens = text_tokens(d.path, tokenizer)
    if d.eval_path is not None:
        held_out = text_tokens(d.eval_path, tokenizer, key="data.eval_path")
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


def record_streams(job: TrainJobConfig, load: Callable[[list, str, str], Any], stream: Callable[..., Any], *,
                   train: bool = True, prepare: Optional[Callable[[Any], None]] = None) -> Streams:
    """Streams over records read whole from their sources: ``load(sources, split, name)`` -> an
    example set, ``stream(examples, **kw)`` -> its batch stream. Held out: data.eval_sources, else
    the data.eval_fraction share of the sources by row hash. ``train=False``: only the held-out
    factory (the training stream is None). ``prepare``: called on each loaded example set (DPO:
    precompute the reference log-probs)."""
    d, t = job.data, job.train
    if any(c.weight != 1.0 for c in d.sources):
        raise ValueError(f"data.sources: weights are for pretraining mixtures; data.kind={d.kind} reads every "
                         "record of every source once per epoch (repeat a file to weight it)")
    train_sources = [build_source(c) for c in d.sources]
    splits = ("all", "all") if d.eval_sources else ("train", "eval")
    eval_sources = [build_source(c) for c in d.eval_sources] if d.eval_sources else train_sources
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


def record_options(job: TrainJobConfig, cfg: ModelConfig) -> dict:
    """What every record loader takes from the job: the held-out share, row length, BOS, bad-row
    policy and the vocabulary bound."""
    d = job.data
    return dict(eval_fraction=d.eval_fraction, seq_len=job.train.seq_len, add_bos=d.add_bos, on_bad_row=d.on_bad_row,
                vocab_size=cfg.vocab_size)


def owned_shards(num_shards: int) -> list[int]:
    """The logical data shards this process reads: an equal, contiguous share."""
    processes, index = jax.process_count(), jax.process_index()
    if num_shards % processes:
        raise ValueError(f"data.shards ({num_shards}) must be a multiple of the number of processes ({processes})")
    per = num_shards // processes
    return list(range(index * per, (index + 1) * per))


def document_streams(d: DataConfig, batch_size: int, seq_len: int, seed: int, tokenizer, *, vocab_size: int,
                     pad_id: int = 0, train: bool = True) -> Streams:
    """-> (host-sharded training stream with prefetch, or None without ``train``; factory of
    one-pass held-out streams)."""
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

    def eval_streams():  # one pass over the held-out documents, in order
        return DocumentStream(eval_sources, eval_weights, tokenizer, split=eval_split, seed=seed, shuffle=False,
                              epochs=1, name="data.eval_sources" if d.eval_sources else "held-out documents", **common)

    eval_streams().check_documents()  # validate now (usable held-out documents per shard), not at the first evaluation
    if not train:
        return None, eval_streams
    train_stream = DocumentStream(train_sources, [c.weight for c in d.sources], tokenizer, split=train_split,
                                  seed=seed, shuffle=d.shuffle, name="data.sources", **common)
    return Prefetch(train_stream, d.prefetch), eval_streams


def report_skipped(stream) -> None:
    skipped = stream.skipped() if hasattr(stream, "skipped") else {}
    if skipped:
        log.warning("data: this process skipped %d bad rows (data.on_bad_row=skip): %s", sum(skipped.values()),
                    ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items())))
