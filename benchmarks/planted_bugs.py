"""The planted-bug experiment of issue 14: plant each bug, run the tests meant to catch it, revert.

Usage: ``.venv/bin/python benchmarks/planted_bugs.py [BUG ...]`` from the repository root,
with a clean working tree (each bug is an edit of one file, restored afterwards, also
on failure; the .proto one regenerates the stubs and restores them with git). Writes
``benchmarks/results/planted_bugs.txt``: per bug, a one-line description, the patch,
the tests run and those that failed. Every bug must fail at least one test.
"""

# ruff: noqa: E501  (the planted edits are quoted verbatim)
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

BUGS = {
    1: (
        "float32 and int32 swap their wire enum numbers (on both sides: the shared codec table)",
        "protos/gradserve/v1/codec.py",
        [
            ("    torch.int32: pb.DTYPE_INT32,", "    torch.int32: pb.DTYPE_FLOAT32,"),
            ("    torch.float32: pb.DTYPE_FLOAT32,", "    torch.float32: pb.DTYPE_INT32,"),
        ],
        ["tests/test_golden.py", "tests/test_codec.py"],
    ),
    "1b": (
        "float32 and int32 swap their wire enum numbers in the .proto (stubs regenerated: both sides)",
        "protos/gradserve/v1/gradserve.proto",
        [("  DTYPE_INT32 = 5;", "  DTYPE_INT32 = 9;"), ("  DTYPE_FLOAT32 = 9;", "  DTYPE_FLOAT32 = 5;")],
        ["tests/test_golden.py", "tests/test_codec.py"],
    ),
    2: (
        "tensors travel big-endian (on both sides: encode and decode byte-swap each element)",
        "protos/gradserve/v1/codec.py",
        [
            (
                "    return flat.view(torch.uint8)\n",
                "    raw = flat.view(torch.uint8)\n    return raw.reshape(-1, flat.element_size()).flip(1).reshape(-1) if flat.element_size() > 1 else raw\n",
            ),
            (
                "    return raw.view(dtype).reshape(shape)\n",
                "    if dtype.itemsize > 1:\n        raw = raw.reshape(-1, dtype.itemsize).flip(1).reshape(-1).contiguous()\n    return raw.view(dtype).reshape(shape)\n",
            ),
        ],
        ["tests/test_golden.py", "tests/test_codec.py"],
    ),
    3: (
        "the handle store's count cap is off by one (--max-handles 2 keeps 1)",
        "server/_handles.py",
        [("while len(self._graphs) > self.max_handles or", "while len(self._graphs) >= self.max_handles or")],
        ["tests/test_limits.py", "tests/test_runtime.py"],
    ),
    4: (
        "the CANCELLED -> DEADLINE_EXCEEDED rewrite is removed (metrics and logs show CANCELLED for expired deadlines)",
        "server/_servicer.py",
        [
            (
                "        if code is grpc.StatusCode.CANCELLED and remaining_s is not None and remaining_s <= 0:\n            code = grpc.StatusCode.DEADLINE_EXCEEDED  # abandoned because the deadline passed\n",
                "",
            )
        ],
        ["tests/test_bad_input.py"],
    ),
    5: (
        "serve --check withholds only first-order failures (a Function failing gradgradcheck is served)",
        "server/_server.py",
        [("            if not box[0].ok:\n", '            if box[0].first_order == "fail":\n')],
        [
            "tests/test_cli.py::test_every_check_result_decides_what_is_served",
            "tests/test_cli.py::test_serve_check_withholds_failing_functions_only",
        ],
    ),
    6: (
        "straight_through_sign's window |x| <= 1 becomes < 1",
        "server/examples.py",
        [("(x.abs() <= 1)", "(x.abs() < 1)")],
        ["tests/test_examples.py", "tests/test_service.py"],
    ),
    7: (
        "backward uses only the first output's cotangent",
        "server/_runtime.py",
        [
            (
                "        pairs = [(o, g) for o, g in zip(chain.outputs, cotangents) if g is not None and o is not None and o.requires_grad]\n",
                "        pairs = [(o, g) for o, g in zip(chain.outputs, cotangents) if g is not None and o is not None and o.requires_grad][:1]\n",
            )
        ],
        ["tests/test_examples.py", "tests/test_service.py", "tests/test_runtime.py"],
    ),
    8: (
        "a recompute request drops grad_outputs (ones used instead)",
        "server/_runtime.py",
        [
            (
                "        chain = self._recompute(entry, args or (), kwargs, rng, lower_order, is_active)\n        cotangents = self._check_grad_outputs(entry, chain.outputs, grad_outputs, chain.order)\n",
                "        chain = self._recompute(entry, args or (), kwargs, rng, lower_order, is_active)\n        cotangents = self._check_grad_outputs(entry, chain.outputs, None, chain.order)\n",
            )
        ],
        ["tests/test_service.py", "tests/test_runtime.py", "tests/test_streaming.py"],
    ),
}


def plant(key: object) -> tuple[str, list[str], str]:
    """Apply bug ``key``, run its tests, revert; returns (patch, failed test ids, pytest's last line)."""
    _desc, path, edits, tests = BUGS[key]
    target = ROOT / path
    original = target.read_text()
    text = original
    for old, new in edits:
        assert text.count(old) == 1, (key, old)
        text = text.replace(old, new)
    target.write_text(text)
    proto = path.endswith(".proto")
    try:
        patch = subprocess.run(["git", "diff", "--", path], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        if proto:
            subprocess.run([PY, "scripts/gen_protos.py"], cwd=ROOT, capture_output=True, check=True)
        run = subprocess.run(
            [PY, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests], cwd=ROOT, capture_output=True, text=True
        )
    finally:
        target.write_text(original)
        if proto:
            subprocess.run(["git", "checkout", "--", "protos/"], cwd=ROOT, check=True)
    failed = sorted(set(re.findall(r"^FAILED (.+?)(?: - |$)", run.stdout, re.M)))
    lines = run.stdout.strip().splitlines()
    return patch, failed, lines[-1] if lines else run.stderr.strip()[-300:]


def main(argv: list[str]) -> int:
    keys = [k for k in BUGS if str(k) in argv] if argv else list(BUGS)
    out, survived = [], []
    for key in keys:
        desc, _path, _edits, tests = BUGS[key]
        patch, failed, last = plant(key)
        print(f"bug {key}: {desc}: {len(failed)} failed ({last})", flush=True)
        if not failed:
            survived.append(key)
        out += [f"== bug {key}: {desc}", f"tests run: {' '.join(tests)}", f"pytest: {last}", "failed:"]
        out += [f"  {t}" for t in failed] or ["  NONE (the bug survived)"]
        out += ["patch:", patch.rstrip(), ""]
    if not argv:
        (ROOT / "benchmarks" / "results" / "planted_bugs.txt").write_text("\n".join(out) + "\n")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
