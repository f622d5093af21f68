"""tensorflow <-> numpy, zero-copy through DLPack where TensorFlow allows.

``Tensor.numpy()`` and ``tf.convert_to_tensor`` both copy (0.6 s and 1.5 s for
256 MB here), so buffers cross by DLPack instead, which shares them:

- `to_numpy`: ``np.from_dlpack`` of the tensor gives a read-only view of its
  CPU buffer. bf16, which DLPack-to-numpy cannot carry, crosses as uint16
  through ``tf.bitcast`` (which shares the buffer) and is reinterpreted as
  ``ml_dtypes.bfloat16``. fp8 and fp4 are copied with ``.numpy()``:
  TensorFlow refuses them both in DLPack and in ``tf.bitcast``.
- `from_numpy`: ``tf.experimental.dlpack.from_dlpack`` aliases the numpy
  buffer (keeping it alive) -- but only when it is 64-byte aligned. TensorFlow
  assumes its buffers are aligned to Eigen's maximum (64 bytes) and aborts the
  whole process (``Check failed: IsAligned()``) on the first op over one that
  is not, so anything less aligned is copied with ``tf.convert_to_tensor``,
  whose copy is aligned. safetensors only guarantees 8-byte alignment, so some
  tensors of a file load zero-copy and the rest cost one copy.

Keras variables (of any backend) are unwrapped to their backend's tensor.
"""

from __future__ import annotations

import functools
import numpy as np

from .. import errors
from . import require
from ..format.dtypes import DTYPES, DType, dtype_for_numpy
from ..format.reader import to_logical

# Eigen's largest alignment; TensorFlow's CPU allocator aligns every buffer to it.
TF_ALIGNMENT = 64


def _tf():
    return require("tensorflow", "tensorflow", "pip install 'safeckpt[tensorflow]'")


@functools.cache
def tables():
    """(by safetensors name, by framework dtype), built on first use so the import stays lazy."""
    tf = _tf()
    # safetensors dtype -> (tf dtype, how bytes cross: "dlpack", "bitcast" (bf16 as uint16), "copy")
    by_name = {
        "BOOL": (tf.bool, "dlpack"), "U8": (tf.uint8, "dlpack"), "I8": (tf.int8, "dlpack"),
        "I16": (tf.int16, "dlpack"), "U16": (tf.uint16, "dlpack"), "F16": (tf.float16, "dlpack"),
        "BF16": (tf.bfloat16, "bitcast"), "I32": (tf.int32, "dlpack"), "U32": (tf.uint32, "dlpack"),
        "F32": (tf.float32, "dlpack"), "C64": (tf.complex64, "dlpack"), "F64": (tf.float64, "dlpack"),
        "I64": (tf.int64, "dlpack"), "U64": (tf.uint64, "dlpack"),
    }
    experimental = getattr(tf.dtypes, "experimental", None)
    for name, attr in (("F8_E5M2", "float8_e5m2"), ("F8_E4M3", "float8_e4m3fn"),
                       ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
                       ("F4", "float4_e2m1fn")):
        if hasattr(experimental, attr):
            by_name[name] = (getattr(experimental, attr), "copy")
    by_tf = {tf_dtype: name for name, (tf_dtype, _) in by_name.items()}
    return by_name, by_tf


def is_tensor(value) -> bool:
    package = type(value).__module__.split(".")[0]
    if package == "keras":
        return hasattr(value, "value") and is_tensor(value.value)
    if package != "tensorflow":
        return False  # not made by tensorflow, so it need not be imported to say so
    tf = _tf()
    return isinstance(value, (tf.Tensor, tf.Variable))


class _Capsule:
    """A DLPack capsule dressed as an exporter, for `np.from_dlpack`."""

    def __init__(self, capsule) -> None:
        self.capsule = capsule

    def __dlpack__(self, **kwargs):
        return self.capsule

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU


def _shared_numpy(tensor) -> np.ndarray:
    """A CPU tensor of a DLPack-able dtype as a read-only numpy view of its buffer."""
    tf = _tf()
    return np.from_dlpack(_Capsule(tf.experimental.dlpack.to_dlpack(tensor)))


