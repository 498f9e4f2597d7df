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

import bz2
import glob
import gzip
import json
import lzma
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import numpy as np

BUILTIN_PREFIX = "builtin:"  # data shipped inside the package: builtin:tinyshakespeare.txt
FORMATS = ("text", "json", "jsonl", "parquet")
_SUFFIX_FORMAT = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "jsonl",
                  ".ndjson": "jsonl", ".parquet": "parquet"}
COMPRESSIONS = {".gz": gzip, ".bz2": bz2, ".xz": lzma}


def compression(path: Path):
    """The stdlib module that opens ``path``'s compression, or None for an uncompressed file."""
    return COMPRESSIONS.get(path.suffix.lower())


def read_text(path: Path) -> str:
    """A UTF-8 text file (compressed or not) as ``Path.read_text`` gives it: newlines (``\\r\\n``,
    ``\\r``) read as ``\\n``. Raises UnicodeDecodeError for text that is not UTF-8."""
    return read_bytes(path).decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when its suffix names a compression (a corrupt file is an
    error naming it)."""
    module = compression(path)
    if module is None:
        return path.read_bytes()
    try:
        with module.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise ValueError(f"{path}: cannot decompress ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class SourceConfig:
    """One source of documents. Exactly one of ``path`` (local files: a file, a directory of
    files, or a glob; ``builtin:NAME`` for shipped data), ``hf`` (a Hugging Face dataset: a
    directory written by ``save_to_disk``, or a hub name, which needs a network) or ``tfds``
    (a TensorFlow Datasets name; needs ``pip install jaxtune[tfds]``)."""

    path: Optional[str] = None
    format: Literal["auto", "text", "json", "jsonl", "parquet"] = "auto"  # auto: from the file suffix
    text_split: Literal["document", "line", "paragraph"] = "document"  # text files: what one document is
    hf: Optional[str] = None
    hf_config: Optional[str] = None  # hub datasets: the configuration name
    data_files: Optional[str] = None  # hf builders over local files (hf: json | parquet | text), e.g. shards/*.jsonl
    tfds: Optional[str] = None
    data_dir: Optional[str] = None  # tfds: where the prepared dataset lives
    split: str = "train"  # hf / tfds split
    streaming: bool = False  # hf hub datasets: stream instead of downloading everything
    field: str = "text"  # json / jsonl / parquet / hf / tfds: the field that holds the text
    weight: float = 1.0  # share of rows drawn from this source in a mixture

    def __post_init__(self):
        given = [k for k in ("path", "hf", "tfds") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"data source: set exactly one of path, hf, tfds (got {given or 'none'})")
        if not self.weight > 0:
            raise ValueError(f"data source {self.label}: weight must be > 0, got {self.weight}")

    @property
    def label(self) -> str:
        return self.path or (f"hf:{self.hf}" if self.hf else f"tfds:{self.tfds}")


class BadRow(ValueError):
    """A row that is not a usable document. ``kind``: invalid_json | not_a_record | missing_field |
    not_text | empty | untokenizable (the tokenizer cannot encode it)."""

    def __init__(self, where: str, kind: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.where, self.kind, self.detail = where, kind, detail


class DocumentSource:
    """Base of all sources. Subclasses set ``name`` and ``random_access`` and implement ``read``
    (random access) or ``stream`` (streaming)."""

    name: str = "source"
    random_access: bool = True

    def __len__(self) -> int:
        raise TypeError(f"{self.name}: a streaming source has no length")

    def read(self, index: int) -> str:
        """The document at ``index``; raises `BadRow` if that row is not a usable document."""
        raise TypeError(f"{self.name}: a streaming source cannot be read at an index")

    def record(self, index: int) -> tuple[dict, str]:
        """-> (the whole row at ``index`` as a dict, where it is) for record-shaped data (SFT,
        classification, preference pairs); raises `BadRow` if the row is not an object."""
        raise TypeError(f"{self.name}: this source holds plain documents, not records with fields")

    def stream(self, start: int = 0) -> Iterator[str | BadRow]:
        """Documents in source order from ``start`` (a bad row is yielded as its `BadRow`)."""
        for index in range(start, len(self)):
            try:
                yield self.read(index)
            except BadRow as bad:
                yield bad


def text_of(record: Any, field: str, where: str) -> str:
    """The non-empty text in ``record[field]``, or a `BadRow` naming what is wrong."""
    if not isinstance(record, dict):
        raise BadRow(where, "not_a_record", f"expected an object with a {field!r} field, got {type(record).__name__}")
    if field not in record:
        fields = ", ".join(map(str, list(record)[:12])) or "none"
        raise BadRow(where, "missing_field", f"no field {field!r} (fields: {fields})")
    return checked_text(record[field], where, field)


def as_record(record: Any, where: str) -> tuple[dict, str]:
    if not isinstance(record, dict):
        raise BadRow(where, "not_a_record", f"expected an object with fields, got {type(record).__name__}")
    return record, where


def checked_text(value: Any, where: str, field: str = "text") -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadRow(where, "not_text", f"field {field!r} is not UTF-8 ({err.reason})") from None
    if not isinstance(value, str):
        raise BadRow(where, "not_text", f"field {field!r} is a {type(value).__name__}, not text")
    if not value.strip():
        raise BadRow(where, "empty", f"empty document in field {field!r}")
    return value


def resolve_path(path: str | Path) -> Path:
    """A data path, with ``builtin:NAME`` meaning jaxtune/data/assets/NAME (works from any install)."""
    text = str(path)
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX):]
        asset = Path(__file__).with_name("assets") / name
        if not asset.exists():
            known = sorted(p.name for p in asset.parent.iterdir() if p.suffix in (".txt", ".jsonl"))
            raise FileNotFoundError(f"data path: no built-in dataset {name!r} (built in: {', '.join(known)})")
        return asset
    return Path(path)


def expand_files(path: str) -> list[Path]:
    """A file, every file under a directory, or a glob -> sorted existing files (error if none)."""
    resolved = resolve_path(path)
    if resolved.is_dir():
        files = sorted(p for p in resolved.rglob("*") if p.is_file() and not p.name.startswith("."))
    elif any(ch in str(path) for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    else:
        files = [resolved] if resolved.exists() else []
    if not files:
        raise FileNotFoundError(f"data source {path}: no such file, or no files match")
    return files


def file_format(path: Path, configured: str) -> str:
    inner = Path(path.stem) if compression(path) is not None else path  # pairs.jsonl.gz -> pairs.jsonl
    fmt = configured if configured != "auto" else _SUFFIX_FORMAT.get(inner.suffix.lower())
    if fmt is None:
        raise ValueError(f"data source {path}: cannot tell the format from the suffix {inner.suffix!r}; "
                         f"set format to one of {', '.join(FORMATS)}")
    if fmt == "parquet" and inner is not path:
        raise ValueError(f"data source {path}: Parquet compresses its own columns; give the .parquet file itself")
    return fmt


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
        from jaxtune.data.tfds_source import TfdsSource

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
