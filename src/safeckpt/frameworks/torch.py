"""torch <-> numpy, zero-copy both ways.

numpy cannot hold torch's bf16/fp8 natively, and torch cannot take ml_dtypes
arrays, so both directions reinterpret the bytes through a same-width integer
type (`Tensor.view(dtype)` / `ndarray.view(dtype)`): no copy, no float32 detour.
"""

from __future__ import annotations

import functools
import numpy as np

from .. import errors
from . import require
from ..format.dtypes import DTYPES, DType, dtype_for_numpy
from ..format.reader import to_logical
from ..format.writer import RawTensor, pack_f4


def _torch():
    return require("torch", "torch", "pip install 'safeckpt[torch]'")


@functools.cache
def tables():
    """(by safetensors name, by framework dtype), built on first use so the import stays lazy."""
    torch = _torch()
    # safetensors dtype -> (torch dtype, same-width integer used to carry the bytes or None)
    by_name = {
        "BOOL": (torch.bool, None), "U8": (torch.uint8, None), "I8": (torch.int8, None),
        "I16": (torch.int16, None), "U16": (torch.uint16, None), "F16": (torch.float16, None),
        "BF16": (torch.bfloat16, torch.int16), "I32": (torch.int32, None), "U32": (torch.uint32, None),
        "F32": (torch.float32, None), "C64": (torch.complex64, None), "F64": (torch.float64, None),
        "I64": (torch.int64, None), "U64": (torch.uint64, None),
    }
    for name, attr in (("F8_E5M2", "float8_e5m2"), ("F8_E4M3", "float8_e4m3fn"),
                       ("F8_E8M0", "float8_e8m0fnu"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                       ("F8_E5M2FNUZ", "float8_e5m2fnuz")):
        if hasattr(torch, attr):
            by_name[name] = (getattr(torch, attr), torch.uint8)
    by_torch = {torch_dtype: (name, carrier) for name, (torch_dtype, carrier) in by_name.items()}
    return by_name, by_torch


def is_tensor(value) -> bool:
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "data_ptr")


def to_numpy(tensor):
    """A torch tensor as numpy (ml_dtypes for bf16/fp8), sharing memory; F4 as RawTensor."""
    torch = _torch()
    if not isinstance(tensor, torch.Tensor):
        raise errors.UnsupportedTensorError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise errors.UnsupportedTensorError(
            f"sparse tensors ({tensor.layout}) cannot be saved; call .to_dense() first "
            "(the file may be much larger)")
    if tensor.device.type == "meta":
        raise errors.UnsupportedTensorError("meta tensors have no data to save; materialize them first")
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.is_conj():
        tensor = tensor.resolve_conj()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    f4 = getattr(torch, "float4_e2m1fn_x2", None)
    if f4 is not None and tensor.dtype == f4:
        shape = tuple(tensor.shape[:-1]) + (tensor.shape[-1] * 2,) if tensor.dim() else (2,)
        return RawTensor("F4", shape, tensor.contiguous().view(torch.uint8).numpy())
    entry = tables()[1].get(tensor.dtype)
    if entry is None:
        raise errors.UnsupportedTensorError(
            f"torch dtype {tensor.dtype} has no safetensors equivalent; cast it first "
            f"(e.g. .to(torch.float32))")
    name, carrier = entry
    if carrier is None:
        return tensor.numpy()
    return tensor.view(carrier).numpy().view(DTYPES[name].numpy)


def _to_device(tensor, device):
    if device is None or device == "cpu":
        return tensor
    if isinstance(device, int):
        device = f"cuda:{device}"
    return tensor.to(device)


def from_numpy(array: np.ndarray, device="cpu"):
    """A numpy array (ml_dtypes included) as a torch tensor sharing its memory."""
    torch = _torch()
    if any(stride < 0 for stride in array.strides):  # torch has no negative strides
        array = array.copy()
    dtype = dtype_for_numpy(array.dtype)
    if dtype is None:
        raise errors.DTypeConversionError(f"numpy dtype {array.dtype} has no torch equivalent here")
    if dtype.name == "F4":
        _check_f4_shape(array.shape)
        return from_storage(pack_f4(array), dtype, array.shape, device)
    torch_dtype, carrier = tables()[0].get(dtype.name, (None, None))
    if torch_dtype is None:
        raise errors.DTypeConversionError(f"this torch ({torch.__version__}) has no dtype for {dtype.name}")
    if carrier is None:
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        return _to_device(torch.from_numpy(array), device)
    raw = array.view(np.uint8 if carrier == torch.uint8 else np.int16)
    return _to_device(torch.from_numpy(raw).view(torch_dtype), device)


def _check_f4_shape(shape: tuple[int, ...]):
    """torch's float4_e2m1fn_x2, if it can hold F4 values of this shape (paired along the last axis)."""
    f4 = getattr(_torch(), "float4_e2m1fn_x2", None)
    if f4 is None or not shape or shape[-1] % 2:
        raise errors.DTypeConversionError(
            f"F4 tensor of shape {list(shape)} cannot become a torch float4_e2m1fn_x2 "
            "(needs torch >= 2.8 and an even last dimension); read it with framework='numpy'")
    return f4


def from_storage(storage: np.ndarray, dtype: DType, shape: tuple[int, ...], device="cpu"):
    """A tensor from its stored bytes; packed F4 becomes float4_e2m1fn_x2 without unpacking."""
    torch = _torch()
    if dtype.name == "F4":
        f4 = _check_f4_shape(shape)
        packed_shape = tuple(shape[:-1]) + (shape[-1] // 2,)
        return _to_device(torch.from_numpy(storage.view(np.uint8)).view(f4).reshape(packed_shape), device)
    if dtype.numpy is None:
        raise errors.DTypeConversionError(
            f"torch has no dtype for {dtype.name}; read it with framework='numpy' to get its raw bytes")
    return from_numpy(to_logical(storage, dtype, shape), device)
