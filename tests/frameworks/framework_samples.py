"""What the framework tests share: shapes, slices, random bit patterns of every dtype, and checks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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


def fits(name: str, shape: tuple) -> bool:
    """Whether a safetensors file can hold the tensor: F4 packs two values per byte, so not an odd count."""
    return name != "F4" or int(np.prod(shape)) % 2 == 0


def aligned_array(nbytes: int, dtype, misalign: int = 0) -> np.ndarray:
    """A buffer whose address is `misalign` bytes past a multiple of 64."""
    buffer = np.zeros(nbytes + 128, np.uint8)
    start = (-buffer.ctypes.data) % 64 + misalign
    return buffer[start:start + nbytes].view(dtype)


def assert_same_bytes(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same dtype, shape and bytes (so NaN payloads count)."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()


def run_python(code: str, **env) -> str:
    """Run `code` (dedented) in a fresh interpreter with `env` added; its stdout. The timeout only stops a hang."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout
