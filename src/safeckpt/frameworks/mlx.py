"""mlx <-> numpy.

- `to_numpy`: ``np.asarray(array)`` goes through the buffer protocol, which
  evaluates the (lazy) array and shares its memory, strides included: a
  transposed array is a strided view that the writer writes in logical
  order. bf16 has no buffer-protocol format, so it crosses as uint16 through
  ``mx.view`` and is reinterpreted as ``ml_dtypes.bfloat16``: no float32 detour.
- `from_numpy`: ``mx.array(array, dtype=...)`` copies. That copy is
  unavoidable here: mlx allocates every array itself, and ``mx.from_dlpack``
  also copies on this platform (and is 3x slower). The dtype is passed
  explicitly because mlx otherwise turns float64 into float32. bf16 is carried
  as uint16 and re-viewed, so every bit (NaN payloads included) survives.

mlx has no fp8 or fp4 dtypes: such tensors raise `DTypeConversionError` (read
them with framework="numpy"). mlx arrays have no device of their own (memory
is unified; the device picks where ops run), so `device` is only checked.
"""

from __future__ import annotations

import functools
import numpy as np

from .. import errors
from . import require
from ..format.dtypes import DTYPES, DType, dtype_for_numpy
from ..format.reader import to_logical


def _mx():
    return require("mlx.core", "mlx", "pip install 'safeckpt[mlx]'; on Linux: pip install 'mlx[cpu]'")


@functools.cache
def tables():
    """(by safetensors name, by framework dtype), built on first use so the import stays lazy."""
    mx = _mx()
    # safetensors dtype -> (mlx dtype, same-width integer that carries it through numpy, or None)
    by_name = {
        "BOOL": (mx.bool_, None), "U8": (mx.uint8, None), "I8": (mx.int8, None),
        "I16": (mx.int16, None), "U16": (mx.uint16, None), "F16": (mx.float16, None),
        "BF16": (mx.bfloat16, mx.uint16), "I32": (mx.int32, None), "U32": (mx.uint32, None),
        "F32": (mx.float32, None), "C64": (mx.complex64, None), "I64": (mx.int64, None),
        "U64": (mx.uint64, None),
    }
    if hasattr(mx, "float64"):
        by_name["F64"] = (mx.float64, None)
    by_mx = {mx_dtype: name for name, (mx_dtype, _) in by_name.items()}
    return by_name, by_mx


def is_tensor(value) -> bool:
    if type(value).__module__.split(".")[0] != "mlx":
        return False  # not made by mlx, so mlx need not be imported to say so
    return isinstance(value, _mx().array)


def to_numpy(array) -> np.ndarray:
    """An mlx array as numpy (ml_dtypes for bf16), sharing its memory."""
    mx = _mx()
    if not isinstance(array, mx.array):
        raise errors.UnsupportedTensorError(f"expected an mlx.core.array, got {type(array).__name__}")
    name = tables()[1].get(array.dtype)
    if name is None:
        raise errors.UnsupportedTensorError(
            f"mlx dtype {array.dtype} has no safetensors equivalent; cast it first "
            "(e.g. x.astype(mx.float32))")
    carrier = tables()[0][name][1]
    if carrier is not None:
        return np.asarray(mx.view(array, carrier)).view(DTYPES[name].numpy)
    return np.asarray(array)


def check_device(device) -> None:
    """mlx arrays live in unified memory; only say no to a device mlx cannot run on."""
    mx = _mx()
    if device is None or isinstance(device, (mx.Device, mx.DeviceType)):
        return
    kind = device.split(":")[0].lower() if isinstance(device, str) else None
    if kind == "cpu":
        return
    if kind in ("gpu", "metal", "cuda") and mx.is_available(mx.gpu):
        return
    raise errors.FrameworkError(f"mlx cannot use device {device!r} here; use 'cpu'"
                                + (" or 'gpu'" if mx.is_available(mx.gpu) else ""))


def from_numpy(array: np.ndarray, device="cpu"):
    """A numpy array (ml_dtypes bf16 included) as an mlx array (a copy: mlx owns its memory)."""
    mx = _mx()
    check_device(device)
    dtype = dtype_for_numpy(array.dtype)
    entry = tables()[0].get(dtype.name) if dtype is not None else None
    if entry is None:
        name = dtype.name if dtype is not None else array.dtype
        raise errors.DTypeConversionError(
            f"mlx ({mx.__version__}) has no dtype for {name}; read it with framework='numpy'")
    mx_dtype, carrier = entry
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if carrier is not None:
        return mx.view(mx.array(array.view(np.uint16), dtype=carrier), mx_dtype)
    return mx.array(array, dtype=mx_dtype)


def from_storage(storage: np.ndarray, dtype: DType, shape: tuple[int, ...], device="cpu"):
    """An mlx array from a tensor's stored bytes."""
    if dtype.name not in tables()[0]:
        raise errors.DTypeConversionError(
            f"mlx has no dtype for {dtype.name}; read it with framework='numpy'")
    return from_numpy(to_logical(storage, dtype, shape), device)
