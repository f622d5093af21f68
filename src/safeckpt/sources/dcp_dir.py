"""A distributed checkpoint written by `safeckpt.torch.distributed.SafeStorageWriter`, as one TensorSource.

The directory (see `safeckpt.torch.distributed` for how it is written)::

    rank-00000.safetensors   the chunks rank 0 saved, each named "<fqn>@<offsets>"
    rank-00001.safetensors   ...
    dcp.json                 the layout: every tensor's global shape and its chunks
    manifest.json            BLAKE3 of every file, range by range

``dcp.json`` is ``{"format": "safeckpt-dcp", "version": 1, "dcp_version": ..., "tensors":
{fqn: {"dtype": torch dtype name, "size": [...], "requires_grad": bool, "chunks":
[{"offsets": [...], "sizes": [...], "file": "rank-0000k.safetensors", "name": "<fqn>@<offsets>"}]}},
"values": {fqn: {"file", "prefix", "document"}}, "planner_data": document}``; each non-tensor
value is a `safeckpt.training.split_state` document whose tensors are in ``file`` under
``prefix`` + their name.

`DcpSource` lists each tensor at its global shape and assembles it from its chunks when
read, so that inspect, convert (one model, or HF shards), diff and merge work on a
distributed checkpoint without torch or a process group. torch is not imported.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import numpy as np

from .. import errors
from ..format.checkpoint_dir import LAYOUT_FILE, MANIFEST_FILE
from ..format.dtypes import DTYPES
from ..format.reader import SafetensorsFile
from .base import TensorInfo, TensorSource

DCP_FILE = LAYOUT_FILE
DCP_FORMAT = "safeckpt-dcp"
DCP_VERSION = 1
# The largest dcp.json read (a layout of a million chunks is about 200 MB).
MAX_LAYOUT_BYTES = 1 << 30

# torch dtype names (as dcp.json records them) -> safetensors dtypes
TORCH_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "complex64": "C64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


def chunk_name(fqn: str, offsets: Any) -> str:
    """The name a chunk of tensor `fqn` starting at `offsets` has in its rank's file."""
    return f"{fqn}@{','.join(str(int(o)) for o in offsets)}"


def is_dcp_directory(path: "os.PathLike | str") -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), DCP_FILE))


def decode_layout(raw: bytes, path: str) -> dict:
    """dcp.json, checked: every shape and offset a list of non-negative ints, every chunk inside
    its tensor, every file a plain name; adds ``"storage"``: chunk name -> {file, name}."""
    try:
        layout = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise errors.CheckpointError(f"is not JSON: {str(exc)[:200]}", path=path) from None
    if not isinstance(layout, dict) or layout.get("format") != DCP_FORMAT:
        raise errors.CheckpointError(f"is not a {DCP_FORMAT} layout", path=path)
    if layout.get("version") != DCP_VERSION:
        raise errors.CheckpointError(f"has version {str(layout.get('version'))[:40]!r}; this safeckpt reads "
                                     f"{DCP_VERSION}", path=path)
    storage = {}
    for fqn, entry in _mapping(layout.get("tensors"), "tensors", path).items():
        entry = _mapping(entry, fqn, path)
        size = _ints(entry.get("size"), f"{fqn}: size", path)
        for chunk in _list(entry.get("chunks"), f"{fqn}: chunks", path):
            chunk = _mapping(chunk, fqn, path)
            offsets = _ints(chunk.get("offsets"), f"{fqn}: chunk offsets", path)
            sizes = _ints(chunk.get("sizes"), f"{fqn}: chunk sizes", path)
            if len(offsets) != len(size) or len(sizes) != len(size) or \
                    any(o + n > s for o, n, s in zip(offsets, sizes, size)):
                raise errors.CheckpointError(f"{fqn}: a chunk at {offsets} of {sizes} lies outside the tensor's "
                                             f"{size}", path=path)
            file, name = chunk.get("file"), chunk.get("name")
            if not isinstance(file, str) or os.path.basename(file) != file or not isinstance(name, str):
                raise errors.CheckpointError(f"{fqn}: a chunk names no plain file and tensor", path=path)
            storage[chunk_name(fqn, offsets)] = {"file": file, "name": name}
    for fqn, where in _mapping(layout.get("values", {}), "values", path).items():
        where = _mapping(where, fqn, path)
        if not isinstance(where.get("file"), str) or not isinstance(where.get("prefix"), str) or \
                not isinstance(where.get("document"), dict):
            raise errors.CheckpointError(f"{fqn}: a value needs a file, a prefix and a document", path=path)
    layout["storage"] = storage
    return layout


