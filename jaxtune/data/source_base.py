"""What every document source is made of: the ``SourceConfig`` a job names, the `DocumentSource`
interface, `BadRow` (a malformed row, reported where it is), the text a record holds, and where
files are (globs, ``builtin:`` data, compressed text)."""

from __future__ import annotations

import bz2
import glob
import gzip
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

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
