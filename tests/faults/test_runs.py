"""Fault injection, issue 22: no command damages a run, corruption is detected, one run per
directory, one-line errors. Every case goes through the CLI (`jaxtune.cli.main.main`, in process)
as a user meets it; what cannot be made real on a CI machine is simulated and the test says how.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxtune.checkpoint import manager
from jaxtune.checkpoint.manager import CheckpointConfig, TrainCheckpointer
from jaxtune.cli.main import main
from jaxtune.job.runlock import RUN_LOCK_FILE

SMALL = ["model.preset=tiny-llama", "data.kind=synthetic", "train.batch_size=4", "train.seq_len=32",
         "train.eval_batches=0", "train.eval_every=0", "train.log_every=1", "checkpoint.every_steps=2",
         "checkpoint.keep_last=3", "logging.progress=false", "logging.tensorboard=false",
         "optim.warmup_steps=1", "optim.schedule=constant"]
LORA = ["peft.lora.rank=4", "peft.lora.alpha=8"]


def train(run: Path, *extra: str) -> int:
    return main(["train", *SMALL, f"checkpoint.directory={run}", *extra])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run with checkpoints at steps 2 and 4 (copied by each test that changes it)."""
    run = tmp_path_factory.mktemp("faults") / "run"
    assert train(run, "train.steps=4", *LORA) == 0
    return run


def copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def snapshot(run: Path) -> dict:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.suffix == ".json"}


def error_line(capsys, command="train") -> str:
    """The one line the CLI printed for a failure (asserts there is exactly one and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"jaxtune {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_convert_never_writes_into_a_training_run(lora_run, hf_checkpoint, tmp_path, capsys):
    """Item 1: `convert hf-to-orbax SRC RUN` exited 0 and rewrote RUN/model_config.json. Now refused
    with and without --overwrite, the run's files unchanged, and the run still resumes."""
    run = copy(lora_run, tmp_path)
    hf_dir, _ = hf_checkpoint("llama")
    before = snapshot(run)
    for flags in ([], ["--overwrite"]):
        assert main(["convert", "hf-to-orbax", str(hf_dir), str(run), *flags]) == 1
        assert "holds a training run" in error_line(capsys, "convert")
    assert main(["convert", "orbax-to-hf", str(run), str(run), "--merge-lora"]) == 1
    assert "holds a training run" in error_line(capsys, "convert")
    assert snapshot(run) == before and not (run / "params").exists()
    assert train(run, "train.steps=6", *LORA) == 0
    assert "resumed from step 4" in capsys.readouterr().err


def test_convert_into_a_non_empty_directory_needs_overwrite(hf_checkpoint, tmp_path, capsys):
    """Item 1: hf-to-orbax replaced files in any directory without params/; a non-empty
    destination now needs --overwrite."""
    hf_dir, _ = hf_checkpoint("llama")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    assert main(["convert", "hf-to-orbax", str(hf_dir), str(dst)]) == 1
    assert "not empty" in error_line(capsys, "convert") and not (dst / "model_config.json").exists()
    assert main(["convert", "hf-to-orbax", str(hf_dir), str(dst), "--overwrite"]) == 0


def test_a_run_that_fails_before_its_first_step_writes_no_metadata(lora_run, tmp_path, capsys):
    """Item 2: validation that fails (here: every checkpoint unreadable, found only when the loop
    restores) left train_meta.json recording a job that never trained. Now the metadata is written
    only once the state is restored, so the failed attempt leaves the files as they were."""
    run = copy(lora_run, tmp_path)
    for step in ("2", "4"):
        shutil.rmtree(run / step / "state")
    before = snapshot(run)
    assert train(run, "train.steps=9", *LORA) == 1
    assert "can be restored" in error_line(capsys)
    assert snapshot(run) == before
    # the same for a batch the micro-batches cannot divide, into a fresh directory: nothing written
    fresh = tmp_path / "fresh"
    assert train(fresh, "train.steps=2", "train.batch_size=5", "train.grad_accum=2") == 1
    assert "train.batch_size" in error_line(capsys) and not fresh.exists()


def test_resuming_a_lora_run_on_another_base_is_refused(lora_run, tmp_path, capsys):
    """Item 2: a LoRA run resumed on a base of the same shape but other weights (another init
    seed here; another checkpoint in practice) continued silently. Refused, naming both bases."""
    run = copy(lora_run, tmp_path)
    before = snapshot(run)
    assert train(run, "train.steps=6", "model.init_seed=1", *LORA) == 1
    line = error_line(capsys)
    assert "init_seed=0" in line and "init_seed=1" in line and "other weights" in line
    assert snapshot(run) == before  # (its own base resumes: test_convert_never_writes_into_a_training_run)


def test_steps_without_model_config_are_refused(lora_run, tmp_path, capsys):
    """Item 7: a restore with model_config.json missing printed 81 tracebacks and then rewrote the
    metadata. Now one line naming the file, and nothing written."""
    run = copy(lora_run, tmp_path)
    (run / "model_config.json").unlink()
    before = snapshot(run)
    assert train(run, "train.steps=6", *LORA) == 1
    assert "no model_config.json" in error_line(capsys)
    assert snapshot(run) == before


def _flip_bytes(step_dir: Path, value: int = 0xFF) -> list[Path]:
    """Overwrite 64 bytes in the middle of every array-data file of a step's params (bit rot, a bad
    disk): the files stay readable, the numbers change. Data files are OCDBT's per-process ``d/``
    chunks; how the arrays split over them varies from save to save, and the largest file of the step
    is sometimes the JSON ``_METADATA``, so no single file is sure to hold the arrays a restore reads."""
    files = [p for p in (step_dir / "params").glob("ocdbt.process_*/d/*") if p.is_file()]
    assert files, f"no OCDBT data files under {step_dir / 'params'}"
    for target in files:
        data = bytearray(target.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 64] = bytes([value]) * 64
        target.write_bytes(bytes(data))
    return files


