"""numpy: arrays are already what the format speaks."""

from __future__ import annotations

import numpy as np

from .. import errors
from ..format.dtypes import DType
from ..format.reader import to_logical
from ..format.writer import RawTensor


def is_tensor(value) -> bool:
    return isinstance(value, (np.ndarray, np.generic))


def to_numpy(value):
    if isinstance(value, RawTensor):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value)
    raise errors.UnsupportedTensorError(
        f"expected a numpy array or a framework tensor, got {type(value).__module__}.{type(value).__name__}")


def check_device(device) -> None:
    if device not in ("cpu", None):
        raise errors.FrameworkError(f"numpy arrays live on the CPU; device {device!r} is not available")


def from_numpy(array: np.ndarray, device="cpu") -> np.ndarray:
    check_device(device)
    return array


def from_storage(storage: np.ndarray, dtype: DType, shape: tuple[int, ...], device="cpu") -> np.ndarray:
    check_device(device)
    return to_logical(storage, dtype, shape)
