#!/usr/bin/env bash
# Runs ON the lent GPU machine, in the repository root (bench/README.md, "GPU checks").
#   bash bench/gpu_run.sh 1   carry [.whl, .gpu/data, .gpu/a]: CUDA tests, solve micro-benchmark (torch loop vs
#                             Triton kernel), the Llama-3-8B-shaped layer loop with each
#   bash bench/gpu_run.sh 2   carry [.whl, .whl-peer, .gpu/data, .gpu/b]: the SmolLM2 job on the GPU and on the
#                             CPU, then llm-compressor's GPTQ on the same GPU (issue 17) and its perplexity
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
    # (tests/test_gptq_triton.py is CPU-only, the interpreter: CI runs it; test_cuda.py has the compiled kernel)
    timeout 200 python3 -m pytest -q -rs tests/test_cuda.py tests/test_devices.py tests/test_gpu_check.py 2>&1 \
      | tee "$OUT/tests.txt"
    # one solve per Llama-3-8B linear shape, the torch column loop against the fused Triton kernel
    timeout 90 python3 bench/bench_solve.py --device cuda --kernels torch,triton --workers 1 --repeat 2 \
      --group-size 128 --shapes 6144x4096,4096x4096,28672x4096,4096x14336 2>&1 | tee "$OUT/solve.md"
    # the layer loop twice: the torch column loop (before), then quant.kernel=auto (the kernel)
    timeout 110 python3 bench/gpu_check.py layers --out /tmp/gc --data "$DATA" -- quant.kernel=torch 2>&1 \
      | tail -c 20000 > "$OUT/layers-torch.log"
    cp /tmp/gc/layers.json "$OUT/layers-torch.json" 2>/dev/null
    timeout 110 python3 bench/gpu_check.py layers --out /tmp/gc --data "$DATA" 2>&1 | tail -c 20000 > "$OUT/layers.log"
    cp /tmp/gc/layers.json "$OUT/" 2>/dev/null; tail -c 3000 "$OUT/layers.log"
    ;;
  2)
    [ -f .gpu/a/part ] || { echo "error: .gpu/a/part is not on this machine (it went back after step 1)" >&2; exit 3; }
    cat .gpu/a/part .gpu/b/part > /tmp/smollm2.gguf
    [ "$(sha256sum /tmp/smollm2.gguf | cut -d' ' -f1)" = "$(cat .gpu/b/sha256)" ] \
      || { echo "error: the reassembled GGUF does not match its checksum" >&2; exit 5; }
    timeout 300 python3 bench/gpu_check.py smollm2 --gguf /tmp/smollm2.gguf --out /tmp/gs --data "$DATA" 2>&1 \
      | tail -c 20000 > "$OUT/smollm2.log"
    cp /tmp/gs/smollm2.json "$OUT/" 2>/dev/null; tail -c 3000 "$OUT/smollm2.log"
    # the peer, in its own site dir (its compressed-tensors 0.19.0, not ours), on the converted checkpoint
    if [ -d .whl-peer ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-llmc \
        .whl-peer/*.whl $(ls .whl/*.whl | grep -v -E 'compressed_tensors|hydra|omegaconf|antlr4') \
        && PYTHONPATH=/tmp/site-llmc:$PWD/bench/peers timeout 170 python3 bench/peers/llmcompressor_gptq.py \
             /tmp/gs/smollm2 "$DATA" /tmp/gs/llmc --samples 32 --seq-len 512 --dtype float32 2>&1 \
           | tail -c 12000 > "$OUT/llmc.log"
      tail -n 3 "$OUT/llmc.log"
      timeout 60 python3 -c 'import json, sys; from dist_quant.eval import evaluate
print(json.dumps({"llmc_ppl": evaluate(sys.argv[1], sys.argv[2], seq_len=512, max_windows=40)}))' \
        /tmp/gs/llmc "$DATA" 2>&1 | tail -n 2 | tee -a "$OUT/llmc.log"
    fi
    ;;
  *) echo "usage: bash bench/gpu_run.sh 1|2" >&2; exit 2 ;;
esac
