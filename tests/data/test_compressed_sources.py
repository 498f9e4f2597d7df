"""Compressed text / JSON / JSONL files read like the plain ones, with the same row locations."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pytest

from jaxtune.data.sources import SourceConfig, build_source

SHARED_HH = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh_rlhf_harmless_base_test.jsonl.gz"
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hh_rlhf_harmless_base_slice.jsonl"


@pytest.mark.parametrize("suffix,module", [(".gz", gzip), (".bz2", bz2), (".xz", lzma)])
def test_compressed_jsonl_json_and_text_equal_the_plain_files(tmp_path, suffix, module):
    rows = [{"text": f"row {i}", "n": i} for i in range(5)]
    jsonl = "".join(json.dumps(r) + "\n" + ("\n" if i == 2 else "") for i, r in enumerate(rows))  # a blank line
    files = {"d.jsonl": jsonl, "d.json": json.dumps(rows), "d.txt": "one\n\ntwo\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        (tmp_path / (name + suffix)).write_bytes(module.compress(text.encode()))
    for name in files:
        plain = build_source(SourceConfig(path=str(tmp_path / name), text_split="line"))
        packed = build_source(SourceConfig(path=str(tmp_path / (name + suffix)), text_split="line"))
        assert len(packed) == len(plain) > 0
        assert [packed.read(i) for i in range(len(packed))] == [plain.read(i) for i in range(len(plain))]
        if name != "d.txt":
            got = [packed.record(i) for i in range(len(packed))]
            assert [r for r, _ in got] == [plain.record(i)[0] for i in range(len(plain))]
            where = [w.replace(suffix, "") for _, w in got]
            assert where == [plain.record(i)[1] for i in range(len(plain))]  # same line numbers


def test_text_newlines_read_as_in_universal_mode(tmp_path):
    """CRLF / CR text reads as LF, compressed or not (as Path.read_text does)."""
    from jaxtune.data.streams import text_tokens
    from jaxtune.data.tokenizer import ByteTokenizer

    raw = b"one\r\ntwo\r\n\r\nthree\rfour\n"
    (tmp_path / "crlf.txt").write_bytes(raw)
    (tmp_path / "crlf.txt.gz").write_bytes(gzip.compress(raw))
    for name in ("crlf.txt", "crlf.txt.gz"):
        lines = build_source(SourceConfig(path=str(tmp_path / name), text_split="line"))
        assert [lines.read(i) for i in range(len(lines))] == ["one", "two", "three", "four"]
        paragraphs = build_source(SourceConfig(path=str(tmp_path / name), text_split="paragraph"))
        assert [paragraphs.read(i) for i in range(len(paragraphs))] == ["one\ntwo", "three\nfour"]
        assert bytes(text_tokens(tmp_path / name, ByteTokenizer()).astype("uint8")) == b"one\ntwo\n\nthree\nfour\n"


def test_corrupt_and_unsupported_compressed_files_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"text": "a"}\n')[:-6])
    with pytest.raises(ValueError, match="bad.jsonl.gz: cannot decompress"):
        build_source(SourceConfig(path=str(bad)))
    (tmp_path / "t.parquet.gz").write_bytes(b"x")
    with pytest.raises(ValueError, match="Parquet compresses its own columns"):
        build_source(SourceConfig(path=str(tmp_path / "t.parquet.gz")))
    (tmp_path / "t.bin.gz").write_bytes(gzip.compress(b"x"))
    with pytest.raises(ValueError, match="cannot tell the format from the suffix '.bin'"):
        build_source(SourceConfig(path=str(tmp_path / "t.bin.gz")))


@pytest.mark.skipif(not SHARED_HH.exists(), reason="the project's shared data folder is not beside this checkout")
def test_the_hh_fixture_is_the_head_of_the_shared_gzipped_split():
    source = build_source(SourceConfig(path=str(SHARED_HH)))
    fixture = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    assert len(source) == 2312
    assert [source.record(i)[0] for i in range(len(fixture))] == fixture
