"""Two processes x 2 CPU devices (jax.distributed over localhost, gloo collectives) train exactly
like one process with 4 devices: same losses, one set of logs, one checkpoint that restores."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["train", "train.steps=4", "train.batch_size=8", "train.seq_len=32", "train.log_every=1",
        "optim.warmup_steps=1", "mesh.data=-1", "logging.progress=false", "logging.tensorboard=false",
        "checkpoint.every_steps=2"]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update(extra)
    return env


def _losses(directory: Path) -> list[float]:
    lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in lines if "train/loss" in r]


def test_two_processes_match_one_process(tmp_path):
    single = tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "jaxtune.cli.main", *ARGS, f"checkpoint.directory={single}"],
                          env=_env(4), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    multi = tmp_path / "multi"
    procs = [
        subprocess.Popen([sys.executable, "-m", "jaxtune.cli.main", *ARGS, f"checkpoint.directory={multi}"],
                         env=_env(2, JAXTUNE_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                  JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-6)
    assert len(_losses(multi)) == 4  # written once (process 0), not once per process
    assert sorted(int(p.name) for p in multi.iterdir() if p.name.isdigit()) == [2, 4]

    # The two-process checkpoint restores in one process with one device.
    proc = subprocess.run([sys.executable, "-m", "jaxtune.cli.main", "eval", "--json", f"model.checkpoint={multi}",
                           "train.batch_size=8", "train.seq_len=32", "train.eval_batches=1"],
                          env=_env(1), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["tokens"] > 0
