"""Sentence pairs for BERT's next-sentence prediction (NSP): documents -> sentences -> pairs -> rows.

Loading (`load_sentence_documents`): a source row (a record's ``data.pairs.text``, or a plain-text
source's document) is one document, held out for eval by its row index as in the other record
loaders; it is split into sentences (`split_sentences`) tokenized without special tokens.

Pairs (`pairs_for_epoch`, BERT's ``create_instances_from_document``): a generator seeded by (seed,
epoch) visits the documents in a random order, gathering each one's consecutive sentences into
chunks of a target length (``max_tokens = seq_len - 3``, or with probability ``short_seq_prob`` one
in ``[2, max_tokens]``, drawn per chunk) or up to the document's end. A chunk of >= 2 sentences
gives a pair: A = its first k sentences (k uniform in ``[1, len - 1]``); with probability
``random_next`` B = consecutive sentences from a random start in another (uniformly drawn)
document, up to the tokens A left, and the walk resumes right after A; else B = the rest of the
chunk, the text that followed A. A one-sentence chunk gives no pair (BERT forces a random B
there, skewing the 50/50 split) and is counted. An over-long pair loses tokens from its longer
side (B on a tie), each from the front or the back with probability 1/2 (BERT's truncate_seq_pair).

Rows: ``[CLS] A [SEP] B [SEP]``, token types 0 through the first [SEP], 1 after. Batches
(`SentencePairStream`, one pair per row, right-padded): ``tokens``, ``segment_ids`` (1 real, 0
padding), ``positions``, ``token_types`` [B, S] int32 (0 on padding); ``nsp_labels`` [B] int32 (0: B
followed A, 1: B is random; BertForPreTraining's convention); ``row_mask`` [B] float32 (0 for the
empty rows filling the last batch of a finite pass). Batches are a function of (seed, position).
"""

from __future__ import annotations

import logging
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Optional, Sequence

import numpy as np

from jaxtune.data.sft import report_counts, skip_or_raise, split_ids
from jaxtune.data.sources import BadRow, ConcatSource, DocumentSource, TextFileSource, text_of

log = logging.getLogger(__name__)

SPLITTERS = ("rule", "line", "paragraph")
_ABBREVIATIONS = frozenset("mr mrs ms dr prof st jr sr rev gen col lt sgt capt mt vs etc cf al fig approx".split())
_CLOSERS = "\"'”’»)]"
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’»)\]]*(?=\s)")
_INITIALISM = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")  # e.g, i.e, U.S (before their last period)
_NEWLINES = re.compile(r"\s*\n\s*")
_BLANK_LINE = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class SentencePairConfig:
    """``data.pairs``: how documents become sentences, and the share of random next sentences."""

    sentences: Literal["rule", "line", "paragraph"] = "rule"  # rule-based splitter | each line | each paragraph
    text: str = "text"  # records: the field that holds the text (plain-text sources give text)
    random_next: float = 0.5  # share of pairs whose B is a random sentence from another document
    short_seq_prob: float = 0.1  # share of chunks aimed at a random length in [2, seq_len - 3]

    def __post_init__(self):
        if self.sentences not in SPLITTERS:
            raise ValueError(f"data.pairs.sentences must be one of {' | '.join(SPLITTERS)}, got {self.sentences!r}")
        if not isinstance(self.text, str) or not self.text:
            raise ValueError(f"data.pairs.text must name a record field, got {self.text!r}")
        if not 0.0 < self.random_next < 1.0:
            raise ValueError(f"data.pairs.random_next must be in (0, 1), got {self.random_next}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ValueError(f"data.pairs.short_seq_prob must be in [0, 1], got {self.short_seq_prob}")


def split_sentences(text: str, how: str = "rule") -> list[str]:
    """The non-empty sentences of ``text`` (newlines inside one become spaces); ``how``: rule | line | paragraph."""
    if how == "line":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if how == "paragraph":
        pieces = _BLANK_LINE.split(text)
    elif how == "rule":
        ends = [match.end() for match in _SENTENCE_END.finditer(text) if _ends_sentence(text, match)]
        pieces = [text[i:j] for i, j in zip([0] + ends, ends + [len(text)])]
    else:
        raise ValueError(f"data.pairs.sentences must be one of {' | '.join(SPLITTERS)}, got {how!r}")
    return [p for p in (_NEWLINES.sub(" ", piece).strip() for piece in pieces) if p]


def _ends_sentence(text: str, match: re.Match) -> bool:
    """Whether the punctuation ``match`` ends a sentence: ``!``, ``?`` and ``...`` do; a lone period
    does unless it follows an abbreviation (Mr. e.g. etc.) or a single capital initial (J.)."""
    if match.group().rstrip(_CLOSERS) != ".":
        return True
    word = re.search(r"\S*$", text[max(0, match.start() - 40): match.start()]).group().lstrip("\"'“‘([")
    return not (word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isupper()) or _INITIALISM.fullmatch(word))