def test_corrupt_newest_checkpoint_is_detected_and_skipped(lora_run, tmp_path, capsys):
    """Item 5: 64 bytes flipped in the newest params file restored without complaint, then every
    step was skipped as non-finite. Now the checksum recorded at save differs: training falls back
    to the previous step with a warning naming the step directory, and `eval` does the same (it
    never evaluates the corrupt step); with every step corrupt both refuse in one line."""
    run = copy(lora_run, tmp_path)
    _flip_bytes(run / "4")
    with pytest.warns(UserWarning, match=r"checkpoint step 4 .*(checksum|NaN)"):
        assert main(["eval", f"model.checkpoint={run}", *SMALL[1:4], "train.eval_batches=2"]) == 0
    assert "nan" not in capsys.readouterr().out.lower()
    with pytest.warns(UserWarning, match=r"/4/params: array .*(checksum|NaN)"):
        assert train(run, "train.steps=6", *LORA) == 0
    assert "resumed from step 2" in capsys.readouterr().err
    for step in ("2", "6"):
        _flip_bytes(run / step)
    shutil.rmtree(run / "4")
    with pytest.warns(UserWarning):
        assert main(["eval", f"model.checkpoint={run}", *SMALL[1:4], "train.eval_batches=2"]) == 1
    assert "can be restored" in error_line(capsys, "eval")


def test_non_finite_restored_params_are_refused(tmp_path, monkeypatch):
    """Item 5: a step whose params hold NaN was restored and trained on (every step then skipped).
    Simulated: `save`'s own NaN refusal is switched off to write such a step (bit rot cannot be
    aimed at a float on a compressed checkpoint); its checksums agree with the NaN, so the
    finiteness check is what refuses it, and restore falls back to the step before."""
    ckpt = TrainCheckpointer(CheckpointConfig(directory=str(tmp_path / "run"), async_save=False))
    params = {"w": jnp.ones((4, 3))}
    state = {"step": jnp.asarray(2, jnp.int32)}
    ckpt.save(2, params=params, state=state, data_state={}, force=True)
    monkeypatch.setattr(manager, "_non_finite_leaves", lambda tree: [])
    ckpt.save(4, params={"w": params["w"].at[1, 2].set(jnp.nan)}, state=state, data_state={}, force=True)
    monkeypatch.undo()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, state))
    with pytest.warns(UserWarning, match=r"checkpoint step 4 .*/4/params: array params/w holds NaN"):
        step, restored, _, _ = ckpt.restore(*abstract)
    assert step == 2 and bool(jnp.isfinite(restored["w"]).all())
    ckpt.close()


def test_a_second_run_into_a_directory_is_refused(lora_run, tmp_path, capsys):
    """Item 6: two runs into one directory both started (one died in Orbax, metrics interleaved).
    Simulated holder: a lock file naming a live process on this host (this test's own pid, as a
    concurrent `jaxtune train` would write it); then a lock left by a dead process is taken over."""
    run = copy(lora_run, tmp_path)
    lock = run / RUN_LOCK_FILE
    lock.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": "now",
                                "command": "jaxtune train other"}))
    before = snapshot(run)
    assert train(run, "train.steps=6", *LORA) == 1
    line = error_line(capsys)
    assert f"pid {os.getpid()}" in line and "in use by another run" in line
    assert snapshot(run) == before
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "since": "then"}))
    with pytest.warns(UserWarning, match="taking over the lock"):
        assert train(run, "train.steps=6", *LORA) == 0
    assert not lock.exists()  # released at the end of the run


def test_disk_full_during_a_save_is_one_line_and_earlier_steps_survive(lora_run, tmp_path, capsys, monkeypatch):
    """Item 7: a full disk printed 597 lines (49 tracebacks). Simulated (CI cannot fill its disk):
    the checkpointer's save raises ENOSPC as the OS would. One line naming the path and the cause;
    the earlier steps survive and resume."""
    run = copy(lora_run, tmp_path)

    def full(self, step, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run / str(step)))

    monkeypatch.setattr(TrainCheckpointer, "save", full)
    assert train(run, "train.steps=6", *LORA) == 1
    line = error_line(capsys)
    assert str(run / "6") in line and "disk is full" in line
    monkeypatch.undo()
    assert train(run, "train.steps=6", *LORA) == 0
    assert "resumed from step 4" in capsys.readouterr().err


def test_unwritable_run_directory_is_one_line(tmp_path, capsys):
    """Item 7: a read-only run directory printed 27 lines. Real where the OS enforces permissions;
    as root (CI containers) permissions are not enforced, so the directory is put under a regular
    file instead, which fails the same way (an OSError from the first write)."""
    parent = tmp_path / "ro"
    if os.geteuid() == 0:
        parent.write_text("a file, not a directory")
    else:
        parent.mkdir()
        parent.chmod(0o555)
    assert train(parent / "run", "train.steps=2") == 1
    line = error_line(capsys)
    assert str(parent) in line


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    """Item 7: --debug / JAXTUNE_DEBUG=1 re-raise the error for its traceback."""
    with pytest.raises(ValueError, match="train.batch_size"):
        main(["--debug", "train", *SMALL, "train.batch_size=5", "train.grad_accum=2"])
    monkeypatch.setenv("JAXTUNE_DEBUG", "1")
    with pytest.raises(ValueError, match="train.batch_size"):
        main(["train", *SMALL, "train.batch_size=5", "train.grad_accum=2"])
