"""A run's logs beyond metrics.jsonl: Weights & Biases (offline: local files only, read back through
W&B's own record schema) gets the same scalars at the same steps and the run's config, and a resumed
run continues the same W&B run; `jaxtune plot` draws the logged losses of several runs, and
`jaxtune train` leaves loss.png in its run directory."""

from __future__ import annotations

import json
import struct

import pytest

from jaxtune.cli.main import main
from jaxtune.config import from_dict
from jaxtune.job import TrainJobConfig, run_training
from tests.conftest import TWO_BLOCKS, TWO_BLOCKS_ARGS

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")  # the test extra installs wandb


def _records(path):
    """W&B's offline run file: a 7-byte header (":W&B", magic, version), then LevelDB-log records
    (crc, length, type; full / first / middle / last pieces) in 32 KiB blocks, each a `Record`."""
    data = path.read_bytes()
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_run(run_dir):
    history, config, ids = {}, {}, set()
    for run_file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in _records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                history.setdefault(items.pop("_step"), {}).update(items)
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "run":  # the run's start record carries the config given to wandb.init
                ids.add(record.run.run_id)
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    return history, config, ids


def _job(directory, steps):
    return from_dict(TrainJobConfig, {
        "model": {"config": TWO_BLOCKS}, "data": {"kind": "synthetic"},
        "train": {"steps": steps, "batch_size": 4, "seq_len": 32, "log_every": 1, "eval_every": 2, "eval_batches": 1},
        "checkpoint": {"directory": str(directory), "every_steps": 2},
        "logging": {"progress": False, "tensorboard": False,
                    "wandb": {"project": "jaxtune-tests", "name": "tiny", "mode": "offline"}}})


def test_wandb_offline_gets_the_scalars_and_config_and_a_resumed_run_continues_it(tmp_path):
    run = tmp_path / "run"
    run_training(_job(run, 2))
    run_training(_job(run, 4))  # resumes from step 2
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    history, config, ids = _wandb_run(run)
    assert len(ids) == 1 and (run / "wandb_run_id").read_text() in ids  # one W&B run across the resume
    for record in logged:
        for tag, value in record.items():
            if tag not in ("step", "time"):
                assert history[record["step"]][tag] == pytest.approx(value, rel=1e-6), (record["step"], tag)
    assert {s for s in history if "train/loss" in history[s]} == {1, 2, 3, 4}
    assert {s for s in history if "eval/loss" in history[s]} == {2, 4}
    assert config["train"]["steps"] in (2, 4) and config["model"]["config"]["hidden_size"] == TWO_BLOCKS["hidden_size"]


def test_missing_wandb_is_a_one_line_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"logging.wandb needs the wandb package: pip install 'jaxtune\[wandb\]'"):
        _job("x", 1)


def test_plot_draws_the_logged_losses_of_several_runs_and_train_leaves_one(tmp_path, capsys):
    from jaxtune.eval.plot import plot_runs, read_curves

    runs = []
    for name, lr in (("a", "3e-3"), ("b", "1e-3")):
        run = tmp_path / name
        assert main(["train", *TWO_BLOCKS_ARGS, "train.steps=4", "train.batch_size=4", "train.seq_len=32",
                     "train.log_every=1", "train.eval_every=2", "train.eval_batches=1", f"optim.lr={lr}",
                     "logging.progress=false", "logging.tensorboard=false", f"checkpoint.directory={run}"]) == 0
        assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # train drew its own curves
        runs.append(run)
    figure = plot_runs(runs, tmp_path / "both.png")
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_step, by_tokens = figure.axes[0], figure.axes[1]
    for run in runs:
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train = [(r["step"], r["train/loss"]) for r in logged if "train/loss" in r]
        held_out = [(r["step"], r["eval/loss"]) for r in logged if "eval/loss" in r]
        lines = {line.get_label(): line for line in by_step.get_lines()}
        assert list(zip(lines[f"{run.name} train"].get_xdata(), lines[f"{run.name} train"].get_ydata())) == train
        assert list(zip(lines[f"{run.name} held-out"].get_xdata(), lines[f"{run.name} held-out"].get_ydata())) == held_out
        seen = [sum(r["train/tokens"] for r in logged if "train/tokens" in r and r["step"] <= s) for s, _ in train]
        tokens_line = {line.get_label(): line for line in by_tokens.get_lines()}[f"{run.name} train"]
        assert list(tokens_line.get_xdata()) == seen and seen[-1] > seen[0] > 0
        assert read_curves(run).name == run.name
    assert main(["plot", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "both.png")]) == 1  # never overwritten
    assert "exists (--overwrite replaces it)" in capsys.readouterr().err
    assert main(["plot", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "both.png"), "--overwrite"]) == 0
