"""Readers for foreign checkpoint formats; each turns a file into data without executing it.

`open_source` recognises a file by content and returns a `TensorSource`; `pickle_vm`
is the restricted pickle machine that every pickle-based format goes through.
"""

from .base import FileSpan, TensorInfo, TensorSource
from .detect import open_source

__all__ = ["open_source", "TensorSource", "TensorInfo", "FileSpan"]
