"""Batch streams: nothing dropped, deterministic, positions restore exactly."""

import numpy as np
import pytest

from jaxtune.data.streams import DataConfig, SyntheticStream, TokenRowStream, lm_batch


def test_token_rows_predict_every_token_once_per_epoch_and_pad_the_tail():
    tokens = np.arange(1, 104, dtype=np.int32)  # 103 tokens: 102 targets, 12 full rows of 8 + a row of 6
    stream = TokenRowStream(tokens, batch_size=4, seq_len=8, shuffle=True, seed=3, epochs=1)
    targets = []
    for batch in stream:
        targets.extend(batch["targets"][batch["loss_mask"] > 0].tolist())
        # inputs and targets are the same text shifted by one wherever the loss counts
        real = batch["loss_mask"] > 0
        assert np.all(batch["targets"][real] == batch["tokens"][real] + 1)
        assert np.all(batch["segment_ids"][~real & (batch["segment_ids"] > 0)] == 1)
    assert sorted(targets) == list(range(2, 104))
    assert stream.num_rows == 13


def test_finite_stream_pads_its_last_batch_with_empty_rows():
    stream = TokenRowStream(np.arange(1, 42, dtype=np.int32), batch_size=4, seq_len=8, shuffle=False, epochs=1)
    batches = list(stream)
    assert len(batches) == 2  # 5 rows -> 4 + 1 (+3 empty rows)
    assert batches[1]["loss_mask"][1:].sum() == 0 and batches[1]["segment_ids"][1:].sum() == 0


def test_stream_state_resumes_the_exact_sequence():
    tokens = np.arange(500, dtype=np.int32) % 97
    a = TokenRowStream(tokens, batch_size=4, seq_len=16, seed=1)
    expected = [next(a) for _ in range(12)]  # several epochs (31 rows)
    b = TokenRowStream(tokens, batch_size=4, seq_len=16, seed=1)
    for _ in range(5):
        next(b)
    c = TokenRowStream(tokens, batch_size=4, seq_len=16, seed=1)
    c.set_state(b.get_state())
    for want in expected[5:]:
        got = next(c)
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
    with pytest.raises(ValueError, match="does not match this stream"):
        TokenRowStream(tokens, batch_size=4, seq_len=16, seed=2).set_state(b.get_state())


def test_synthetic_stream_is_a_function_of_seed_and_position():
    s = SyntheticStream(4, 16, 50, seed=5, pad_fraction=0.5)
    first = [next(s) for _ in range(3)]
    t = SyntheticStream(4, 16, 50, seed=5, pad_fraction=0.5)
    t.set_state({"kind": "synthetic", "position": 2, "seed": 5})
    np.testing.assert_array_equal(next(t)["tokens"], first[2]["tokens"])
    assert len({float(b["loss_mask"].sum()) for b in first}) > 1  # padding varies the real-token count
    with pytest.raises(ValueError, match="seed 5"):
        t.set_state({"kind": "synthetic", "position": 2, "seed": 6})


def test_lm_batch_masks_padding_and_config_checks():
    batch = lm_batch(np.array([[5, 6, 7, 0]]), np.array([3]))
    assert batch["segment_ids"].tolist() == [[1, 1, 1]]
    assert batch["loss_mask"].tolist() == [[1, 1, 0]]
    with pytest.raises(ValueError, match="data.eval_fraction"):
        DataConfig(eval_fraction=1.5)
    with pytest.raises(ValueError, match="fewer than one batch"):
        TokenRowStream(np.arange(20), batch_size=8, seq_len=8)