def read_layout(directory: str) -> tuple[dict, dict]:
    """(the checked layout, the manifest) of a distributed checkpoint; dcp.json is checked
    against the manifest first."""
    from ..format.integrity import check_file, decode_manifest

    manifest_path, layout_path = os.path.join(directory, MANIFEST_FILE), os.path.join(directory, DCP_FILE)
    try:
        with open(manifest_path, "rb") as f:
            manifest = decode_manifest(f.read(MAX_LAYOUT_BYTES + 1), manifest_path)
        with open(layout_path, "rb") as f:
            raw = f.read(MAX_LAYOUT_BYTES + 1)
    except FileNotFoundError as exc:
        raise errors.CheckpointError(f"is not a committed distributed checkpoint (no "
                                     f"{os.path.basename(exc.filename)})", path=directory) from None
    if len(raw) > MAX_LAYOUT_BYTES:
        raise errors.CheckpointError(f"is larger than {MAX_LAYOUT_BYTES} bytes", path=layout_path)
    entry = manifest.get("files", {}).get(DCP_FILE)
    if not isinstance(entry, dict):
        raise errors.IntegrityError(f"the manifest does not list {DCP_FILE}", path=manifest_path)
    check_file(memoryview(raw), entry, layout_path)
    return decode_layout(raw, layout_path), manifest


class DcpSource(TensorSource):
    """The tensors of a distributed checkpoint at their global shapes, assembled from chunks when read."""

    format = DCP_FORMAT

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.layout, self.manifest = read_layout(path)
        self._files: dict[str, SafetensorsFile] = {}
        self._infos: dict[str, TensorInfo] = {}
        for fqn, entry in self.layout["tensors"].items():
            dtype = TORCH_DTYPES.get(str(entry.get("dtype")))
            if dtype is None:
                self.note(f"{fqn}: torch.{str(entry.get('dtype'))[:40]} has no safetensors equivalent; skipped")
                continue
            shape = tuple(entry["size"])
            self._infos[fqn] = TensorInfo(dtype, shape, math.prod(shape) * DTYPES[dtype].bits // 8)
        self.tree = {"values": {fqn: where["document"] for fqn, where in self.layout.get("values", {}).items()}}

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._files:
            if name not in self.manifest.get("files", {}):
                raise errors.CheckpointError(f"names a file {name!r} its manifest does not list", path=self.path)
            self._files[name] = SafetensorsFile(os.path.join(self.path, name))
        return self._files[name]

    def read(self, name: str) -> np.ndarray:
        return assemble(self, name, ((chunk["offsets"], chunk["sizes"], self._chunk)
                                     for chunk in self.layout["tensors"][name]["chunks"]))

    def _chunk(self, name: str, offsets: list, sizes: list) -> tuple[np.ndarray, str]:
        where = self.layout["storage"][chunk_name(name, offsets)]
        file = self._file(where["file"])
        if where["name"] not in file.header.tensors:
            raise errors.SourceError(f"its chunk {where['name']!r} is not in {where['file']}", path=self.path,
                                     tensor=name)
        return file.array(where["name"]), f"{where['file']}: {where['name']}"

    def files(self) -> list[str]:
        return [os.path.join(self.path, name) for name in sorted(self.manifest.get("files", {}))]

    def describe(self) -> str:
        ranks = len({chunk["file"] for entry in self.layout["tensors"].values() for chunk in entry["chunks"]})
        return f"distributed checkpoint (safeckpt DCP), {len(self)} tensors from {ranks} rank files"

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()


def assemble(source: TensorSource, name: str, chunks: Any) -> np.ndarray:
    """Tensor `name` of `source` at its global shape, from ``(offsets, sizes, read)`` chunks, where
    ``read(name, offsets, sizes)`` gives the chunk's array and a label for messages. Each must hold
    the listed dtype and sizes, and together they must cover the tensor."""
    info = source[name]
    out = np.zeros(info.shape, np.dtype(DTYPES[info.dtype].numpy))
    covered = 0
    for offsets, sizes, read in chunks:
        array, label = read(name, offsets, sizes)
        if tuple(array.shape) != tuple(sizes) or array.dtype != out.dtype:
            raise errors.SourceError(f"its chunk {label} holds {array.dtype}{list(array.shape)}, not "
                                     f"{info.dtype}{list(sizes)}", path=source.path, tensor=name)
        out[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))] = array
        covered += math.prod(sizes)
    if covered < out.size:
        raise errors.SourceError(f"its chunks cover {covered} of its {out.size} elements", path=source.path,
                                 tensor=name)
    out.flags.writeable = False
    return out


def _mapping(value: Any, what: str, path: str) -> dict:
    if not isinstance(value, dict):
        raise errors.CheckpointError(f"{str(what)[:200]} is not an object", path=path)
    return value


def _list(value: Any, what: str, path: str) -> list:
    if not isinstance(value, list):
        raise errors.CheckpointError(f"{str(what)[:200]} is not a list", path=path)
    return value


def _ints(value: Any, what: str, path: Optional[str]) -> list[int]:
    if not isinstance(value, list) or len(value) > 64 or not all(type(v) is int and 0 <= v < 1 << 62 for v in value):
        raise errors.CheckpointError(f"{str(what)[:200]}: expected a list of at most 64 non-negative integers",
                                     path=path)
    return value
