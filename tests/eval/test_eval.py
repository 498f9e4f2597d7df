"""`jaxtune eval` tasks: continuation log-likelihoods and multiple choice against a hand computation
from full-sequence logits, exact match against an independent (cache-free) greedy decode, answer
extraction, the report file and table."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.config import from_dict
from jaxtune.data.instruct import InstructConfig
from jaxtune.data.tokenizer import ByteTokenizer
from jaxtune.eval.config import EvalTaskConfig
from jaxtune.eval.tasks import exact_match, multiple_choice
from jaxtune.generate.text import extract_answer
from jaxtune.job import TrainJobConfig
from jaxtune.models import Model
from jaxtune.models.presets import preset
from jaxtune.models.scoring import continuation_rows, sequence_logprobs

BYTE = ByteTokenizer()


@pytest.fixture(scope="module")
def model_params():
    model = Model(preset("tiny-llama"))
    return model, jax.jit(model.init)(jax.random.key(3))


@jax.jit
def _full_logprobs(params, tokens):
    logits = Model(preset("tiny-llama")).apply(params, tokens)
    return jax.nn.log_softmax(logits, -1)


def _by_hand(params, context, continuation):
    ids = np.asarray([list(context) + list(continuation)], np.int32)
    logp = np.asarray(_full_logprobs(params, jnp.asarray(ids)))[0].astype(np.float64)
    return sum(logp[len(context) - 1 + i, t] for i, t in enumerate(continuation))


def test_continuation_log_likelihood_equals_full_sequence_logits(model_params):
    model, params = model_params
    pairs = [(BYTE.encode("Question: 2+2="), BYTE.encode(" 4")), (BYTE.encode("Hi"), BYTE.encode(" there, you")),
             (BYTE.encode("x"), BYTE.encode("y"))]
    rows = continuation_rows(pairs, 32)
    summed, _ = sequence_logprobs(model, params, rows)
    np.testing.assert_allclose(np.asarray(summed), [_by_hand(params, a, b) for a, b in pairs], rtol=1e-5)
    with pytest.raises(ValueError, match="row 0: 33 tokens do not fit 32"):
        continuation_rows([(list(range(20)), list(range(13)))], 31)


def test_multiple_choice_accuracy_matches_the_hand_computed_argmax(model_params):
    model, params = model_params
    rng = np.random.default_rng(0)
    records, expected_acc, expected_norm = [], 0, 0
    for i in range(12):
        choices = ["".join(rng.choice(list("abcdef"), int(rng.integers(1, 6)))) for _ in range(4)]
        answer = int(rng.integers(4))
        records.append(({"prompt": f"Pick {i}:", "choices": choices, "answer": answer}, f"mc:{i}"))
        scores = np.array([_by_hand(params, BYTE.encode(f"Pick {i}:"), BYTE.encode(c)) for c in choices])
        expected_acc += int(np.argmax(scores) == answer)
        expected_norm += int(np.argmax(scores / [len(c) for c in choices]) == answer)
    task = EvalTaskConfig(kind="choice", batch_size=8)
    out = multiple_choice(task, model, params, BYTE, records, [], InstructConfig())
    assert out["examples"] == 12
    assert out["acc"] == expected_acc / 12 and out["acc_norm"] == expected_norm / 12
    assert 0 < expected_acc < 12 or 0 < expected_norm < 12  # the check can tell right from wrong


def _greedy_without_cache(params, prompt_ids, n):
    ids = list(prompt_ids)
    for _ in range(n):
        logp = np.asarray(_full_logprobs(params, jnp.asarray([ids], jnp.int32)))[0, -1]
        ids.append(int(np.argmax(logp)))
    return ids[len(prompt_ids):]


def test_exact_match_scores_an_independent_greedy_decode(model_params):
    model, params = model_params
    records = []
    for i, prompt in enumerate(["To be", "Hello wor", "ROMEO:", "1+1=", "The end"]):
        continuation = BYTE.decode([t for t in _greedy_without_cache(params, BYTE.encode(prompt), 6) if t < 256])
        reference = continuation if i % 2 == 0 else continuation + "!"  # odd rows can never match
        records.append(({"prompt": prompt, "completion": reference}, f"row:{i}"))
    task = EvalTaskConfig(kind="generate", batch_size=4, max_new_tokens=6)  # the default: the whole text
    assert task.answer == (None, False)
    out = exact_match(task, model, params, BYTE, records, [], InstructConfig())
    # the byte tokenizer has an EOS (258), so a row may stop early: this model (random weights) must not
    assert out["mean_new_tokens"] == 6
    assert out["correct"] == 3 and out["exact_match"] == pytest.approx(3 / 5)
    assert [s["correct"] for s in out["samples"]] == [True, False, True, False, True]


def test_answer_extraction_gsm8k_style():
    pattern, numeric = EvalTaskConfig(answer_pattern="gsm8k").answer
    assert numeric and EvalTaskConfig(answer_pattern="gsm8k", numeric=False).answer == (pattern, False)
    assert extract_answer("so 48+24 = 72 clips.\n#### 72", pattern, True) == 72.0
    assert extract_answer("#### 1,234", pattern, True) == 1234.0
    assert extract_answer("#### -3.5", pattern, True) == -3.5
    assert extract_answer("the answer is 72", pattern, True) is None
    assert extract_answer(" $1,000 ", None, True) == 1000.0
    assert extract_answer(" yes ", None, False) == "yes"
    with pytest.raises(ValueError, match="needs one \\(group\\)"):
        EvalTaskConfig(answer_pattern="#### \\d+")


def test_report_is_written_once_and_the_table_lists_every_metric(tmp_path):
    from jaxtune.eval.report import format_table
    from jaxtune.job.evaluate import write_results

    job = from_dict(TrainJobConfig, {"eval": {"output": str(tmp_path / "r.json")}})
    results = {"gsm8k": {"exact_match": 0.25, "examples": 4, "samples": [{"prediction": "x"}]}}
    path = write_results(job, results)
    report = json.loads(path.read_text())
    assert report["results"] == results and report["model"]["preset"] == "tiny-llama"
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_results(job, results)
    table = format_table(results)
    assert "gsm8k  exact_match  0.2500" in table and "samples" not in table