@dataclass
class SentenceDocuments:
    """Documents as lists of tokenized sentences (int32, non-empty), with where each came from."""

    documents: list[list[np.ndarray]]
    where: list[str]
    counts: Counter = field(default_factory=Counter)  # skipped rows, by kind
    total_rows: int = 0

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def sentences(self) -> int:
        return sum(len(doc) for doc in self.documents)

    @property
    def tokens(self) -> int:
        return sum(len(s) for doc in self.documents for s in doc)

    @property
    def single_sentence(self) -> int:  # documents of one sentence: sources of random next sentences only
        return sum(len(doc) == 1 for doc in self.documents)


def document_text(source: DocumentSource, index: int, text_field: str) -> tuple[str, str]:
    """(text, where) of row ``index``: a record's ``text_field``, or a plain-text source's document."""
    while isinstance(source, ConcatSource):
        source, index = source._locate(index)
    if type(source).record is not DocumentSource.record:
        record, where = source.record(index)
        return text_of(record, text_field, where), where
    line = f":{source.lines[index]}" if isinstance(source, TextFileSource) else f" row {index}"
    return source.read(index), f"{source.name}{line}"


def _encode(documents: list[list[str]], tokenizer) -> list[list[np.ndarray]]:
    """Each document's sentences tokenized in one batch call, empty ones dropped."""
    ids = iter(tokenizer.encode_batch([s for doc in documents for s in doc]) if any(documents) else [])
    return [[a for a in (np.asarray(next(ids), np.int32) for _ in doc) if len(a)] for doc in documents]


def _encode_block(block: list[tuple[str, str]], how: str, tokenizer, on_bad_row: str, counts: Counter) -> list:
    """[(sentence arrays, where)] of a block of (text, where); rows the tokenizer cannot encode raise or are counted."""
    split = [split_sentences(text, how) for text, _ in block]
    try:
        return list(zip(_encode(split, tokenizer), (where for _, where in block)))
    except ValueError:  # a text this tokenizer cannot encode: find the row
        out = []
        for sentences, (_, where) in zip(split, block):
            try:
                out.append((_encode([sentences], tokenizer)[0], where))
            except ValueError as err:
                skip_or_raise(BadRow(where, "untokenizable", str(err)), on_bad_row, counts)
        return out


def load_sentence_documents(sources: Sequence[DocumentSource], cfg: SentencePairConfig, tokenizer, *,
                            split: str = "all", eval_fraction: float = 0.05, on_bad_row: str = "error",
                            vocab_size: Optional[int] = None, block: int = 256,
                            name: str = "data.sources") -> SentenceDocuments:
    """The documents of ``split`` as tokenized sentences; refuses < 2 documents, or none of >= 2 sentences."""
    result, texts = SentenceDocuments([], []), []
    for source in sources:
        for index in split_ids(source, split, eval_fraction):
            try:
                texts.append(document_text(source, int(index), cfg.text))
            except BadRow as bad:
                skip_or_raise(bad, on_bad_row, result.counts)
    result.total_rows = len(texts) + sum(result.counts.values())
    for start in range(0, len(texts), block):
        for sentences, where in _encode_block(texts[start: start + block], cfg.sentences, tokenizer, on_bad_row,
                                              result.counts):
            if not sentences:
                skip_or_raise(BadRow(where, "empty", "no tokens after tokenization"), on_bad_row, result.counts)
                continue
            top = max(int(s.max()) for s in sentences)
            if vocab_size is not None and top >= vocab_size:
                raise ValueError(f"{where}: token id {top} >= the model's vocab_size {vocab_size} "
                                 "(tokenizer and model do not match)")
            result.documents.append(sentences)
            result.where.append(where)
    skipped = f" ({dict(result.counts)} rows skipped)" if result.counts else ""
    if len(result) < 2:
        raise ValueError(f"{name}: {len(result)} usable documents in the {split} split{skipped}; next-sentence "
                         "prediction needs at least 2 (random next sentences come from another document)")
    if result.single_sentence == len(result):
        raise ValueError(f"{name}: no document in the {split} split has 2 or more sentences (data.pairs.sentences="
                         f"{cfg.sentences}){skipped}, so there is no next sentence to predict")
    print(f"{name} ({split} split): {len(result)} documents, {result.sentences} sentences, {result.tokens} tokens; "
          f"{result.single_sentence} documents of one sentence (used only as random next sentences)",
          file=sys.stderr, flush=True)
    report_counts(name, split, result)
    return result


