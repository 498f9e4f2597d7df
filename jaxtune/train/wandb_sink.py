"""Scalars and the run's config to Weights & Biases (``logging.wandb``), for `MetricsLogger`.

One W&B run per jaxtune run: its id is kept in ``wandb_run_id`` in the log directory, so a resumed
run continues the same W&B run (``resume="allow"``). Scalars are logged with the training step as
W&B's step, under the same tags as ``metrics.jsonl`` and TensorBoard (``train/loss``, ``eval/loss``,
...). ``mode=offline`` writes local files only (``wandb sync`` uploads them later).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from jaxtune.train.config import WandbConfig

RUN_ID_FILE = "wandb_run_id"


class WandbSink:
    def __init__(self, cfg: WandbConfig, log_dir: Optional[str], run_config: Optional[dict[str, Any]] = None):
        import wandb  # an optional extra; WandbConfig refuses to be built without it

        directory = cfg.directory or log_dir
        run_id = None
        id_file = os.path.join(log_dir, RUN_ID_FILE) if log_dir else None
        if id_file and os.path.exists(id_file):
            run_id = open(id_file, encoding="utf-8").read().strip() or None
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._run = wandb.init(project=cfg.project, name=cfg.name, entity=cfg.entity, mode=cfg.mode, dir=directory,
                               id=run_id, resume="allow" if run_id else None, config=run_config or {},
                               settings=wandb.Settings(silent=True, console="off"))
        if id_file and run_id is None:
            os.makedirs(log_dir, exist_ok=True)
            with open(id_file, "w", encoding="utf-8") as f:
                f.write(self._run.id)

    def log(self, step: int, tagged: dict[str, float]) -> None:
        self._run.log(dict(tagged), step=int(step))

    def close(self) -> None:
        self._run.finish()
