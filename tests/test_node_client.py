"""A second-language client: clients/node/test.js, written from docs/protocol.md, against a real server.

It proves the spec is enough to write a client without the Python SDK: seed examples
with exact values, the golden wire vectors, a 6 MiB tensor through StreamCall, slot
order, handles, higher order, randomness replay and ErrorInfo reasons.

Needs Node.js and npm. Without them the test is skipped, except under CI=true, where
it fails (.ci/run installs Debian's nodejs and npm when they are missing). The npm
packages are pinned in clients/node/package-lock.json and installed once with
``npm ci`` into clients/node/node_modules (git-ignored); a changed lockfile reinstalls.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time

import pytest
from conftest import ROOT, TESTS, ServerProcess

NODE_DIR = ROOT / "clients" / "node"
STAMP = NODE_DIR / "node_modules" / ".gradserve-lock-sha256"


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _unavailable(reason: str) -> None:
    """Skip locally; under CI a missing toolchain is a failure, never a silent skip."""
    if _on_ci():
        pytest.fail(f"{reason} (CI is set, so this is not skipped; .ci/run installs nodejs and npm with apt-get)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def node() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable(f"Node.js client test needs node and npm on PATH (node: {node}, npm: {npm})")
    lock = hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()
    if not (STAMP.exists() and STAMP.read_text().strip() == lock):
        install = subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if install.returncode != 0:
            _unavailable(f"npm ci in {NODE_DIR} failed (exit {install.returncode}): {install.stderr.strip()[-2000:]}")
        STAMP.write_text(lock + "\n")
    return node


def test_node_client_speaks_the_protocol(node: str) -> None:
    start = time.monotonic()
    with ServerProcess("--functions", "gradserve.server.examples", "--functions", "gradserve_test_functions") as server:
        ready_s = time.monotonic() - start
        run = subprocess.run(
            [node, str(NODE_DIR / "test.js"), server.target, str(TESTS / "golden" / "wire_vectors.json")],
            capture_output=True,
            text=True,
            timeout=120,
        )
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"node {version}; server ready in {ready_s:.1f} s; node client ran in {time.monotonic() - start - ready_s:.1f} s")
    print(run.stdout)
    print(run.stderr)
    assert run.returncode == 0, f"node client failed (exit {run.returncode}):\n{run.stdout}\n{run.stderr}"
    assert " 0 failed" in run.stdout
