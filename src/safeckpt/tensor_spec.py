"""safetensors' raw-buffer API: `TensorSpec`, `serialize`, `serialize_file`, `deserialize`.

These are the functions `safetensors` 0.8 exposes at its top level for callers
that hold raw tensor bytes rather than framework tensors. A tensor to write is
described either by a `TensorSpec` (0.8: a dtype name, a shape and the address
and length of its bytes) or by the dict that safetensors 0.7 and earlier took,
``{"dtype": "float32", "shape": [2, 3], "data": b"..."}``; both are written by
the same streaming writer as `save_file`, with the same bytes as safetensors.

>>> import numpy as np, safeckpt
>>> w = np.ones((2, 3), np.float32)
>>> spec = safeckpt.TensorSpec(dtype="float32", shape=w.shape, data_ptr=w.ctypes.data, data_len=w.nbytes)
>>> data = safeckpt.serialize({"w": spec}, metadata={"step": "1"})
>>> safeckpt.deserialize(data)
[('w', {'dtype': 'F32', 'shape': [2, 3], 'data': bytearray(b'...')})]
"""

from __future__ import annotations

import ctypes
import operator
import os
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import errors
from .format.dtypes import DTYPES
from .format.reader import parse_bytes_header
from .format.writer import PreparedTensor, RawTensor, check_metadata, prepare
from .sinks.safetensors import serialize as serialize_prepared
from .sinks.safetensors import write_file

# The dtype names a TensorSpec takes (torch's and numpy's names) -> the safetensors dtype they are.
DTYPE_CODES: Dict[str, str] = {
    (d.numpy_type.rpartition(".")[2] if d.numpy_type.startswith("ml_dtypes.") else np.dtype(d.numpy_type).name): d.name
    for d in DTYPES.values() if d.numpy_type is not None and not d.packed}  # names only: ml_dtypes is not imported
# torch's packed float4: two F4 values per byte, so its last dimension counts half the values.
PACKED_F4 = "float4_e2m1fn_x2"
DTYPE_CODES[PACKED_F4] = "F4"


def _logical_shape(dtype: str, shape, what: str) -> List[int]:
    """The header shape: ints >= 0, the last one doubled for torch's packed float4."""
    try:
        dims = [operator.index(dim) for dim in shape]
    except TypeError:
        raise errors.UnsupportedTensorError(f"{what}: shape must be a sequence of ints, got {shape!r}") from None
    if any(dim < 0 for dim in dims):
        raise errors.UnsupportedTensorError(f"{what}: shape {dims} has a negative dimension")
    if dtype == PACKED_F4 and dims:
        dims[-1] *= 2
    return dims


def _dtype_code(dtype, what: str) -> str:
    code = DTYPE_CODES.get(dtype) if isinstance(dtype, str) else None
    if code is None:
        raise errors.UnsupportedTensorError(
            f"{what}: unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CODES)}")
    return code


class TensorSpec:
    """One tensor's bytes in memory, described for `serialize`: as safetensors 0.8's TensorSpec.

    `dtype` is a torch/numpy dtype name ("float32", "bfloat16", "float4_e2m1fn_x2", ...)
    and is kept as its safetensors code ("F32"); `shape` is the tensor's shape (for
    "float4_e2m1fn_x2", torch's packed shape: the last dimension is doubled).
    `data_ptr` is the address of `data_len` bytes in C order: the caller keeps them
    alive until every `serialize` that uses this spec has returned.

    >>> TensorSpec(dtype="float32", shape=w.shape, data_ptr=w.ctypes.data, data_len=w.nbytes)
    TensorSpec(dtype='F32', shape=[2, 3], data_ptr=..., data_len=24)
    """

    __slots__ = ("_dtype", "_shape", "_data_ptr", "_data_len")

    def __init__(self, *, dtype: str, shape: Sequence[int], data_ptr: int, data_len: int) -> None:
        what = "TensorSpec"
        self._dtype = _dtype_code(dtype, what)
        self._shape = _logical_shape(dtype, shape, what)
        try:
            self._data_ptr, self._data_len = operator.index(data_ptr), operator.index(data_len)
        except TypeError:
            raise errors.UnsupportedTensorError(
                f"{what}: data_ptr and data_len must be ints, got {data_ptr!r} and {data_len!r}") from None
        if self._data_ptr < 0 or self._data_len < 0:
            raise errors.UnsupportedTensorError(f"{what}: data_ptr and data_len cannot be negative")
        if self._data_ptr == 0 and self._data_len:
            raise errors.UnsupportedTensorError(
                f"{what}: data_ptr is 0 (a null pointer) but data_len is {self._data_len}")

    @property
    def dtype(self) -> str:
        """The safetensors dtype code ("F32", "BF16", ...)."""
        return self._dtype

    @property
    def shape(self) -> List[int]:
        """The shape written in the header (elements, not packed bytes)."""
        return list(self._shape)

    @property
    def data_ptr(self) -> int:
        return self._data_ptr

    @property
    def data_len(self) -> int:
        return self._data_len

    def __repr__(self) -> str:
        return (f"TensorSpec(dtype={self._dtype!r}, shape={self._shape}, data_ptr={self._data_ptr}, "
                f"data_len={self._data_len})")


