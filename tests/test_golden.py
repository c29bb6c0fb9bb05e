"""Golden wire vectors: fixed bytes written by hand, checked against the codec and a live server.

The vectors in ``golden/wire_vectors.json`` are what any client, in any language, must
send and read. Round trips through the codec alone cannot catch a dtype enum swapped or a
byte order flipped on both sides; these bytes can.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from wire_table import WIRE_DTYPES

from gradserve.server import RunningServer
from gradserve.v1 import codec
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

VECTORS = json.loads((Path(__file__).parent / "golden" / "wire_vectors.json").read_text())
TENSORS = VECTORS["tensors"]
_TORCH = {name: w.dtype for name, w in WIRE_DTYPES.items()}


def _ids(vectors: list[dict]) -> list[str]:
    return [f"{v['dtype']}{v['shape']}" for v in vectors]


def _tensor(vector: dict) -> torch.Tensor:
    """The vector's values as a torch tensor, built without the codec."""
    dtype = _TORCH[vector["dtype"]]
    values = vector["values"]
    if dtype.is_complex:
        return torch.view_as_complex(torch.tensor(values, dtype=torch.float64)).to(dtype).reshape(vector["shape"])
    if dtype in (torch.uint16, torch.uint32, torch.uint64):  # past int64's range: numpy builds them
        return torch.from_numpy(np.array(values, dtype=f"uint{8 * dtype.itemsize}"))
    build = torch.float32 if dtype.itemsize == 1 and dtype.is_floating_point else dtype
    return torch.tensor(values, dtype=build).to(dtype).reshape(vector["shape"])


def _message(vector: dict, hex_key: str = "hex") -> pb.Tensor:
    return pb.Tensor(dtype=vector["number"], shape=vector["shape"], data=bytes.fromhex(vector[hex_key]))


def test_every_wire_dtype_has_a_vector() -> None:
    declared = {v.name: v.number for v in pb.DType.DESCRIPTOR.values if v.number}
    assert {v["dtype"]: v["number"] for v in TENSORS} == declared


@pytest.mark.parametrize("vector", TENSORS, ids=_ids(TENSORS))
def test_codec_writes_the_golden_bytes(vector: dict) -> None:
    msg = codec.encode_tensor(_tensor(vector))
    assert (msg.dtype, list(msg.shape), msg.data.hex()) == (vector["number"], vector["shape"], vector["hex"])


@pytest.mark.parametrize("vector", TENSORS, ids=_ids(TENSORS))
def test_codec_reads_the_golden_bytes(vector: dict) -> None:
    decoded = codec.decode_tensor(_message(vector))
    expected = _tensor(vector)
    assert decoded.dtype == expected.dtype and list(decoded.shape) == vector["shape"]
    assert torch.equal(decoded.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> pb_grpc.GradientServiceStub:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.GradientServiceStub(channel)
    channel.close()


@pytest.mark.parametrize("vector", TENSORS, ids=_ids(TENSORS))
def test_server_echoes_the_golden_bytes(stub: pb_grpc.GradientServiceStub, vector: dict) -> None:
    reply = stub.Forward(pb.ForwardRequest(function="identity", args=[pb.Value(tensor=_message(vector))]), timeout=10)
    (out,) = reply.outputs
    assert (out.dtype, list(out.shape), out.data.hex()) == (vector["number"], vector["shape"], vector["hex"])


DOUBLED = [v for v in TENSORS if "doubled" in v]


@pytest.mark.parametrize("vector", DOUBLED, ids=_ids(DOUBLED))
def test_server_computes_on_the_golden_bytes(stub: pb_grpc.GradientServiceStub, vector: dict) -> None:
    args = [pb.Value(tensor=_message(vector)), pb.Value(float_value=2.0)]
    (out,) = stub.Forward(pb.ForwardRequest(function="scale", args=args), timeout=10).outputs
    assert (out.dtype, list(out.shape), out.data.hex()) == (vector["number"], vector["shape"], vector["doubled"])


@pytest.mark.parametrize("call", VECTORS["calls"], ids=[c["function"] for c in VECTORS["calls"]])
def test_forward_backward_golden_replies(stub: pb_grpc.GradientServiceStub, call: dict) -> None:
    args = [
        pb.Value(
            tensor=pb.Tensor(dtype=a["number"], shape=a["shape"], data=bytes.fromhex(a["hex"]), requires_grad=a["requires_grad"])
        )
        for a in call["args"]
    ]
    reply = stub.ForwardBackward(pb.ForwardBackwardRequest(function=call["function"], args=args), timeout=10)
    got_outputs = [{"number": t.dtype, "shape": list(t.shape), "hex": t.data.hex()} for t in reply.outputs]
    got_grads = [{"number": g.tensor.dtype, "shape": list(g.tensor.shape), "hex": g.tensor.data.hex()} for g in reply.grads]
    assert got_outputs == call["outputs"] and got_grads == call["grads"]
