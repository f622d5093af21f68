"""Framework adapters: translate between framework tensors and numpy buffers.

Each adapter module (numpy, torch, jax, tensorflow, paddle, mlx) provides:

- ``is_tensor(value) -> bool``
- ``to_numpy(value) -> np.ndarray | RawTensor``: zero-copy where the framework allows;
  bf16/fp8 become ``ml_dtypes`` arrays without a float32 detour.
- ``from_numpy(array, device) -> tensor``: zero-copy where the framework allows.
- ``from_storage(storage, dtype, shape, device) -> tensor``: from a tensor's stored
  bytes (packed F4 maps straight onto packed framework types).

Adapters import their framework lazily: importing safeckpt never imports torch.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .. import errors

ALIASES = {
    "np": "numpy", "numpy": "numpy",
    "pt": "torch", "torch": "torch", "pytorch": "torch",
    "tf": "tensorflow", "tensorflow": "tensorflow",
    "jax": "jax", "flax": "jax",
    "mlx": "mlx",
    "paddle": "paddle",
}

# Top-level package of a tensor's type -> adapter name, so detection imports nothing.
_TYPE_PACKAGES = {"numpy": "numpy", "torch": "torch", "jax": "jax", "jaxlib": "jax",
                  "tensorflow": "tensorflow", "keras": "tensorflow", "paddle": "paddle", "mlx": "mlx"}


def get(framework: str) -> ModuleType:
    """The adapter for a framework name, accepting every name safetensors accepts."""
    name = ALIASES.get(str(framework).lower()) if isinstance(framework, str) else None
    if name is None:
        raise errors.FrameworkError(
            f"unknown framework {framework!r}; use one of {', '.join(sorted(ALIASES))}")
    adapter = _loaded.get(name)
    if adapter is None:
        adapter = _loaded[name] = importlib.import_module(f"{__name__}.{name}")
    return adapter


# Adapters imported so far: `get` runs once per tensor saved, and import_module is slow to find one.
_loaded: dict[str, ModuleType] = {}


def require(module: str, framework: str, install: str) -> ModuleType:
    """Import a framework on first use, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise errors.FrameworkError(
            f"framework {framework!r} requested but it is not installed ({install})") from None


def adapter_for(value) -> ModuleType:
    """The adapter whose framework made `value`, found without importing anything."""
    package = type(value).__module__.split(".")[0]
    name = _TYPE_PACKAGES.get(package)
    if name is None:
        return get("numpy")
    return get(name)


def to_numpy(value):
    """Any framework's tensor (or a numpy array) as numpy, zero-copy where possible."""
    return adapter_for(value).to_numpy(value)
