"""Built-in tokenizers: character-level round trip, saving beside checkpoints, errors."""

import pytest
from transformers import AutoTokenizer

from jaxtune.cli.main import main
from jaxtune.cli.tokenizer import train_wordpiece
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


def test_wordpiece_trained_here_frames_pairs_as_bert_does(tmp_path):
    """`jaxtune tokenizer train --kind wordpiece`: a BertTokenizerFast (uncased) whose pairs are
    [CLS] A [SEP] B [SEP] with token types 0 / 1, [PAD] id 0 and [MASK] set; the CLI refuses to
    overwrite a tokenizer."""
    text = tmp_path / "text.txt"
    text.write_text("The red king spoke.\n\nA green field lay there. The blue sky was wide.\n" * 40)
    assert main(["tokenizer", "train", str(text), "--kind", "wordpiece", "--vocab-size", "120",
                 "--min-frequency", "1", "--out", str(tmp_path / "wp")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "wp")
    assert type(tok).__name__ == "BertTokenizer" and tok.pad_token_id == 0 and tok.mask_token_id is not None
    enc = tok("The RED king", "blue sky")
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == ["[CLS]", "the", "red", "king", "[SEP]", "blue", "sky", "[SEP]"]
    assert enc["token_type_ids"] == [0, 0, 0, 0, 0, 1, 1, 1]
    ours = load_tokenizer(tmp_path / "wp")
    assert (ours.cls_token_id, ours.sep_token_id) == (tok.cls_token_id, tok.sep_token_id)
    assert ours.encode("the red king") == enc["input_ids"][1:4]  # no special tokens of its own
    with pytest.raises(FileExistsError, match="already holds a tokenizer"):
        train_wordpiece([str(text)], 120, tmp_path / "wp")
