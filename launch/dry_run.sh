#!/usr/bin/env bash
# Print the plan of an N-rank job without starting it: layers, modules and their owner ranks,
# per-rank bytes to read and write, estimated peak memory per rank, output part files.
# Reads only config.json and safetensors headers; fails (exit 2) on what a run would refuse.
#
#   NPROC=8 launch/dry_run.sh model.path=/models/Qwen2.5-72B-Instruct quant=gptq_w4a16
#   NNODES=4 NPROC=8 launch/dry_run.sh model.path=...      # plans 32 ranks
#
# Environment: NPROC ranks per node (default: GPUs/NPUs here, or 2), NNODES (default 1).
# Other arguments are Hydra overrides (runtime.world_size=N given here wins).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NPROC="${NPROC:-$(dq_default_nproc)}"
NNODES="${NNODES:-1}"
exec "$PYTHON" -m dist_quant dry_run=true "runtime.world_size=$((NNODES * NPROC))" "$@"
