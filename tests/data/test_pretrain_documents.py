"""Pretraining on documents end to end: an interrupted run resumes with exactly the batches of
the uninterrupted one (prefetch on), and the shipped Llama recipe runs, CPU-sized, with a
tokenizer trained by `jaxtune tokenizer train`; `jaxtune eval` reproduces its val loss."""

import json

import numpy as np
import pytest

from jaxtune.cli.main import main
from jaxtune.config import from_dict
from jaxtune.job import TrainJobConfig, run_training


def _job(directory, steps=6):
    return from_dict(TrainJobConfig, {
        "model": {"preset": "tiny-llama"},
        "data": {"kind": "documents", "sources": [{"path": "builtin:tinyshakespeare.txt", "text_split": "paragraph"}],
                 "eval_fraction": 0.02, "tokenize_batch": 16},
        "train": {"steps": steps, "batch_size": 4, "seq_len": 48, "log_every": 1, "eval_every": 0},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "checkpoint": {"directory": directory, "every_steps": 3},
        "logging": {"progress": False, "tensorboard": False, "jsonl": False},
    })


class _Stop(Exception):
    pass


def test_interrupted_document_run_resumes_with_the_same_batches(tmp_path):
    full = run_training(_job(None))
    seen = []

    def stop_after_checkpoint(step, metrics):
        seen.append(step)
        if step == 4:
            raise _Stop

    with pytest.raises(_Stop):
        run_training(_job(str(tmp_path / "run")), callbacks=[stop_after_checkpoint])
    resumed = run_training(_job(str(tmp_path / "run")))
    assert resumed.resumed_from == 3
    losses = lambda r, steps: [next(h["loss"] for h in r.history if h["step"] == s) for s in steps]  # noqa: E731
    np.testing.assert_array_equal(losses(resumed, [4, 5, 6]), losses(full, [4, 5, 6]))


def test_llama_recipe_cpu_sized_with_a_trained_tokenizer(tmp_path, capsys):
    tok = tmp_path / "bpe"
    assert main(["tokenizer", "train", "builtin:tinyshakespeare.txt", "--vocab-size", "512", "--out", str(tok)]) == 0
    assert (tok / "tokenizer.json").exists()
    assert main(["tokenizer", "train", "builtin:tinyshakespeare.txt", "--vocab-size", "512", "--out", str(tok)]) == 1
    ckpt = tmp_path / "run"
    cpu = ["model.config.vocab_size=512", "model.config.hidden_size=64", "model.config.num_layers=2",
           "model.config.num_heads=4", "model.config.num_kv_heads=2", "model.config.head_dim=16",
           "model.config.intermediate_size=128", "model.config.max_position_embeddings=128",
           "model.dtype=float32", "model.attention_impl=dpa", "train.remat=none", f"tokenizer.path={tok}",
           "train.batch_size=4", "train.seq_len=64", "train.eval_batches=2", "logging.progress=false",
           "logging.tensorboard=false"]
    args = ["configs/pretrain_llama_small.yaml", f"checkpoint.directory={ckpt}", "train.steps=3",
            "train.eval_every=3", "optim.warmup_steps=1", *cpu]
    assert main(["train", *args]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    val = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert len(val) == 1 and 4.0 < val[0] < 8.0  # ~ln(512) = 6.2 at the start
    assert (ckpt / "tokenizer.json").exists()  # saved beside the checkpoints
    not_model = [a for a in args if not a.startswith("model.config.")]
    assert main(["eval", "--json", *not_model, f"model.checkpoint={ckpt}", "eval.tasks=[{kind: loss, limit: 2}]"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]["loss"] == pytest.approx(val[0], rel=1e-6)


def test_bad_rows_stop_a_run_naming_the_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} " * 5}) + "\n" for i in range(40)) + "{oops\n")
    args = ["train", "model.preset=tiny-llama", "data.kind=documents", f"data.sources=[{{path: {data}}}]",
            "data.shuffle=false", "data.eval_fraction=0.1", "train.steps=30", "train.batch_size=2",
            "train.seq_len=64", "logging.progress=false", "logging.jsonl=false", "logging.tensorboard=false"]
    assert main(args) == 1
    assert f"{data}:41: invalid JSON" in capsys.readouterr().err
