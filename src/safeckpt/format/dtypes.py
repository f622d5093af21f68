"""The safetensors dtypes: their names, widths, write order and numpy types.

The table below is in the order of the Rust `Dtype` enum. Writers sort tensors
by that order *descending* (so wider types come first and every tensor is
naturally aligned), then by name.

Sub-byte types:
- ``F4`` (float4 e2m1) is packed two values per byte, the first value in the
  low nibble. numpy (through ``ml_dtypes.float4_e2m1fn``) holds one value per
  byte, so F4 is unpacked on read and packed on write.
- ``F6_E2M3`` / ``F6_E3M2`` have no packed numpy type; they are read as their
  raw bytes (``uint8``) and the dtype is reported in the header entry (`HeaderEntry`).

``ml_dtypes`` takes a second or more to import, so it is imported the first
time one of its types is asked for (`DType.numpy` of BF16, F8_*, F4), never
for reading a header or a float32 tensor. An array of one of its types cannot
exist before it is imported, which is what `dtype_for_numpy` relies on.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class DType:
    """One safetensors dtype."""

    name: str
    bits: int
    # the numpy type of one element: a numpy type code ("<f4") or an ml_dtypes name ("ml_dtypes.bfloat16");
    # None: raw bytes only
    numpy_type: Optional[str] = field(repr=False)
    rank: int  # position in the Rust enum

    @functools.cached_property
    def numpy(self) -> Optional[np.dtype]:
        """The numpy type of one element (from ml_dtypes for bf16, fp8, fp4); None: raw bytes only."""
        if self.numpy_type is None:
            return None
        if self.numpy_type.startswith("ml_dtypes."):
            import ml_dtypes
            return np.dtype(getattr(ml_dtypes, self.numpy_type[len("ml_dtypes."):]))
        return np.dtype(self.numpy_type)

    @property
    def packed(self) -> bool:
        """True for sub-byte types stored several to a byte."""
        return self.bits < 8


def _table() -> dict[str, DType]:
    rows = [
        ("BOOL", 8, "?"),
        ("F4", 4, "ml_dtypes.float4_e2m1fn"),
        ("F6_E2M3", 6, None),
        ("F6_E3M2", 6, None),
        ("U8", 8, "u1"),
        ("I8", 8, "i1"),
        ("F8_E5M2", 8, "ml_dtypes.float8_e5m2"),
        ("F8_E4M3", 8, "ml_dtypes.float8_e4m3fn"),
        ("F8_E8M0", 8, "ml_dtypes.float8_e8m0fnu"),
        ("F8_E4M3FNUZ", 8, "ml_dtypes.float8_e4m3fnuz"),
        ("F8_E5M2FNUZ", 8, "ml_dtypes.float8_e5m2fnuz"),
        ("I16", 16, "<i2"),
        ("U16", 16, "<u2"),
        ("F16", 16, "<f2"),
        ("BF16", 16, "ml_dtypes.bfloat16"),
        ("I32", 32, "<i4"),
        ("U32", 32, "<u4"),
        ("F32", 32, "<f4"),
        ("C64", 64, "<c8"),
        ("F64", 64, "<f8"),
        ("I64", 64, "<i8"),
        ("U64", 64, "<u8"),
    ]
    return {name: DType(name, bits, npd, rank) for rank, (name, bits, npd) in enumerate(rows)}


DTYPES: dict[str, DType] = _table()

# numpy type -> safetensors dtype, for writing. Byte order is normalised by the
# writer, so keys are the native/little-endian forms. ml_dtypes' types join once it is imported.
_BY_NUMPY: dict[np.dtype, DType] = {d.numpy: d for d in DTYPES.values()
                                    if d.numpy_type is not None and not d.numpy_type.startswith("ml_dtypes.")}


def dtype_of(name: str) -> Optional[DType]:
    """The DType called `name` ("F32", "BF16", ...), or None if unknown."""
    return DTYPES.get(name)


def dtype_for_numpy(dtype: np.dtype) -> Optional[DType]:
    """The safetensors dtype for a numpy dtype (any byte order), or None."""
    key = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
    found = _BY_NUMPY.get(key)
    if found is None and "ml_dtypes" in sys.modules and len(_BY_NUMPY) < len(DTYPES) - 2:
        _BY_NUMPY.update({d.numpy: d for d in DTYPES.values() if d.numpy is not None})
        found = _BY_NUMPY.get(key)
    return found


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
