"""The safetensors dtypes: their names, widths, write order and numpy types.

The table below is in the order of the Rust `Dtype` enum. Writers sort tensors
by that order *descending* (so wider types come first and every tensor is
naturally aligned), then by name.

Sub-byte types:
- ``F4`` (float4 e2m1) is packed two values per byte, the first value in the
  low nibble. numpy (through ``ml_dtypes.float4_e2m1fn``) holds one value per
  byte, so F4 is unpacked on read and packed on write.
- ``F6_E2M3`` / ``F6_E3M2`` have no packed numpy type; they are read as their
  raw bytes (``uint8``) and the dtype is reported in `TensorInfo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class DType:
    """One safetensors dtype."""

    name: str
    bits: int
    numpy: Optional[np.dtype]  # the numpy type of one element; None: raw bytes only
    rank: int  # position in the Rust enum

    @property
    def packed(self) -> bool:
        """True for sub-byte types stored several to a byte."""
        return self.bits < 8


def _table() -> dict[str, DType]:
    rows = [
        ("BOOL", 8, np.dtype(np.bool_)),
        ("F4", 4, np.dtype(ml_dtypes.float4_e2m1fn)),
        ("F6_E2M3", 6, None),
        ("F6_E3M2", 6, None),
        ("U8", 8, np.dtype(np.uint8)),
        ("I8", 8, np.dtype(np.int8)),
        ("F8_E5M2", 8, np.dtype(ml_dtypes.float8_e5m2)),
        ("F8_E4M3", 8, np.dtype(ml_dtypes.float8_e4m3fn)),
        ("F8_E8M0", 8, np.dtype(ml_dtypes.float8_e8m0fnu)),
        ("F8_E4M3FNUZ", 8, np.dtype(ml_dtypes.float8_e4m3fnuz)),
        ("F8_E5M2FNUZ", 8, np.dtype(ml_dtypes.float8_e5m2fnuz)),
        ("I16", 16, np.dtype("<i2")),
        ("U16", 16, np.dtype("<u2")),
        ("F16", 16, np.dtype("<f2")),
        ("BF16", 16, np.dtype(ml_dtypes.bfloat16)),
        ("I32", 32, np.dtype("<i4")),
        ("U32", 32, np.dtype("<u4")),
        ("F32", 32, np.dtype("<f4")),
        ("C64", 64, np.dtype("<c8")),
        ("F64", 64, np.dtype("<f8")),
        ("I64", 64, np.dtype("<i8")),
        ("U64", 64, np.dtype("<u8")),
    ]
    return {name: DType(name, bits, npd, rank) for rank, (name, bits, npd) in enumerate(rows)}


DTYPES: dict[str, DType] = _table()

# numpy type -> safetensors dtype, for writing. Byte order is normalised by the
# writer, so keys are the native/little-endian forms.
_BY_NUMPY: dict[np.dtype, DType] = {d.numpy: d for d in DTYPES.values() if d.numpy is not None}


def dtype_of(name: str) -> Optional[DType]:
    """The DType called `name` ("F32", "BF16", ...), or None if unknown."""
    return DTYPES.get(name)


def dtype_for_numpy(dtype: np.dtype) -> Optional[DType]:
    """The safetensors dtype for a numpy dtype (any byte order), or None."""
    return _BY_NUMPY.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)


def storage_dtype(dtype: DType) -> np.dtype:
    """The numpy type of the bytes as stored: packed and raw types are uint8."""
    if dtype.numpy is None or dtype.packed:
        return np.dtype(np.uint8)
    return dtype.numpy


def byte_size(dtype: DType, shape: tuple[int, ...]) -> Optional[int]:
    """Bytes taken by `shape` elements of `dtype`; None if bits are not a whole byte."""
    count = 1
    for dim in shape:
        count *= dim
    bits = count * dtype.bits
    if bits % 8:
        return None
    return bits // 8
