"""Multi-process start-up: one call before anything touches devices.

``JAXTUNE_DISTRIBUTED=1`` makes `maybe_initialize` call ``jax.distributed.initialize()``,
which reads the cluster from the environment (Cloud TPU VMs, SLURM, Open MPI, or
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``). After it,
``jax.devices()`` lists every process's devices and the mesh spans all hosts. Single-process
runs skip it.
"""

from __future__ import annotations

import os

import jax

_done = False


def maybe_initialize() -> bool:
    """Initialise jax.distributed when ``JAXTUNE_DISTRIBUTED`` is 1/true; returns whether it did."""
    global _done
    if _done or os.environ.get("JAXTUNE_DISTRIBUTED", "").lower() not in ("1", "true", "yes"):
        return _done
    jax.distributed.initialize()
    _done = True
    return True
