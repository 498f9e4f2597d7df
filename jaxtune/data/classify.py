"""Labelled text for sequence classification and regression: records -> padded rows + labels.

A record holds a text field and a label field. Class labels are integers in
``[0, num_labels)`` or names listed in ``labels`` (mapped to their index); regression
labels are numbers. One example per row (right-padded), because the head pools each row
(its last real token, or the mean of its tokens). Over-long texts are truncated (keeping
the start), dropped or refused by ``on_long``, and counted; bad rows raise or are counted.

Batches: ``tokens``, ``segment_ids`` (1 = text, 0 = padding), ``positions``, ``labels``
(int32 classes or float32 values) and ``row_mask`` (0 for the empty rows that fill the
last batch of a finite pass).
"""

from __future__ import annotations

import numbers
from collections import Counter
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional, Sequence

import numpy as np

from jaxtune.data.sft import ExampleSet, OnePerRowStream, finish_loading, fit_length, read_records, skip_or_raise
from jaxtune.data.sources import BadRow, DocumentSource, text_of


@dataclass(frozen=True)
class ClassifyDataConfig:
    """``data.classify``: where text and label are, and the label names."""

    text: str = "text"
    label: str = "label"
    labels: tuple[str, ...] = ()  # class names, in index order (string labels are looked up here)
    on_long: Literal["truncate", "drop", "error"] = "truncate"


class LabelledExample(NamedTuple):
    tokens: np.ndarray
    label: float
    where: str


def label_of(record: dict, cfg: ClassifyDataConfig, where: str, *, num_labels: int, regression: bool) -> float:
    if cfg.label not in record or record[cfg.label] is None:
        raise BadRow(where, "missing_field", f"no field {cfg.label!r} (fields: {', '.join(map(str, list(record)[:12]))})")
    value = record[cfg.label]
    if regression:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
            raise BadRow(where, "bad_label", f"regression label {value!r} is not a finite number")
        return float(value)
    if isinstance(value, str):
        if value not in cfg.labels:
            raise BadRow(where, "bad_label", f"label {value!r} is not one of data.classify.labels {list(cfg.labels)}")
        return float(cfg.labels.index(value))
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < num_labels:
        raise BadRow(where, "bad_label", f"label {value!r} is not a class index in [0, {num_labels})")
    return float(value)


def load_labelled(sources: Sequence[DocumentSource], cfg: ClassifyDataConfig, tokenizer, *, num_labels: int,
                  regression: bool, split: str = "all", eval_fraction: float = 0.05, seq_len: int,
                  add_bos: bool = False, on_bad_row: str = "error", vocab_size: Optional[int] = None,
                  cls_sep: bool = False, name: str = "data.sources") -> ExampleSet:
    """The labelled examples of ``split``. ``cls_sep``: frame each text ``[CLS] text [SEP]`` (BERT, whose
    pooler reads the first token) when the tokenizer has both tokens."""
    counts: Counter = Counter()
    records = read_records(sources, split, eval_fraction, on_bad_row=on_bad_row, counts=counts)
    result = ExampleSet([], counts, len(records) + sum(counts.values()))
    parsed = []
    for record, where in records:
        try:
            parsed.append((text_of(record, cfg.text, where),
                           label_of(record, cfg, where, num_labels=num_labels, regression=regression), where))
        except BadRow as bad:
            skip_or_raise(bad, on_bad_row, counts)
    head, tail = [tokenizer.bos_token_id] if add_bos else [], []
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls_sep and cls is not None and sep is not None:
        head, tail = [cls], [sep]
    for (text, label, where), ids in zip(parsed, tokenizer.encode_batch([p[0] for p in parsed]) if parsed else []):
        tokens = np.asarray(head + list(ids) + tail, np.int32)
        if vocab_size is not None and len(tokens) and int(tokens.max()) >= vocab_size:
            raise ValueError(f"{where}: token id {int(tokens.max())} >= the model's vocab_size {vocab_size}")
        # seq_len tokens per row: fit_length counts inputs + one target, so allow seq_len - 1 + 1
        fitted = fit_length(tokens, tokens, where, seq_len - 1, cfg.on_long, counts)
        if fitted is None:
            continue
        if tail and len(fitted[0]) < len(tokens):  # truncated: the row still ends in [SEP], as BERT's do
            fitted = (np.concatenate([fitted[0][:-1], tail]).astype(np.int32),)
        result.examples.append(LabelledExample(fitted[0], label, where))
    return finish_loading(result, name, split, "labelled examples")


class LabelledStream(OnePerRowStream):
    """Padded rows of labelled examples (order, epochs and state: `OnePerRowStream`)."""

    state_kind = "labelled"

    def __init__(self, examples: ExampleSet, batch_size: int, seq_len: int, *, regression: bool, name: str = "classification",
                 **kw):
        super().__init__(examples, batch_size, seq_len, name=name, **kw)
        self.regression = regression

    def __next__(self) -> dict[str, np.ndarray]:
        indices = self.next_indices()
        b, s = self.batch_size, self.seq_len
        batch = {"tokens": np.full((b, s), self.pad_id, np.int32), "segment_ids": np.zeros((b, s), np.int32),
                 "positions": np.zeros((b, s), np.int32), "row_mask": np.zeros((b,), np.float32),
                 "labels": np.zeros((b,), np.float32 if self.regression else np.int32)}
        for row, index in enumerate(indices):
            example = self.examples[index]
            k = len(example.tokens)
            batch["tokens"][row, :k] = example.tokens
            batch["segment_ids"][row, :k] = 1
            batch["positions"][row, :k] = np.arange(k)
            batch["labels"][row] = example.label
            batch["row_mask"][row] = 1.0
        return batch
