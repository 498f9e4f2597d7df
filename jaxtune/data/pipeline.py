"""The document pipeline: sources -> shards -> tokenized documents -> packed rows -> batches.

Determinism and host sharding. The data is cut into ``num_shards`` logical shards; shard
``k`` reads the documents at positions ``k, k + S, k + 2S, ...`` of each source's order
(a seeded permutation per epoch for random-access sources, the stream order otherwise)
and fills ``batch_size / S`` rows of every global batch. A process builds only the rows
of the shards it owns (``shards``), so each host reads and tokenizes its own slice, and
the global batch is the shards' rows in shard order whatever the process count: two
processes with shards {0} and {1} produce exactly the batches one process with shards
{0, 1} does. The loop assembles the global array with
``jax.make_array_from_process_local_data``.

State. A shard's position is, per source, (epoch, cursor, token offset into the current
document) plus the number of rows it has filled (which seeds the mixture draw) and the
bad rows it skipped; `get_state` returns the owned shards', `merge_states` joins every
process's, and `set_state` takes back the owned ones. Held-out documents are chosen by a
hash of their index, so train and eval never share a document and the split does not
depend on the seed or on streaming.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Sequence

import numpy as np

from jaxtune.data.packing import concat_rows, empty_rows, piece_of, write_piece
from jaxtune.data.sources import BadRow, DocumentSource

log = logging.getLogger(__name__)

Split = Literal["all", "train", "eval"]


def held_out(indices: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each document index belongs to the held-out split (a fixed hash of the index:
    splitmix64 -> uniform [0, 1) < fraction)."""
    if fraction <= 0:
        return np.zeros(np.shape(indices), bool)
    with np.errstate(over="ignore"):
        z = np.asarray(indices, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


@dataclass(frozen=True)
class DocumentOptions:
    """How documents become tokens: the tokenizer's BOS/EOS added or not, bad rows raised or
    skipped (and counted), documents tokenized ``block`` at a time."""

    add_bos: bool = False
    add_eos: bool = True
    on_bad_row: Literal["error", "skip"] = "error"
    block: int = 256
    vocab_size: Optional[int] = None  # token ids must be below it


class ShardReader:
    """The documents of one source that fall in one shard and one split, tokenized a block at a
    time and handed out as pieces. ``epochs=None`` cycles forever (a new order every epoch)."""

    def __init__(self, source: DocumentSource, tokenizer, options: DocumentOptions, *, source_index: int,
                 shard: int, num_shards: int, split: Split, eval_fraction: float, seed: int, shuffle: bool,
                 epochs: Optional[int]):
        self.source, self.tokenizer, self.options = source, tokenizer, options
        self.source_index, self.shard, self.num_shards = source_index, shard, num_shards
        self.split, self.eval_fraction, self.seed, self.shuffle, self.epochs = split, eval_fraction, seed, shuffle, epochs
        self.bos = self._special("bos") if options.add_bos else None
        self.eos = self._special("eos") if options.add_eos else None
        if source.random_access:
            ids = np.arange(len(source))
            if split != "all":
                ids = ids[held_out(ids, eval_fraction) == (split == "eval")]
            if len(ids) < num_shards:
                raise ValueError(
                    f"data source {source.name}: {len(ids)} {split} documents for {num_shards} shards"
                    + (f" (data.eval_fraction={eval_fraction} of {len(source)} documents is held out; give "
                       "data.eval_sources, or more documents)" if split != "all" else "")
                )
            self.ids = ids
        self.epoch, self.cursor, self.offset = 0, 0, 0
        self.skipped: Counter = Counter()
        self._reset_bad_count()
        self._reset_cache()

    def _special(self, which: str) -> int:
        value = getattr(self.tokenizer, f"{which}_token_id", None)
        if value is None:
            raise ValueError(f"data.add_{which}: the tokenizer has no {which.upper()} token")
        return int(value)

    def _reset_cache(self):
        self._docs: deque = deque()  # (cursor, epoch, tokens) ahead of the read position
        self._order_epoch, self._order = None, None
        self._stream, self._stream_next = None, None

    # --- reading documents -------------------------------------------------------------------
    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            ids = self.ids
            if self.shuffle:
                ids = ids[np.random.default_rng([self.seed, self.source_index, epoch]).permutation(len(ids))]
            self._order_epoch, self._order = epoch, ids[self.shard::self.num_shards]
        return self._order

    def _raw_block(self, epoch: int, cursor: int) -> list[tuple[int, int, object]]:
        """Up to ``block`` documents (cursor, epoch, text | BadRow) from (epoch, cursor) on."""
        out = []
        while len(out) < self.options.block:
            if self.epochs is not None and epoch >= self.epochs:
                break
            if self.source.random_access:
                order = self._order_for(epoch)
                if cursor >= len(order):
                    epoch, cursor = epoch + 1, 0
                    continue
                try:
                    item = self.source.read(int(order[cursor]))
                except BadRow as bad:
                    item = bad
                out.append((cursor, epoch, item))
                cursor += 1
            else:
                got = self._next_streamed(epoch, cursor)
                if got is None:  # the stream ended: the next epoch starts from its beginning
                    if cursor == 0:
                        raise ValueError(f"data source {self.source.name}: no {self.split} documents for shard {self.shard}")
                    epoch, cursor = epoch + 1, 0
                    continue
                index, item = got
                out.append((index, epoch, item))
                cursor = index + 1
        return out

    def _next_streamed(self, epoch: int, cursor: int):
        """The next (global index, item) at or after ``cursor`` that belongs to this shard and split."""
        if self._stream is None or self._stream_next != (epoch, cursor):
            self._stream = enumerate(self.source.stream(cursor), start=cursor)
        for index, item in self._stream:
            if index % self.num_shards != self.shard:
                continue
            if self.split != "all" and bool(held_out(np.asarray([index]), self.eval_fraction)[0]) != (self.split == "eval"):
                continue
            self._stream_next = (epoch, index + 1)
            return index, item
        self._stream = None
        return None

    def _refill(self) -> None:
        if self._docs:
            epoch, cursor = self._docs[-1][1], self._docs[-1][0] + 1
        else:
            epoch, cursor = self.epoch, self.cursor
        raw = self._raw_block(epoch, cursor)
        texts = [item for _, _, item in raw if not isinstance(item, BadRow)]
        try:
            encoded = iter(self.tokenizer.encode_batch(texts)) if texts else iter(())
        except ValueError:  # a text the tokenizer cannot encode (a character-level vocabulary): find which
            encoded = iter([self._encode_one(t) for t in texts])
        for cur, ep, item in raw:
            if isinstance(item, BadRow):
                self._docs.append((cur, ep, item))
                continue
            ids = next(encoded)
            if isinstance(ids, ValueError):
                self._docs.append((cur, ep, BadRow(f"{self.source.name} document at position {cur}", "untokenizable",
                                                   str(ids))))
                continue
            tokens = ([self.bos] if self.bos is not None else []) + list(ids) + ([self.eos] if self.eos is not None else [])
            tokens = np.asarray(tokens, np.int32)
            if len(tokens) < 2:
                tokens = BadRow(f"{self.source.name} document at position {cur}", "empty",
                                f"{len(tokens)} token after tokenization, a document needs 2 for one target")
            elif self.options.vocab_size is not None and int(tokens.max()) >= self.options.vocab_size:
                raise ValueError(f"data source {self.source.name}: token id {int(tokens.max())} >= the model's "
                                 f"vocab_size {self.options.vocab_size} (tokenizer and model do not match)")
            self._docs.append((cur, ep, tokens))

    def _encode_one(self, text: str):
        try:
            return self.tokenizer.encode_batch([text])[0]
        except ValueError as err:
            return err

    def _current(self) -> Optional[np.ndarray]:
        """Tokens of the document at the read position (bad rows raised or skipped), or None at the end."""
        while True:
            if not self._docs:
                self._refill()
                if not self._docs:
                    return None
            cursor, epoch, tokens = self._docs[0]
            self.cursor, self.epoch = cursor, epoch
            if not isinstance(tokens, BadRow):
                self.good_epoch = epoch
                return tokens
            self._skip(tokens)
            self._advance()
            self._check_not_all_bad(epoch)

    def _reset_bad_count(self) -> None:
        self.good_epoch, self.bad_epoch, self.bad_count = None, None, 0  # bad rows skipped in bad_epoch

    def _check_not_all_bad(self, epoch: int) -> None:
        """A reader whose every document of an epoch is a skipped bad row has nothing to give: a
        finite one would end empty (an evaluation of nothing), an endless one would spin forever."""
        if self.bad_epoch != epoch:
            self.bad_epoch, self.bad_count = epoch, 0
        self.bad_count += 1
        if not self.source.random_access or self.good_epoch == epoch:
            return
        per_epoch = len(self.ids[self.shard::self.num_shards])
        if self.bad_count >= per_epoch:
            which = {"train": "training ", "eval": "held-out "}.get(self.split, "")
            shard = f" of shard {self.shard}" if self.num_shards > 1 else ""
            counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items()))
            raise ValueError(f"data source {self.source.name}: all {per_epoch} {which}documents{shard} are bad rows "
                             f"(skipped: {counts}); it holds nothing to read")

    def _skip(self, bad: BadRow) -> None:
        if self.options.on_bad_row != "skip":
            raise ValueError(f"{bad} (set data.on_bad_row=skip to skip and count such rows)")
        if not self.skipped[bad.kind]:
            log.warning("skipping bad rows (data.on_bad_row=skip); first %s row: %s", bad.kind, bad)
        self.skipped[bad.kind] += 1

    def take(self, room: int) -> Optional[np.ndarray]:
        """The next piece with at most ``room`` inputs, or None when a finite reader is done."""
        tokens = self._current()
        if tokens is None:
            return None
        piece = piece_of(tokens, self.offset, room)
        self.offset += len(piece) - 1
        if self.offset >= len(tokens) - 1:  # document finished: move to the next one
            self._advance()
        return piece

    def _advance(self) -> None:
        """Past the document at the read position: the position becomes the next buffered
        document's, or the one after (the next read wraps into the next epoch if needed)."""
        cursor, epoch, _ = self._docs.popleft()
        self.offset = 0
        if self._docs:
            self.cursor, self.epoch = self._docs[0][0], self._docs[0][1]
        else:
            self.cursor, self.epoch = cursor + 1, epoch

    @property
    def exhausted(self) -> bool:
        return self._current() is None

    # --- state ------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset, "skipped": dict(self.skipped)}

    def set_state(self, state: dict) -> None:
        self.epoch, self.cursor, self.offset = int(state["epoch"]), int(state["cursor"]), int(state["offset"])
        self.skipped = Counter(state.get("skipped", {}))
        self._reset_bad_count()
        self._reset_cache()


