"""paddle <-> numpy, zero-copy both ways through DLPack.

``Tensor.numpy()`` and ``paddle.to_tensor`` copy; DLPack shares. Neither
numpy nor paddle's DLPack carries bf16 or fp8, so those cross as a same-width
integer (int16 for bf16, uint8 for fp8: the types paddle's ``view(dtype)``
kernel takes) and are reinterpreted on the other side (``Tensor.view(dtype)``
/ ``ndarray.view(dtype)``): no copy, no float32 detour.

- `to_numpy`: ``np.from_dlpack`` of the detached CPU tensor (or of its integer
  view) -- strided tensors included, which numpy sees with their strides and
  the writer writes in logical order. Tensors on a GPU are copied to the host
  first. Needs paddle >= 3.0 (DLPack export, ``view(dtype)``).
- `from_numpy`: ``paddle.utils.dlpack.from_dlpack`` of the array. Paddle
  tensors can be modified in place, so a read-only array is copied first;
  arrays loaded with mmap are writable private maps, so writes to the tensor
  never reach the file.

Paddle quirks: ``paddle.to_tensor`` turns a numpy uint16 array into
``paddle.bfloat16`` (paddle's historical bf16 carrier), and ``str(paddle.uint16)``
reads "paddle.bfloat16"; DLPack keeps uint16 as ``paddle.uint16``, and dtypes
are compared, never their names.
"""

from __future__ import annotations

import functools
import numpy as np

from .. import errors
from . import require
from ..format.dtypes import DTYPES, DType, dtype_for_numpy
from ..format.reader import to_logical


def _paddle():
    return require("paddle", "paddle", "pip install 'safeckpt[paddle]'")


@functools.cache
def tables():
    """(by safetensors name, by framework dtype), built on first use so the import stays lazy."""
    paddle = _paddle()
    # safetensors dtype -> (paddle dtype, same-width integer that carries it through DLPack, or None)
    by_name = {
        "BOOL": (paddle.bool, None), "U8": (paddle.uint8, None), "I8": (paddle.int8, None),
        "I16": (paddle.int16, None), "F16": (paddle.float16, None), "BF16": (paddle.bfloat16, paddle.int16),
        "I32": (paddle.int32, None), "F32": (paddle.float32, None), "C64": (paddle.complex64, None),
        "F64": (paddle.float64, None), "I64": (paddle.int64, None),
    }
    for name, attr, carrier in (("U16", "uint16", None), ("U32", "uint32", None), ("U64", "uint64", None),
                                ("F8_E4M3", "float8_e4m3fn", "uint8"), ("F8_E5M2", "float8_e5m2", "uint8")):
        if hasattr(paddle, attr):
            by_name[name] = (getattr(paddle, attr), getattr(paddle, carrier) if carrier else None)
    by_paddle = {paddle_dtype: name for name, (paddle_dtype, _) in by_name.items()}
    return by_name, by_paddle


def is_tensor(value) -> bool:
    if type(value).__module__.split(".")[0] != "paddle":
        return False  # not made by paddle, so paddle need not be imported to say so
    return isinstance(value, _paddle().Tensor)


def to_numpy(tensor) -> np.ndarray:
    """A paddle tensor as numpy (ml_dtypes for bf16/fp8), sharing its memory on the CPU."""
    paddle = _paddle()
    if not isinstance(tensor, paddle.Tensor):
        raise errors.UnsupportedTensorError(f"expected a paddle.Tensor, got {type(tensor).__name__}")
    name = tables()[1].get(tensor.dtype)
    if name is None:
        raise errors.UnsupportedTensorError(
            f"paddle dtype {tensor.dtype} has no safetensors equivalent; cast it first "
            "(e.g. x.astype('float32'))")
    tensor = tensor.detach()  # DLPack refuses tensors that require gradients; detach shares memory
    if not tensor.place.is_cpu_place():
        tensor = tensor.cpu()
    numpy_dtype = DTYPES[name].numpy
    if 0 in tensor.shape:  # nothing to share, and its data pointer may be null
        return np.empty(tuple(tensor.shape), dtype=numpy_dtype)
    carrier = tables()[0][name][1]
    if carrier is not None:
        return np.from_dlpack(tensor.view(carrier)).view(numpy_dtype)
    return np.from_dlpack(tensor)


def _to_device(tensor, device):
    paddle = _paddle()
    if device is None or device == "cpu" or isinstance(device, paddle.CPUPlace):
        return tensor
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"gpu:{device}"
    if isinstance(device, str):
        device = device.replace("cuda", "gpu")
    try:
        return tensor.to(device)
    except (ValueError, RuntimeError) as exc:
        raise errors.FrameworkError(f"cannot place a paddle tensor on {device!r}: {exc}") from None


def from_numpy(array: np.ndarray, device="cpu"):
    """A numpy array (ml_dtypes included) as a paddle tensor sharing its memory."""
    paddle = _paddle()
    dtype = dtype_for_numpy(array.dtype)
    entry = tables()[0].get(dtype.name) if dtype is not None else None
    if entry is None:
        name = dtype.name if dtype is not None else array.dtype
        raise errors.DTypeConversionError(
            f"paddle ({paddle.__version__}) has no dtype for {name}; read it with framework='numpy'")
    paddle_dtype, carrier = entry
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if not (array.flags.c_contiguous and array.flags.writeable):
        array = array.copy(order="C")
    if carrier is not None:
        array = array.view(np.int16 if carrier == paddle.int16 else np.uint8)
    tensor = paddle.utils.dlpack.from_dlpack(array)
    if tensor.dtype != paddle_dtype:
        tensor = tensor.view(paddle_dtype)
    return _to_device(tensor, device)


def from_storage(storage: np.ndarray, dtype: DType, shape: tuple[int, ...], device="cpu"):
    """A paddle tensor from a tensor's stored bytes."""
    if dtype.name not in tables()[0]:
        raise errors.DTypeConversionError(
            f"paddle has no dtype for {dtype.name}; read it with framework='numpy'")
    return from_numpy(to_logical(storage, dtype, shape), device)