class Pair(NamedTuple):
    a: np.ndarray  # int32 tokens of sentence A
    b: np.ndarray  # int32 tokens of sentence B
    is_random: bool  # B comes from another document
    doc: int  # the document A comes from


def truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """BERT's truncation: cut the longer side (B on a tie) one token at a time, from the front or the
    back with probability 1/2, until ``len(a) + len(b) <= max_tokens`` (needs max_tokens >= 2)."""
    la, lb = len(a), len(b)
    if la + lb <= max_tokens:
        return a, b
    if 2 * min(la, lb) <= max_tokens:  # only the longer side is cut
        fa, fb = (max_tokens - lb, lb) if la > lb else (la, max_tokens - la)
    else:  # both end about halfway (A keeps the odd token: ties cut B first)
        fa, fb = (max_tokens + 1) // 2, max_tokens // 2
    front_a, front_b = rng.binomial(la - fa, 0.5), rng.binomial(lb - fb, 0.5)
    return a[front_a: front_a + fa], b[front_b: front_b + fb]


def _random_b(documents: list[list[np.ndarray]], doc: int, rng: np.random.Generator, room: int) -> np.ndarray:
    """Consecutive sentences from a random start in a uniformly drawn other document, up to ``room`` tokens."""
    other = int(rng.integers(len(documents) - 1))
    sentences = documents[other + (other >= doc)]
    sentences = sentences[int(rng.integers(len(sentences))):]
    enough = int(np.searchsorted(np.cumsum([len(x) for x in sentences]), room))  # first sentence reaching room
    return np.concatenate(sentences[: enough + 1])


def _document_pairs(documents: list[list[np.ndarray]], doc: int, rng: np.random.Generator, max_tokens: int,
                    random_next: float, short_seq_prob: float, counts: Counter) -> list[Pair]:
    sentences, pairs, start = documents[doc], [], 0
    while start < len(sentences):
        target = int(rng.integers(2, max_tokens + 1)) if rng.random() < short_seq_prob else max_tokens
        end, length = start, 0
        while end < len(sentences) and length < target:
            length += len(sentences[end])
            end += 1
        if end - start < 2:
            counts["single_sentence_chunks"] += 1
            start = end
            continue
        k = int(rng.integers(1, end - start))  # A = the chunk's first k sentences
        a = np.concatenate(sentences[start: start + k])
        if rng.random() < random_next:
            b, is_random, start = _random_b(documents, doc, rng, target - len(a)), True, start + k
        else:
            b, is_random, start = np.concatenate(sentences[start + k: end]), False, end
        if len(a) + len(b) > max_tokens:
            counts["truncated"] += 1
        a, b = truncate_pair(a, b, max_tokens, rng)
        pairs.append(Pair(a, b, is_random, doc))
    return pairs


def pairs_for_epoch(documents: SentenceDocuments | list[list[np.ndarray]], *, max_tokens: int, seed: int, epoch: int,
                    random_next: float = 0.5, short_seq_prob: float = 0.1,
                    counts: Optional[Counter] = None) -> list[Pair]:
    """Every pair of epoch ``epoch``, in generation order (module docstring); a function of its arguments.
    ``counts`` (optional) gains ``single_sentence_chunks`` (left out) and ``truncated``."""
    docs = documents.documents if isinstance(documents, SentenceDocuments) else documents
    if max_tokens < 2 or len(docs) < 2:
        raise ValueError(f"sentence pairs: need max_tokens >= 2 (one token of A and one of B) and >= 2 documents "
                         f"(random next sentences), got {max_tokens} and {len(docs)}")
    counts = Counter() if counts is None else counts
    rng = np.random.default_rng([seed, epoch])
    pairs = []
    for doc in rng.permutation(len(docs)):
        pairs.extend(_document_pairs(docs, int(doc), rng, max_tokens, random_next, short_seq_prob, counts))
    return pairs