class DocumentStream:
    """Global batches of packed (or padded) rows from weighted sources; yields this process's
    rows only (``process_local``). Position-deterministic: batch n depends only on the seed,
    the sources and n."""

    process_local = True

    def __init__(self, sources: Sequence[DocumentSource], weights: Sequence[float], tokenizer, *,
                 batch_size: int, seq_len: int, packing: Literal["pack", "pad"] = "pack",
                 options: DocumentOptions = DocumentOptions(), split: Split = "all", eval_fraction: float = 0.0,
                 seed: int = 0, shuffle: bool = True, epochs: Optional[int] = None, num_shards: int = 1,
                 shards: Optional[Sequence[int]] = None, pad_id: int = 0, name: str = "data"):
        if batch_size % num_shards:
            raise ValueError(f"data.shards ({num_shards}) must divide train.batch_size ({batch_size}): "
                             "every shard fills the same number of rows")
        if packing not in ("pack", "pad"):
            raise ValueError(f"data.packing must be pack | pad, got {packing!r}")
        shards = list(range(num_shards)) if shards is None else list(shards)
        weights = np.asarray(weights, np.float64)
        if len(weights) != len(sources) or not len(sources) or (weights <= 0).any():
            raise ValueError(f"{name}: need one positive weight per source, got {list(weights)} for {len(sources)}")
        self.sources, self.weights = list(sources), weights / weights.sum()
        self.batch_size, self.seq_len, self.packing = batch_size, seq_len, packing
        self.num_shards, self.shards, self.rows_per_shard = num_shards, shards, batch_size // num_shards
        self.seed, self.pad_id, self.name, self.split = seed, pad_id, name, split
        self.readers = {
            k: [ShardReader(src, tokenizer, options, source_index=i, shard=k, num_shards=num_shards, split=split,
                            eval_fraction=eval_fraction, seed=seed, shuffle=shuffle, epochs=epochs)
                for i, src in enumerate(self.sources)]
            for k in shards
        }
        self.rows_done = {k: 0 for k in shards}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def _pick_source(self, shard: int, row: int) -> Optional[ShardReader]:
        readers = self.readers[shard]
        if len(readers) == 1:
            return None if readers[0].exhausted else readers[0]
        live = [i for i, r in enumerate(readers) if not r.exhausted]
        if not live:
            return None
        w = self.weights[live] / self.weights[live].sum()
        u = np.random.default_rng([self.seed, 7, shard, row]).random()
        return readers[live[min(int(np.searchsorted(np.cumsum(w), u, side="right")), len(live) - 1)]]

    def _fill(self, rows: dict, r: int, shard: int) -> bool:
        """Fill row ``r`` for ``shard``; False when every source of the shard is finished."""
        reader = self._pick_source(shard, self.rows_done[shard])
        if reader is None:
            return False
        self.rows_done[shard] += 1
        slot, segment = 0, 0
        while slot < self.seq_len:
            piece = reader.take(self.seq_len - slot)
            if piece is None:
                break
            segment += 1
            slot = write_piece(rows, r, slot, piece, segment)
            if self.packing == "pad":
                break
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        parts, any_real = [], False
        for shard in self.shards:
            rows = empty_rows(self.rows_per_shard, self.seq_len, self.pad_id)
            for r in range(self.rows_per_shard):
                if not self._fill(rows, r, shard):
                    break
                any_real = True
            parts.append(rows)
        if not any_real:
            raise StopIteration
        return concat_rows(parts)

    def check_documents(self) -> None:
        """Read ahead to every reader's first usable document, so that a source with none in this
        split (every row a skipped bad row) raises now, naming it, and not at its first use."""
        for readers in self.readers.values():
            for reader in readers:
                reader.exhausted  # noqa: B018 (reads ahead; raises for a source of bad rows only)

    def empty_batch(self) -> dict[str, np.ndarray]:
        """This process's share of a batch with no real token (for collective end-of-data)."""
        return empty_rows(self.rows_per_shard * len(self.shards), self.seq_len, self.pad_id)

    def skipped(self) -> dict[str, int]:
        total: Counter = Counter()
        for readers in self.readers.values():
            for r in readers:
                total.update(r.skipped)
        return dict(total)

    # --- state ------------------------------------------------------------------------------
    def _signature(self) -> dict:
        return {"sources": [s.name for s in self.sources], "sizes": [len(s) if s.random_access else None for s in self.sources],
                "num_shards": self.num_shards, "rows_per_shard": self.rows_per_shard, "seq_len": self.seq_len,
                "packing": self.packing, "seed": self.seed, "split": self.split}

    def get_state(self) -> dict:
        return {"kind": "documents", "signature": self._signature(),
                "shards": {str(k): {"rows": self.rows_done[k], "readers": [r.get_state() for r in self.readers[k]]}
                           for k in self.shards}}

    @staticmethod
    def merge_states(states: Sequence[dict]) -> dict:
        """Join the per-process states (each holds its own shards) into one."""
        merged = dict(states[0])
        merged["shards"] = {}
        for s in states:
            merged["shards"].update(s["shards"])
        return merged

    def set_state(self, state: dict) -> None:
        if state.get("kind") != "documents":
            raise ValueError(f"{self.name}: the checkpoint's data state is not from a document stream ({state.get('kind')!r})")
        ours, theirs = self._signature(), state.get("signature", {})
        changed = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        if changed:
            detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{self.name}: cannot resume the data position, the data setup changed ({detail})")
        missing = [k for k in self.shards if str(k) not in state["shards"]]
        if missing:
            raise ValueError(f"{self.name}: the checkpoint's data state has no position for shards {missing}")
        for k in self.shards:
            shard_state = state["shards"][str(k)]
            self.rows_done[k] = int(shard_state["rows"])
            for reader, rs in zip(self.readers[k], shard_state["readers"]):
                reader.set_state(rs)
