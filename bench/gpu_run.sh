#!/usr/bin/env bash
# Runs ON the lent GPU machine, in the repository root (bench/README.md, "GPU checks").
#   bash bench/gpu_run.sh 1   carry [.whl, .gpu/data, .gpu/a]: CUDA tests, the Llama-3-8B-shaped layer loop
#   bash bench/gpu_run.sh 2   carry [.whl, .gpu/data, .gpu/b]: the SmolLM2 job on the GPU and on the CPU
# Step 2 needs .gpu/a from step 1 still on the machine (it stays while the machine is warm:
# call step 2 right after step 1 returns). Exit 3: .gpu/a is gone (the machine went back);
# rerun step 1's carry with step 2's command. Results go to $OUT (what comes back).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "error: installing the carried wheels failed" >&2; exit 4; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
DATA=.gpu/data/valid.txt
case "${1:-}" in
  1)
    { nvidia-smi; python3 -c 'import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)'; } \
      2>&1 | tee "$OUT/machine.txt"
    timeout 150 python3 -m pytest -q -rs tests/test_cuda.py tests/test_devices.py tests/test_gpu_check.py 2>&1 \
      | tee "$OUT/tests.txt"
    timeout 300 python3 bench/gpu_check.py layers --out /tmp/gc --data "$DATA" 2>&1 | tail -c 20000 > "$OUT/layers.log"
    cp /tmp/gc/layers.json "$OUT/" 2>/dev/null; tail -c 3000 "$OUT/layers.log"
    ;;
  2)
    [ -f .gpu/a/part ] || { echo "error: .gpu/a/part is not on this machine (it went back after step 1)" >&2; exit 3; }
    cat .gpu/a/part .gpu/b/part > /tmp/smollm2.gguf
    [ "$(sha256sum /tmp/smollm2.gguf | cut -d' ' -f1)" = "$(cat .gpu/b/sha256)" ] \
      || { echo "error: the reassembled GGUF does not match its checksum" >&2; exit 5; }
    timeout 420 python3 bench/gpu_check.py smollm2 --gguf /tmp/smollm2.gguf --out /tmp/gs --data "$DATA" 2>&1 \
      | tail -c 20000 > "$OUT/smollm2.log"
    cp /tmp/gs/smollm2.json "$OUT/" 2>/dev/null; tail -c 3000 "$OUT/smollm2.log"
    ;;
  *) echo "usage: bash bench/gpu_run.sh 1|2" >&2; exit 2 ;;
esac
