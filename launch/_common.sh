# Shared by the launch scripts (sourced, not run). Every launcher:
#   * runs the dist_quant of this checkout (its root goes first on PYTHONPATH),
#   * resolves ONE run directory and passes runtime.run_dir=... to every rank, so all ranks
#     write rank{r}.log into the same place (unless the arguments already set it),
#   * passes its remaining arguments through as Hydra overrides.

DQ_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$DQ_ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"

# Accelerators visible on this node: CUDA GPUs, else Ascend NPUs, else 0.
dq_count_devices() {
    local n=0
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
        n=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
    elif command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [ "$n" -eq 0 ]; then
        if [ -n "${ASCEND_RT_VISIBLE_DEVICES:-}" ]; then
            n=$(echo "$ASCEND_RT_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
        else
            n=$(ls /dev/davinci[0-9]* 2>/dev/null | wc -l)
        fi
    fi
    echo "$n"
}

# NPROC: ranks on this node (default: one per accelerator, or 2 on a CPU-only node).
dq_default_nproc() {
    local n
    n=$(dq_count_devices)
    if [ "$n" -gt 0 ]; then echo "$n"; else echo 2; fi
}

# A free TCP port on this machine (for single-node jobs; multi-node jobs must agree on one).
dq_free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# Sets DQ_RUN_ARGS: ("runtime.run_dir=$RUN_DIR") unless an argument already sets runtime.run_dir.
# $1 = "resolve": default RUN_DIR to runs/<time> here (one node); "optional": only when RUN_DIR is set
# (multi-node: rank 0 chooses runs/<time> and broadcasts it, the same for every node).
dq_run_dir_args() {
    local mode="$1"; shift
    DQ_RUN_ARGS=()
    local arg
    for arg in "$@"; do
        case "$arg" in runtime.run_dir=*|+runtime.run_dir=*|++runtime.run_dir=*) return 0 ;; esac
    done
    if [ -z "${RUN_DIR:-}" ] && [ "$mode" = resolve ]; then
        RUN_DIR="runs/$(date +%Y-%m-%d_%H-%M-%S)"
    fi
    if [ -n "${RUN_DIR:-}" ]; then
        DQ_RUN_ARGS=("runtime.run_dir=$RUN_DIR")
        echo "dist_quant: run directory $RUN_DIR" >&2
    fi
}

# Sets DQ_LOG_ARGS: torchrun options that show only the local ranks in LOG_RANK on the console
# ("0" by default, "0,1", or "all"). Uses --local-ranks-filter where torchrun has it; older
# torchrun: every rank's output goes to files under $1 and the chosen ranks are tee'd.
dq_log_args() {
    local log_dir="$1"
    DQ_LOG_ARGS=()
    local ranks="${LOG_RANK:-0}"
    [ "$ranks" = all ] && return 0
    # (looked up in torchrun's source: `torchrun --help` would import torch, seconds on a busy node)
    local run_py
    run_py=$("$PYTHON" -c 'import importlib.util as u, os; s = u.find_spec("torch"); print(os.path.join(os.path.dirname(s.origin), "distributed", "run.py"))' 2>/dev/null || true)
    if [ -n "$run_py" ] && grep -q -- 'local[-_]ranks[-_]filter' "$run_py" 2>/dev/null; then
        DQ_LOG_ARGS=("--local-ranks-filter=$ranks")
    else
        local tee="" r
        for r in ${ranks//,/ }; do tee="${tee:+$tee,}$r:3"; done
        mkdir -p "$log_dir"
        DQ_LOG_ARGS=("--log-dir=$log_dir" "--redirects=3" "--tee=$tee")
    fi
}
