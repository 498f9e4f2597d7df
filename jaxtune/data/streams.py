"""Batch streams the training loop consumes: the protocol, a synthetic stream and a text-file stream.

A stream yields global batches (dicts of numpy ``[global_batch, seq]`` arrays
in the language-modelling layout of `jaxtune.train.losses`) and can report and
restore its position, which the loop stores in every checkpoint so a resumed
run sees exactly the batches the uninterrupted run would have. Streams are
deterministic functions of (seed, position): no hidden RNG state.

Documents from files and datasets (packing, mixtures, host sharding) are
`jaxtune.data.pipeline.DocumentStream`; this module holds the config, the
protocol and the two simplest streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional, Protocol

import numpy as np

from jaxtune.data.classify import ClassifyDataConfig
from jaxtune.data.instruct import InstructConfig
from jaxtune.data.preference import PreferenceConfig
from jaxtune.data.sentence_pairs import SentencePairConfig
from jaxtune.data.sources import SourceConfig, read_text, resolve_path


class BatchStream(Protocol):
    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...
    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


@dataclass(frozen=True)
class DataConfig:
    """kind: synthetic (learnable counting sequences) | text (one continuous UTF-8 file cut into
    rows, nanoGPT style) | documents (files / datasets of documents, packed or padded, mixed by
    weight, host-sharded; `jaxtune.data.pipeline`) | sft (instruction records: prompt /
    completion, Alpaca, chat messages; `jaxtune.data.sft`) | classification (text + label
    records; `jaxtune.data.classify`) | preference (chosen / rejected pairs, also the HH dialogue
    layout; `jaxtune.data.preference`) | sentence_pairs (documents split into sentences, BERT's
    [CLS] A [SEP] B [SEP] next-sentence pairs; `jaxtune.data.sentence_pairs`)."""

    kind: Literal["synthetic", "text", "documents", "sft", "classification", "preference", "sentence_pairs"] = "synthetic"
    path: Optional[str] = None  # text: a UTF-8 file tokenized with the job's tokenizer
    eval_path: Optional[str] = None  # text: held-out file; default: the last eval_fraction of `path`
    eval_fraction: float = 0.05  # text: tail share held out; documents: share of documents held out (by index hash)
    pad_fraction: float = 0.0  # synthetic: share of each row that is padding, drawn per row up to this
    sources: tuple[SourceConfig, ...] = ()  # documents: what to train on (weights mix them by rows)
    eval_sources: tuple[SourceConfig, ...] = ()  # documents: held-out data; default: eval_fraction of `sources`
    packing: Literal["pack", "pad"] = "pack"  # documents: several per row (split at row ends), or one per row
    add_bos: bool = False  # documents: put the tokenizer's BOS before each document
    add_eos: Optional[bool] = None  # documents: EOS after each document; None: when the tokenizer has one
    on_bad_row: Literal["error", "skip"] = "error"  # documents: malformed / empty rows stop the run, or are skipped and counted
    shards: Optional[int] = None  # documents: logical data shards (default: the process count); must divide batch_size
    shuffle: bool = True  # documents: a seeded permutation of documents per epoch
    prefetch: int = 2  # documents: batches prepared ahead in a background thread (0: none)
    tokenize_batch: int = 256  # documents: documents per tokenizer call
    sft: InstructConfig = field(default_factory=InstructConfig)  # sft: formats, columns, chat template, loss masking
    classify: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)  # classification: text / label fields
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)  # preference: layout and fields of pairs
    pairs: SentencePairConfig = field(default_factory=SentencePairConfig)  # sentence_pairs: splitting, random share

    def __post_init__(self):
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.pad_fraction < 1.0:
            raise ValueError(f"data.pad_fraction must be in [0, 1), got {self.pad_fraction}")
        if self.kind in ("documents", "sft", "classification", "preference", "sentence_pairs") and not self.sources:
            raise ValueError(f"data.sources: data.kind={self.kind} needs at least one source")
        if self.shards is not None and self.shards < 1:
            raise ValueError(f"data.shards must be >= 1, got {self.shards}")
        if self.tokenize_batch < 1:
            raise ValueError(f"data.tokenize_batch must be >= 1, got {self.tokenize_batch}")


def lm_batch(rows: np.ndarray, lengths: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """rows: [batch, seq + 1] token ids -> the LM batch dict; ``lengths`` real tokens per row (rest padding)."""
    batch, width = rows.shape
    seq = width - 1
    if lengths is None:
        lengths = np.full((batch,), width)
    real = np.arange(width)[None, :] < lengths[:, None]
    segment_ids = real[:, :-1].astype(np.int32)
    loss_mask = (real[:, 1:] & real[:, :-1]).astype(np.float32)
    return {
        "tokens": rows[:, :seq].astype(np.int32),
        "targets": rows[:, 1:].astype(np.int32),
        "segment_ids": segment_ids,
        "loss_mask": loss_mask,
    }


class SyntheticStream:
    """Learnable synthetic sequences: each row counts up from a random start by a random stride
    (mod vocab), so a model's loss falls as it learns. Batch ``i`` depends only on (seed, i).
    ``pad_fraction`` > 0 pads each row by a random share up to that fraction, so batches carry
    different numbers of real tokens. ``batches``: end after that many (a held-out set; None: endless)."""

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int, *, seed: int = 0, pad_fraction: float = 0.0,
                 pad_id: int = 0, batches: Optional[int] = None):
        if not 0.0 <= pad_fraction < 1.0:
            raise ValueError(f"data.pad_fraction must be in [0, 1), got {pad_fraction}")
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, vocab_size
        self.seed, self.pad_fraction, self.pad_id, self.batches = seed, pad_fraction, pad_id, batches
        self.position = 0

    def batch_at(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        start = rng.integers(0, self.vocab_size, (self.batch_size, 1))
        stride = rng.integers(1, 8, (self.batch_size, 1))
        rows = (start + stride * np.arange(self.seq_len + 1)[None, :]) % self.vocab_size
        lengths = None
        if self.pad_fraction:
            width = self.seq_len + 1
            lengths = width - rng.integers(0, int(width * self.pad_fraction) + 1, (self.batch_size,))
            rows = np.where(np.arange(width)[None, :] < lengths[:, None], rows, self.pad_id)
        return lm_batch(rows, lengths)

    def __iter__(self):
        return self

    def __next__(self):
        if self.batches is not None and self.position >= self.batches:
            raise StopIteration
        batch = self.batch_at(self.position)
        self.position += 1
        return batch

    def get_state(self) -> dict:
        return {"kind": "synthetic", "position": self.position, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        if state.get("kind") != "synthetic" or state.get("seed") != self.seed:
            raise ValueError(f"data state {state} is not from a synthetic stream with seed {self.seed}")
        self.position = int(state["position"])


class TokenRowStream:
    """Rows of ``seq_len + 1`` tokens cut from one token array (a tokenized text file) with a
    stride of ``seq_len``, so every token after the first is a target exactly once per epoch; the
    last, shorter row is padded (no loss on the padding): nothing is dropped. Rows are visited in
    a seeded permutation that changes every epoch. ``epochs=None`` repeats forever; a finite
    count ends the stream, the last batch padded with empty rows. Position = rows consumed."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0, shuffle: bool = True,
                 epochs: Optional[int] = None, pad_id: int = 0, name: str = "text"):
        tokens = np.asarray(tokens)
        if len(tokens) < 2:
            raise ValueError(f"{name}: {len(tokens)} tokens, need at least 2 for one target")
        self.num_rows = -(-(len(tokens) - 1) // seq_len)
        starts = np.arange(self.num_rows) * seq_len
        self.lengths = np.minimum(seq_len + 1, len(tokens) - starts)
        padded = np.concatenate([tokens, np.full(seq_len + 1, pad_id, tokens.dtype)])
        self.rows = padded[starts[:, None] + np.arange(seq_len + 1)[None, :]]
        if epochs is None and self.num_rows < batch_size:
            raise ValueError(f"{name}: {len(tokens)} tokens give {self.num_rows} rows of {seq_len + 1}, "
                             f"fewer than one batch of {batch_size}")
        self.batch_size, self.seq_len, self.seed, self.shuffle = batch_size, seq_len, seed, shuffle
        self.epochs, self.pad_id, self.name = epochs, pad_id, name
        self.position = 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def __iter__(self):
        return self

    def __next__(self):
        end = None if self.epochs is None else self.epochs * self.num_rows
        if end is not None and self.position >= end:
            raise StopIteration
        idx = []
        pos = self.position
        while len(idx) < self.batch_size and (end is None or pos < end):
            epoch, offset = divmod(pos, self.num_rows)
            take = min(self.batch_size - len(idx), self.num_rows - offset)
            idx.extend(self._order(epoch)[offset: offset + take])
            pos += take
        self.position = pos
        idx = np.asarray(idx)
        rows, lengths = self.rows[idx], self.lengths[idx]
        if len(idx) < self.batch_size:  # the end of a finite stream: fill with empty rows
            fill = self.batch_size - len(idx)
            rows = np.concatenate([rows, np.full((fill, self.seq_len + 1), self.pad_id, rows.dtype)])
            lengths = np.concatenate([lengths, np.zeros(fill, lengths.dtype)])
        return lm_batch(rows, lengths)

    def get_state(self) -> dict:
        return {"kind": "rows", "name": self.name, "position": self.position, "seed": self.seed, "rows": self.num_rows}

    def set_state(self, state: dict) -> None:
        if state.get("kind") != "rows" or state.get("rows") != self.num_rows or state.get("seed") != self.seed:
            raise ValueError(
                f"data state {state} does not match this stream ({self.name}: {self.num_rows} rows, seed {self.seed})"
            )
        self.position = int(state["position"])


def text_tokens(path: str | Path, tokenizer, key: str = "data.path") -> np.ndarray:
    """Tokenize a UTF-8 text file in one pass (no BOS/EOS: it is one continuous document).
    ``key``: the config key that named the file, for errors."""
    path = resolve_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{key}: {path} does not exist")
    try:
        text = read_text(path)
    except UnicodeDecodeError as err:
        raise ValueError(f"{key}: {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    if not text.strip():
        raise ValueError(f"{key}: {path} is empty")
    return np.asarray(tokenizer.encode(text), dtype=np.int32)
