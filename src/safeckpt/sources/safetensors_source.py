"""A safetensors file as a TensorSource (the one format that needs no conversion)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..format.reader import SafetensorsFile
from .base import TensorInfo, TensorSource


class SafetensorsSource(TensorSource):
    """A validated safetensors file; `read` gives read-only zero-copy views."""

    format = "safetensors"

    def __init__(self, path: str, *, backend: str = "mmap") -> None:
        """`backend="pread"` reads the header alone and maps nothing (for describing many shards)."""
        super().__init__(path)
        self.file = SafetensorsFile(path, backend=backend)
        header = self.file.header
        self.metadata = header.metadata
        self._infos = {name: TensorInfo(t.dtype, t.shape, t.nbytes) for name, t in header.tensors.items()}
        self.tree = {"__metadata__": self.metadata} if self.metadata else None

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> np.ndarray:
        self[name]  # a clear TensorNotFoundError for an unknown name
        array = self.file.array(name)
        array.flags.writeable = False
        return array

    def file_span(self, name: str) -> Optional[tuple[int, int]]:
        info = self.file.header.tensors[name]
        return self.file.header.data_start + info.data_offsets[0], info.nbytes

    def release(self, name: str) -> None:
        if name in self.file.header.tensors:
            self.file.release(name)

    def describe(self) -> str:
        return f"safetensors file, {len(self)} tensors"

    def close(self) -> None:
        self.file.close()
