"""Tensors as safetensors bytes: checked, described, and laid out in logical order.

`prepare` checks a name and a numpy array (or a `RawTensor` of bytes already in
the file's layout) and describes it for writing; `tensor_chunks` gives its file
bytes: a C-contiguous little-endian array as one zero-copy buffer, any other
array (transposed, Fortran-ordered, strided, big-endian) in logical order in
blocks of at most `BLOCK_BYTES`, so memory stays bounded. Writing files is the
sink's (`safeckpt.sinks.safetensors`), the one writer.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Union

import numpy as np

from .. import errors
from .dtypes import DTYPES, DType, byte_size, dtype_for_numpy
from .header import METADATA_KEY, check_shape, tensor_nbytes

BLOCK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class RawTensor:
    """Bytes with a declared safetensors dtype and shape, written as they are.

    For dtypes numpy cannot hold packed (F6_E2M3, F6_E3M2) or bytes already in
    the file layout (F4 packed two per byte).
    """

    dtype: str
    shape: tuple[int, ...]
    data: Union[bytes, bytearray, memoryview, np.ndarray]


@dataclass(frozen=True)
class PreparedTensor:
    """A tensor checked and ready to write. `load` gives its numpy array on demand."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    nbytes: int
    load: Callable[[], Union[np.ndarray, RawTensor]]


def prepare(name: str, value: Union[np.ndarray, np.generic, RawTensor], path=None) -> PreparedTensor:
    """Check a name and a numpy array (or RawTensor) and describe it for writing."""
    check_name(name, path)
    if isinstance(value, RawTensor):
        return _prepare_raw(name, value, path)
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise errors.UnsupportedTensorError(
            f"expected a numpy array or a framework tensor, got {type(value).__module__}.{type(value).__name__}",
            path=path, tensor=name)
    dtype = dtype_for_numpy(value.dtype)
    if dtype is None:
        raise errors.UnsupportedTensorError(
            f"numpy dtype {value.dtype} has no safetensors equivalent; cast it first "
            f"(safetensors dtypes: {', '.join(DTYPES)})", path=path, tensor=name)
    shape = tuple(int(d) for d in value.shape)
    nbytes = byte_size(dtype, shape)
    if nbytes is None:
        raise errors.UnsupportedTensorError(
            f"{value.size} values of {dtype.name} do not fill whole bytes (F4 packs two per byte: "
            "the element count must be even)", path=path, tensor=name)
    return PreparedTensor(name, dtype, shape, nbytes, lambda: value)


def _prepare_raw(name: str, raw: RawTensor, path) -> PreparedTensor:
    dtype = DTYPES.get(raw.dtype)
    if dtype is None:
        raise errors.UnsupportedTensorError(f"unknown safetensors dtype {raw.dtype!r}", path=path, tensor=name)
    try:
        shape = check_shape(tuple(operator.index(d) for d in raw.shape), path, name)
        nbytes = tensor_nbytes(dtype, shape, path, name)
    except (TypeError, errors.HeaderError) as exc:
        # The checks a header gets, so that we never write a file we would refuse to read.
        raise errors.UnsupportedTensorError(getattr(exc, "detail", str(exc)), path=path, tensor=name) from None
    given = memoryview(raw.data).nbytes
    if nbytes != given:
        raise errors.UnsupportedTensorError(
            f"shape {list(shape)} of {dtype.name} needs {nbytes} bytes but {given} were given",
            path=path, tensor=name)
    return PreparedTensor(name, dtype, shape, nbytes, lambda: raw)


def check_name(name, path=None) -> None:
    if not isinstance(name, str):
        raise errors.InvalidNameError(f"tensor names must be strings, got {type(name).__name__} {name!r}",
                                      path=path)
    if name == METADATA_KEY:
        raise errors.InvalidNameError(f"{METADATA_KEY!r} is reserved for the header's metadata", path=path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.InvalidNameError(f"tensor name {name!r} is not valid UTF-8", path=path) from None


def check_metadata(metadata, path=None) -> Optional[dict[str, str]]:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise errors.InvalidMetadataError(
            f"metadata must be a dict of str to str, got {type(metadata).__name__}", path=path)
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise errors.InvalidMetadataError(
                f"metadata must map str to str; {key!r}: {value!r} is {type(key).__name__}: "
                f"{type(value).__name__} (convert values with str() or json.dumps())", path=path)
        try:
            (key + value).encode("utf-8")
        except UnicodeEncodeError:
            raise errors.InvalidMetadataError(f"metadata {key!r} is not valid UTF-8", path=path) from None
    return dict(metadata)


# --- bytes in logical order ---------------------------------------------------

def tensor_chunks(value: Union[np.ndarray, RawTensor]) -> Iterator[memoryview]:
    """The tensor's file bytes, as buffers to write one after another."""
    if isinstance(value, RawTensor):
        view = memoryview(value.data).cast("B") if not isinstance(value.data, np.ndarray) \
            else memoryview(np.ascontiguousarray(value.data).reshape(-1).view(np.uint8))
        if view.nbytes:
            yield view
        return
    if value.size == 0:
        return
    if dtype_for_numpy(value.dtype).name == "F4":
        yield memoryview(pack_f4(value))
        return
    little = value.dtype.newbyteorder("<") if value.dtype.byteorder == ">" else value.dtype
    if value.flags.c_contiguous and value.dtype == little:
        yield memoryview(value.reshape(-1).view(np.uint8))
        return
    for block in _logical_blocks(value):
        yield memoryview(np.ascontiguousarray(block, dtype=little).reshape(-1).view(np.uint8))


def _logical_blocks(array: np.ndarray) -> Iterator[np.ndarray]:
    """Consecutive pieces of `array` in C order, each at most about BLOCK_BYTES."""
    if array.ndim == 0:
        yield array
        return
    row_bytes = array.itemsize * math.prod(array.shape[1:])
    if row_bytes > BLOCK_BYTES and array.ndim > 1:
        for row in array:
            yield from _logical_blocks(row)
        return
    rows = max(1, BLOCK_BYTES // max(row_bytes, 1))
    for start in range(0, array.shape[0], rows):
        yield array[start:start + rows]


def pack_f4(values: np.ndarray) -> np.ndarray:
    """One float4_e2m1fn per byte -> two per byte, the first in the low nibble."""
    nibbles = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    if nibbles.size % 2:
        raise errors.UnsupportedTensorError(f"F4 packs two values per byte; {nibbles.size} values is odd")
    return (nibbles[0::2] & 0x0F) | ((nibbles[1::2] & 0x0F) << 4)
