"""The document pipeline: packing and segment masking, exact resume, host sharding, mixtures,
held-out split, bad rows, and the source formats."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.data.pipeline import DocumentOptions, DocumentStream, held_out
from jaxtune.data.prefetch import Prefetch
from jaxtune.data.sources import SourceConfig, build_source
from jaxtune.data.tokenizer import ByteTokenizer
from jaxtune.models import Model, ModelConfig

TOK = ByteTokenizer()


def _docs(n, seed=0, lo=3, hi=60):
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    return [f"d{i} " + "".join(rng.choice(letters, rng.integers(lo, hi))) for i in range(n)]


def _jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


def _stream(paths, weights=None, **kw):
    sources = [build_source(SourceConfig(path=str(p))) for p in paths]
    kw.setdefault("batch_size", 4)
    kw.setdefault("seq_len", 32)
    kw.setdefault("options", DocumentOptions(add_eos=True))
    return DocumentStream(sources, weights or [1.0] * len(sources), TOK, **kw)


def _segments(batch):
    """Every (inputs, targets) run of one segment in a batch, in row order."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            m = seg == s
            assert m.nonzero()[0].tolist() == list(range(m.nonzero()[0][0], m.nonzero()[0][-1] + 1))  # contiguous
            np.testing.assert_array_equal(batch["positions"][r][m], np.arange(m.sum()))
            out.append((batch["tokens"][r][m], batch["targets"][r][m]))
    return out


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_every_target_exactly_once_in_document_order(tmp_path, packing):
    docs = _docs(9)
    stream = _stream([_jsonl(tmp_path / "d.jsonl", docs)], batch_size=2, seq_len=16, packing=packing,
                     shuffle=False, epochs=1)
    pieces = [p for batch in stream for p in _segments(batch)]
    # Re-join pieces: a document split across rows continues with the token it ended on.
    rebuilt, current = [], None
    for inputs, targets in pieces:
        if current is not None and current[-1] == inputs[0] and current[-1] != TOK.eos_token_id:
            current = np.concatenate([current, targets])
        else:
            if current is not None:
                rebuilt.append(current)
            current = np.concatenate([inputs[:1], targets])
    rebuilt.append(current)
    expected = [np.asarray(list(d.encode()) + [TOK.eos_token_id]) for d in docs]
    assert [r.tolist() for r in rebuilt] == [e.tolist() for e in expected]


def test_pack_fills_rows_and_pad_uses_one_document_per_row(tmp_path):
    docs = _docs(40, lo=3, hi=12)
    path = _jsonl(tmp_path / "d.jsonl", docs)
    packed = next(_stream([path], batch_size=4, seq_len=32, packing="pack", shuffle=False))
    padded = next(_stream([path], batch_size=4, seq_len=32, packing="pad", shuffle=False))
    assert packed["loss_mask"].sum() == 4 * 32  # no padding while documents remain
    assert (packed["segment_ids"].max(axis=1) > 1).all()
    assert (padded["segment_ids"].max(axis=1) == 1).all()
    assert padded["loss_mask"].sum() < 4 * 32


