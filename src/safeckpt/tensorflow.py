"""Drop-in for ``safetensors.tensorflow``: the same functions and signatures, TensorFlow tensors in and out.

The framework is imported when a tensor is converted, not with this module.

>>> from safeckpt.tensorflow import save_file, load_file
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

from . import api
from .api import safe_open  # noqa: F401  (as in safetensors.tensorflow)


def save(tensors: Dict[str, Any], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """Serialize TensorFlow tensors to safetensors bytes."""
    return api.save(tensors, metadata)


def save_file(tensors: Dict[str, Any], filename: Union[str, os.PathLike],
              metadata: Optional[Dict[str, str]] = None) -> None:
    """Save TensorFlow tensors to a safetensors file, atomically."""
    api.save_file(tensors, filename, metadata)


def load(data: bytes) -> Dict[str, Any]:
    """Load TensorFlow tensors (tf.Tensor) from safetensors bytes."""
    return api.load(data, framework="tf")


def load_file(filename: Union[str, os.PathLike], *, backend: str = "mmap") -> Dict[str, Any]:
    """Load TensorFlow tensors (tf.Tensor) from a safetensors file."""
    return api.load_file(filename, framework="tf", backend=backend)
