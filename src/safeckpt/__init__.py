"""safeckpt: safe, fast, portable model weights and training checkpoints.

>>> import numpy as np, safeckpt
>>> safeckpt.save_file({"w": np.ones((2, 2), np.float32)}, "model.safetensors")
>>> safeckpt.load_file("model.safetensors")["w"]

Every public name is imported on first use (PEP 562), so `import safeckpt` and
the CLI's start-up pay only for what they touch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> module that defines it
_LAZY = {
    "save_file": ".api", "load_file": ".api", "save": ".api", "load": ".api", "safe_open": ".api",
    "SafeckptError": ".errors", "HeaderError": ".errors", "SourceError": ".errors", "UnsafeFileError": ".errors",
    "RawTensor": ".format", "SafetensorsFile": ".format", "HeaderEntry": ".format",
    "open_source": ".sources", "TensorSource": ".sources", "TensorInfo": ".sources",
    "scan": ".ops.scan", "ScanReport": ".ops.scan",
    "convert": ".ops.convert", "ConvertReport": ".ops.convert",
    "cast": ".ops.convert",
    "verify": ".ops.verify", "VerifyReport": ".ops.verify",
    "diff": ".ops.diff", "DiffReport": ".ops.diff",
    "merge": ".ops.merge", "MergeReport": ".ops.merge",
    "CheckpointManager": ".training.manager", "CheckpointInfo": ".training.manager",
    "SafetensorError": ".errors", "_safe_open_handle": ".api",
    "TensorSpec": ".tensor_spec",
    "serialize": ".tensor_spec",
    "serialize_file": ".tensor_spec",
    "deserialize": ".tensor_spec",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safeckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # for type checkers and IDEs; never run
    from .api import load, load_file, safe_open, save, save_file
    from .errors import HeaderError, SafeckptError, SafetensorError, SourceError, UnsafeFileError
    from .format import HeaderEntry, RawTensor, SafetensorsFile
    from .ops.convert import ConvertReport, cast, convert
    from .ops.diff import DiffReport, diff
    from .ops.merge import MergeReport, merge
    from .ops.scan import ScanReport, scan
    from .ops.verify import VerifyReport, verify
    from .sources import TensorInfo, TensorSource, open_source
    from .tensor_spec import TensorSpec, deserialize, serialize, serialize_file
    from .training.manager import CheckpointInfo, CheckpointManager
