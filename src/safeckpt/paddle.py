"""Drop-in for ``safetensors.paddle``: the same functions and signatures, paddle tensors in and out.

The framework is imported when a tensor is converted, not with this module.

>>> from safeckpt.paddle import save_file, load_file
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

from . import api
from .api import safe_open  # noqa: F401  (as in safetensors.paddle)
from .tensor_spec import TensorSpec, deserialize, serialize, serialize_file  # noqa: F401  (as in safetensors.paddle)


def save(tensors: Dict[str, Any], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """Serialize paddle tensors to safetensors bytes."""
    return api.save(tensors, metadata)


def save_file(tensors: Dict[str, Any], filename: Union[str, os.PathLike],
              metadata: Optional[Dict[str, str]] = None) -> None:
    """Save paddle tensors to a safetensors file, atomically."""
    api.save_file(tensors, filename, metadata)


def load(data: bytes, device: str = "cpu") -> Dict[str, Any]:
    """Load paddle tensors (paddle.Tensor) from safetensors bytes."""
    return api.load(data, framework="paddle", device=device)


def load_file(filename: Union[str, os.PathLike], device: Any = "cpu", *, backend: str = "mmap") -> Dict[str, Any]:
    """Load paddle tensors (paddle.Tensor) from a safetensors file."""
    return api.load_file(filename, framework="paddle", device=device, backend=backend)
