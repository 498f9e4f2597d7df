"""Multi-process start-up: one call before anything touches devices.

``JAXTUNE_DISTRIBUTED=1`` makes `maybe_initialize` call ``jax.distributed.initialize()``.
JAX detects the cluster itself on Cloud TPU VMs, SLURM, Open MPI and Kubernetes; elsewhere set
``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` (the last two are read here and passed on). After it, ``jax.devices()``
lists every process's devices and the mesh spans all hosts. Single-process runs skip it.
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
    explicit = {}
    for env, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if os.environ.get(env):
            try:
                explicit[arg] = int(os.environ[env])
            except ValueError:
                raise ValueError(f"{env} must be an integer, got {os.environ[env]!r}") from None
    jax.distributed.initialize(**explicit)
    _done = True
    return True
