"""Multi-process start-up: one call before anything touches devices.

`maybe_initialize` calls ``jax.distributed.initialize()`` when this process is one of several, and
never for a single-process run. Whether it is one of several is `detect_cluster`, a pure function
of the environment, checked in this order:

* ``JAXTUNE_DISTRIBUTED=1`` forces it on, ``JAXTUNE_DISTRIBUTED=0`` forces it off (unset/``auto``:
  detect);
* ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) with ``JAX_NUM_PROCESSES`` > 1 (any launcher;
  also set ``JAX_PROCESS_ID``);
* Open MPI (``mpirun``/``mpiexec``): ``OMPI_COMM_WORLD_SIZE`` > 1;
* SLURM: inside an ``srun`` step (``SLURM_STEP_NUM_TASKS``/``SLURM_STEP_NODELIST``) with more than
  one task (``SLURM_STEP_NUM_TASKS``, else ``SLURM_NTASKS``) and ``SLURM_PROCID`` set. The batch
  script itself (``sbatch`` without ``srun``) is one process and is not detected;
* Cloud TPU on GKE: more than one host in ``TPU_PROCESS_ADDRESSES``/``TPU_WORKER_HOSTNAMES``, or a
  multislice job (``MEGASCALE_NUM_SLICES`` > 1).

On those environments JAX's own cluster detection fills in the coordinator address, process count
and id. A Cloud TPU VM slice created with ``gcloud compute tpus tpu-vm create`` (GCE) describes its
workers only in the VM metadata server, which jaxtune does not query: set ``JAXTUNE_DISTRIBUTED=1``
there (``launch/tpu_vm.sh`` does) and JAX reads the metadata inside ``initialize()``.

``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and ``JAX_LOCAL_DEVICE_IDS`` (comma-separated) are read
here and passed on when set; JAX reads ``JAX_COORDINATOR_ADDRESS`` itself. After it,
``jax.devices()`` lists every process's devices and the mesh spans all hosts.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from typing import Any, Optional

import jax

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")
_done = False


def _int(env: Mapping[str, str], key: str) -> Optional[int]:
    """A launcher-provided integer; None when unset or not an integer."""
    try:
        return int(env.get(key, "").strip())
    except ValueError:
        return None


def _explicit_int(env: Mapping[str, str], key: str) -> Optional[int]:
    """A user-provided integer; None when unset, an error when malformed."""
    value = env.get(key, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key} must be an integer, got {env[key]!r}") from None


def _hosts(value: str) -> list[str]:
    return [h for h in (p.strip() for p in value.split(",")) if h]


def detect_cluster(env: Mapping[str, str]) -> Optional[str]:
    """Why this process is one of several (a short description), or None for a single-process run.

    Pure: reads only ``env``. Raises ValueError for a malformed ``JAXTUNE_DISTRIBUTED`` or
    ``JAX_NUM_PROCESSES``."""
    flag = env.get("JAXTUNE_DISTRIBUTED", "").strip().lower()
    if flag in _OFF:
        return None
    if flag in _ON:
        return "JAXTUNE_DISTRIBUTED=1"
    if flag not in ("", "auto"):
        raise ValueError(f"JAXTUNE_DISTRIBUTED must be 1, 0 or auto, got {env['JAXTUNE_DISTRIBUTED']!r}")

    num = _explicit_int(env, "JAX_NUM_PROCESSES")
    if env.get("JAX_COORDINATOR_ADDRESS", "").strip() and num is not None and num > 1:
        return f"JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES={num}"

    ompi = _int(env, "OMPI_COMM_WORLD_SIZE")
    if ompi is not None and ompi > 1:
        return f"Open MPI: OMPI_COMM_WORLD_SIZE={ompi}"

    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_NODELIST" in env):
        tasks = _int(env, "SLURM_STEP_NUM_TASKS")
        if tasks is None:
            tasks = _int(env, "SLURM_NTASKS")
        if tasks is not None and tasks > 1:
            return f"SLURM: srun step with {tasks} tasks"

    for key in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):  # JAX's GKE TPU detection, same order
        if key in env:
            hosts = _hosts(env[key])
            if len(hosts) > 1:
                return f"Cloud TPU: {len(hosts)} workers in {key}"
            break
    slices = _int(env, "MEGASCALE_NUM_SLICES")
    if slices is not None and slices > 1:
        return f"Cloud TPU multislice: MEGASCALE_NUM_SLICES={slices}"
    return None


def _single_process_hint(env: Mapping[str, str]) -> Optional[str]:
    """A warning for environments that look multi-process but were not detected as such."""
    if env.get("JAXTUNE_DISTRIBUTED", "").strip().lower() in _OFF:
        return None
    tasks = _int(env, "SLURM_NTASKS")
    if tasks is not None and tasks > 1 and "SLURM_STEP_NODELIST" not in env and "SLURM_STEP_NUM_TASKS" not in env:
        return (f"SLURM_NTASKS={tasks} but this is not an srun step, so jaxtune runs as one process; "
                "launch it with srun (see launch/slurm.sbatch) to use every task")
    num = _int(env, "JAX_NUM_PROCESSES")
    if num is not None and num > 1 and not env.get("JAX_COORDINATOR_ADDRESS", "").strip():
        return (f"JAX_NUM_PROCESSES={num} without JAX_COORDINATOR_ADDRESS: running as one process "
                "(set JAX_COORDINATOR_ADDRESS=host:port of process 0, or JAXTUNE_DISTRIBUTED=1 on a cluster JAX detects)")
    return None


def initialize_kwargs(env: Mapping[str, str]) -> dict[str, Any]:
    """Arguments for ``jax.distributed.initialize`` from the environment; JAX detects the rest."""
    kwargs: dict[str, Any] = {}
    for key, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        value = _explicit_int(env, key)
        if value is not None:
            kwargs[arg] = value
    ids = env.get("JAX_LOCAL_DEVICE_IDS", "").strip()
    if ids:
        try:
            kwargs["local_device_ids"] = [int(i) for i in _hosts(ids)]
        except ValueError:
            raise ValueError(f"JAX_LOCAL_DEVICE_IDS must be comma-separated integers, got {ids!r}") from None
    ompi = _int(env, "OMPI_COMM_WORLD_SIZE")
    if (ompi is not None and ompi > 1 and "OMPI_MCA_orte_hnp_uri" not in env
            and not env.get("JAX_COORDINATOR_ADDRESS", "").strip()):
        # Open MPI 5 (PRRTE) has no ORTE URI, which JAX's Open MPI detection reads; mpi4py covers it.
        if importlib.util.find_spec("mpi4py") is None:
            raise RuntimeError("Open MPI >= 5 detected (OMPI_COMM_WORLD_SIZE set, no OMPI_MCA_orte_hnp_uri): "
                               "pip install mpi4py, or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID")
        kwargs["cluster_detection_method"] = "mpi4py"
    return kwargs


def maybe_initialize(env: Optional[Mapping[str, str]] = None) -> bool:
    """Initialise jax.distributed when `detect_cluster` finds several processes; returns whether
    jax.distributed is initialised (by this call, an earlier one, or the caller's own code)."""
    global _done
    if _done:
        return True
    env = os.environ if env is None else env
    reason = detect_cluster(env)
    if reason is None:
        hint = _single_process_hint(env)
        if hint:
            print(f"jaxtune: warning: {hint}", file=sys.stderr, flush=True)
        return False
    if jax.distributed.is_initialized():
        _done = True
        return True
    kwargs = initialize_kwargs(env)
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    print(f"jaxtune: multi-process run detected ({reason}): jax.distributed.initialize({shown})",
          file=sys.stderr, flush=True)
    jax.distributed.initialize(**kwargs)
    _done = True
    return True
