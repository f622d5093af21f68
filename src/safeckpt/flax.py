"""Drop-in for ``safetensors.flax``: the same functions and signatures, jax arrays in and out.

The framework is imported when a tensor is converted, not with this module.

>>> from safeckpt.flax import save_file, load_file
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

from . import api
from .api import safe_open  # noqa: F401  (as in safetensors.flax)


def save(tensors: Dict[str, Any], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """Serialize jax arrays to safetensors bytes."""
    return api.save(tensors, metadata)


def save_file(tensors: Dict[str, Any], filename: Union[str, os.PathLike],
              metadata: Optional[Dict[str, str]] = None) -> None:
    """Save jax arrays to a safetensors file, atomically."""
    api.save_file(tensors, filename, metadata)


def load(data: bytes) -> Dict[str, Any]:
    """Load jax arrays (jax.Array) from safetensors bytes."""
    return api.load(data, framework="flax")


def load_file(filename: Union[str, os.PathLike], *, backend: str = "mmap") -> Dict[str, Any]:
    """Load jax arrays (jax.Array) from a safetensors file."""
    return api.load_file(filename, framework="flax", backend=backend)
