"""Drop-in for ``safetensors.numpy``: the same functions and signatures, zero-copy loads.

>>> from safeckpt.numpy import save_file, load_file
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Union

import numpy as np

from . import api
from .api import safe_open  # noqa: F401  (as in safetensors.numpy)
from .tensor_spec import TensorSpec, deserialize, serialize, serialize_file  # noqa: F401  (as in safetensors.numpy)


def save(tensor_dict: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """Serialize numpy arrays to safetensors bytes (any strides, written in logical order)."""
    return api.save(tensor_dict, metadata)


def save_file(tensor_dict: Dict[str, np.ndarray], filename: Union[str, os.PathLike],
              metadata: Optional[Dict[str, str]] = None) -> None:
    """Save numpy arrays to a safetensors file, atomically."""
    api.save_file(tensor_dict, filename, metadata)


def load(data: bytes) -> Dict[str, np.ndarray]:
    """Load numpy arrays from safetensors bytes."""
    return api.load(data, framework="numpy")


def load_file(filename: Union[str, os.PathLike], *, backend: str = "mmap") -> Dict[str, np.ndarray]:
    """Load numpy arrays from a safetensors file: zero-copy, writable, private views of the file."""
    return api.load_file(filename, framework="numpy", backend=backend)
