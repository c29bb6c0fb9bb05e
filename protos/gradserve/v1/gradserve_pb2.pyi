from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_COMPLEX64: _ClassVar[DType]
    DTYPE_COMPLEX128: _ClassVar[DType]
    DTYPE_UINT16: _ClassVar[DType]
    DTYPE_UINT32: _ClassVar[DType]
    DTYPE_UINT64: _ClassVar[DType]
    DTYPE_FLOAT8_E4M3FN: _ClassVar[DType]
    DTYPE_FLOAT8_E5M2: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_BOOL: DType
DTYPE_UINT8: DType
DTYPE_INT8: DType
DTYPE_INT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_COMPLEX64: DType
DTYPE_COMPLEX128: DType
DTYPE_UINT16: DType
DTYPE_UINT32: DType
DTYPE_UINT64: DType
DTYPE_FLOAT8_E4M3FN: DType
DTYPE_FLOAT8_E5M2: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "requires_grad", "shared_memory")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_GRAD_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    requires_grad: bool
    shared_memory: SharedMemoryRef
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., requires_grad: _Optional[bool] = ..., shared_memory: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class SharedMemoryRef(_message.Message):
    __slots__ = ("name", "offset", "byte_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    byte_size: int
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class SparseTensor(_message.Message):
    __slots__ = ("shape", "indices", "values", "requires_grad")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_GRAD_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    indices: Tensor
    values: Tensor
    requires_grad: bool
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., requires_grad: _Optional[bool] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("tensor", "bool_value", "int_value", "float_value", "string_value", "null_value", "sparse_tensor")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    NULL_VALUE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_TENSOR_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    bool_value: bool
    int_value: int
    float_value: float
    string_value: str
    null_value: _struct_pb2.NullValue
    sparse_tensor: SparseTensor
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., bool_value: _Optional[bool] = ..., int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., string_value: _Optional[str] = ..., null_value: _Optional[_Union[_struct_pb2.NullValue, str]] = ..., sparse_tensor: _Optional[_Union[SparseTensor, _Mapping]] = ...) -> None: ...

