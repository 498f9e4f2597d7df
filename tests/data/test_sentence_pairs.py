"""Next-sentence-prediction data: the sentence splitter, BERT's pair building (checked on a corpus
whose token ids say which document and sentence they come from), truncation against a literal
token-by-token simulation of BERT's, row framing (also against transformers' BertTokenizerFast),
stream resume, finite passes, loading and its errors."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from jaxtune.data.sentence_pairs import (
    SentenceDocuments,
    SentencePairConfig,
    SentencePairStream,
    encode_pair,
    load_sentence_documents,
    pairs_for_epoch,
    split_sentences,
    truncate_pair,
)
from jaxtune.data.sft import split_ids
from jaxtune.data.sources import SourceConfig, build_source
from jaxtune.data.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer

PAD, CLS, SEP = 0, 1, 2
FIRST_ID = 10


def _corpus(n_docs=60, seed=0, sizes=(1, 4)):
    """Documents of 2-8 sentences; ids run consecutively through the whole corpus, so consecutive
    sentences of a document are consecutive ids, and `_index` says where any id is."""
    rng = np.random.default_rng(seed)
    docs, next_id = [], FIRST_ID
    for _ in range(n_docs):
        sentences = []
        for _ in range(int(rng.integers(2, 9))):
            length = int(rng.integers(sizes[0], sizes[1] + 1))
            sentences.append(np.arange(next_id, next_id + length, dtype=np.int32))
            next_id += length
        docs.append(sentences)
    return SentenceDocuments(docs, [f"doc{d}" for d in range(n_docs)])


def _index(corpus):
    """id -> (document, sentence, offset in the sentence)."""
    return {int(t): (d, s, o) for d, doc in enumerate(corpus.documents) for s, sent in enumerate(doc)
            for o, t in enumerate(sent)}


def _whole_sentences(ids, where):
    """(document, first sentence, last sentence) of ids that are whole consecutive sentences of one document."""
    assert len(ids) and np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))), "not consecutive text"
    (d0, s0, o0), (d1, s1, _) = where[int(ids[0])], where[int(ids[-1])]
    after = where.get(int(ids[-1]) + 1)
    assert d0 == d1 and o0 == 0 and (after is None or after[2] == 0), "not whole sentences of one document"
    return d0, s0, s1


# ---- splitting ------------------------------------------------------------------------------


def test_rule_splitter_knows_abbreviations_initials_quotes_and_newlines():
    text = ('Mr. Smith went to Washington. He met Dr. J. Doe, e.g. at St. Paul\'s in the U.S. on Monday! '
            'Did he? "Yes." She said (quietly.) Then\nleft.  It cost 3.5 dollars etc. and more...  Fine')
    assert split_sentences(text, "rule") == [
        "Mr. Smith went to Washington.", "He met Dr. J. Doe, e.g. at St. Paul's in the U.S. on Monday!", "Did he?",
        '"Yes."', "She said (quietly.)", "Then left.", "It cost 3.5 dollars etc. and more...", "Fine"]
    assert split_sentences("  One.\n\nTwo?Three!  ", "rule") == ["One.", "Two?Three!"]
    assert split_sentences("Mrs. i.e. Z. end", "rule") == ["Mrs. i.e. Z. end"]


def test_line_and_paragraph_splitting():
    text = "first line\n  second  line \n\n\n third\n para\n \nlast."
    assert split_sentences(text, "line") == ["first line", "second  line", "third", "para", "last."]
    assert split_sentences(text, "paragraph") == ["first line second  line", "third para", "last."]
    with pytest.raises(ValueError, match="rule | line | paragraph"):
        split_sentences(text, "word")


def test_config_validation_names_the_field():
    for kw, key in (({"random_next": 1.0}, "random_next"), ({"random_next": 0.0}, "random_next"),
                    ({"short_seq_prob": 1.5}, "short_seq_prob"), ({"sentences": "word"}, "sentences"),
                    ({"text": ""}, "text")):
        with pytest.raises(ValueError, match=f"data.pairs.{key}"):
            SentencePairConfig(**kw)


# ---- pairs ----------------------------------------------------------------------------------


def test_pairs_keep_next_text_together_and_draw_random_b_from_other_documents():
    corpus = _corpus()
    where = _index(corpus)
    max_tokens = 64  # > any document's 8 x 4 tokens: nothing is ever truncated
    pairs = [p for e in range(16) for p in pairs_for_epoch(corpus, max_tokens=max_tokens, seed=3, epoch=e,
                                                           random_next=0.5, short_seq_prob=0.2)]
    assert len(pairs) >= 1000
    assert abs(np.mean([p.is_random for p in pairs]) - 0.5) < 0.04
    random_starts = Counter()
    for p in pairs:
        assert 1 <= len(p.a) and 1 <= len(p.b) and len(p.a) + len(p.b) <= max_tokens
        da, _, a_last = _whole_sentences(p.a, where)
        db, b_first, b_last = _whole_sentences(p.b, where)
        assert da == p.doc
        if p.is_random:
            assert db != p.doc
            random_starts[b_first == 0] += 1
        else:  # B is exactly the text after A, in the same document
            assert db == p.doc and b_first == a_last + 1
    assert random_starts[False] > random_starts[True] > 0  # a random B starts anywhere in its document
    again = [p.a.tolist() for p in pairs_for_epoch(corpus, max_tokens=64, seed=3, epoch=1, short_seq_prob=0.2)]
    assert again == [p.a.tolist() for p in pairs_for_epoch(corpus, max_tokens=64, seed=3, epoch=1, short_seq_prob=0.2)]
    assert again != [p.a.tolist() for p in pairs_for_epoch(corpus, max_tokens=64, seed=3, epoch=2, short_seq_prob=0.2)]


def test_random_b_puts_the_rest_of_the_chunk_back():
    """Without short targets every chunk is the rest of its document: the walk starts at sentence 0, a
    non-random pair ends the document, a random one resumes right after A; one sentence left gives no pair."""
    corpus = _corpus(n_docs=40, seed=1)
    where = _index(corpus)
    counts = Counter()
    pairs = pairs_for_epoch(corpus, max_tokens=64, seed=0, epoch=0, short_seq_prob=0.0, counts=counts)
    by_doc: dict[int, list] = {}
    for p in pairs:
        by_doc.setdefault(p.doc, []).append(p)
    singles = 0
    for d, doc in enumerate(corpus.documents):
        start = 0
        for p in by_doc.get(d, []):
            _, a_first, a_last = _whole_sentences(p.a, where)
            assert a_first == start
            b_doc, _, b_last = _whole_sentences(p.b, where)
            assert b_last == len(corpus.documents[b_doc]) - 1  # the room A left (> 32 tokens) outlasts any document
            start = a_last + 1 if p.is_random else len(doc)
        assert len(doc) - start in (0, 1)
        singles += len(doc) - start
    assert counts["single_sentence_chunks"] == singles > 0
    assert set(by_doc) == set(range(len(corpus)))


def test_chunks_fill_to_the_target_and_random_b_to_the_room_a_left():
    """Sentences of 2 tokens, max_tokens 6: every chunk is exactly 3 sentences; A is 1 or 2 of them
    (uniformly); a random B fills exactly the 6 - len(A) tokens left, unless its document ends first."""
    ids = np.arange(FIRST_ID, FIRST_ID + 2 * 30 * 6, dtype=np.int32).reshape(30, 6, 2)
    corpus = SentenceDocuments([list(doc) for doc in ids], [f"doc{d}" for d in range(30)])
    where = _index(corpus)
    counts = Counter()
    pairs = [p for e in range(4) for p in pairs_for_epoch(corpus, max_tokens=6, seed=1, epoch=e, random_next=1e-9,
                                                          short_seq_prob=0.0, counts=counts)]
    assert len(pairs) == 4 * 30 * 2 and not any(p.is_random for p in pairs) and not counts
    assert sorted({_whole_sentences(p.a, where)[1] for p in pairs}) == [0, 3]
    assert all(len(p.a) + len(p.b) == 6 for p in pairs)
    assert abs(np.mean([len(p.a) == 2 for p in pairs]) - 0.5) < 0.1
    pairs = pairs_for_epoch(corpus, max_tokens=6, seed=1, epoch=0, random_next=1 - 1e-9, short_seq_prob=0.0)
    assert all(p.is_random for p in pairs) and len(pairs) > 30
    for p in pairs:
        db, _, b_last = _whole_sentences(p.b, where)
        assert len(p.a) + len(p.b) == 6 or (len(p.a) + len(p.b) < 6 and b_last == 5)


def _bert_truncate(a, b, max_tokens, rng):
    a, b = list(a), list(b)
    while len(a) + len(b) > max_tokens:
        side = a if len(a) > len(b) else b
        side.pop(0) if rng.random() < 0.5 else side.pop()
    return a, b


def test_truncation_matches_berts_token_by_token_loop():
    rng, py = np.random.default_rng(0), random.Random(0)
    for la in range(1, 14):
        for lb in range(1, 14):
            for max_tokens in (2, 3, 7, 8, 12):
                a, b = np.arange(la), np.arange(100, 100 + lb)
                ta, tb = truncate_pair(a, b, max_tokens, rng)
                ra, rb = _bert_truncate(a, b, max_tokens, py)
                assert (len(ta), len(tb)) == (len(ra), len(rb)), (la, lb, max_tokens)
                assert len(ta) >= 1 and len(tb) >= 1
                for cut, whole in ((ta, a), (tb, b)):  # a contiguous piece of the original
                    assert np.array_equal(cut, np.arange(cut[0], cut[0] + len(cut))) and cut[0] in whole
    a, b = np.arange(20), np.arange(100, 103)
    starts = Counter(int(truncate_pair(a, b, 10, rng)[0][0]) for _ in range(400))
    ta, tb = truncate_pair(a, b, 10, rng)
    assert len(ta) == 7 and tb.tolist() == b.tolist()  # only the longer side loses tokens
    # each of the 13 cuts falls at the front with probability 1/2: A starts at Binomial(13, 1/2)
    assert min(starts) <= 3 and max(starts) >= 10 and 6.0 <= np.mean(list(starts.elements())) <= 7.0


def test_long_sentences_are_truncated_to_fit_and_never_emptied():
    corpus = _corpus(n_docs=30, seed=2, sizes=(5, 20))
    counts = Counter()
    pairs = pairs_for_epoch(corpus, max_tokens=13, seed=0, epoch=0, counts=counts)
    assert counts["truncated"] > 0 and pairs
    assert all(1 <= len(p.a) and 1 <= len(p.b) and len(p.a) + len(p.b) <= 13 for p in pairs)


# ---- rows and the stream --------------------------------------------------------------------


def _stream(corpus, **kw):
    args = dict(batch_size=16, seq_len=67, cls_id=CLS, sep_id=SEP, pad_id=PAD, seed=5, short_seq_prob=0.2)
    args.update(kw)
    return SentencePairStream(corpus, args.pop("batch_size"), args.pop("seq_len"), **args)


def test_rows_frame_cls_a_sep_b_sep_with_token_types_and_padding():
    corpus = _corpus()
    stream = _stream(corpus, shuffle=False)
    pairs = pairs_for_epoch(corpus, max_tokens=64, seed=5, epoch=0, short_seq_prob=0.2)
    batch = next(stream)
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "tokens": ((16, 67), "int32"), "segment_ids": ((16, 67), "int32"), "positions": ((16, 67), "int32"),
        "token_types": ((16, 67), "int32"), "nsp_labels": ((16,), "int32"), "row_mask": ((16,), "float32")}
    for row, p in enumerate(pairs[:16]):
        expected = [CLS] + p.a.tolist() + [SEP] + p.b.tolist() + [SEP]
        n, first_sep = len(expected), len(p.a) + 1
        assert batch["tokens"][row].tolist() == expected + [PAD] * (67 - n)
        assert batch["tokens"][row, 0] == CLS and batch["tokens"][row, first_sep] == SEP == batch["tokens"][row, n - 1]
        assert batch["token_types"][row].tolist() == [0] * (first_sep + 1) + [1] * (n - first_sep - 1) + [0] * (67 - n)
        assert batch["segment_ids"][row].tolist() == [1] * n + [0] * (67 - n)
        assert batch["positions"][row].tolist() == list(range(n)) + [0] * (67 - n)
        assert batch["nsp_labels"][row] == int(p.is_random) and batch["row_mask"][row] == 1.0
    tokens, types = encode_pair(np.array([7, 8]), np.array([9]), CLS, SEP)
    assert tokens.tolist() == [CLS, 7, 8, SEP, 9, SEP] and types.tolist() == [0, 0, 0, 0, 1, 1]


def test_resume_gives_the_batches_of_the_uninterrupted_stream():
    corpus = _corpus()
    stream = _stream(corpus)
    for _ in range(3):
        next(stream)
    state = stream.get_state()
    later = [next(stream) for _ in range(4)]  # 7 x 16 rows: past the end of epoch 0
    assert stream.epoch >= 1
    resumed = _stream(corpus)
    resumed.set_state(json.loads(json.dumps(state)))
    for want, got in zip(later, (next(resumed) for _ in range(4))):
        assert all(np.array_equal(want[k], got[k]) for k in want)
    served = [tuple(p.a.tolist()) for p in stream.pairs(0)]
    generated = [tuple(p.a.tolist()) for p in pairs_for_epoch(corpus, max_tokens=64, seed=5, epoch=0,
                                                             short_seq_prob=0.2)]
    assert served != generated and sorted(served) == sorted(generated)  # shuffled: the same pairs


def test_finite_pass_serves_every_pair_once_then_stops():
    corpus = _corpus()
    n = len(pairs_for_epoch(corpus, max_tokens=64, seed=5, epoch=0, short_seq_prob=0.2))
    batch_size = n // 2 + 1
    batches = list(_stream(corpus, batch_size=batch_size, epochs=1))
    assert len(batches) == 2
    mask = np.concatenate([b["row_mask"] for b in batches])
    assert mask.tolist() == [1.0] * n + [0.0] * (2 * batch_size - n)
    last = batches[-1]
    empty = last["row_mask"] == 0
    assert not last["segment_ids"][empty].any() and not last["tokens"][empty].any()
    n1 = len(pairs_for_epoch(corpus, max_tokens=64, seed=5, epoch=1, short_seq_prob=0.2))
    two = list(_stream(corpus, batch_size=batch_size, epochs=2))
    assert len(two) == -(-(n + n1) // batch_size) and sum(b["row_mask"].sum() for b in two) == n + n1


def test_stream_errors_and_state_mismatch():
    corpus = _corpus(n_docs=5)
    with pytest.raises(ValueError, match=r"no \[CLS\] or no \[SEP\] token \(ids None, 2\).*needs both"):
        _stream(corpus, cls_id=ByteTokenizer().cls_token_id)
    with pytest.raises(ValueError, match=r"no \[CLS\] or no \[SEP\] token \(ids 1, None\)"):
        _stream(corpus, sep_id=CharTokenizer("ab").sep_token_id)
    with pytest.raises(ValueError, match="seq_len 4"):
        _stream(corpus, seq_len=4)
    state = _stream(corpus).get_state()
    assert state["kind"] == "sentence_pairs" and state["documents"] == 5
    with pytest.raises(ValueError, match=r"seed 5 \(this stream: 6\)"):
        _stream(corpus, seed=6).set_state(state)
    with pytest.raises(ValueError, match=r"documents 5 \(this stream: 6\)"):
        _stream(_corpus(n_docs=6)).set_state(state)
    with pytest.raises(ValueError, match="kind 'sft'"):
        _stream(corpus).set_state({**state, "kind": "sft"})


# ---- loading --------------------------------------------------------------------------------


def _jsonl(tmp_path, rows, name="docs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_source(SourceConfig(path=str(path)))


def test_loading_records_and_paragraph_files(tmp_path, capsys):
    source = _jsonl(tmp_path, [{"body": "One. Two! Three?"}, {"body": "Alone."}, {"other": "x"}, {"body": "A b. C d."}])
    cfg = SentencePairConfig(text="body")
    with pytest.raises(ValueError, match=r"docs.jsonl:3: no field 'body'"):
        load_sentence_documents([source], cfg, ByteTokenizer())
    docs = load_sentence_documents([source], cfg, ByteTokenizer(), on_bad_row="skip", name="data.eval_sources")
    assert [[bytes(s.tolist()).decode() for s in d] for d in docs.documents] == [
        ["One.", "Two!", "Three?"], ["Alone."], ["A b.", "C d."]]
    assert all(s.dtype == np.int32 for d in docs.documents for s in d)
    assert docs.where == [f"{source.path}:1", f"{source.path}:2", f"{source.path}:4"]
    assert (len(docs), docs.sentences, docs.tokens, docs.single_sentence) == (3, 6, 28, 1)
    assert dict(docs.counts) == {"missing_field": 1} and SentencePairStream(
        docs, 2, 16, cls_id=1, sep_id=2).skipped() == {"missing_field": 1}
    err = capsys.readouterr().err
    assert "data.eval_sources (all split): 3 documents, 6 sentences, 28 tokens; 1 documents of one sentence" in err

    (tmp_path / "a.txt").write_text("First para. Second\nsentence.\n\nSolo.\n")
    (tmp_path / "b.txt").write_text("\nx y. z!\n")
    files = build_source(SourceConfig(path=str(tmp_path / "*.txt"), text_split="paragraph"))
    docs = load_sentence_documents([files], SentencePairConfig(), ByteTokenizer())
    assert docs.where == [f"{tmp_path / 'a.txt'}:1", f"{tmp_path / 'a.txt'}:4", f"{tmp_path / 'b.txt'}:2"]
    assert [len(d) for d in docs.documents] == [2, 1, 2]


def test_train_and_eval_split_documents_by_the_record_rule(tmp_path):
    rows = [{"text": f"Doc {i} starts. It ends."} for i in range(40)]
    source = _jsonl(tmp_path, rows)
    parts = {split: load_sentence_documents([source], SentencePairConfig(), ByteTokenizer(), split=split,
                                            eval_fraction=0.3) for split in ("train", "eval")}
    for split, docs in parts.items():
        assert docs.where == [f"{source.path}:{i + 1}" for i in split_ids(source, split, 0.3)]
    assert len(parts["train"]) + len(parts["eval"]) == 40 and len(parts["eval"]) >= 2


def test_loading_errors(tmp_path):
    source = _jsonl(tmp_path, [{"text": "ab. cd."}, {"text": "ok. zz top."}])
    with pytest.raises(ValueError, match=rf"{source.path}:2: token id 122 >= the model's vocab_size 120"):
        load_sentence_documents([source], SentencePairConfig(), ByteTokenizer(), vocab_size=120)
    single = _jsonl(tmp_path, [{"text": "One only."}, {"text": "Just one."}], "single.jsonl")
    with pytest.raises(ValueError, match=r"data.sources: no document in the all split has 2 or more sentences"):
        load_sentence_documents([single], SentencePairConfig(), ByteTokenizer())
    lonely = _jsonl(tmp_path, [{"text": "One. Two."}, {"text": ""}], "lonely.jsonl")
    with pytest.raises(ValueError, match=r"pairs: 1 usable documents in the all split \(\{'empty': 1\}"):
        load_sentence_documents([lonely], SentencePairConfig(), ByteTokenizer(), on_bad_row="skip", name="pairs")
    with pytest.raises(ValueError, match=r"lonely.jsonl:2: .*\(data.on_bad_row=skip"):
        load_sentence_documents([lonely], SentencePairConfig(), ByteTokenizer())
    chars = CharTokenizer.from_text("ab. cd")
    skipped = load_sentence_documents([_jsonl(tmp_path, [{"text": "ab. cd."}, {"text": "dc. ba."}, {"text": "xy."}],
                                              "chars.jsonl")], SentencePairConfig(), chars, on_bad_row="skip")
    assert dict(skipped.counts) == {"untokenizable": 1} and len(skipped) == 2


# ---- a real BERT tokenizer ------------------------------------------------------------------


def test_rows_equal_bert_tokenizer_pair_encoding(tmp_path):
    from transformers import BertTokenizerFast

    words = "the cat sat on mat a dog ran far away it was late . ! ? then came home".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    wrapped = HFTokenizer(tok)
    assert (wrapped.cls_token_id, wrapped.sep_token_id) == (2, 3) == (tok.cls_token_id, tok.sep_token_id)
    source = _jsonl(tmp_path, [{"text": "The cat sat on the mat. A dog ran far away! It was late."},
                               {"text": "Then the dog came home. The cat ran. It was late?"},
                               {"text": "A cat came. The dog sat."}])
    docs = load_sentence_documents([source], SentencePairConfig(), wrapped, vocab_size=wrapped.vocab_size)
    stream = SentencePairStream(docs, 8, 40, cls_id=wrapped.cls_token_id, sep_id=wrapped.sep_token_id,
                                pad_id=wrapped.pad_token_id, short_seq_prob=0.0, epochs=3)
    rows = 0
    for batch in stream:
        for row in np.flatnonzero(batch["row_mask"]):
            n = int(batch["segment_ids"][row].sum())
            tokens = batch["tokens"][row, :n].tolist()
            first_sep = tokens.index(tok.sep_token_id)
            a_text, b_text = tok.decode(tokens[1:first_sep]), tok.decode(tokens[first_sep + 1: -1])
            want = tok(a_text, b_text)
            assert tokens == want["input_ids"]
            assert batch["token_types"][row, :n].tolist() == want["token_type_ids"]
            rows += 1
    assert rows >= 6
