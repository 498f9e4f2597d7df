"""Ctrl-C (issue 22, item 4): the first saves and stops like SIGTERM, the second exits at once, and
closing the metrics writers never blocks exit."""

import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from jaxtune.checkpoint.manager import CheckpointConfig, TrainCheckpointer
from jaxtune.cli.main import main
from jaxtune.config import from_dict
from jaxtune.models import Model, ModelConfig
from jaxtune.parallel import MeshConfig, make_mesh
from jaxtune.data.streams import SyntheticStream
from jaxtune.train import metrics
from jaxtune.train.config import TrainConfig
from jaxtune.train.loop import train
from jaxtune.train.stopping import INTERRUPTED_EXIT_CODE
from jaxtune.train.losses import causal_lm_loss
from jaxtune.train.metrics import MetricsLogger
from jaxtune.train.optim import OptimConfig, build_optimizer
from tests.conftest import TWO_BLOCKS, TWO_BLOCKS_ARGS

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
# A two-block tiny-llama (tests/conftest.py): what is interrupted is the loop, not the model.
TINY = [*TWO_BLOCKS_ARGS, "train.batch_size=2", "train.seq_len=16", "train.log_every=1", "train.eval_every=0",
        "train.eval_batches=0", "checkpoint.every_steps=1000000", "logging.progress=false"]


def _default_sigint_in_child():
    """Popen's preexec_fn: the child gets Ctrl-C's default disposition, whatever pytest was started
    with (a shell's background job starts with SIGINT ignored, and an ignored signal is inherited)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _train_lines(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if "train/loss" in line]


def _steps_on_disk(ckpt: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def test_ctrl_c_saves_exits_130_and_the_same_command_resumes(tmp_path, capsys):
    """Reproduces the report: Ctrl-C on `jaxtune train` (TensorBoard on) never saved and could hang.
    Now the first SIGINT stops at the next step boundary, saves that step, prints how to resume and
    exits 130; the same command then resumes from the saved step."""
    ckpt = tmp_path / "run"
    args = ["train", "train.steps=100000", *TINY, f"checkpoint.directory={ckpt}", "logging.tensorboard=true"]
    command = [sys.executable, "-m", "jaxtune.cli.main", *args]
    proc = subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint_in_child)
    log = ckpt / "metrics.jsonl"
    try:
        deadline = time.time() + 180  # start-up and compilation (seconds when the machine is idle)
        while time.time() < deadline and proc.poll() is None and not _train_lines(log):
            time.sleep(0.1)
        assert _train_lines(log), "no step was logged"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)  # a step, a save of a tiny model, and exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == INTERRUPTED_EXIT_CODE == 130, err[-3000:]
    assert "press Ctrl-C again to exit at once" in err
    steps = _steps_on_disk(ckpt)
    assert len(steps) == 1 and steps[0] >= 1
    saved = steps[0]
    assert f"interrupted (Ctrl-C) at step {saved}; state saved in {ckpt}" in out
    assert _train_lines(log)[-1]["step"] == saved  # saved exactly where it stopped

    # The same command (with a reachable step count) resumes from there (in process: no second start-up).
    assert main(["train", f"train.steps={saved + 1}", *args[2:]]) == 0
    assert f"resumed from step {saved}" in capsys.readouterr().err
    assert _train_lines(log)[-1]["step"] == saved + 1


def _tiny_run(steps: int = 1000, **kw):
    cfg = from_dict(ModelConfig, TWO_BLOCKS)
    model = Model(cfg)
    tc = TrainConfig(steps=steps, batch_size=2, seq_len=16, log_every=1)
    opt, sched = build_optimizer(OptimConfig(lr=1e-3), tc.steps)
    return train(loss_fn=causal_lm_loss(model), params=model.init, model_cfg=cfg, optimizer=opt, schedule=sched,
                 cfg=tc, batches=SyntheticStream(2, 16, cfg.vocab_size), mesh=make_mesh(MeshConfig()), **kw)


@pytest.fixture
def default_sigint():
    """Python's own Ctrl-C handler for the test (a test runner may have replaced or ignored it),
    restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set from the main thread")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)


