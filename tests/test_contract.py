"""The committed stubs are exactly what the .proto generates, and the contract keeps its rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gradserve.v1 import gradserve_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ["gradserve_pb2.py", "gradserve_pb2.pyi", "gradserve_pb2_grpc.py", "gradserve_pb2_grpc.pyi"]


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True)
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "gradserve" / "v1" / name).read_bytes() != (ROOT / "protos" / "gradserve" / "v1" / name).read_bytes()
    ]
    assert not stale, f"stubs out of date, run `python scripts/gen_protos.py`: {stale}"


def test_service_has_the_required_rpcs() -> None:
    service = pb.DESCRIPTOR.services_by_name["GradientService"]
    assert service.full_name == "gradserve.v1.GradientService"
    assert {"ListFunctions", "Forward", "Backward", "ForwardBackward"} <= set(service.methods_by_name)


def test_enums_start_with_unspecified() -> None:
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.name


def test_every_message_field_and_rpc_is_commented() -> None:
    text = (ROOT / "protos" / "gradserve" / "v1" / "gradserve.proto").read_text().splitlines()
    for i, line in enumerate(text):
        stripped = line.strip()
        is_decl = stripped.startswith(("message ", "rpc ", "enum ")) or (
            stripped.endswith(";") and "=" in stripped and not stripped.startswith(("//", "option", "syntax", "package"))
        )
        if is_decl:
            assert text[i - 1].strip().startswith("//"), f"line {i + 1} has no comment above it: {stripped}"
