#!/usr/bin/env bash
# Pack what bench/gpu_check.py needs on a lent GPU machine that reaches no registry
# (bench/README.md, "GPU checks"): run here, in the repository root.
#   .whl/        wheels for that machine's Python 3.12 of what its image lacks (dist_quant's
#                configs, compressed-tensors and its pydantic, gguf for the SmolLM2 file)
#   .gpu/data/   the calibration / held-out text
#   .gpu/a/, .gpu/b/  the SmolLM2 GGUF in two halves (98 MB: a call carries at most 64 MiB)
#   .whl-peer/   llm-compressor 0.14.0.1 and what it needs beyond that image (its own compressed-tensors
#                0.19.0, auto-round 0.15.1, datasets with dill and multiprocess), installed apart from
#                dist_quant's wheels, for the peer run beside ours on the same GPU (issue 17)
# The folders are git-ignored; each call carries what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/wikitext-2/valid.txt}
[ -f "$DATA" ] || { echo "error: calibration text $DATA not found (pass its path)" >&2; exit 2; }
GGUF=$(python3 -c 'from dist_quant.demo_model import find_smollm2_gguf; print(find_smollm2_gguf())')
rm -rf .whl .whl-peer .gpu && mkdir -p .whl .whl-peer .gpu/data .gpu/a .gpu/b
plat=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --only-binary=:all: --no-deps -d .whl)
pin() { grep -i -E "^${1//-/[-_]}==" constraints.txt || { echo "error: $1 is not pinned in constraints.txt" >&2; exit 2; }; }
python3 -m pip download -q "${plat[@]}" "$(pin hydra-core)" "$(pin omegaconf)" "$(pin compressed-tensors)" \
  "$(pin gguf)" "$(pin pydantic)" "$(pin pydantic-core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
  "$(pin loguru)" "$(pin typing-extensions)"
# antlr4-python3-runtime (omegaconf's parser) is published as a source archive only: build its pure-Python wheel here.
python3 -m pip wheel -q --no-deps -w .whl "$(pin antlr4-python3-runtime)"
# the peer (bench/peers/llmcompressor_gptq.py): versions as in its CPU venv (bench/README.md)
peer=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --only-binary=:all: --no-deps -d .whl-peer)
python3 -m pip download -q "${peer[@]}" llmcompressor==0.14.0.1 compressed-tensors==0.19.0 auto-round==0.15.1 \
  "$(pin datasets)" "$(pin dill)" "$(pin multiprocess)"
cp "$DATA" .gpu/data/valid.txt
size=$(stat -c %s "$GGUF"); half=$(( (size + 1) / 2 ))
head -c "$half" "$GGUF" > .gpu/a/part && tail -c +"$((half + 1))" "$GGUF" > .gpu/b/part
sha256sum "$GGUF" | cut -d' ' -f1 > .gpu/b/sha256
du -sh .whl .whl-peer .gpu/a .gpu/b .gpu/data
