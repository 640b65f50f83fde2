#!/usr/bin/env bash
# Several nodes, torchrun on each: run this same command on every node (ssh, pdsh, a cluster
# manager), with the same MASTER_ADDR/MASTER_PORT/NNODES and each node's own NODE_RANK.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node01 launch/multinode.sh model.path=/shared/models/X   # on node01
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node01 launch/multinode.sh model.path=/shared/models/X   # on node02
#
# Environment:
#   NNODES       number of nodes (required)
#   NODE_RANK    this node's index, 0..NNODES-1 (required; node 0 hosts global rank 0)
#   MASTER_ADDR  address of node 0, reachable from every node (required)
#   MASTER_PORT  rendezvous port on node 0 (default 29500)
#   NPROC        ranks per node (default: GPUs/NPUs on this node, or 2 on a CPU-only node)
#   LOG_RANK     local ranks whose output the console shows: 0 (default), "0,1", or "all"
#   RUN_DIR      run directory (default: rank 0 chooses runs/<date>_<time> and tells every rank);
#                model, output and run directories should be on a filesystem all nodes share
# Other arguments are Hydra overrides, passed through unchanged.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (this node: 0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0)}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC="${NPROC:-$(dq_default_nproc)}"
dq_run_dir_args optional "$@"
dq_log_args "${RUN_DIR:-runs}/torchrun-node$NODE_RANK"

set -x
exec torchrun --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC" \
    --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
    ${DQ_LOG_ARGS[@]+"${DQ_LOG_ARGS[@]}"} -m dist_quant ${DQ_RUN_ARGS[@]+"${DQ_RUN_ARGS[@]}"} "$@"
