"""Built-in tokenizers: character-level round trip, saving beside checkpoints, errors."""

import pytest

from jaxtune.data.streams import resolve_path
from jaxtune.data.tokenizer import ByteTokenizer, CharTokenizer, load_tokenizer


def test_char_tokenizer_round_trip_and_vocabulary():
    text = resolve_path("builtin:tinyshakespeare.txt").read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65 == len(set(text))  # nanoGPT's shakespeare_char vocabulary
    sample = text[:500]
    ids = tok.encode(sample)
    assert len(ids) == len(sample) and max(ids) < 65 and tok.decode(ids) == sample
    assert tok.chars == sorted(tok.chars)
    with pytest.raises(ValueError, match="not in its vocabulary"):
        tok.encode("café")


def test_saved_tokenizers_load_from_the_checkpoint_directory(tmp_path):
    CharTokenizer.from_text("hello world").save(tmp_path)
    loaded = load_tokenizer(tmp_path)  # auto: the saved character vocabulary
    assert isinstance(loaded, CharTokenizer) and loaded.decode(loaded.encode("hello")) == "hello"
    assert isinstance(load_tokenizer(tmp_path, "char"), CharTokenizer)
    other = tmp_path / "bytes"
    other.mkdir()
    ByteTokenizer().save(other)
    assert isinstance(load_tokenizer(other), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="no character vocabulary"):
        load_tokenizer(tmp_path / "missing", "char")


def test_builtin_data_paths():
    assert resolve_path("builtin:tinyshakespeare.txt").stat().st_size == 1_115_394
    with pytest.raises(FileNotFoundError, match="built in: tinyshakespeare.txt"):
        resolve_path("builtin:nope.txt")