class NamedValue(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: Value
    def __init__(self, name: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class RngReplay(_message.Message):
    __slots__ = ("seed", "device_type", "torch_version")
    SEED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    seed: int
    device_type: str
    torch_version: str
    def __init__(self, seed: _Optional[int] = ..., device_type: _Optional[str] = ..., torch_version: _Optional[str] = ...) -> None: ...

class Cotangents(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[MaybeTensor]
    def __init__(self, values: _Optional[_Iterable[_Union[MaybeTensor, _Mapping]]] = ...) -> None: ...

class MaybeTensor(_message.Message):
    __slots__ = ("tensor", "none", "sparse")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    NONE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    none: _struct_pb2.NullValue
    sparse: SparseTensor
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., none: _Optional[_Union[_struct_pb2.NullValue, str]] = ..., sparse: _Optional[_Union[SparseTensor, _Mapping]] = ...) -> None: ...

class ListFunctionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FunctionInfo(_message.Message):
    __slots__ = ("name", "num_inputs", "doc", "kind", "version", "unavailable_reason", "signature", "required_inputs", "double_backward")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_INPUTS_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_INPUTS_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_BACKWARD_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_inputs: int
    doc: str
    kind: str
    version: str
    unavailable_reason: str
    signature: str
    required_inputs: int
    double_backward: bool
    def __init__(self, name: _Optional[str] = ..., num_inputs: _Optional[int] = ..., doc: _Optional[str] = ..., kind: _Optional[str] = ..., version: _Optional[str] = ..., unavailable_reason: _Optional[str] = ..., signature: _Optional[str] = ..., required_inputs: _Optional[int] = ..., double_backward: _Optional[bool] = ...) -> None: ...

class ListFunctionsResponse(_message.Message):
    __slots__ = ("functions",)
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    functions: _containers.RepeatedCompositeFieldContainer[FunctionInfo]
    def __init__(self, functions: _Optional[_Iterable[_Union[FunctionInfo, _Mapping]]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("function", "args", "keep_graph", "kwargs", "no_grad", "seed")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KEEP_GRAPH_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    NO_GRAD_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    function: str
    args: _containers.RepeatedCompositeFieldContainer[Value]
    keep_graph: bool
    kwargs: _containers.RepeatedCompositeFieldContainer[NamedValue]
    no_grad: bool
    seed: int
    def __init__(self, function: _Optional[str] = ..., args: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., keep_graph: _Optional[bool] = ..., kwargs: _Optional[_Iterable[_Union[NamedValue, _Mapping]]] = ..., no_grad: _Optional[bool] = ..., seed: _Optional[int] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("outputs", "returns_tuple", "handle", "handle_ttl_ms", "version", "rng")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    RETURNS_TUPLE_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    HANDLE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RNG_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    returns_tuple: bool
    handle: str
    handle_ttl_ms: int
    version: str
    rng: RngReplay
    def __init__(self, outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., returns_tuple: _Optional[bool] = ..., handle: _Optional[str] = ..., handle_ttl_ms: _Optional[int] = ..., version: _Optional[str] = ..., rng: _Optional[_Union[RngReplay, _Mapping]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("function", "handle", "recompute", "grad_outputs", "version", "keep_graph", "rng", "lower_order")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KEEP_GRAPH_FIELD_NUMBER: _ClassVar[int]
    RNG_FIELD_NUMBER: _ClassVar[int]
    LOWER_ORDER_FIELD_NUMBER: _ClassVar[int]
    function: str
    handle: str
    recompute: Arguments
    grad_outputs: _containers.RepeatedCompositeFieldContainer[MaybeTensor]
    version: str
    keep_graph: bool
    rng: RngReplay
    lower_order: _containers.RepeatedCompositeFieldContainer[Cotangents]
    def __init__(self, function: _Optional[str] = ..., handle: _Optional[str] = ..., recompute: _Optional[_Union[Arguments, _Mapping]] = ..., grad_outputs: _Optional[_Iterable[_Union[MaybeTensor, _Mapping]]] = ..., version: _Optional[str] = ..., keep_graph: _Optional[bool] = ..., rng: _Optional[_Union[RngReplay, _Mapping]] = ..., lower_order: _Optional[_Iterable[_Union[Cotangents, _Mapping]]] = ...) -> None: ...

class ReleaseHandlesRequest(_message.Message):
    __slots__ = ("handles",)
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    handles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, handles: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseHandlesResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class Arguments(_message.Message):
    __slots__ = ("values", "kwargs")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    kwargs: _containers.RepeatedCompositeFieldContainer[NamedValue]
    def __init__(self, values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., kwargs: _Optional[_Iterable[_Union[NamedValue, _Mapping]]] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grads", "handle", "handle_ttl_ms")
    GRADS_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    HANDLE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    grads: _containers.RepeatedCompositeFieldContainer[MaybeTensor]
    handle: str
    handle_ttl_ms: int
    def __init__(self, grads: _Optional[_Iterable[_Union[MaybeTensor, _Mapping]]] = ..., handle: _Optional[str] = ..., handle_ttl_ms: _Optional[int] = ...) -> None: ...

class ForwardBackwardRequest(_message.Message):
    __slots__ = ("function", "args", "grad_outputs", "kwargs", "seed")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    function: str
    args: _containers.RepeatedCompositeFieldContainer[Value]
    grad_outputs: _containers.RepeatedCompositeFieldContainer[MaybeTensor]
    kwargs: _containers.RepeatedCompositeFieldContainer[NamedValue]
    seed: int
    def __init__(self, function: _Optional[str] = ..., args: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., grad_outputs: _Optional[_Iterable[_Union[MaybeTensor, _Mapping]]] = ..., kwargs: _Optional[_Iterable[_Union[NamedValue, _Mapping]]] = ..., seed: _Optional[int] = ...) -> None: ...

class ForwardBackwardResponse(_message.Message):
    __slots__ = ("outputs", "returns_tuple", "grads")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    RETURNS_TUPLE_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    returns_tuple: bool
    grads: _containers.RepeatedCompositeFieldContainer[MaybeTensor]
    def __init__(self, outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., returns_tuple: _Optional[bool] = ..., grads: _Optional[_Iterable[_Union[MaybeTensor, _Mapping]]] = ...) -> None: ...

class SharedMemoryProbeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SharedMemoryProbeResponse(_message.Message):
    __slots__ = ("nonce", "segment")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    segment: SharedMemoryRef
    def __init__(self, nonce: _Optional[bytes] = ..., segment: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("forward", "backward", "forward_backward", "data")
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    FORWARD_BACKWARD_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    forward: ForwardRequest
    backward: BackwardRequest
    forward_backward: ForwardBackwardRequest
    data: bytes
    def __init__(self, forward: _Optional[_Union[ForwardRequest, _Mapping]] = ..., backward: _Optional[_Union[BackwardRequest, _Mapping]] = ..., forward_backward: _Optional[_Union[ForwardBackwardRequest, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("forward", "backward", "forward_backward", "data")
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    FORWARD_BACKWARD_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    forward: ForwardResponse
    backward: BackwardResponse
    forward_backward: ForwardBackwardResponse
    data: bytes
    def __init__(self, forward: _Optional[_Union[ForwardResponse, _Mapping]] = ..., backward: _Optional[_Union[BackwardResponse, _Mapping]] = ..., forward_backward: _Optional[_Union[ForwardBackwardResponse, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...
