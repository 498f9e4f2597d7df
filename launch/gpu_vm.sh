#!/usr/bin/env bash
# Run a jaxtune command on one GPU VM (all of its GPUs, one process), after installing the project
# and CUDA 12 JAX into the current Python (use a virtualenv). Run it on the VM itself:
#   launch/gpu_vm.sh train configs/train_demo.yaml mesh.fsdp=8 checkpoint.directory=runs/a
# Every argument goes to `jaxtune` unchanged.
#   JAXTUNE_SKIP_INSTALL=1   skip the pip install (already installed)
#   JAXTUNE_JAX_SPEC=...     a JAX requirement to install instead of the project's cuda12 extra
#                            (default: pip install -e ".[cuda12]", i.e. jax[cuda12] within pyproject's range)
#   JAXTUNE_XLA_GPU_FLAGS=.. XLA flags to add (default: the latency-hiding scheduler, which overlaps
#                            collectives with compute); flags this XLA does not know are dropped.
#                            Your own XLA_FLAGS are kept and win over these.
# Several GPU VMs: run this on each with JAX_COORDINATOR_ADDRESS=<vm0 ip>:<port>, JAX_NUM_PROCESSES
# and JAX_PROCESS_ID set (jaxtune then calls jax.distributed.initialize), or use launch/slurm.sbatch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if [[ "${JAXTUNE_SKIP_INSTALL:-0}" != 1 ]]; then
  # the cuda12 extra: JAX's CUDA 12 wheels (they bundle CUDA and cuDNN; the VM needs only an NVIDIA driver)
  if [[ -n "${JAXTUNE_JAX_SPEC:-}" ]]; then
    "$PYTHON" -m pip install -q -e . "$JAXTUNE_JAX_SPEC"
  else
    "$PYTHON" -m pip install -q -e ".[cuda12]"
  fi
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true
else
  echo "gpu_vm.sh: warning: nvidia-smi not found; is the NVIDIA driver installed?" >&2
fi

# Keep only the flags this XLA accepts: XLA aborts on an unknown flag, and flags come and go
# between releases. The check parses XLA_FLAGS on the CPU backend, so it needs no GPU.
flags=""
for flag in ${JAXTUNE_XLA_GPU_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}; do
  if XLA_FLAGS="$flag" JAX_PLATFORMS=cpu "$PYTHON" -c "import jax; jax.numpy.zeros(1).block_until_ready()" \
       >/dev/null 2>&1; then
    flags="$flags $flag"
  else
    echo "gpu_vm.sh: this XLA does not accept $flag; leaving it out" >&2
  fi
done
export XLA_FLAGS="${flags# } ${XLA_FLAGS:-}"

exec "$PYTHON" -m jaxtune.cli.main "$@"