def test_first_ctrl_c_in_process_returns_interrupted(default_sigint, capfd):
    """The library side of the first Ctrl-C: train() returns status "interrupted" after the step the
    signal arrived in (no KeyboardInterrupt), says on stderr that a second Ctrl-C exits at once, and
    gives Ctrl-C back to Python's handler."""
    result = _tiny_run(callbacks=[lambda step, m: _ctrl_c() if step == 2 else None])
    assert result.status == "interrupted"
    assert 2 <= result.history[-1]["step"] <= 3 and int(result.state.step) == result.history[-1]["step"]
    assert "press Ctrl-C again to exit at once" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_second_ctrl_c_during_the_save_raises_at_once(default_sigint):
    """Reproduces a second Ctrl-C while the first one's save is still running (a slow disk, a large
    state; simulated by a save that sleeps a minute): KeyboardInterrupt comes out of train() at once,
    and Ctrl-C's default handler is back."""
    saves = []

    class SlowSave(TrainCheckpointer):
        def save(self, step, **kw):
            saves.append(time.perf_counter())
            _ctrl_c()  # the second Ctrl-C, mid-save
            time.sleep(60)
            return super().save(step, **kw)

    with pytest.raises(KeyboardInterrupt):
        _tiny_run(checkpointer=SlowSave(CheckpointConfig()),
                  callbacks=[lambda step, m: _ctrl_c() if step == 2 else None])
    assert len(saves) == 1
    assert time.perf_counter() - saves[0] < 5  # not the minute the save would take
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


SECOND_CTRL_C_SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading
    sys.path.insert(0, {root!r})
    from tests.faults.test_interrupt import _tiny_run

    def at_step(step, metrics):
        if step == 2:
            # cleanup that would block exit for ever: a non-daemon thread that never ends
            threading.Thread(target=threading.Event().wait, daemon=False).start()
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    _tiny_run(callbacks=[at_step])
""")


def test_second_ctrl_c_exits_even_when_cleanup_would_block(tmp_path):
    """Two quick Ctrl-C's on a process whose exit would otherwise wait for ever (simulated: a
    non-daemon thread that never ends): the process still exits, with 130, EXIT_GRACE_S after its main thread ends."""
    script = tmp_path / "two_ctrl_c.py"
    script.write_text(SECOND_CTRL_C_SCRIPT.format(root=str(ROOT)))
    # Without the exit watchdog this run never ends (TimeoutExpired).
    proc = subprocess.run([sys.executable, str(script)], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=180, preexec_fn=_default_sigint_in_child)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, proc.stderr[-3000:]  # only the watchdog can end it
    assert "KeyboardInterrupt" in proc.stderr


class HangingWriter:
    """A TensorBoard writer whose close() never returns until released (simulated: a hung network
    file system, or a writer thread stuck behind an interrupted queue)."""

    release = threading.Event()

    def __init__(self, log_dir):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.release.wait()


def test_close_returns_when_the_tensorboard_writer_hangs(tmp_path, monkeypatch):
    """Reproduces the hang of the report (simulated writer, see HangingWriter): closing the logger
    joined the TensorBoard writer for ever. Now close() returns after its timeout with a warning,
    the JSONL log is complete, and a second close() returns at once."""
    monkeypatch.setattr(metrics, "TensorBoardWriter", HangingWriter)
    logger = MetricsLogger(str(tmp_path), total_steps=3, progress=False, close_timeout_s=0.5)
    logger.log(1, {"loss": 1.0})
    start = time.perf_counter()
    try:
        with pytest.warns(RuntimeWarning, match="TensorBoard"):
            logger.close()
        assert time.perf_counter() - start < 3
        start = time.perf_counter()
        logger.close()
        assert time.perf_counter() - start < 0.1
    finally:
        HangingWriter.release.set()
    assert [json.loads(line)["train/loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1.0]


def test_tensorboard_writer_leaves_no_thread_or_queue(tmp_path):
    """Why an interrupt while logging can no longer wedge close(): the TensorBoard events are written
    by the calling thread; no writer thread or queue exists to be joined."""
    before = set(threading.enumerate())
    with MetricsLogger(str(tmp_path), total_steps=3, progress=False, jsonl=False) as logger:
        logger.log(1, {"loss": 1.0})
        assert not set(threading.enumerate()) - before
    assert list(tmp_path.glob("events.out.tfevents.*"))
