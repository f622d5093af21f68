"""A checkpoint written by torch.distributed.checkpoint's own FileSystemWriter, read without running it.

The directory (``dcp.save(state, checkpoint_id=path)``)::

    .metadata          a pickle of ``Metadata``: ``state_dict_metadata`` (fqn -> a tensor's
                       properties, global size and chunks, or ``BytesStorageMetadata`` for any
                       other value), ``planner_data``, and ``storage_data``: ``MetadataIndex(fqn,
                       chunk offset)`` -> ``_StorageInfo(relative_path, offset, length)``
    __0_0.distcp       what rank 0 wrote: each item's bytes at its (offset, length), back to back
    __1_0.distcp       ...

With the default serialization each item is a whole ``torch.save`` zip: a tensor chunk's
(``torch.load(weights_only=True)`` when DCP loads it), or any other value's
(``torch.load(weights_only=False)``: DCP runs that pickle). Here ``.metadata`` and every
item go through the restricted pickle machine (`pickle_vm`), so `TorchDcpSource` lists each
tensor at its global shape, assembles it from its chunks when read, and shows the other
values as data; nothing is imported or called. Items stored with a transform (DCP's
compression extensions) or another serialization are refused with their name.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import numpy as np

from .. import errors
from ..format.dtypes import DTYPES
from .base import TensorInfo, TensorSource, map_file, unmap
from .dcp_dir import assemble
from .pickle_records import DcpIndex, TorchDType
from .torch_file import TORCH_TO_SAFETENSORS, _load_pickle, torch_zip_in

METADATA_FILE = ".metadata"
# The largest .metadata read (a million chunks take about 300 MB).
MAX_METADATA_BYTES = 1 << 30


def is_torch_dcp_directory(path: "os.PathLike | str") -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), METADATA_FILE))


class TorchDcpSource(TensorSource):
    """The tensors of a DCP checkpoint at their global shapes; values of other kinds in `tree`."""

    format = "torch-dcp"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        metadata_path = os.path.join(path, METADATA_FILE)
        mapping = map_file(metadata_path)
        try:
            if len(mapping) > MAX_METADATA_BYTES:
                raise errors.SourceError(f"is larger than {MAX_METADATA_BYTES} bytes", path=metadata_path)
            result = _load_pickle(mapping, metadata_path)
        finally:
            unmap(mapping)
        self.globals = result.globals
        metadata = result.value
        if not isinstance(metadata, dict) or not isinstance(metadata.get("state_dict_metadata"), dict) \
                or not isinstance(metadata.get("storage_data"), dict):
            raise errors.SourceError("is not a torch.distributed.checkpoint Metadata record", path=metadata_path)
        self._storage = metadata["storage_data"]
        self._maps: dict[str, Any] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._chunks: dict[str, list] = {}
        values: dict[str, Any] = {}
        for fqn, entry in metadata["state_dict_metadata"].items():
            if not isinstance(fqn, str) or not isinstance(entry, dict):
                raise errors.SourceError("a state_dict_metadata entry is not a named record", path=metadata_path)
            if "chunks" not in entry:
                values[fqn] = self._value(fqn)
                continue
            self._add_tensor(fqn, entry, metadata_path)
        self.tree = {"values": values, "planner_data": _plain(metadata.get("planner_data"))}

    def _add_tensor(self, fqn: str, entry: dict, where: str) -> None:
        dtype = (entry.get("properties") or {}).get("dtype")
        name = TORCH_TO_SAFETENSORS.get(dtype.name) if isinstance(dtype, TorchDType) else None
        if name is None:
            self.note(f"{fqn}: torch.{getattr(dtype, 'name', '?')} has no safetensors equivalent; skipped")
            return
        size = _dims(entry.get("size"), f"{fqn}: size", where)
        chunks = []
        for chunk in entry.get("chunks") or []:
            if not isinstance(chunk, dict):
                raise errors.SourceError(f"{fqn}: a chunk is not a record", path=where)
            offsets = _dims(chunk.get("offsets"), f"{fqn}: chunk offsets", where)
            sizes = _dims(chunk.get("sizes"), f"{fqn}: chunk sizes", where)
            if len(offsets) != len(size) or len(sizes) != len(size) or \
                    any(o + n > s for o, n, s in zip(offsets, sizes, size)):
                raise errors.SourceError(f"{fqn}: a chunk at {list(offsets)} of {list(sizes)} lies outside "
                                         f"{list(size)}", path=where)
            chunks.append((offsets, sizes))
        self._chunks[fqn] = chunks
        self._infos[fqn] = TensorInfo(name, size, math.prod(size) * DTYPES[name].bits // 8)

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def _item(self, fqn: str, offsets: Optional[tuple]) -> tuple[memoryview, str]:
        """The bytes of one item (a torch.save zip) and the name it has in messages."""
        info = self._storage.get(DcpIndex(fqn, offsets))
        label = f"{fqn}@{list(offsets) if offsets is not None else 'value'}"
        if not isinstance(info, dict):
            raise errors.SourceError(f"{label}: the metadata says where no rank stored it", path=self.path)
        file, start, length = info.get("relative_path"), info.get("offset"), info.get("length")
        if not isinstance(file, str) or os.path.basename(file) != file or not file or \
                type(start) is not int or type(length) is not int or start < 0 or length < 0:
            raise errors.SourceError(f"{label}: its storage record is malformed", path=self.path)
        if info.get("transform_descriptors"):
            raise errors.SourceError(f"{label}: stored with transforms {info['transform_descriptors']!r} (DCP's "
                                     "compression extensions), which safeckpt does not read", path=self.path)
        if file not in self._maps:
            self._maps[file] = map_file(os.path.join(self.path, file))
        mapping = self._maps[file]
        if start + length > len(mapping):
            raise errors.SourceError(f"{label}: bytes {start}-{start + length} run past the end of {file} "
                                     f"({len(mapping)} bytes)", path=self.path)
        return memoryview(mapping)[start:start + length], f"{os.path.join(self.path, file)} [{label}]"

    def _value(self, fqn: str) -> Any:
        view, label = self._item(fqn, None)
        item = torch_zip_in(view, label)
        try:
            return item.tree
        finally:
            item.close()

    def read(self, name: str) -> np.ndarray:
        return assemble(self, name, ((offsets, sizes, self._chunk) for offsets, sizes in self._chunks[name]))

    def _chunk(self, name: str, offsets: tuple, sizes: tuple) -> tuple[np.ndarray, str]:
        view, label = self._item(name, offsets)
        item = torch_zip_in(view, label)
        try:
            if list(item.keys()) != ["tensor"]:
                raise errors.SourceError(f"{label}: not one tensor but {len(item)}", path=self.path, tensor=name)
            return item.read("tensor"), label  # a view of the .distcp file's map, open until close()
        finally:
            item.close()

    def files(self) -> list[str]:
        names = {info.get("relative_path") for info in self._storage.values() if isinstance(info, dict)}
        return [os.path.join(self.path, METADATA_FILE)] + sorted(
            os.path.join(self.path, name) for name in names if isinstance(name, str) and os.path.basename(name) == name)

    def describe(self) -> str:
        return f"torch.distributed.checkpoint directory, {len(self)} tensors in {len(self.files()) - 1} files"

    def close(self) -> None:
        for mapping in self._maps.values():
            unmap(mapping)
        self._maps.clear()


def _dims(value: Any, what: str, where: str) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) > 64 or \
            not all(type(v) is int and 0 <= v < 1 << 62 for v in value):
        raise errors.SourceError(f"{what} is not a list of at most 64 non-negative integers", path=where)
    return tuple(value)


def _plain(value: Any, depth: int = 0) -> Any:
    """planner_data as JSON-able data (its keys and paths are strings and ints); bounded in depth."""
    if depth > 32:
        return "<cut: nested too deep>"
    if isinstance(value, dict):
        return {str(k)[:200]: _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else repr(value)[:200]
