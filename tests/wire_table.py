"""The wire dtypes of gradserve.v1, written out by hand from docs/protocol.md.

For each ``DType`` name: its enum number, the torch dtype it carries, the item size in
bytes, and whether it may require gradients (floating point or complex). Tests compare
the codec and the server against this table, never against the codec's own, so an enum
number or item size changed in the product (on both sides) shows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class WireDType(NamedTuple):
    number: int
    dtype: torch.dtype
    itemsize: int
    differentiable: bool


WIRE_DTYPES: dict[str, WireDType] = {
    "DTYPE_BOOL": WireDType(1, torch.bool, 1, False),
    "DTYPE_UINT8": WireDType(2, torch.uint8, 1, False),
    "DTYPE_INT8": WireDType(3, torch.int8, 1, False),
    "DTYPE_INT16": WireDType(4, torch.int16, 2, False),
    "DTYPE_INT32": WireDType(5, torch.int32, 4, False),
    "DTYPE_INT64": WireDType(6, torch.int64, 8, False),
    "DTYPE_FLOAT16": WireDType(7, torch.float16, 2, True),
    "DTYPE_BFLOAT16": WireDType(8, torch.bfloat16, 2, True),
    "DTYPE_FLOAT32": WireDType(9, torch.float32, 4, True),
    "DTYPE_FLOAT64": WireDType(10, torch.float64, 8, True),
    "DTYPE_COMPLEX64": WireDType(11, torch.complex64, 8, True),
    "DTYPE_COMPLEX128": WireDType(12, torch.complex128, 16, True),
    "DTYPE_UINT16": WireDType(13, torch.uint16, 2, False),
    "DTYPE_UINT32": WireDType(14, torch.uint32, 4, False),
    "DTYPE_UINT64": WireDType(15, torch.uint64, 8, False),
    "DTYPE_FLOAT8_E4M3FN": WireDType(16, torch.float8_e4m3fn, 1, True),
    "DTYPE_FLOAT8_E5M2": WireDType(17, torch.float8_e5m2, 1, True),
}

BY_NUMBER: dict[int, WireDType] = {w.number: w for w in WIRE_DTYPES.values()}
