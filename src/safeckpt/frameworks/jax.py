"""jax <-> numpy, zero-copy on the CPU where XLA allows.

jax speaks `ml_dtypes` natively (bf16, every fp8, fp4), so no dtype needs a
detour through another type.

- `to_numpy`: ``np.asarray(array)`` is a read-only view of the XLA buffer for
  an array on one CPU device. An array on an accelerator, or sharded over
  several devices, is copied (gathered) to the host: there is no host memory
  to share.
- `from_numpy`: ``jax.device_put(array, device)`` aliases the numpy buffer
  (and keeps it alive) when it is 64-byte aligned, which XLA's CPU client
  requires, and copies it otherwise. Tensors in a safetensors file are only
  8-byte aligned by the format, so some load zero-copy and the rest cost one
  copy. ``jnp.asarray`` always copies, so it is not used.
- 64-bit types: with ``jax_enable_x64`` off (jax's default) jax has no 64-bit
  dtypes, and ``jnp.asarray`` silently narrows them. We narrow only what is
  safe: I64/U64 become int32/uint32 when every value fits (a step counter,
  position ids) and raise `DTypeConversionError` otherwise; F64 becomes
  float32, with a warning if any value changes.
"""

from __future__ import annotations

import warnings

import numpy as np

from .. import errors
from . import require
from ..format.dtypes import DType, dtype_for_numpy
from ..format.reader import to_logical

_ENABLE_X64 = "jax.config.update('jax_enable_x64', True)"


def _jax():
    return require("jax", "jax", "pip install 'safeckpt[jax]'")


def is_tensor(value) -> bool:
    if type(value).__module__.split(".")[0] not in ("jax", "jaxlib"):
        return False  # not made by jax, so jax need not be imported to say so
    return isinstance(value, _jax().Array)


def to_numpy(array) -> np.ndarray:
    """A jax array as numpy (ml_dtypes for bf16/fp8/fp4), a view of its buffer on the CPU."""
    jax = _jax()
    if isinstance(array, jax.core.Tracer):
        raise errors.UnsupportedTensorError(
            "a traced value (inside jax.jit, grad or vmap) has no data yet; "
            "save the concrete arrays outside the transformation")
    if not isinstance(array, jax.Array):
        raise errors.UnsupportedTensorError(f"expected a jax.Array, got {type(array).__name__}")
    if jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):
        raise errors.UnsupportedTensorError(
            f"a typed PRNG key array ({array.dtype}) has no safetensors dtype; "
            "save jax.random.key_data(key) and rebuild it with jax.random.wrap_key_data")
    if array.is_deleted():
        raise errors.UnsupportedTensorError("the array was deleted (donated to a jitted call?)")
    if not array.is_fully_addressable:
        raise errors.UnsupportedTensorError(
            "the array is sharded across processes and this process holds only part of it; "
            "gather it first (jax.experimental.multihost_utils.process_allgather) or save "
            "each process's shards separately")
    if dtype_for_numpy(np.dtype(array.dtype)) is None:
        raise errors.UnsupportedTensorError(
            f"jax dtype {array.dtype} has no safetensors equivalent; cast it first "
            "(e.g. x.astype(jnp.float32))")
    return np.asarray(array)


def _narrow_for_x32(array: np.ndarray, dtype: DType) -> np.ndarray:
    """What jax can hold of a 64-bit array: itself with x64 enabled, else narrowed where safe."""
    narrow = np.dtype(_jax().dtypes.canonicalize_dtype(array.dtype))
    if narrow == array.dtype:
        return array
    if array.dtype.kind in "iu":
        info = np.iinfo(narrow)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise errors.DTypeConversionError(
                f"{dtype.name} values outside the {narrow} range cannot be held by jax with 64-bit "
                f"types disabled; call {_ENABLE_X64} before loading")
        return array.astype(narrow)
    narrowed = array.astype(narrow)
    if not np.array_equal(narrowed.astype(array.dtype), array, equal_nan=True):
        warnings.warn(f"{dtype.name} values were rounded to {narrow} because jax has 64-bit types "
                      f"disabled; call {_ENABLE_X64} before loading to keep them exact", stacklevel=2)
    return narrowed


def _device(device):
    """A jax Device (or Sharding) from safetensors-style names: "cpu", "gpu:1", "cuda", 0."""
    jax = _jax()
    if isinstance(device, (jax.Device, jax.sharding.Sharding)):
        return device
    if device is None:
        device = "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        platform, index = None, device
    elif isinstance(device, str):
        platform, _, index_text = device.lower().partition(":")
        if not index_text.isdigit() and index_text:
            raise errors.FrameworkError(f"cannot read a jax device from {device!r}; "
                                        "use e.g. 'cpu', 'gpu:0' or a jax.Device")
        index = int(index_text or 0)
    else:
        raise errors.FrameworkError(f"cannot read a jax device from {device!r}; "
                                    "use e.g. 'cpu', 'gpu:0' or a jax.Device")
    try:
        devices = jax.devices(platform)
    except RuntimeError as exc:
        raise errors.FrameworkError(f"jax has no {platform!r} devices here ({exc}); "
                                    f"available: {[str(d) for d in jax.devices()]}") from None
    if not 0 <= index < len(devices):
        raise errors.FrameworkError(f"device {device!r} is not available; jax sees {[str(d) for d in devices]}")
    return devices[index]


def from_numpy(array: np.ndarray, device="cpu"):
    """A numpy array (ml_dtypes included) as a jax array, aliasing it where XLA allows."""
    jax = _jax()
    dtype = dtype_for_numpy(array.dtype)
    if dtype is None:
        raise errors.DTypeConversionError(f"numpy dtype {array.dtype} has no jax equivalent here")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if array.dtype.itemsize == 8:
        array = _narrow_for_x32(array, dtype)
    return jax.device_put(array, _device(device))


def from_storage(storage: np.ndarray, dtype: DType, shape: tuple[int, ...], device="cpu"):
    """A jax array from a tensor's stored bytes (F4 is unpacked to jnp.float4_e2m1fn)."""
    if dtype.numpy is None:
        raise errors.DTypeConversionError(
            f"jax has no dtype for packed {dtype.name}; read it with framework='numpy' to get its raw bytes")
    return from_numpy(to_logical(storage, dtype, shape), device)
