"""The peak RSS a run reports is its own, not its launcher's: a child started with
vfork/fork + exec by a parent holding a large heap inherits the parent's ``ru_maxrss``
(Linux keeps the old address space's high-water mark across execve), which made the
benchmark driver report 2.2 GB for a 0.8 GB SmolLM2 run."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")


def test_own_high_water_mark_follows_allocations():
    """In a fresh process: in the suite's own process an earlier test's peak can already lie above
    the current RSS, and a 300 MiB block then raises the high-water mark by less than its size."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {ROOT!r})
        from dist_quant.memory import peak_rss_bytes
        def vmhwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        before = peak_rss_bytes()
        block = bytearray(300 * 2**20)  # 300 MiB, touched
        for i in range(0, len(block), 4096):
            block[i] = 1
        after = peak_rss_bytes()
        print(json.dumps([before, after, vmhwm()]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    import json

    before, after, hwm = json.loads(out)
    assert after - before >= 250 * 2**20
    assert abs(after - hwm) < 16 * 2**20


def test_child_of_big_parent_reports_its_own_peak():
    parent = textwrap.dedent(f"""
        import json, subprocess, sys
        big = bytearray(800 * 2**20)
        for i in range(0, len(big), 4096):
            big[i] = 1
        child = ("import json, resource, sys; sys.path.insert(0, {ROOT!r}); "
                 "from dist_quant.memory import peak_rss_bytes; "
                 "print(json.dumps([peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))")
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout
        print(out.strip())
    """)
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout
    ours, maxrss = (int(v) for v in out.strip().splitlines()[-1].strip("[]").split(","))
    assert ours < 200 * 2**20, ours  # a bare interpreter importing dist_quant.memory
    if maxrss > 700 * 2**20:  # the kernel carried the parent's mark over: the reason for VmHWM
        assert maxrss > 3 * ours
