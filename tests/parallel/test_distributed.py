"""Multi-process detection: which environments make jaxtune call jax.distributed.initialize (never
actually called here: a fake stands in for it)."""

import pytest

from jaxtune.parallel import distributed
from jaxtune.parallel.distributed import detect_cluster, initialize_kwargs, maybe_initialize

# What the environments look like (trimmed to the variables that matter, plus a few that don't).
SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "3",
              "SLURM_LOCALID": "3", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_STEP_NUM_NODES": "2"}
SLURM_BATCH = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
               "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_NNODES": "2"}  # the sbatch script itself, no srun
OMPI = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911"}
GKE_TPU = {"TPU_WORKER_HOSTNAMES": "w-0.svc,w-1.svc,w-2.svc,w-3.svc", "TPU_WORKER_ID": "2"}
EXPLICIT = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}


@pytest.mark.parametrize("env, expected", [
    ({"JAXTUNE_DISTRIBUTED": "1"}, "JAXTUNE_DISTRIBUTED=1"),
    ({"JAXTUNE_DISTRIBUTED": "true"}, "JAXTUNE_DISTRIBUTED=1"),
    (EXPLICIT, "JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES=2"),
    (SLURM_STEP, "SLURM: srun step with 8 tasks"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_NODELIST": "n1,n2"}, "SLURM: srun step with 2 tasks"),
    (OMPI, "Open MPI: OMPI_COMM_WORLD_SIZE=4"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, "Open MPI: OMPI_COMM_WORLD_SIZE=2"),  # Open MPI 5
    (GKE_TPU, "Cloud TPU: 4 workers in TPU_WORKER_HOSTNAMES"),
    ({"TPU_PROCESS_ADDRESSES": "a:8471,b:8471", "TPU_WORKER_HOSTNAMES": "a"}, "Cloud TPU: 2 workers in TPU_PROCESS_ADDRESSES"),
    ({"MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1", "TPU_WORKER_HOSTNAMES": "localhost"},
     "Cloud TPU multislice: MEGASCALE_NUM_SLICES=2"),
    ({**OMPI, **SLURM_STEP}, "Open MPI: OMPI_COMM_WORLD_SIZE=4"),  # mpirun inside an allocation: MPI wins, as in JAX
    ({**EXPLICIT, **SLURM_STEP}, "JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES=2"),
])
def test_detects_multi_process_environments(env, expected):
    assert detect_cluster({"HOME": "/root", "PATH": "/usr/bin", **env}) == expected


@pytest.mark.parametrize("env", [
    {},  # nothing set: a laptop, one GPU VM, CI
    {"HOME": "/root", "CUDA_VISIBLE_DEVICES": "0,1,2,3"},  # one process, several GPUs
    {**SLURM_STEP, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"},  # srun -n1
    {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n1"},
    SLURM_BATCH,  # the batch step is one process even in an 8-task allocation
    {k: v for k, v in SLURM_STEP.items() if k != "SLURM_PROCID"},
    {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"},  # single-host TPU (v5e-8, v4-8)
    {"TPU_WORKER_HOSTNAMES": "t1v-n-0, ", "MEGASCALE_NUM_SLICES": "1"},
    {"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"},  # mpirun -np 1
    {"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"},
    {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},  # no coordinator, no cluster: nothing to join
    {"JAXTUNE_DISTRIBUTED": "auto"},
    {"SLURM_NTASKS": "x", "SLURM_STEP_NUM_TASKS": "", "SLURM_PROCID": "0"},  # malformed launcher values
])
def test_single_process_environments_are_not_detected(env):
    assert detect_cluster(env) is None


@pytest.mark.parametrize("env", [SLURM_STEP, OMPI, GKE_TPU, EXPLICIT, {"MEGASCALE_NUM_SLICES": "4"}])
@pytest.mark.parametrize("off", ["0", "false", "OFF"])
def test_jaxtune_distributed_0_overrides_detection(env, off):
    assert detect_cluster({**env, "JAXTUNE_DISTRIBUTED": off}) is None


def test_malformed_settings_are_errors():
    with pytest.raises(ValueError, match="JAXTUNE_DISTRIBUTED"):
        detect_cluster({"JAXTUNE_DISTRIBUTED": "maybe"})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer"):
        detect_cluster({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="JAX_LOCAL_DEVICE_IDS"):
        initialize_kwargs({"JAX_LOCAL_DEVICE_IDS": "0,a"})


def test_initialize_kwargs_pass_explicit_values_and_leave_the_rest_to_jax():
    assert initialize_kwargs(SLURM_STEP) == {}  # JAX's SLURM detection fills everything
    assert initialize_kwargs(EXPLICIT) == {"num_processes": 2, "process_id": 1}  # JAX reads the address itself
    assert initialize_kwargs({**SLURM_STEP, "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"}) == {"local_device_ids": [0, 1, 2, 3]}
    assert initialize_kwargs(OMPI) == {}


def test_open_mpi_5_goes_through_mpi4py(monkeypatch):
    ompi5 = {k: v for k, v in OMPI.items() if k != "OMPI_MCA_orte_hnp_uri"}
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: object() if name == "mpi4py" else None)
    assert initialize_kwargs(ompi5) == {"cluster_detection_method": "mpi4py"}
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="mpi4py"):
        initialize_kwargs(ompi5)
    assert initialize_kwargs({**ompi5, "JAX_COORDINATOR_ADDRESS": "h:1"}) == {}


@pytest.fixture
def fake_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed, "_done", False)
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


def test_single_process_never_calls_initialize(fake_initialize, capsys):
    for env in ({}, SLURM_BATCH, {"JAXTUNE_DISTRIBUTED": "0", **SLURM_STEP}, {"TPU_WORKER_HOSTNAMES": "localhost"}):
        assert maybe_initialize(env) is False
    assert fake_initialize == []
    assert "not an srun step" in capsys.readouterr().err  # the batch-step case says how to fix it


def test_detected_run_calls_initialize_once_and_says_why(fake_initialize, capsys):
    assert maybe_initialize(SLURM_STEP) is True
    assert maybe_initialize(SLURM_STEP) is True
    assert fake_initialize == [{}]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SLURM: srun step with 8 tasks" in err


def test_explicit_launch_passes_process_count_and_id(fake_initialize):
    assert maybe_initialize({**EXPLICIT, "JAXTUNE_DISTRIBUTED": "1"}) is True
    assert fake_initialize == [{"num_processes": 2, "process_id": 1}]


def test_already_initialised_runtime_is_left_alone(fake_initialize, monkeypatch):
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: True)
    assert maybe_initialize(GKE_TPU) is True
    assert fake_initialize == []
