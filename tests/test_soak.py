"""The soak script's --quick mode: 1,000 calls, 5% malformed, against a server it starts and stops."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_soak_passes() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=55,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"^wrong answers\s+0$", proc.stdout, re.M), out
    assert re.search(r"^unexpected codes\s+0$", proc.stdout, re.M), out
    assert re.search(r"^calls\s+1000 of 1000 ", proc.stdout, re.M), out
    assert "result: PASS" in proc.stdout, out
