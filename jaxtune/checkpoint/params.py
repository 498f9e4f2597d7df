"""Save and restore one parameter tree with Orbax (a params checkpoint: ``<directory>/params/``).

What explains the tree (jaxtune's ``model_config.json``, tokenizer files) is written beside it by
the job layer (`jaxtune.job.runmeta`); this module knows only pytrees. Restoring takes the abstract
tree, so any device count or mesh can restore it (give leaves a ``.sharding`` to place them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxtune.utils.fingerprint import leaf_checksums, mismatches

PARAMS_DIR = "params"
CHECKSUMS_FILE = "params_checksums.json"  # an exact checksum per array, verified at restore


def save_params(directory: str | Path, params: Any, *, overwrite: bool = False) -> Path:
    """Write ``params`` to ``directory/params`` (refused if it exists, unless ``overwrite``)."""
    directory = Path(directory).absolute()
    if (directory / PARAMS_DIR).exists() and not overwrite:
        raise FileExistsError(f"{directory / PARAMS_DIR} exists (replace it with overwrite=True; the CLI's "
                              "flag is --overwrite)")
    directory.mkdir(parents=True, exist_ok=True)
    checksums = leaf_checksums(params)
    if jax.process_index() == 0:  # an overwritten tree must never meet the old tree's checksums
        (directory / CHECKSUMS_FILE).unlink(missing_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params, force=overwrite)
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        tmp = directory / f".{CHECKSUMS_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(checksums, indent=0) + "\n")
        tmp.replace(directory / CHECKSUMS_FILE)
    return directory


def restore_params(directory: str | Path, abstract: Any) -> Any:
    """The tree saved by `save_params`, in the structure, shapes and dtypes of ``abstract``
    (`jax.ShapeDtypeStruct` leaves; a changed dtype casts). Leaves without a ``.sharding`` go to
    the first device. Arrays whose checksum differs from the one recorded at save are refused."""
    directory = Path(directory).absolute()
    if not (directory / PARAMS_DIR).exists():
        raise FileNotFoundError(f"{directory}: no {PARAMS_DIR}/ directory")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)
                                                           or device), abstract)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / PARAMS_DIR, abstract)
    recorded = directory / CHECKSUMS_FILE
    if recorded.exists():
        bad = mismatches(json.loads(recorded.read_text()), leaf_checksums(params))
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise ValueError(f"{directory / PARAMS_DIR}: array {bad[0]} differs from what was saved (checksum "
                             f"mismatch with {recorded}){more}: the checkpoint is corrupt")
    return params
