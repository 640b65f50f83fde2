"""``python -m dist_quant`` with the checkpoint reader instrumented, for the multi-rank MoE
tests: every tensor a rank reads is recorded, and every routed-expert tensor is followed
with a ``weakref.finalize`` until it is freed, so the number of experts of a layer whose
weights are alive at once is measured from outside the code under test.

    TRACE_DIR=dir python tests/moe_trace_main.py KEY=VALUE…   (under torch.distributed.run)

Writes ``dir/rank{RANK}.json``: ``reads`` (tensor names in order) and ``peak_live``
(layer → most experts alive at once)."""
from __future__ import annotations

import json
import os
import re
import sys
import weakref
from pathlib import Path

EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.")


def main() -> int:
    from dist_quant import checkpoint
    from dist_quant.__main__ import main as dist_quant_main

    reads: list[str] = []
    live: dict[tuple[int, int], int] = {}
    peak: dict[int, int] = {}
    original = checkpoint.Checkpoint.get

    def freed(key):
        live[key] -= 1

    def traced_get(self, name):
        tensor = original(self, name)
        reads.append(name)
        m = EXPERT.match(name)
        if m:
            key = (int(m.group(1)), int(m.group(2)))
            live[key] = live.get(key, 0) + 1
            alive = sum(1 for k, n in live.items() if k[0] == key[0] and n > 0)
            peak[key[0]] = max(peak.get(key[0], 0), alive)
            weakref.finalize(tensor, freed, key)
        return tensor

    checkpoint.Checkpoint.get = traced_get
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import faults

    faults.install_from_env()  # DIST_QUANT_TEST_FAIL
    rc = dist_quant_main(sys.argv[1:])
    out = Path(os.environ["TRACE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"reads": reads, "peak_live": peak}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
