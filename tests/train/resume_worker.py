"""`python resume_worker.py CKPT_DIR`: train toward 20 steps, SIGKILL itself once step 10 is
committed (test_loop.py resumes the run and compares with an uninterrupted one)."""

import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jaxtune.checkpoint.manager import TrainCheckpointer  # noqa: E402
from jaxtune.config import from_dict
from jaxtune.job import TrainJobConfig  # noqa: E402
from jaxtune.job import run_training  # noqa: E402
from tests.conftest import TWO_BLOCKS  # noqa: E402


def job(checkpoint_dir=None, steps=20) -> TrainJobConfig:
    return from_dict(TrainJobConfig, {
        "model": {"config": TWO_BLOCKS},  # a two-block tiny-llama: what is compared is the loop's resuming
        "data": {"kind": "synthetic", "pad_fraction": 0.3},
        "train": {"steps": steps, "batch_size": 4, "seq_len": 32, "grad_accum": 2, "log_every": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 3, "weight_decay": 0.1},
        "checkpoint": {"directory": checkpoint_dir, "every_steps": 10, "keep_last": 3},
        "logging": {"progress": False, "tensorboard": False, "jsonl": False},
    })


def main(checkpoint_dir):
    cfg = job(checkpoint_dir)
    checkpointer = TrainCheckpointer(cfg.checkpoint)

    def kill_after_checkpoint(step, metrics):
        if step == 12:  # step 10's save started two steps ago; make sure it is committed, then die
            checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)

    run_training(cfg, callbacks=[kill_after_checkpoint], checkpointer=checkpointer)
    raise SystemExit("not killed")


if __name__ == "__main__":
    main(sys.argv[1])