def test_packed_losses_equal_per_document_losses(tmp_path):
    """No attention across documents: each packed segment's token losses equal those of the
    document run alone (positions restart at 0 in each segment)."""
    cfg = ModelConfig(vocab_size=TOK.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=64)
    model = Model(cfg)
    params = model.init(jax.random.key(0))
    batch = next(_stream([_jsonl(tmp_path / "d.jsonl", _docs(12, hi=20))], batch_size=2, seq_len=48, shuffle=False))
    assert batch["segment_ids"].max() >= 3

    @jax.jit
    def nll(tokens, targets, segment_ids, positions=None):
        logits = model.apply(params, tokens, segment_ids=segment_ids, positions=positions)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    packed = np.asarray(nll(batch["tokens"], batch["targets"], batch["segment_ids"], batch["positions"]))
    # Each document alone at the start of its own row (the rest padding, segment 0).
    alone = {k: np.zeros((0, 48), np.int32) for k in ("tokens", "targets", "segment_ids")}
    where = []
    for r in range(2):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            m = seg == s
            n = int(m.sum())
            for k in ("tokens", "targets"):
                row = np.zeros((1, 48), np.int32)
                row[0, :n] = batch[k][r][m]
                alone[k] = np.concatenate([alone[k], row])
            alone["segment_ids"] = np.concatenate([alone["segment_ids"], (np.arange(48) < n)[None].astype(np.int32)])
            where.append((r, m, n))
    single = np.asarray(nll(alone["tokens"], alone["targets"], alone["segment_ids"]))
    for i, (r, m, n) in enumerate(where):
        np.testing.assert_allclose(packed[r][m], single[i, :n], rtol=1e-5, atol=1e-5)


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_sees_the_same_batches(tmp_path, prefetch):
    """Stop anywhere (mid-document, across epochs, in a mixture), save the state as JSON, restore
    it in a fresh stream: the following batches are exactly the uninterrupted run's."""
    a = _jsonl(tmp_path / "a.jsonl", _docs(7, seed=1, hi=90))
    b = _jsonl(tmp_path / "b.jsonl", _docs(5, seed=2))

    def make():
        return Prefetch(_stream([a, b], [0.7, 0.3], batch_size=4, seq_len=24, seed=3,
                                options=DocumentOptions(block=3)), prefetch)

    uninterrupted = _take(make(), 14)
    first = make()
    _take(first, 6)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    assert any(r["offset"] > 0 for s in state["shards"].values() for r in s["readers"])  # stopped mid-document
    resumed = make()
    resumed.set_state(state)
    _same(_take(resumed, 8), uninterrupted[6:])
    assert max(r["epoch"] for r in resumed.get_state()["shards"]["0"]["readers"]) >= 1  # crossed an epoch


def test_host_shards_assemble_the_single_process_batches(tmp_path):
    """Shards read by different processes concatenate to the batches one process reads, and
    their merged states resume either setup."""
    path = _jsonl(tmp_path / "d.jsonl", _docs(30, hi=40))
    whole = _stream([path], batch_size=4, num_shards=2, seed=5)
    parts = [_stream([path], batch_size=4, num_shards=2, shards=[k], seed=5) for k in (0, 1)]
    for _ in range(5):
        batch, pieces = next(whole), [next(p) for p in parts]
        _same([batch], [{k: np.concatenate([p[k] for p in pieces]) for k in batch}])
    merged = DocumentStream.merge_states([p.get_state() for p in parts])
    assert merged == whole.get_state()
    again = _stream([path], batch_size=4, num_shards=2, shards=[1], seed=5)
    again.set_state(merged)
    _same(_take(again, 3), _take(parts[1], 3))
    with pytest.raises(ValueError, match="num_shards"):
        _stream([path], batch_size=4, num_shards=4, seed=5).set_state(merged)
    with pytest.raises(ValueError, match="must divide"):
        _stream([path], batch_size=6, num_shards=4)


def test_shuffle_is_seeded_and_changes_per_epoch(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [f"document number {i}" for i in range(16)])

    def first_tokens(seed):
        s = _stream([path], batch_size=16, seq_len=40, packing="pad", seed=seed)
        return [tuple(next(s)["tokens"][:, 16]) for _ in range(2)]  # the digit(s) of each row's document

    assert first_tokens(0) == first_tokens(0)
    assert first_tokens(0) != first_tokens(1)
    e0, e1 = first_tokens(0)
    assert e0 != e1 and sorted(e0) == sorted(e1)  # same documents, new order


