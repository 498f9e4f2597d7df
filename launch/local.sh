#!/usr/bin/env bash
# Run a jaxtune command on this machine after installing the project into the current Python.
#   launch/local.sh generate configs/generate_demo.yaml sampling.max_new_tokens=64
# Set JAXTUNE_FAKE_DEVICES=8 to split the CPU into 8 XLA devices (for sharding experiments).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e .
if [[ -n "${JAXTUNE_FAKE_DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${JAXTUNE_FAKE_DEVICES}"
fi
exec jaxtune "$@"