def to_numpy(value):
    """A tf.Tensor / tf.Variable (or Keras variable) as numpy, sharing its buffer where it can."""
    if type(value).__module__.split(".")[0] == "keras":
        return _keras_to_numpy(value)
    tf = _tf()
    if isinstance(value, (tf.SparseTensor, tf.RaggedTensor)):
        dense = "tf.sparse.to_dense(x)" if isinstance(value, tf.SparseTensor) else "x.to_tensor()"
        raise errors.UnsupportedTensorError(
            f"{type(value).__name__} cannot be saved; make it dense first ({dense})")
    if isinstance(value, tf.Variable):
        value = tf.convert_to_tensor(value)
    if not isinstance(value, tf.Tensor):
        raise errors.UnsupportedTensorError(f"expected a tf.Tensor, got {type(value).__name__}")
    if tf.is_symbolic_tensor(value):
        raise errors.UnsupportedTensorError(
            "a symbolic tensor (inside tf.function) has no data yet; save the eager tensors outside it")
    name = tables()[1].get(value.dtype)
    if name is None:
        raise errors.UnsupportedTensorError(
            f"tensorflow dtype {value.dtype.name} has no safetensors equivalent; cast it first "
            "(e.g. tf.cast(x, tf.float32))")
    if "CPU" not in value.device.upper():
        with tf.device("/CPU:0"):
            value = tf.identity(value)  # the bytes must be in host memory to be written
    how = tables()[0][name][1]
    if how == "copy" or value.shape.num_elements() == 0:
        return value.numpy()
    if how == "bitcast":
        return _shared_numpy(tf.bitcast(value, tf.uint16)).view(DTYPES[name].numpy)
    return _shared_numpy(value)


def _keras_to_numpy(value):
    inner = getattr(value, "value", None)
    if inner is None or type(inner).__module__.split(".")[0] == "keras":
        raise errors.UnsupportedTensorError(
            f"a Keras {type(value).__name__} without concrete data cannot be saved; "
            "save the model's variables (model.weights) after it is built")
    from . import adapter_for
    return adapter_for(inner).to_numpy(inner)


def _device_name(device) -> str:
    """A TensorFlow device name from safetensors-style names: "cpu", "gpu:1", "cuda", 0."""
    if device is None:
        return "/CPU:0"
    if isinstance(device, int) and not isinstance(device, bool):
        return f"/GPU:{device}"
    if not isinstance(device, str):
        raise errors.FrameworkError(f"cannot read a tensorflow device from {device!r}; use e.g. 'cpu' or 'gpu:0'")
    text = device.strip()
    if text.startswith("/"):
        return text
    kind, _, index = text.partition(":")
    kind = {"cpu": "CPU", "gpu": "GPU", "cuda": "GPU", "tpu": "TPU"}.get(kind.lower(), kind.upper())
    return f"/{kind}:{index or 0}"


def _place(tensor, device):
    """The tensor on `device`; CPU tensors stay where they are."""
    tf = _tf()
    name = _device_name(device)
    wanted = tf.DeviceSpec.from_string(name)
    if (wanted.device_type or "CPU").upper() == "CPU" and (wanted.device_index or 0) == 0:
        return tensor
    known = [tf.DeviceSpec.from_string(d.name) for d in tf.config.list_logical_devices()]
    if not any(d.device_type == wanted.device_type and d.device_index == (wanted.device_index or 0)
               for d in known):
        raise errors.FrameworkError(
            f"device {device!r} is not available; tensorflow sees "
            f"{[d.name for d in tf.config.list_logical_devices()]}")
    with tf.device(name):
        return tf.identity(tensor)


def _aligned(array: np.ndarray) -> bool:
    return array.ctypes.data % TF_ALIGNMENT == 0


def from_numpy(array: np.ndarray, device="cpu"):
    """A numpy array (ml_dtypes included) as a tf.Tensor, aliasing it when TensorFlow can."""
    tf = _tf()
    dtype = dtype_for_numpy(array.dtype)
    entry = tables()[0].get(dtype.name) if dtype is not None else None
    if entry is None:
        name = dtype.name if dtype is not None else array.dtype
        raise errors.DTypeConversionError(
            f"tensorflow ({tf.__version__}) has no dtype for {name}; read it with framework='numpy'")
    tf_dtype, how = entry
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    carrier = array.view(np.uint16) if how == "bitcast" else array
    if (how != "copy" and carrier.size and carrier.flags.c_contiguous and carrier.flags.writeable
            and _aligned(carrier)):
        tensor = tf.experimental.dlpack.from_dlpack(carrier.__dlpack__())
    else:
        tensor = tf.convert_to_tensor(carrier)  # a copy, which TensorFlow aligns
    if how == "bitcast":
        tensor = tf.bitcast(tensor, tf_dtype)
    return _place(tensor, device)


def from_storage(storage: np.ndarray, dtype: DType, shape: tuple[int, ...], device="cpu"):
    """A tf.Tensor from a tensor's stored bytes (F4 is unpacked to float4_e2m1fn)."""
    if dtype.name not in tables()[0]:
        raise errors.DTypeConversionError(
            f"tensorflow has no dtype for {dtype.name}; read it with framework='numpy'")
    return from_numpy(to_logical(storage, dtype, shape), device)
