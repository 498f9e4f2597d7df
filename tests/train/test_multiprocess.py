"""Two processes x 4 CPU devices (jax.distributed over localhost, gloo collectives), each reading
its own shard of a JSONL corpus (the host-sharded loader), train exactly like one process with
8 devices: same losses, one set of logs, a checkpoint that both processes resume from (the data
position of both hosts' shards restored). (Restoring a checkpoint on another mesh and device count:
test_sharding_equivalence.py.)"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import SUITE_XLA_FLAGS, TWO_BLOCKS_ARGS

ROOT = Path(__file__).resolve().parents[2]
# A two-block tiny-llama (tests/conftest.py): what is compared is how the processes split the data and
# run the collectives, not the model, and the five processes compile their programs faster.
ARGS = ["train", *TWO_BLOCKS_ARGS, "train.batch_size=8", "train.seq_len=32", "train.log_every=1",
        "optim.warmup_steps=1", "optim.schedule=constant", "mesh.data=-1", "logging.progress=false",
        "logging.tensorboard=false", "checkpoint.every_steps=2", "data.kind=documents", "data.shards=2",
        "data.eval_fraction=0.1"]


def _corpus(path: Path) -> str:
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "ship", "sails", "at", "dawn", "and", "night", "falls"]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(3, 40)))}) + "\n"
                            for _ in range(120)))
    return f"data.sources=[{{path: {path}}}]"


def _env(devices: int, **extra) -> dict:
    # The session's persistent compilation cache (tests/conftest.py) is kept: the resumed pair
    # reads the programs the first pair compiled instead of compiling them again.
    cache = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_")) or k in cache}
    # A long collective timeout: on a busy 2-core machine one process can fall 30 s behind the other.
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_cpu_collective_timeout_seconds=600 "
                         f"{SUITE_XLA_FLAGS}")
    env.update(extra)
    return env


def _losses(directory: Path) -> list[float]:
    lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in lines if "train/loss" in r]


def _launch_pair(args: list[str], port: int) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-m", "jaxtune.cli.main", *args],
                         env=_env(4, JAXTUNE_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                  JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(f"process {i}: {err[-2500:]}" for i, (_, err) in enumerate(outs))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    data = _corpus(tmp_path / "corpus.jsonl")
    single = tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "jaxtune.cli.main", *ARGS, data, "train.steps=6",
                           f"checkpoint.directory={single}"],
                          env=_env(8), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi = tmp_path / "multi"
    _launch_pair([*ARGS, data, "train.steps=4", f"checkpoint.directory={multi}"], _free_port())
    assert len(_losses(multi)) == 4  # written once (process 0), not once per process
    np.testing.assert_allclose(_losses(multi), _losses(single)[:4], rtol=1e-6)
    assert sorted(int(p.name) for p in multi.iterdir() if p.name.isdigit()) == [2, 4]
    saved = json.loads((multi / "4" / "data" / "metadata").read_text()) if (multi / "4" / "data" / "metadata").exists() else None
    if saved is not None:  # both hosts' shard positions are in the one checkpoint
        assert sorted(saved["shards"]) == ["0", "1"]

    # Both processes resume from step 4 (each restores its own shard's position) and continue
    # exactly like the uninterrupted single-process run.
    _launch_pair([*ARGS, data, "train.steps=6", f"checkpoint.directory={multi}"], _free_port())
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-6)
