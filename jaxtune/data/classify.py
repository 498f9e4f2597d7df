"""Labelled text for sequence classification and regression: records -> padded rows + labels.

A record holds a text field and a label field. Class labels are integers in
``[0, num_labels)`` or names listed in ``labels`` (mapped to their index); regression
labels are numbers. One example per row (right-padded), because the head pools each row
(its last real token, or the mean of its tokens). Over-long texts are truncated (keeping
the start), dropped or refused by ``on_long``, and counted; bad rows raise or are counted.

Batches: ``tokens``, ``segment_ids`` (1 = text, 0 = padding), ``positions``, ``labels``
(int32 classes or float32 values), ``row_mask`` (0 for the empty rows that fill the
last batch of a finite pass) and, for text pairs (``text_pair``: ``[CLS] a [SEP] b [SEP]``),
``token_types``.
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
    # a second text (sentence-pair tasks: entailment, paraphrase): [CLS] text [SEP] text_pair [SEP] with
    # token types 0 / 1 (needs a tokenizer with [CLS] and [SEP])
    text_pair: Optional[str] = None
    label: str = "label"
    labels: tuple[str, ...] = ()  # class names, in index order (string labels are looked up here)
    on_long: Literal["truncate", "drop", "error"] = "truncate"


class LabelledExample(NamedTuple):
    tokens: np.ndarray
    label: float
    where: str
    types: Optional[np.ndarray] = None  # token types of a text pair (data.classify.text_pair)


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
    pooler reads the first token) when the tokenizer has both tokens. With ``cfg.text_pair`` every row
    is ``[CLS] text [SEP] text_pair [SEP]`` with token types 0 / 1, as a BERT tokenizer's
    ``tokenizer(text, text_pair)`` gives (and its ``longest_first`` truncation)."""
    counts: Counter = Counter()
    records = read_records(sources, split, eval_fraction, on_bad_row=on_bad_row, counts=counts)
    result = ExampleSet([], counts, len(records) + sum(counts.values()))
    parsed = []
    for record, where in records:
        try:
            second = text_of(record, cfg.text_pair, where) if cfg.text_pair else None
            parsed.append((text_of(record, cfg.text, where), second,
                           label_of(record, cfg, where, num_labels=num_labels, regression=regression), where))
        except BadRow as bad:
            skip_or_raise(bad, on_bad_row, counts)
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cfg.text_pair and (cls is None or sep is None):
        raise ValueError("data.classify.text_pair: the tokenizer has no [CLS] / [SEP] tokens to join two texts "
                         "with ([CLS] text [SEP] text_pair [SEP]: a BERT-style tokenizer)")
    firsts = tokenizer.encode_batch([p[0] for p in parsed]) if parsed else []
    seconds = tokenizer.encode_batch([p[1] for p in parsed]) if parsed and cfg.text_pair else [None] * len(parsed)
    for (_, _, label, where), ids, pair_ids in zip(parsed, firsts, seconds):
        if pair_ids is not None:
            fitted = _fit_pair(list(ids), list(pair_ids), cls, sep, where, seq_len, cfg.on_long, counts)
        else:
            fitted = _fit_single(list(ids), [tokenizer.bos_token_id] if add_bos else [],
                                 [sep] if cls_sep and cls is not None and sep is not None else [],
                                 [cls] if cls_sep and cls is not None and sep is not None else None,
                                 where, seq_len, cfg.on_long, counts)
        if fitted is None:
            continue
        tokens, types = fitted
        if vocab_size is not None and len(tokens) and int(tokens.max()) >= vocab_size:
            raise ValueError(f"{where}: token id {int(tokens.max())} >= the model's vocab_size {vocab_size}")
        result.examples.append(LabelledExample(tokens, label, where, types))
    return finish_loading(result, name, split, "labelled examples")


def _fit_single(ids: list, bos: list, tail: list, cls: Optional[list], where: str, seq_len: int, on_long: str,
                counts: Counter):
    """One text's row (BOS or [CLS] first, [SEP] last when framed), cut to ``seq_len`` by ``on_long``."""
    tokens = np.asarray((cls if cls is not None else bos) + ids + tail, np.int32)
    # seq_len tokens per row: fit_length counts inputs + one target, so allow seq_len - 1 + 1
    fitted = fit_length(tokens, tokens, where, seq_len - 1, on_long, counts)
    if fitted is None:
        return None
    if tail and len(fitted[0]) < len(tokens):  # truncated: the row still ends in [SEP], as BERT's do
        return np.concatenate([fitted[0][:-1], tail]).astype(np.int32), None
    return fitted[0], None


def _fit_pair(first: list, second: list, cls: int, sep: int, where: str, seq_len: int, on_long: str, counts: Counter):
    """``[CLS] first [SEP] second [SEP]`` and its token types; over ``seq_len``, by ``on_long``: an error,
    dropped (counted), or truncated as `tokenizers`' ``longest_first`` does (one token at a time from the
    end of the longer text, the second on a tie; counted)."""
    room = seq_len - 3
    if len(first) + len(second) > room:
        if on_long == "error":
            raise ValueError(f"{where}: {len(first) + len(second) + 3} tokens, longer than train.seq_len = {seq_len} "
                             "(data.classify.on_long: truncate or drop such examples, counted)")
        if on_long == "drop" or room < 2:
            counts["dropped_long"] += 1
            return None
        counts["truncated"] += 1
        n1, n2 = len(first), len(second)
        for _ in range(n1 + n2 - room):
            if n1 > n2:
                n1 -= 1
            else:
                n2 -= 1
        first, second = first[:n1], second[:n2]
    tokens = np.asarray([cls, *first, sep, *second, sep], np.int32)
    types = np.zeros(len(tokens), np.int32)
    types[len(first) + 2:] = 1
    return tokens, types


class LabelledStream(OnePerRowStream):
    """Padded rows of labelled examples (order, epochs and state: `OnePerRowStream`)."""

    state_kind = "labelled"

    def __init__(self, examples: ExampleSet, batch_size: int, seq_len: int, *, regression: bool, name: str = "classification",
                 **kw):
        super().__init__(examples, batch_size, seq_len, name=name, **kw)
        self.regression = regression
        self.pairs = any(e.types is not None for e in self.examples)  # text pairs: batches carry token_types

    def __next__(self) -> dict[str, np.ndarray]:
        indices = self.next_indices()
        b, s = self.batch_size, self.seq_len
        batch = {"tokens": np.full((b, s), self.pad_id, np.int32), "segment_ids": np.zeros((b, s), np.int32),
                 "positions": np.zeros((b, s), np.int32), "row_mask": np.zeros((b,), np.float32),
                 "labels": np.zeros((b,), np.float32 if self.regression else np.int32)}
        if self.pairs:
            batch["token_types"] = np.zeros((b, s), np.int32)
        for row, index in enumerate(indices):
            example = self.examples[index]
            k = len(example.tokens)
            batch["tokens"][row, :k] = example.tokens
            batch["segment_ids"][row, :k] = 1
            batch["positions"][row, :k] = np.arange(k)
            batch["labels"][row] = example.label
            if example.types is not None:
                batch["token_types"][row, :k] = example.types
            batch["row_mask"][row] = 1.0
        return batch
