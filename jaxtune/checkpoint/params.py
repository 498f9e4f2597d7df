"""Save and restore one parameter tree with Orbax (a params checkpoint: ``<directory>/params/``).

What explains the tree (jaxtune's ``model_config.json``, tokenizer files) is written beside it by
the job layer (`jaxtune.job.runmeta`); this module knows only pytrees. Restoring takes the abstract
tree, so any device count or mesh can restore it (give leaves a ``.sharding`` to place them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

PARAMS_DIR = "params"


def save_params(directory: str | Path, params: Any, *, overwrite: bool = False) -> Path:
    """Write ``params`` to ``directory/params`` (refused if it exists, unless ``overwrite``)."""
    directory = Path(directory).absolute()
    if (directory / PARAMS_DIR).exists() and not overwrite:
        raise FileExistsError(f"{directory / PARAMS_DIR} exists (replace it with overwrite=True; the CLI's "
                              "flag is --overwrite)")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params, force=overwrite)
        checkpointer.wait_until_finished()
    return directory


def restore_params(directory: str | Path, abstract: Any) -> Any:
    """The tree saved by `save_params`, in the structure, shapes and dtypes of ``abstract``
    (`jax.ShapeDtypeStruct` leaves; a changed dtype casts). Leaves without a ``.sharding`` go to
    the first device."""
    directory = Path(directory).absolute()
    if not (directory / PARAMS_DIR).exists():
        raise FileNotFoundError(f"{directory}: no {PARAMS_DIR}/ directory")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)
                                                           or device), abstract)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(directory / PARAMS_DIR, abstract)
