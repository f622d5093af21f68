"""Shared fixtures: files are made with the real libraries or byte by byte."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Union

import ml_dtypes
import numpy as np
import pytest


def safetensors_bytes(header: Union[str, bytes, dict], data: bytes = b"") -> bytes:
    """A file made byte by byte: 8-byte length, header (dict -> compact JSON), data."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode("utf-8")
    return struct.pack("<Q", len(header)) + header + data


@pytest.fixture
def raw_file(tmp_path: Path) -> Callable[..., Path]:
    """raw_file(header, data=b"", name="x.safetensors") -> path of a hand-made file."""
    counter = iter(range(10**6))

    def make(header, data: bytes = b"", name: str | None = None) -> Path:
        path = tmp_path / (name or f"raw{next(counter)}.safetensors")
        path.write_bytes(safetensors_bytes(header, data))
        return path

    return make


@pytest.fixture
def model_like() -> dict:
    """A small model-like state dict in numpy: mixed shapes and dtypes, a scalar, an empty tensor."""
    rng = np.random.default_rng(0)
    return {
        "embed.weight": rng.standard_normal((64, 16)).astype(np.float32),
        "layers.0.attn.q.weight": rng.standard_normal((16, 16)).astype(ml_dtypes.bfloat16),
        "layers.0.attn.q.bias": rng.standard_normal(16).astype(np.float16),
        "layers.0.norm.scale": np.ones(16, dtype=np.float64),
        "layers.0.step": np.array(7, dtype=np.int64),
        "layers.0.mask": rng.integers(0, 2, 16).astype(bool),
        "layers.0.ids": np.arange(10, dtype=np.int32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
