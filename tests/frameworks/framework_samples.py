"""What the framework tests share: shapes, slices, and random bit patterns of every dtype."""

from __future__ import annotations

import numpy as np

from safeckpt.format.dtypes import DTYPES

SHAPES = [(), (0,), (3, 0, 2), (4, 6)]
SLICES = {(): (), (0,): np.s_[0:0], (3, 0, 2): np.s_[1:, :, ::2], (4, 6): np.s_[1:3, ::2]}


def sample(name: str, shape: tuple, seed: int = 0) -> np.ndarray:
    """Random bit patterns of a safetensors dtype (NaN payloads, infinities, -0 and all)."""
    dtype = DTYPES[name].numpy
    rng = np.random.default_rng(seed)
    count = int(np.prod(shape))
    if name == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if name == "F4":  # one value per byte, in the low nibble
        return rng.integers(0, 16, count, dtype=np.uint8).view(dtype).reshape(shape)
    return rng.integers(0, 256, count * dtype.itemsize, dtype=np.uint8).view(dtype).reshape(shape)


def assert_same_bytes(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same dtype, shape and bytes (so NaN payloads count)."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()
