"""Supervised fine-tuning data: instruction records -> tokenized examples -> packed batches.

`load_examples` reads every record of the configured sources (the held-out share chosen
by a hash of the row index, as for documents), renders it (`jaxtune.data.instruct`),
tokenizes its segments and keeps, per token, whether it is a target. Over-long examples
are truncated or dropped by ``data.sft.on_long`` and counted; malformed rows raise or, with
``data.on_bad_row=skip``, are counted; the counts are logged and kept on the stream.

`ExampleStream` turns examples into rows of ``seq_len``: packed (examples back to back,
each its own segment with positions from 0, never split across rows, so no example
attends to another) or padded (one per row). The loss mask is the examples' target mask,
so the causal-LM loss is normalised by real completion tokens, across gradient
accumulation too (the loop sums the weights of all micro-batches before dividing).
Batches are a function of (seed, position); every process builds the whole global batch.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import numpy as np

from jaxtune.data.instruct import InstructConfig, Segment, mask_rule, record_format, render, template_of
from jaxtune.data.packing import empty_rows, write_piece
from jaxtune.data.pipeline import held_out
from jaxtune.data.segments import encode_segments
from jaxtune.data.sources import BadRow, DocumentSource

log = logging.getLogger(__name__)


class Example(NamedTuple):
    tokens: np.ndarray  # int32 [n]
    trained: np.ndarray  # bool [n]: token i is a target (predicted from the tokens before it)
    where: str


@dataclass
class ExampleSet:
    examples: list[Example]
    counts: Counter = field(default_factory=Counter)  # truncated, dropped_long, no_target, skipped kinds
    total_rows: int = 0
    reference: Optional[np.ndarray] = None  # preference pairs: precomputed reference log-probs [n, 2]


def split_ids(source: DocumentSource, split: str, eval_fraction: float) -> np.ndarray:
    """Row indices of ``source`` in ``split`` (all | train | eval; eval by a fixed hash of the index)."""
    if not source.random_access:
        raise ValueError(f"data source {source.name}: SFT, classification and preference data need a random-access "
                         "source (files, or a Hugging Face dataset on disk or downloaded), not a streaming one")
    ids = np.arange(len(source))
    if split == "all":
        return ids
    return ids[held_out(ids, eval_fraction) == (split == "eval")]


def read_records(sources: Sequence[DocumentSource], split: str, eval_fraction: float, *, on_bad_row: str,
                 counts: Counter) -> list[tuple[dict, str]]:
    """(record, where) of every row in ``split`` of the sources, in order; bad rows raised or counted."""
    out = []
    for source in sources:
        for index in split_ids(source, split, eval_fraction):
            try:
                out.append(source.record(int(index)))
            except BadRow as bad:
                skip_or_raise(bad, on_bad_row, counts)
    return out


def skip_or_raise(bad: BadRow, on_bad_row: str, counts: Counter) -> None:
    if on_bad_row != "skip":
        raise ValueError(f"{bad} (data.on_bad_row=skip skips and counts such rows)") from None
    counts[bad.kind] += 1


def fit_length(tokens: np.ndarray, trained: np.ndarray, where: str, seq_len: int, on_long: str, counts: Counter):
    """The example cut to ``seq_len + 1`` tokens by ``on_long`` (None: dropped, counted)."""
    if len(tokens) <= seq_len + 1:
        return tokens, trained
    if on_long == "error":
        raise ValueError(f"{where}: {len(tokens)} tokens, longer than train.seq_len + 1 = {seq_len + 1} "
                         "(data.sft.on_long: truncate or drop such examples, counted)")
    if on_long == "drop":
        counts["dropped_long"] += 1
        return None
    counts["truncated"] += 1
    return tokens[: seq_len + 1], trained[: seq_len + 1]


def load_examples(sources: Sequence[DocumentSource], cfg: InstructConfig, tokenizer, *, split: str = "all",
                  eval_fraction: float = 0.05, seq_len: int, add_bos: bool = False, add_eos: Optional[bool] = None,
                  on_bad_row: str = "error", vocab_size: Optional[int] = None, block: int = 256,
                  name: str = "data.sources") -> ExampleSet:
    """Every usable example of ``split``; see the module docstring for what is dropped and counted."""
    result = ExampleSet([])
    records = read_records(sources, split, eval_fraction, on_bad_row=on_bad_row, counts=result.counts)
    result.total_rows = len(records) + sum(result.counts.values())
    eos = getattr(tokenizer, "eos_token_id", None) if add_eos is not False else None
    if add_eos and eos is None:
        raise ValueError("data.add_eos: the tokenizer has no EOS token")
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    if add_bos and bos is None:
        raise ValueError("data.add_bos: the tokenizer has no BOS token")
    templates: set[str] = set()
    for start in range(0, len(records), block):
        chunk = records[start: start + block]
        rendered, kept = [], []
        for record, where in chunk:
            try:
                templates.add(template_of(cfg, record_format(record, cfg, where), tokenizer))
                segments = render(record, where, cfg, tokenizer, eos=eos)
            except BadRow as bad:
                skip_or_raise(bad, on_bad_row, result.counts)
                continue
            rendered.append(([Segment(bos, False)] if bos is not None else []) + segments)
            kept.append(where)
        try:
            encoded = encode_segments(rendered, tokenizer)
        except ValueError:  # a text this tokenizer cannot encode: find the row
            encoded = []
            for segments, where in zip(rendered, kept):
                try:
                    encoded.append(encode_segments([segments], tokenizer)[0])
                except ValueError as err:
                    skip_or_raise(BadRow(where, "untokenizable", str(err)), on_bad_row, result.counts)
                    encoded.append(None)
        for item, where in zip(encoded, kept):
            if item is None:
                continue
            tokens, trained = item
            if vocab_size is not None and len(tokens) and int(tokens.max()) >= vocab_size:
                raise ValueError(f"{where}: token id {int(tokens.max())} >= the model's vocab_size {vocab_size} "
                                 "(tokenizer and model do not match)")
            fitted = fit_length(tokens, trained, where, seq_len, cfg.on_long, result.counts)
            if fitted is None:
                continue
            tokens, trained = fitted
            if not trained[1:].any():  # nothing to learn (the prompt filled the row)
                result.counts["no_target"] += 1
                continue
            result.examples.append(Example(tokens, trained, where))
    if templates:  # the job's log says how targets were chosen (stderr: stdout may carry --json results)
        print(f"{name} ({split} split): {mask_rule(templates, cfg, tokenizer)}", file=sys.stderr, flush=True)
    return finish_loading(result, name, split)


def finish_loading(result: ExampleSet, name: str, split: str, what: str = "examples") -> ExampleSet:
    """A loader's last step: no usable ``what`` is an error with the counts; else warn the counts."""
    if not result.examples:
        raise ValueError(f"{name}: no usable {what} in the {split} split ({dict(result.counts) or 'no rows'})")
    report_counts(name, split, result)
    return result


