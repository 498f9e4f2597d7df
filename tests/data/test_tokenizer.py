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
    with pytest.raises(FileNotFoundError, match="built in: .*tinyshakespeare.txt"):
        resolve_path("builtin:nope.txt")


def test_hf_tokenizer_trained_here_round_trips_and_batches(tmp_path):
    """`jaxtune tokenizer train` output loads as a transformers fast tokenizer: batched encoding
    equals one-by-one encoding, decoding gives the text back, special tokens are set."""
    from jaxtune.cli.tokenizer import train_tokenizer

    train_tokenizer(["builtin:tinyshakespeare.txt"], 400, tmp_path / "bpe")
    tok = load_tokenizer(tmp_path / "bpe")  # auto: the directory holds HF files
    assert tok.vocab_size == 400 and tok.eos_token_id is not None and tok.bos_token_id is not None
    texts = ["ROMEO:\nWherefore art thou, Romeo?", "  spaces  and ünïcödé ✓", "x"]
    batched = tok.encode_batch(texts)
    assert batched == [tok.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in batched] == texts
    assert len(batched[0]) < len(texts[0])  # merges learned
