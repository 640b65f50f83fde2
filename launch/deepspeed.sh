#!/usr/bin/env bash
# One node through the DeepSpeed launcher (where DeepSpeed is installed):
#
#   launch/deepspeed.sh model.path=/models/Qwen2.5-7B-Instruct quant=gptq_w4a16
#
# DeepSpeed sets RANK/WORLD_SIZE/LOCAL_RANK and passes --local_rank=N (dropped by dist_quant),
# and sets CUDA_VISIBLE_DEVICES even on a CPU-only node (harmless: the device is chosen by
# runtime.device, auto = CUDA if torch sees a GPU, else NPU, else CPU).
#
# Environment (all optional):
#   NPROC        ranks (passed as --num_gpus; default: GPUs/NPUs on this node, or 2 on CPU)
#   MASTER_PORT  rendezvous port (default: a free port)
#   RUN_DIR      run directory (default: runs/<date>_<time>, resolved once here)
#   HOSTFILE     a DeepSpeed hostfile for several nodes (then NPROC is ranks per node)
# Other arguments are Hydra overrides, passed through unchanged.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

command -v deepspeed >/dev/null 2>&1 || { echo "error: the deepspeed launcher is not installed (pip install deepspeed)" >&2; exit 2; }
NPROC="${NPROC:-$(dq_default_nproc)}"
MASTER_PORT="${MASTER_PORT:-$(dq_free_port)}"
dq_run_dir_args resolve "$@"
host_args=()
[ -n "${HOSTFILE:-}" ] && host_args=(--hostfile "$HOSTFILE")

set -x
exec deepspeed ${host_args[@]+"${host_args[@]}"} --num_gpus "$NPROC" --master_port "$MASTER_PORT" \
    --module dist_quant ${DQ_RUN_ARGS[@]+"${DQ_RUN_ARGS[@]}"} "$@"
