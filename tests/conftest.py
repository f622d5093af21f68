"""Shared fixtures: files are made with the real libraries or byte by byte (helpers in tests/files.py)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
import pytest

from tests.files import safetensors_bytes


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


# --- hostile checkpoints made by the real libraries ----------------------------------------

@pytest.fixture
def expanded(tmp_path: Path) -> Path:
    """torch.save of a 4-byte storage expanded by stride 0 to 2**40 elements (the file is 2 KB)."""
    torch = pytest.importorskip("torch")
    path = tmp_path / "expanded.pt"
    torch.save({"w": torch.zeros(1).expand(2**40), "b": torch.ones(3)}, path)
    return path


@pytest.fixture(params=["pickle", "torch"])
def big_int_file(request, tmp_path: Path) -> Path:
    """A plain pickle and a torch checkpoint whose structure holds 10**5000 (as a value and a key),
    past Python's int-to-text limit."""
    state = {"n": 10**5000, "k": {10**5000: 1, 2**70: 2}}
    if request.param == "pickle":
        path = tmp_path / "big.pkl"
        path.write_bytes(pickle.dumps({"w": np.zeros(2, np.float32), **state}))
    else:
        torch = pytest.importorskip("torch")
        path = tmp_path / "big.pt"
        torch.save({"w": torch.zeros(2), **state}, path)
    return path
