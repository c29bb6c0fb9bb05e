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


def test_quick_chaos_soak_passes() -> None:
    """Good callers beside every hostile pattern for a few seconds: right answers, health within 1 s, RSS in budget."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--chaos", "--quick", "--duration-s", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"^wrong answers\s+0$", proc.stdout, re.M), out
    made, answered = map(int, re.search(r"^good calls\s+(\d+) made, (\d+) answered right", proc.stdout, re.M).groups())
    assert made > 0 and answered == made, out
    assert re.search(r"^hostile unexpected\s+0$", proc.stdout, re.M), out
    assert "PASS  health within 1 s throughout" in proc.stdout, out
    assert "PASS  server RSS under baseline + budget" in proc.stdout, out
    assert "result: PASS" in proc.stdout, out
