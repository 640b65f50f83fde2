#!/usr/bin/env bash
# One node: NPROC ranks of `python -m dist_quant`, started by torchrun.
#
#   launch/torchrun.sh model.path=/models/Qwen2.5-7B-Instruct quant=gptq_w4a16 calib.path=calib.jsonl
#
# Environment (all optional):
#   NPROC        ranks to start (default: GPUs/NPUs on this node, or 2 on a CPU-only node)
#   LOG_RANK     local ranks whose output the console shows: 0 (default), "0,1", or "all"
#                (every rank always writes <run dir>/rank{r}.log)
#   MASTER_PORT  rendezvous port on this machine (default: a free port)
#   RUN_DIR      run directory for the logs (default: runs/<date>_<time>, resolved once here)
#   PYTHON       python interpreter used for helpers (default: python3)
# Other arguments are Hydra overrides, passed through unchanged.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NPROC="${NPROC:-$(dq_default_nproc)}"
MASTER_PORT="${MASTER_PORT:-$(dq_free_port)}"
dq_run_dir_args resolve "$@"
dq_log_args "${RUN_DIR:-runs}/torchrun"

set -x
exec torchrun --nnodes=1 --nproc-per-node="$NPROC" --master-addr=127.0.0.1 --master-port="$MASTER_PORT" \
    ${DQ_LOG_ARGS[@]+"${DQ_LOG_ARGS[@]}"} -m dist_quant ${DQ_RUN_ARGS[@]+"${DQ_RUN_ARGS[@]}"} "$@"