def report_counts(name: str, split: str, result: ExampleSet) -> None:
    if result.counts:
        log.warning("%s (%s split), of %d rows: %s", name, split, result.total_rows,
                    ", ".join(f"{n} {k}" for k, n in sorted(result.counts.items())))


class ExampleStream:
    """Rows of ``seq_len`` from examples (module docstring). ``epochs=None`` repeats forever with a
    new seeded order every epoch; a finite count ends the stream, its last batch filled with
    empty rows. Position = (epoch, examples consumed in it)."""

    process_local = False

    def __init__(self, examples: ExampleSet, batch_size: int, seq_len: int, *, packing: str = "pack", seed: int = 0,
                 shuffle: bool = True, epochs: Optional[int] = None, pad_id: int = 0, name: str = "sft"):
        if packing not in ("pack", "pad"):
            raise ValueError(f"data.packing must be pack or pad, got {packing!r}")
        self.examples, self.counts = examples.examples, examples.counts
        self.batch_size, self.seq_len, self.packing = batch_size, seq_len, packing
        self.seed, self.shuffle, self.epochs, self.pad_id, self.name = seed, shuffle, epochs, pad_id, name
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = None, None

    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.examples)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch, self._order = epoch, order
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = empty_rows(self.batch_size, self.seq_len, self.pad_id)
        row, slot, segment, wrote = 0, 0, 1, False
        while row < self.batch_size:
            if self.epochs is not None and self.epoch >= self.epochs:
                break
            order = self._order_for(self.epoch)
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            example = self.examples[int(order[self.cursor])]
            n = len(example.tokens) - 1
            if slot and (self.packing == "pad" or slot + n > self.seq_len):
                row, slot, segment = row + 1, 0, 1
                continue
            slot = write_piece(rows, row, slot, example.tokens, segment, example.trained)
            segment += 1
            self.cursor += 1
            wrote = True
        if not wrote:
            raise StopIteration
        return rows

    def get_state(self) -> dict:
        return {"kind": "sft", "name": self.name, "epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "examples": len(self.examples)}

    def set_state(self, state: dict) -> None:
        if state.get("kind") != "sft" or state.get("seed") != self.seed or state.get("examples") != len(self.examples):
            raise ValueError(f"data state {state} does not match this stream ({self.name}: {len(self.examples)} "
                             f"examples, seed {self.seed}); the data or its filtering changed since the checkpoint")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class OnePerRowStream:
    """Base of streams that put one example per row (classification, preference pairs): a seeded
    order per epoch, position = examples consumed, ``epochs=None`` forever, a finite pass ends
    with empty rows filling its last batch. Subclasses set ``state_kind`` and build a batch from
    the example indices `next_indices` hands out."""

    process_local = False
    state_kind = "rows"

    def __init__(self, examples: ExampleSet, batch_size: int, seq_len: int, *, seed: int = 0, shuffle: bool = True,
                 epochs: Optional[int] = None, pad_id: int = 0, name: str = "records"):
        self.source, self.examples, self.counts = examples, examples.examples, examples.counts
        self.batch_size, self.seq_len, self.seed, self.shuffle = batch_size, seq_len, seed, shuffle
        self.epochs, self.pad_id, self.name = epochs, pad_id, name
        self.position = 0
        self._order_epoch, self._order = None, None

    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.examples)
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> list[int]:
        """Indices of the next batch's examples (fewer than batch_size at the end of a finite pass)."""
        n = len(self.examples)
        end = None if self.epochs is None else self.epochs * n
        if end is not None and self.position >= end:
            raise StopIteration
        out = []
        while len(out) < self.batch_size and (end is None or self.position < end):
            epoch, offset = divmod(self.position, n)
            out.append(int(self._order_for(epoch)[offset]))
            self.position += 1
        return out

    def __iter__(self):
        return self

    def get_state(self) -> dict:
        return {"kind": self.state_kind, "name": self.name, "position": self.position, "seed": self.seed,
                "examples": len(self.examples)}

    def set_state(self, state: dict) -> None:
        if (state.get("kind") != self.state_kind or state.get("seed") != self.seed
                or state.get("examples") != len(self.examples)):
            raise ValueError(f"data state {state} does not match this stream ({self.name}: {len(self.examples)} "
                             f"examples, seed {self.seed})")
        self.position = int(state["position"])