def _memory(spec: TensorSpec) -> np.ndarray:
    """The bytes a spec points at, as a uint8 array that shares them (no copy)."""
    if not spec.data_len:
        return np.empty(0, dtype=np.uint8)
    return np.ctypeslib.as_array((ctypes.c_ubyte * spec.data_len).from_address(spec.data_ptr))


def _raw(name: str, value: Any, path) -> RawTensor:
    """A TensorSpec or a safetensors <= 0.7 dict as the bytes to write."""
    if isinstance(value, TensorSpec):
        return RawTensor(value.dtype, tuple(value.shape), _memory(value))
    if isinstance(value, Mapping):
        missing = [key for key in ("dtype", "shape", "data") if key not in value]
        if missing:
            raise errors.UnsupportedTensorError(
                f"the tensor's dict lacks {', '.join(repr(k) for k in missing)}: give a TensorSpec, or "
                "{'dtype': 'float32', 'shape': [...], 'data': bytes}", path=path, tensor=name)
        what = "the tensor's dict"
        try:
            data = memoryview(value["data"])
        except TypeError:
            raise errors.UnsupportedTensorError(
                f"{what}: 'data' must be bytes, got {type(value['data']).__name__}", path=path, tensor=name) from None
        try:
            code = _dtype_code(value["dtype"], what)
            shape = _logical_shape(value["dtype"], value["shape"], what)
        except errors.UnsupportedTensorError as exc:
            raise errors.UnsupportedTensorError(exc.detail, path=path, tensor=name) from None
        return RawTensor(code, tuple(shape), data)
    raise errors.UnsupportedTensorError(
        f"expected a TensorSpec, got {type(value).__module__}.{type(value).__name__} (framework tensors "
        "go to save()/save_file())", path=path, tensor=name)


def _prepare_specs(tensor_dict: Mapping[str, Any], path=None) -> List[PreparedTensor]:
    if not isinstance(tensor_dict, Mapping):
        raise errors.UnsupportedTensorError(
            f"expected a dict of name -> TensorSpec, got {type(tensor_dict).__name__}", path=path)
    return [prepare(name, _raw(name, value, path), path) for name, value in tensor_dict.items()]


def serialize(tensor_dict: Mapping[str, Union[TensorSpec, Mapping[str, Any]]],
              metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The safetensors bytes of raw tensors, as safetensors' `serialize`.

    >>> data = serialize({"w": TensorSpec(dtype="float32", shape=[3], data_ptr=w.ctypes.data, data_len=12)})
    >>> data = serialize({"w": {"dtype": "float32", "shape": [3], "data": w.tobytes()}})  # safetensors <= 0.7
    """
    metadata = check_metadata(metadata)
    return serialize_prepared(_prepare_specs(tensor_dict), metadata)


def serialize_file(tensor_dict: Mapping[str, Union[TensorSpec, Mapping[str, Any]]],
                   filename: Union[str, "os.PathLike[str]"], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write raw tensors to a safetensors file (atomically), as safetensors' `serialize_file`.

    >>> serialize_file({"w": spec}, "model.safetensors", metadata={"step": "1"})
    """
    metadata = check_metadata(metadata, filename)
    write_file(_prepare_specs(tensor_dict, filename), filename, metadata)


def deserialize(bytes: Union[bytes, bytearray, memoryview]) -> List[Tuple[str, Dict[str, Any]]]:
    """Every tensor of safetensors bytes as ``(name, {"dtype", "shape", "data"})``, in file order.

    `dtype` is the safetensors code ("F32"), `shape` a list and `data` a bytearray
    of the tensor's bytes as stored (little-endian; F4 packed two per byte).
    The parameter is called `bytes`, as in safetensors.

    >>> deserialize(safeckpt.save({"w": np.ones(2, np.float32)}))
    [('w', {'dtype': 'F32', 'shape': [2], 'data': bytearray(b'\\x00\\x00\\x80?\\x00\\x00\\x80?')})]
    """
    try:
        view = memoryview(bytes).cast("B")
    except TypeError:
        raise errors.HeaderError(f"expected the bytes of a safetensors file, got {type(bytes).__name__}",
                                 path="<bytes>") from None
    header = parse_bytes_header(view)
    result = []
    for name, info, where in header.places():
        data = bytearray(view[where])
        result.append((name, {"dtype": info.dtype, "shape": list(info.shape), "data": data}))
    return result