def test_mixture_draws_rows_by_weight(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", ["aaaa"] * 20)
    b = _jsonl(tmp_path / "b.jsonl", ["bbbb"] * 20)
    stream = _stream([a, b], [3.0, 1.0], batch_size=16, seq_len=8, packing="pad")
    rows = np.concatenate([next(stream)["tokens"][:, 0] for _ in range(50)])
    share = float(np.mean(rows == ord("a")))
    assert abs(share - 0.75) < 5 * np.sqrt(0.75 * 0.25 / len(rows)), share
    assert set(np.unique(rows)) == {ord("a"), ord("b")}


def test_held_out_split_is_disjoint_and_sized(tmp_path):
    idx = np.arange(20000)
    assert abs(held_out(idx, 0.1).mean() - 0.1) < 0.01
    docs = [f"doc {i:03d}." for i in range(200)]
    path = _jsonl(tmp_path / "d.jsonl", docs)

    def seen(split):
        s = _stream([path], batch_size=2, seq_len=16, packing="pad", split=split, eval_fraction=0.1, epochs=1,
                    shuffle=False)
        return {bytes(b["tokens"][r][b["segment_ids"][r] > 0][:7].astype(np.uint8)).decode() for b in s for r in range(2)} - {""}

    train, held = seen("train"), seen("eval")
    assert not train & held
    assert train | held == {d[:7] for d in docs}
    assert 8 <= len(held) <= 35


def test_bad_rows_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"txt": "wrong field"}\n')
    stream = _stream([path], batch_size=1, seq_len=64, shuffle=False)
    with pytest.raises(ValueError, match=r"bad\.jsonl:4: no field 'text' \(fields: txt\)"):
        next(stream)
    path.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        next(_stream([path], batch_size=1, seq_len=64, shuffle=False))
    path.write_text('{"text": "fine"}\n{"text": "   "}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: empty document"):
        next(_stream([path], batch_size=1, seq_len=64, shuffle=False))
    path.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'text' is a int"):
        next(_stream([path], batch_size=1, seq_len=64, shuffle=False))


def test_bad_rows_skipped_and_counted_when_configured(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = ['{"text": "one"}', "not json", '{"text": ""}', '[1, 2]', '{"body": "x"}', '{"text": "two"}']
    path.write_text("\n".join(lines) + "\n")
    stream = _stream([path], batch_size=1, seq_len=64, shuffle=False, epochs=1,
                     options=DocumentOptions(on_bad_row="skip"))
    batches = list(stream)
    text = "".join(TOK.decode(b["tokens"][0][b["loss_mask"][0] > 0]) for b in batches)
    assert "one" in text and "two" in text and "x" not in text
    assert stream.skipped() == {"invalid_json": 1, "empty": 1, "not_a_record": 1, "missing_field": 1}
    assert stream.get_state()["shards"]["0"]["readers"][0]["skipped"] == stream.skipped()


def test_token_ids_beyond_the_model_vocab_are_an_error(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ["hello"])
    with pytest.raises(ValueError, match="vocab_size 100"):
        next(_stream([path], batch_size=1, options=DocumentOptions(vocab_size=100), split="all"))


def test_text_json_parquet_and_hf_sources(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "t.txt").write_text("first para\nline two\n\n\nsecond para\n")
    src = build_source(SourceConfig(path=str(tmp_path / "t.txt"), text_split="paragraph"))
    assert [src.read(i) for i in range(len(src))] == ["first para\nline two", "second para"]
    lines = build_source(SourceConfig(path=str(tmp_path / "t.txt"), text_split="line"))
    assert len(lines) == 3 and lines.read(2) == "second para"
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"empty\.txt:1: empty document"):
        build_source(SourceConfig(path=str(tmp_path / "empty.txt"))).read(0)

    (tmp_path / "r.json").write_text(json.dumps({"rows": [{"text": "a"}, {"text": None}]}))
    js = build_source(SourceConfig(path=str(tmp_path / "r.json")))
    assert js.read(0) == "a"
    with pytest.raises(ValueError, match=r"r\.json record 1 of 'rows': field 'text' is a NoneType"):
        js.read(1)

    pq.write_table(pa.table({"content": ["x y", None, "z"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match="no column 'text' \\(columns: content\\)"):
        build_source(SourceConfig(path=str(tmp_path / "p.parquet")))
    pqs = build_source(SourceConfig(path=str(tmp_path / "p.parquet"), field="content"))
    assert len(pqs) == 3 and pqs.read(2) == "z"
    with pytest.raises(ValueError, match=r"p\.parquet row 1: column 'content' is null"):
        pqs.read(1)

    datasets.Dataset.from_dict({"text": ["h0", "h1", "h2"]}).save_to_disk(str(tmp_path / "hfds"))
    hf = build_source(SourceConfig(hf=str(tmp_path / "hfds")))
    assert hf.random_access and [hf.read(i) for i in range(3)] == ["h0", "h1", "h2"]

    _jsonl(tmp_path / "s1.jsonl", ["s0", "s1"])
    _jsonl(tmp_path / "s2.jsonl", ["s2"])
    glob = build_source(SourceConfig(path=str(tmp_path / "s*.jsonl")))
    assert [glob.read(i) for i in range(len(glob))] == ["s0", "s1", "s2"]
    with pytest.raises(FileNotFoundError, match="no files match"):
        build_source(SourceConfig(path=str(tmp_path / "nothing*.jsonl")))
    (tmp_path / "x.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match="cannot tell the format from the suffix '.csv'"):
        build_source(SourceConfig(path=str(tmp_path / "x.csv")))


def test_streaming_source_shards_and_resumes(tmp_path):
    """A streamed dataset (datasets' json builder over local files, streaming=True) is read
    forward, split across shards by index, and resumed by skipping to the saved index."""
    path = _jsonl(tmp_path / "big.jsonl", _docs(25, hi=30))
    src = build_source(SourceConfig(hf="json", data_files=str(path), streaming=True))
    assert not src.random_access
    ref = build_source(SourceConfig(path=str(path)))

    def make(shards=None):
        return DocumentStream([src], [1.0], TOK, batch_size=4, seq_len=20, num_shards=2, shards=shards,
                              options=DocumentOptions(block=4))

    whole = _take(make(), 9)  # crosses the end of the stream: epoch 2 starts again
    pieces = [p for b in whole[:2] for p in _segments(b)]
    shard0_docs = [ref.read(i) for i in range(0, 25, 2)]
    assert bytes(pieces[0][0].astype(np.uint8)).decode() in shard0_docs[0]
    half = make()
    _take(half, 4)
    state = json.loads(json.dumps(half.get_state()))
    again = make(shards=[1])
    again.set_state(state)
    tail = _take(again, 5)
    _same(tail, [{k: v[2:] for k, v in b.items()} for b in whole[4:]])


def test_text_the_tokenizer_cannot_encode_is_a_bad_row(tmp_path):
    """A character vocabulary meets a character it lacks: an error naming the document, or with
    on_bad_row=skip an explicit, counted skip of that document only."""
    from jaxtune.data.tokenizer import CharTokenizer

    chars = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .")
    path = _jsonl(tmp_path / "c.jsonl", ["fine text.", "has digits 42.", "more fine text."])
    make = lambda options: DocumentStream([build_source(SourceConfig(path=str(path)))], [1.0], chars,  # noqa: E731
                                          batch_size=1, seq_len=64, shuffle=False, epochs=1, split="all", options=options)
    with pytest.raises(ValueError, match=r"c\.jsonl document at position 1: .*not in its vocabulary.*on_bad_row=skip"):
        list(make(DocumentOptions(add_eos=False)))
    stream = make(DocumentOptions(add_eos=False, on_bad_row="skip"))
    text = "".join(chars.decode(b["tokens"][0][b["segment_ids"][0] > 0]) for b in stream)
    assert text == "fine textmore fine text"  # inputs: each document but its last character
    assert stream.skipped() == {"untokenizable": 1}
