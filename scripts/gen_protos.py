"""Generate the Python stubs of the wire contract with grpcio-tools and mypy-protobuf.

Usage: ``python scripts/gen_protos.py [--out DIR]``. Without ``--out`` the stubs are
written beside the ``.proto`` (``protos/gradserve/v1/``), where the import name
``gradserve.v1`` finds them. ``tests/test_contract.py`` regenerates into a temporary
folder and fails when the committed stubs differ.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO = "gradserve/v1/gradserve.proto"


def generate(out: Path) -> None:
    """Write gradserve_pb2.py, .pyi, gradserve_pb2_grpc.py and .pyi under ``out/gradserve/v1``."""
    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy_grpc={shutil.which('protoc-gen-mypy_grpc', path=str(bindir))}",
        f"--mypy_grpc_out={out}",
        PROTO,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: protos/)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
