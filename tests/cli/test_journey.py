"""What a user meets after a run, through the CLI: `jaxtune eval RUN` evaluates as the run trained (its
saved job, a full pass, counts), synthetic data is refused for a run trained on real data, positions
past a learned table are an error (never a NaN), a resumed run lists what changed, `--print-config`,
``peft=null`` and reading a run without absl noise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from jaxtune.cli.main import main
from jaxtune.config import load_config
from jaxtune.job import TrainJobConfig

ROOT = Path(__file__).resolve().parents[2]
CHAR = str(ROOT / "configs/pretrain_shakespeare_char.yaml")
# the main job's model, two steps, small held-out share (10 rows of 64), a training-time eval of one batch
SMALL = ["train.steps=2", "train.steps_per_call=1", "optim.warmup_steps=1", "train.eval_every=2", "train.eval_batches=1",
         "train.batch_size=4", "data.eval_fraction=0.006", "logging.progress=false", "logging.tensorboard=false",
         "checkpoint.every_steps=2"]


def test_one_run_through_eval_refusals_and_resume(tmp_path, capfd):
    """One small run of the main job (trained once), then what a user does with it."""
    run = tmp_path / "char"
    assert main(["train", CHAR, *SMALL, f"checkpoint.directory={run}"]) == 0
    capfd.readouterr()
    _eval_uses_the_saved_job_with_a_full_pass_and_counts(run, capfd)
    _reading_a_run_prints_no_read_only_notice(run, capfd)
    _synthetic_data_for_a_real_run_is_refused_unless_asked(run, capfd)
    _resume_lists_changed_settings_and_says_where_it_resumed(run, tmp_path / "resumed", capfd)


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _eval_uses_the_saved_job_with_a_full_pass_and_counts(char_run, capsys):
    assert main(["eval", "--json", f"model.checkpoint={char_run}"]) == 0
    out, err = capsys.readouterr()
    saved = json.loads(out.strip().splitlines()[-1])["loss"]
    assert "the run's own job" in err and "data.kind=text" in err
    assert main(["eval", "--json", CHAR, f"model.checkpoint={char_run}", *SMALL]) == 0
    with_file = _json_out(capsys)["loss"]
    # the run's text data, not synthetic tokens: the same figures as evaluating with the config file
    assert saved["loss"] == pytest.approx(with_file["loss"], rel=1e-6) and saved["loss"] < 5
    # a full pass although train.eval_batches=1: every held-out row (6,692 targets in 105 rows of 64, 4 per
    # batch), and the counts say so; the training run's start said the same
    assert saved["examples"] == 105 and saved["batches"] == 27 and saved["tokens"] == 6692


def _reading_a_run_prints_no_read_only_notice(char_run, capfd):
    assert main(["eval", f"model.checkpoint={char_run}"]) == 0
    out, err = capfd.readouterr()
    assert "examples" in out and "read only" not in err and "read only" not in out


def _synthetic_data_for_a_real_run_is_refused_unless_asked(char_run, capsys):
    assert main(["eval", str(ROOT / "configs/train_demo.yaml"), f"model.checkpoint={char_run}"]) == 1
    err = capsys.readouterr().err
    assert "trained on data.kind=text" in err and "data.kind=synthetic" in err
    # asked for: then the learned-position model's 64 positions are the limit, an error and not a NaN
    assert main(["eval", str(ROOT / "configs/train_demo.yaml"), f"model.checkpoint={char_run}",
                 "data.kind=synthetic"]) == 1
    assert "train.seq_len (128) exceeds the model's 64 learned positions" in capsys.readouterr().err
    assert main(["eval", "--json", f"model.checkpoint={char_run}", "data.kind=synthetic", "train.seq_len=64"]) == 0
    assert _json_out(capsys)["loss"]["loss"] < 100  # finite


def _resume_lists_changed_settings_and_says_where_it_resumed(char_run, run, capsys):
    shutil.copytree(char_run, run)  # the fixture's run, resumed here with other settings
    assert main(["train", CHAR, *SMALL, f"checkpoint.directory={run}"]) == 0  # nothing to do: the same settings
    start = capsys.readouterr().err
    assert "data: 17,324 training rows (1,108,700 tokens) per epoch; 105 rows (6,692 tokens) held out" in start
    assert "step: 4 rows of 64 tokens; 2 steps = 0.00 epochs (4,331 steps per epoch)" in start
    assert "resume: 1 setting(s) differ from the saved run:\n  checkpoint.directory: " in start  # the copy
    assert main(["train", CHAR, *SMALL, "train.steps=3", "optim.lr=1e-3", f"checkpoint.directory={run}"]) == 0
    err = capsys.readouterr().err
    assert "resume: 2 setting(s) differ from the saved run" in err
    assert "train.steps: 2 -> 3: the learning-rate schedule is re-stretched" in err
    assert "optim.lr: 0.002 -> 0.001" in err
    assert "resumed from step 2 of 3" in err  # at the start (the summary at the end no longer says it)


def test_print_config_and_peft_null(tmp_path, capsys):
    lora = str(ROOT / "configs/lora_shakespeare_char.yaml")
    assert main(["train", lora, "--print-config", "train.steps=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 7 and printed["peft"]["lora"]["rank"] > 0
    path = tmp_path / "printed.yaml"
    path.write_text(yaml.safe_dump(printed))
    assert load_config(TrainJobConfig, path) == load_config(TrainJobConfig, lora, ["train.steps=7"])
    assert main(["train", lora, "--print-config", "peft=null"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["peft"]["lora"] is None
