"""Document sources: where pretraining text comes from, one document at a time.

A source turns files or datasets into documents (strings) addressed by an index in
the source's own order. Random-access sources (text, JSON, JSONL, Parquet files,
Hugging Face datasets on disk, TFDS) read any index; streaming sources (a Hugging
Face dataset with ``streaming: true``) read forward from an index. Every document
carries its location (``file:line``, ``file row N``, ``dataset[split] row N``) so a
malformed row, a missing field or an empty document is reported where it is, as a
`BadRow`; the pipeline raises it or, when configured, skips and counts it.

Text, JSON and JSONL files may be compressed (``.gz``, ``.bz2``, ``.xz``; the format comes from
the suffix before it, e.g. ``pairs.jsonl.gz``): they are decompressed into memory once, when
opened (uncompressed files are read in place).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jaxtune.data.source_base import (  # noqa: F401  (SourceConfig, BadRow, ...: also importable from here)
    BadRow,
    DocumentSource,
    SourceConfig,
    as_record,
    checked_text,
    compression,
    expand_files,
    file_format,
    read_bytes,
    read_text,
    resolve_path,
    text_of,
)
from jaxtune.data.tfds_source import TfdsSource

class TextFileSource(DocumentSource):
    """A UTF-8 text file: the whole file is one document, or each non-blank line, or each
    blank-line-separated paragraph (``text_split``)."""

    def __init__(self, path: Path, text_split: str = "document"):
        self.path, self.name = path, str(path)
        try:
            text = read_text(path)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
        if text_split == "document":
            self.docs, self.lines = [text], [1]
        elif text_split in ("line", "paragraph"):
            self.docs, self.lines = [], []
            current, first = [], 0
            for number, line in enumerate(text.splitlines(keepends=True), start=1):
                if text_split == "line":
                    if line.strip():
                        self.docs.append(line.rstrip("\n"))
                        self.lines.append(number)
                    continue
                if line.strip():
                    first = first or number
                    current.append(line)
                elif current:
                    self.docs.append("".join(current).rstrip("\n"))
                    self.lines.append(first)
                    current, first = [], 0
            if current:
                self.docs.append("".join(current).rstrip("\n"))
                self.lines.append(first)
        else:
            raise ValueError(f"data source {path}: text_split must be document | line | paragraph, got {text_split!r}")

    def __len__(self) -> int:
        return len(self.docs)

    def read(self, index: int) -> str:
        return checked_text(self.docs[index], f"{self.path}:{self.lines[index]}")


class JsonlSource(DocumentSource):
    """One JSON object per line. Only line offsets are held in memory (a compressed file: its
    decompressed bytes too); each row is parsed when read, so an invalid line is reported as
    ``file:line`` when it is reached. Blank lines are not rows."""

    def __init__(self, path: Path, field: str = "text"):
        import io

        self.path, self.field, self.name = path, field, str(path)
        self._data = read_bytes(path) if compression(path) is not None else None
        offsets, numbers, lengths = [], [], []
        with (open(path, "rb") if self._data is None else io.BytesIO(self._data)) as f:
            offset = 0
            for number, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(offset)
                    numbers.append(number)
                    lengths.append(len(line))
                offset += len(line)
        self.offsets = np.asarray(offsets, np.int64)
        self.lengths = np.asarray(lengths, np.int64)
        self.numbers = np.asarray(numbers, np.int64)
        self._fd = os.open(path, os.O_RDONLY) if self._data is None else None

    def __len__(self) -> int:
        return len(self.numbers)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _parsed(self, index: int) -> tuple[Any, str]:
        where = f"{self.path}:{int(self.numbers[index])}"
        start, length = int(self.offsets[index]), int(self.lengths[index])
        if self._data is not None:
            raw = self._data[start: start + length]
        else:
            raw = os.pread(self._fd, length, start)  # pread: safe from several threads
        try:
            return json.loads(raw), where
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRow(where, "invalid_json", f"invalid JSON ({err})") from None

    def read(self, index: int) -> str:
        record, where = self._parsed(index)
        return text_of(record, self.field, where)

    def record(self, index: int) -> tuple[dict, str]:
        return as_record(*self._parsed(index))


class JsonSource(DocumentSource):
    """A JSON file holding a list of objects (or an object whose one list value holds them)."""

    def __init__(self, path: Path, field: str = "text"):
        self.path, self.field, self.name = path, field, str(path)
        try:
            data = json.loads(read_bytes(path).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from None
        if isinstance(data, dict):
            lists = [k for k, v in data.items() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(f"{path}: expected a list of records, or an object with exactly one list "
                                 f"of records (found lists under {lists or 'no key'})")
            self.key, data = lists[0], data[lists[0]]
        elif isinstance(data, list):
            self.key = None
        else:
            raise ValueError(f"{path}: expected a list of records, got {type(data).__name__}")
        self.records = data

    def __len__(self) -> int:
        return len(self.records)

    def _where(self, index: int) -> str:
        return f"{self.path} record {index}" + (f" of {self.key!r}" if self.key else "")

    def read(self, index: int) -> str:
        return text_of(self.records[index], self.field, self._where(index))

    def record(self, index: int) -> tuple[dict, str]:
        return as_record(self.records[index], self._where(index))


class ParquetSource(DocumentSource):
    """A Parquet file; only the text column is read (memory-mapped Arrow)."""

    def __init__(self, path: Path, field: str = "text"):
        import pyarrow.parquet as pq

        self.path, self.field, self.name = path, field, str(path)
        schema = pq.read_schema(path)
        if field not in schema.names:
            raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)})")
        self.column = pq.read_table(path, columns=[field], memory_map=True).column(field)
        self._table = None

    def __len__(self) -> int:
        return len(self.column)

    def read(self, index: int) -> str:
        value = self.column[index].as_py()
        where = f"{self.path} row {index}"
        if value is None:
            raise BadRow(where, "missing_field", f"column {self.field!r} is null")
        return checked_text(value, where, self.field)

    def record(self, index: int) -> tuple[dict, str]:
        if self._table is None:  # every column, read once when records are asked for
            import pyarrow.parquet as pq

            self._table = pq.read_table(self.path, memory_map=True)
        return as_record(self._table.slice(index, 1).to_pylist()[0], f"{self.path} row {index}")


class HFDatasetSource(DocumentSource):
    """A Hugging Face dataset: a ``save_to_disk`` directory (memory-mapped, random access), or
    anything `datasets.load_dataset` takes: a hub name (downloads, unless ``streaming``), or a
    builder over local files (``hf: json`` with ``data_files``). Streaming reads forward and
    resumes by skipping to the saved index."""

    def __init__(self, cfg: SourceConfig):
        import datasets

        self.field, self.split = cfg.field, cfg.split
        self.name = f"{cfg.hf}[{cfg.split}]"
        local = Path(cfg.hf)
        if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise ValueError(f"data source {cfg.hf}: no split {cfg.split!r} (splits: {', '.join(ds)})")
                ds = ds[cfg.split]
            self.random_access = True
        else:
            ds = datasets.load_dataset(cfg.hf, cfg.hf_config, data_files=cfg.data_files, split=cfg.split,
                                       streaming=cfg.streaming)
            self.random_access = not cfg.streaming
        columns = getattr(ds, "column_names", None)
        if columns is not None and cfg.field not in columns:
            raise ValueError(f"data source {self.name}: no column {cfg.field!r} (columns: {', '.join(columns)})")
        self.ds = ds

    def __len__(self) -> int:
        if not self.random_access:
            return super().__len__()
        return len(self.ds)

    def read(self, index: int) -> str:
        if not self.random_access:
            return super().read(index)
        return text_of(self.ds[int(index)], self.field, f"{self.name} row {index}")

    def record(self, index: int) -> tuple[dict, str]:
        if not self.random_access:
            return super().record(index)
        return as_record(self.ds[int(index)], f"{self.name} row {index}")

    def stream(self, start: int = 0) -> Iterator[str | BadRow]:
        if self.random_access:
            yield from super().stream(start)
            return
        for index, record in enumerate(self.ds.skip(start) if start else self.ds, start=start):
            try:
                yield text_of(record, self.field, f"{self.name} row {index}")
            except BadRow as bad:
                yield bad


def open_source(cfg: SourceConfig) -> list[DocumentSource]:
    """The sources one config names (a glob of files gives one source per file)."""
    if cfg.hf is not None:
        return [HFDatasetSource(cfg)]
    if cfg.tfds is not None:
        return [TfdsSource(cfg)]
    sources: list[DocumentSource] = []
    for path in expand_files(cfg.path):
        fmt = file_format(path, cfg.format)
        if fmt == "text":
            sources.append(TextFileSource(path, cfg.text_split))
        elif fmt == "jsonl":
            sources.append(JsonlSource(path, cfg.field))
        elif fmt == "json":
            sources.append(JsonSource(path, cfg.field))
        elif fmt == "parquet":
            sources.append(ParquetSource(path, cfg.field))
    return sources


class ConcatSource(DocumentSource):
    """Several random-access sources read as one (the files of one glob), index by index."""

    def __init__(self, parts: list[DocumentSource], name: str):
        if not all(p.random_access for p in parts):
            raise ValueError(f"{name}: only random-access sources can be concatenated")
        self.parts, self.name = parts, name
        self.ends = np.cumsum([len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _locate(self, index: int) -> tuple[DocumentSource, int]:
        part = int(np.searchsorted(self.ends, index, side="right"))
        start = 0 if part == 0 else int(self.ends[part - 1])
        return self.parts[part], index - start

    def read(self, index: int) -> str:
        part, local = self._locate(index)
        return part.read(local)

    def record(self, index: int) -> tuple[dict, str]:
        part, local = self._locate(index)
        return part.record(local)


def build_source(cfg: SourceConfig) -> DocumentSource:
    """One `DocumentSource` for a config (the files of a glob concatenated in sorted order)."""
    parts = open_source(cfg)
    source = parts[0] if len(parts) == 1 else ConcatSource(parts, cfg.label)
    if source.random_access and len(source) == 0:
        raise ValueError(f"data source {cfg.label}: holds no documents")
    return source
