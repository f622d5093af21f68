"""A safetensors file as a TensorSource (the one format that needs no conversion)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Optional

import numpy as np

from ..format.reader import SafetensorsFile
from .base import FileSpan, TensorInfo, TensorSource


class HeaderInfos(Mapping):
    """A header's tensors as `TensorInfo`, each made when asked for: a header may list a
    million tensors, and opening the file should not copy them all."""

    __slots__ = ("_tensors",)

    def __init__(self, tensors: dict) -> None:  # name -> the header's entry (dtype, shape, offsets)
        self._tensors = tensors

    def __getitem__(self, name: str) -> TensorInfo:
        dtype, shape, (begin, end) = self._tensors[name]
        return TensorInfo(dtype, shape, end - begin)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class SafetensorsSource(TensorSource):
    """A validated safetensors file; `read` gives read-only zero-copy views."""

    format = "safetensors"

    def __init__(self, path: str, *, backend: str = "mmap") -> None:
        """`backend="pread"` reads the header alone and maps nothing (for describing many shards)."""
        super().__init__(path)
        self.file = SafetensorsFile(path, backend=backend)
        header = self.file.header
        self.metadata = header.metadata
        self._infos = HeaderInfos(header.tensors)
        self.tree = {"__metadata__": self.metadata} if self.metadata else None

    @property
    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> np.ndarray:
        self[name]  # a clear TensorNotFoundError for an unknown name
        array = self.file.array(name)
        array.flags.writeable = False
        return array

    def file_span(self, name: str) -> Optional[FileSpan]:
        entry = self.file.header.tensors[name]
        return FileSpan(self.path, self.file.header.data_start + entry.data_offsets[0], entry.nbytes)

    def release(self, name: str) -> None:
        if name in self.file.header.tensors:
            self.file.release(name)

    def describe(self) -> str:
        return f"safetensors file, {len(self)} tensors"

    def close(self) -> None:
        self.file.close()
