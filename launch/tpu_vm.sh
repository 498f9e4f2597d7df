#!/usr/bin/env bash
# Run a jaxtune command on every worker of a Cloud TPU VM (single host or a multi-host slice).
# Run it from your workstation (needs an authenticated gcloud); it copies this checkout to each
# worker, installs it with its tpu extra (jax[tpu]) there, and starts the same command on all workers at once:
#   TPU_NAME=my-v4-32 TPU_ZONE=us-central2-b launch/tpu_vm.sh \
#       train configs/train_demo.yaml mesh.fsdp=16 checkpoint.directory=gs://my-bucket/runs/a
# Every argument goes to `jaxtune` unchanged. On a multi-host slice the checkpoint directory must be
# storage every worker sees (a gs:// bucket), not a local path.
#   TPU_NAME          (required) the TPU VM name, as in `gcloud compute tpus tpu-vm list`
#   TPU_ZONE          (required) its zone
#   TPU_PROJECT       its project (default: gcloud's configured project)
#   TPU_REMOTE_DIR    where the checkout goes on each worker, relative to home (default: jaxtune)
#   TPU_PYTHON        the Python on the workers (default: python3; point it at a venv's python)
#   TPU_FORWARD_ENV   names of local variables to set on the workers too, e.g. "HF_TOKEN XLA_FLAGS"
#   JAXTUNE_SKIP_INSTALL=1  skip the pip install on the workers
# On a slice of more than one worker the script sets JAXTUNE_DISTRIBUTED=1, and jaxtune calls
# jax.distributed.initialize(), which finds the other workers through the TPU VM metadata.
# Ctrl-C stops gcloud here but may leave the workers running; stop them with
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$TPU_ZONE" --worker=all --command 'pkill -f jaxtune.cli.main'
set -euo pipefail

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }

[[ $# -ge 1 && "$1" != -h && "$1" != --help ]] || usage
[[ -n "${TPU_NAME:-}" ]] || die "set TPU_NAME to the TPU VM name (see: gcloud compute tpus tpu-vm list --zone ZONE); --help for usage"
[[ -n "${TPU_ZONE:-}" ]] || die "set TPU_ZONE to the TPU VM's zone (e.g. us-central2-b); --help for usage"
command -v gcloud >/dev/null 2>&1 || die "gcloud not found: install the Google Cloud SDK and run 'gcloud auth login'"
cd "$(dirname "$0")/.."

where=(--zone "$TPU_ZONE")
if [[ -n "${TPU_PROJECT:-}" ]]; then where+=(--project "$TPU_PROJECT"); fi
remote_dir="${TPU_REMOTE_DIR:-jaxtune}"

# How many workers (hosts) the slice has: one network endpoint each.
workers=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}" --format='json(networkEndpoints)' \
            | grep -c '"ipAddress"' || true)
[[ "$workers" -ge 1 ]] || die "could not read the workers of TPU '$TPU_NAME' in zone $TPU_ZONE (does it exist and is it READY?)"
echo "tpu_vm.sh: $TPU_NAME has $workers worker(s)" >&2

# Pack the checkout: tracked and untracked-but-not-ignored files (no .git, venvs or local runs).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    if [[ -f "$f" ]]; then printf '%s\0' "$f"; fi  # skip files deleted but not yet committed
  done > "$tmp/files"
  tar --null -T "$tmp/files" -czf "$tmp/jaxtune.tgz"
else
  tar --exclude=.git --exclude=.venv --exclude=./runs -czf "$tmp/jaxtune.tgz" .
fi
gcloud compute tpus tpu-vm scp "$tmp/jaxtune.tgz" "$TPU_NAME:jaxtune.tgz" --worker=all "${where[@]}"

# The command each worker runs; every piece of user input is quoted with printf %q.
py="${TPU_PYTHON:-python3}"
remote="set -euo pipefail; mkdir -p $(printf %q "$remote_dir"); tar -xzf ~/jaxtune.tgz -C $(printf %q "$remote_dir")"
remote+="; cd $(printf %q "$remote_dir")"
if [[ "${JAXTUNE_SKIP_INSTALL:-0}" != 1 ]]; then
  remote+="; $(printf %q "$py") -m pip install -q -e $(printf %q '.[tpu]')"  # the tpu extra: jax[tpu] (libtpu)
fi
for name in ${TPU_FORWARD_ENV:-}; do
  [[ -n "${!name+x}" ]] || die "TPU_FORWARD_ENV names $name, which is not set here"
  remote+="; export $name=$(printf %q "${!name}")"
done
if [[ "$workers" -gt 1 ]]; then remote+="; export JAXTUNE_DISTRIBUTED=1"; fi
remote+="; exec $(printf %q "$py") -m jaxtune.cli.main"
for arg in "$@"; do remote+=" $(printf %q "$arg")"; done

exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=all --command "bash -c $(printf %q "$remote")"
