"""Classification fine-tuning: the head's loss in closed form, metrics against scikit-learn, a
separable toy task learned to high accuracy (full and LoRA), and eval restoring the head."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxtune.config import from_dict
from jaxtune.data.classify import ClassifyDataConfig, LabelledStream, load_labelled
from jaxtune.data.sources import SourceConfig, build_source
from jaxtune.data.tasks import COLOURS, colour_sentences, write_jsonl
from jaxtune.data.tokenizer import ByteTokenizer, load_tokenizer
from jaxtune.eval.metrics import classification_report, regression_report
from jaxtune.job import TrainJobConfig
from jaxtune.models import Model
from jaxtune.models.presets import preset
from jaxtune.train.classify import add_score_head, classification_loss
from tests.conftest import FINE_TUNE_COMMON

COLORS = list(COLOURS)


@pytest.fixture(scope="module")
def color_data(tmp_path_factory):
    """Which colour word a sentence contains (3 classes): separable by one token anywhere."""
    d = tmp_path_factory.mktemp("colors")
    train, held = write_jsonl(d / "train.jsonl", colour_sentences(400, 0)), write_jsonl(d / "eval.jsonl", colour_sentences(96, 1))
    return {"kind": "classification", "sources": [{"path": str(train)}], "eval_sources": [{"path": str(held)}],
            "classify": {"labels": COLORS}}


def _job(data, directory, **extra):
    job = {**FINE_TUNE_COMMON, "model": {"preset": "tiny-llama"}, "data": data,
           "objective": {"kind": "classification", "num_labels": 3},
           "train": {"steps": 40, "batch_size": 16, "seq_len": 48, "eval_batches": 6},
           "checkpoint": {"directory": str(directory)}, **extra}
    return from_dict(TrainJobConfig, job)


def test_loss_is_cross_entropy_of_the_last_real_token_and_mse_for_regression():
    cfg = preset("tiny-llama")
    model = Model(cfg)
    params = add_score_head(jax.jit(model.init)(jax.random.key(0)), cfg, 3, jax.random.key(1))
    params["score"]["kernel"] = params["score"]["kernel"] * 50  # logits far from uniform
    tokens = np.array([[5, 6, 7, 0], [8, 9, 0, 0]], np.int32)
    seg = (np.arange(4)[None] < np.array([[3], [2]])).astype(np.int32)
    batch = {"tokens": tokens, "segment_ids": seg, "positions": np.tile(np.arange(4), (2, 1)),
             "labels": np.array([2, 0], np.int32), "row_mask": np.array([1.0, 1.0], np.float32)}
    hidden, _ = jax.jit(lambda p, t, s: model.hidden(p, t, segment_ids=s))(params, jnp.asarray(tokens), jnp.asarray(seg))
    last = np.asarray(hidden)[[0, 1], [2, 1]]  # the last real token of each row
    logits = last @ np.asarray(params["score"]["kernel"]) + np.asarray(params["score"]["bias"])
    expected = sum(np.log(np.exp(l).sum()) - l[y] for l, y in zip(logits.astype(np.float64), [2, 0]))
    total, weight, metrics = jax.jit(classification_loss(model, num_labels=3))(params, batch, None)
    assert float(weight) == 2 and float(total) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["accuracy"]) == sum(np.argmax(logits, -1) == [2, 0])
    reg = add_score_head(jax.jit(model.init)(jax.random.key(0)), cfg, 1, jax.random.key(1))
    values = (last @ np.asarray(reg["score"]["kernel"]))[:, 0]
    targets = np.array([0.5, -1.0], np.float32)
    total, _, _ = jax.jit(classification_loss(model, num_labels=1, regression=True))(
        reg, {**batch, "labels": targets, "row_mask": np.array([1.0, 0.0], np.float32)}, None)
    assert float(total) == pytest.approx((values[0] - 0.5) ** 2, rel=1e-4)  # the masked row does not count


def test_reports_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, mean_squared_error

    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    preds[preds == 3] = 0  # class 3 never predicted: its F1 is 0 (sklearn's zero_division=0)
    report = classification_report(preds, labels, 4)
    assert report["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert report["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro", zero_division=0))
    for k, f1 in enumerate(f1_score(labels, preds, average=None, zero_division=0)):
        assert report[f"class_{k}"]["f1"] == pytest.approx(f1)
    x, y = rng.normal(size=50), rng.normal(size=50)
    reg = regression_report(x, y)
    assert reg["mse"] == pytest.approx(mean_squared_error(y, x)) and reg["mae"] == pytest.approx(mean_absolute_error(y, x))


@pytest.mark.parametrize("peft", ["lora"])  # full fine-tuning: test_classification_recipe_runs_end_to_end
def test_head_learns_a_separable_task_and_eval_restores_it(tmp_path, color_data, peft):
    from jaxtune.job import run_eval_job, run_training

    extra = {}
    if peft:  # LoRA r8 + the head learn more slowly than full fine-tuning (measured: 0.90 at 60 steps, 0.64 at 40)
        extra = {"peft": {"lora": {"rank": 8, "targets": "all-linear"}}, "optim": {**FINE_TUNE_COMMON["optim"], "lr": 1e-2},
                 "train": {"steps": 60, "batch_size": 16, "seq_len": 48, "eval_batches": 6}}
    result = run_training(_job(color_data, tmp_path / "run", **extra))
    trained = result.evals[-1]
    assert trained["accuracy"] >= (0.8 if peft else 0.95), trained  # chance: 0.33
    if peft:
        assert result.trainable_params < 0.2 * result.total_params
    extra["model"] = {"checkpoint": str(tmp_path / "run")}
    restored = run_eval_job(_job(color_data, tmp_path / "run", eval={"tasks": [{"kind": "classify"}, {"kind": "loss"}]},
                                 **extra))
    assert restored["classify"]["accuracy"] == pytest.approx(trained["accuracy"])
    assert restored["loss"]["loss"] == pytest.approx(trained["loss"], rel=1e-5)
    assert restored["classify"]["macro_f1"] >= (0.75 if peft else 0.95)


def test_bad_labels_name_the_row(tmp_path):
    from jaxtune.job import run_training

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "a red", "label": "red"}) + "\n" + json.dumps({"text": "x", "label": "pink"}) + "\n")
    data = {"kind": "classification", "sources": [{"path": str(path)}], "eval_sources": [{"path": str(path)}],
            "classify": {"labels": COLORS}}
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: label 'pink' is not one of data\.classify\.labels"):
        run_training(_job(data, tmp_path / "run"))


def test_classification_recipe_runs_end_to_end(tmp_path, capsys):
    from jaxtune.cli.main import main

    run = tmp_path / "run"
    common = ["logging.progress=false", "logging.tensorboard=false", f"checkpoint.directory={run}"]
    assert main(["train", "configs/classify_colours.yaml", "train.steps=50", *common]) == 0
    assert main(["eval", "--json", "configs/classify_colours.yaml", f"model.checkpoint={run}", *common]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["classify"]["examples"] == 120 and results["classify"]["accuracy"] >= 0.95
    assert list((run / "eval").glob("*.json"))


def test_text_pairs_are_framed_and_truncated_as_a_bert_tokenizer_does(tmp_path):
    """data.classify.text_pair: rows equal `BertTokenizerFast(text, text_pair, truncation=True,
    max_length=seq_len)` (ids and token types, longest_first truncation included); batches carry
    token_types; a tokenizer without [CLS] / [SEP] is refused; on_long=drop / error act on pairs."""
    directory = Path(__file__).resolve().parents[2] / "configs" / "tokenizers" / "shakespeare_wordpiece_2k"
    ref, ours = AutoTokenizer.from_pretrained(directory), load_tokenizer(directory)
    rows = [{"a": "Is this a dagger which I see before me?", "b": "Come, let me clutch thee.", "y": 1},
            {"a": "Short.", "b": "The handle toward my hand, come let me clutch thee, I have thee not and yet I see "
                             "thee still, art thou not fatal vision?", "y": 0},
            {"a": "To be, or not to be, that is the question, whether tis nobler in the mind to suffer",
             "b": "The slings and arrows of outrageous fortune, or to take arms", "y": 1}]
    source = build_source(SourceConfig(path=str(write_jsonl(tmp_path / "pairs.jsonl", rows))))
    cfg = ClassifyDataConfig(text="a", text_pair="b", label="y")
    seq_len = 24
    examples = load_labelled([source], cfg, ours, num_labels=2, regression=False, seq_len=seq_len, cls_sep=True)
    for example, row in zip(examples.examples, rows):
        want = ref(row["a"], row["b"], truncation=True, max_length=seq_len)
        assert example.tokens.tolist() == want["input_ids"] and example.types.tolist() == want["token_type_ids"]
    assert dict(examples.counts) == {"truncated": 2}
    batch = next(LabelledStream(examples, 4, seq_len, regression=False, shuffle=False, epochs=1))
    assert batch["token_types"][0, : len(examples.examples[0].types)].tolist() == examples.examples[0].types.tolist()
    assert batch["token_types"][3].sum() == 0 and batch["row_mask"].tolist() == [1, 1, 1, 0]
    dropped = load_labelled([source], ClassifyDataConfig(text="a", text_pair="b", label="y", on_long="drop"), ours,
                            num_labels=2, regression=False, seq_len=seq_len)
    assert len(dropped.examples) == 1 and dict(dropped.counts) == {"dropped_long": 2}
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: .* longer than train.seq_len = 24"):
        load_labelled([source], ClassifyDataConfig(text="a", text_pair="b", label="y", on_long="error"), ours,
                      num_labels=2, regression=False, seq_len=seq_len)
    with pytest.raises(ValueError, match=r"text_pair: the tokenizer has no \[CLS\] / \[SEP\]"):
        load_labelled([source], cfg, ByteTokenizer(), num_labels=2, regression=False, seq_len=seq_len)
