"""Test-only entry point: ``python -m dist_quant`` with the fault injection of
``tests/faults.py`` installed from ``DIST_QUANT_TEST_FAIL`` (run as a script, also under
torchrun)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

if __name__ == "__main__":
    import faults

    faults.install_from_env()
    from dist_quant.__main__ import run

    run()