def encode_pair(a: np.ndarray, b: np.ndarray, cls_id: int, sep_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, token_types) of ``[CLS] a [SEP] b [SEP]``: types 0 through the first SEP, 1 after."""
    tokens = np.concatenate([[cls_id], a, [sep_id], b, [sep_id]]).astype(np.int32)
    types = np.zeros(len(tokens), np.int32)
    types[len(a) + 2:] = 1
    return tokens, types


class SentencePairStream:
    """Batches of NSP rows (module docstring). The pairs of epoch e are ``pairs_for_epoch(epoch=e)``,
    served in generation order, or with ``shuffle`` permuted by a generator seeded (seed, e, 1).
    ``epochs=None`` repeats forever; a finite count ends the stream, its last batch filled with
    empty rows. Position = (epoch, pairs of it consumed)."""

    process_local = False

    def __init__(self, documents: SentenceDocuments, batch_size: int, seq_len: int, *, cls_id: Optional[int],
                 sep_id: Optional[int], pad_id: int = 0, seed: int = 0, shuffle: bool = True,
                 epochs: Optional[int] = None, random_next: float = 0.5, short_seq_prob: float = 0.1,
                 name: str = "sentence pairs"):
        if cls_id is None or sep_id is None:
            raise ValueError(f"{name}: the tokenizer has no [CLS] or no [SEP] token (ids {cls_id}, {sep_id}); "
                             "next-sentence prediction needs both (rows are [CLS] A [SEP] B [SEP])")
        if seq_len < 5:
            raise ValueError(f"{name}: seq_len {seq_len} is too short for [CLS] A [SEP] B [SEP] (needs >= 5)")
        self.documents, self.batch_size, self.seq_len = documents, batch_size, seq_len
        self.cls_id, self.sep_id, self.pad_id, self.seed, self.shuffle = cls_id, sep_id, pad_id, seed, shuffle
        self.epochs, self.random_next, self.short_seq_prob, self.name = epochs, random_next, short_seq_prob, name
        self.epoch, self.offset = 0, 0
        self._pairs_epoch, self._pairs = None, []

    def pairs(self, epoch: int) -> list[Pair]:
        """The pairs of ``epoch`` in serving order (the current epoch's list is cached)."""
        if self._pairs_epoch != epoch:
            counts: Counter = Counter()
            pairs = pairs_for_epoch(self.documents, max_tokens=self.seq_len - 3, seed=self.seed, epoch=epoch,
                                    random_next=self.random_next, short_seq_prob=self.short_seq_prob, counts=counts)
            if not pairs:
                raise ValueError(f"{self.name}: epoch {epoch} gives no sentence pairs (every chunk is a single "
                                 f"sentence: sentences too long for seq_len {self.seq_len}?)")
            if self.shuffle:
                pairs = [pairs[i] for i in np.random.default_rng([self.seed, epoch, 1]).permutation(len(pairs))]
            log.info("%s epoch %d: %d pairs (%d random next), %d truncated, %d one-sentence chunks left out",
                     self.name, epoch, len(pairs), sum(p.is_random for p in pairs), counts["truncated"],
                     counts["single_sentence_chunks"])
            self._pairs_epoch, self._pairs = epoch, pairs
        return self._pairs

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b, s = self.batch_size, self.seq_len
        batch = {"tokens": np.full((b, s), self.pad_id, np.int32), "segment_ids": np.zeros((b, s), np.int32),
                 "positions": np.zeros((b, s), np.int32), "token_types": np.zeros((b, s), np.int32),
                 "nsp_labels": np.zeros((b,), np.int32), "row_mask": np.zeros((b,), np.float32)}
        row = 0
        while row < b and (self.epochs is None or self.epoch < self.epochs):
            pairs = self.pairs(self.epoch)
            if self.offset >= len(pairs):
                self.epoch, self.offset = self.epoch + 1, 0
                continue
            pair = pairs[self.offset]
            tokens, types = encode_pair(pair.a, pair.b, self.cls_id, self.sep_id)
            n = len(tokens)
            batch["tokens"][row, :n], batch["token_types"][row, :n] = tokens, types
            batch["segment_ids"][row, :n], batch["positions"][row, :n] = 1, np.arange(n)
            batch["nsp_labels"][row], batch["row_mask"][row] = int(pair.is_random), 1.0
            row, self.offset = row + 1, self.offset + 1
        if row == 0:
            raise StopIteration
        return batch

    def skipped(self) -> dict[str, int]:
        """Rows skipped while loading (data.on_bad_row=skip), by kind."""
        return dict(self.documents.counts)

    def get_state(self) -> dict:
        return {"kind": "sentence_pairs", "name": self.name, "seed": self.seed, "epoch": self.epoch,
                "offset": self.offset, "documents": len(self.documents)}

    def set_state(self, state: dict) -> None:
        mine = {"kind": "sentence_pairs", "seed": self.seed, "documents": len(self.documents)}
        if wrong := [f"{k} {state.get(k)!r} (this stream: {v!r})" for k, v in mine.items() if state.get(k) != v]:
            raise ValueError(f"data state does not match this stream ({self.name}): {', '.join(wrong)}; the data "
                             "or its filtering changed since the checkpoint")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
