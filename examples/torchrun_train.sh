#!/usr/bin/env bash
# Two-process data-parallel training on one machine (CPU: gloo; GPUs: nccl), loopback only.
# Usage: examples/torchrun_train.sh [--fsdp] [--steps N] [--preset tiny|small] [--data FILE] ...
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "$(uname)" == "Linux" ]]; then export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"; fi
exec torchrun --standalone --nproc_per_node="${NPROC:-2}" examples/torchrun_train.py "$@"
