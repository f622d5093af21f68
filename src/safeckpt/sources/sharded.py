"""A sharded checkpoint (Hugging Face index JSON) as one TensorSource.

The index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``)
is ``{"metadata": {"total_size": N, ...}, "weight_map": {tensor: shard file}}``;
shard files sit beside it. Each shard is opened with `open_source`, so shards
of any format we read work, and the index is checked against them: a tensor
the index names must be in its shard.

Tensors come in the model's state-dict order: shard by shard (in file-name order,
which for ``model-0000k-of-0000N`` is shard order), each shard's tensors in its own
order. The index's ``weight_map`` is sorted by name when transformers writes it, so
it cannot say which of two tied names (an embedding and its head) came first.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import numpy as np

from .. import errors
from ..format.storage import open_regular_file
from .base import FileSpan, TensorInfo, TensorSource

# An index is a small JSON file; anything larger is not one.
MAX_INDEX_BYTES = 64 * 1024 * 1024
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json",
               "diffusion_pytorch_model.safetensors.index.json",
               "diffusion_pytorch_model.bin.index.json")


def read_index(path: str) -> dict:
    """The parsed, checked index JSON: ``{"metadata": {...}, "weight_map": {...}}``."""
    with open_regular_file(path) as f:
        raw = f.read(MAX_INDEX_BYTES + 1)
    if len(raw) > MAX_INDEX_BYTES:
        raise errors.SourceError(f"index file larger than {MAX_INDEX_BYTES} bytes", path=path)
    try:
        index = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise errors.SourceError(f"not valid JSON: {exc}", path=path) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise errors.SourceError("not a sharded-checkpoint index: it needs a \"weight_map\" "
                                 "object of tensor name -> shard file", path=path)
    for shard in set(weight_map.values()):
        parts = shard.replace("\\", "/").split("/")
        if os.path.isabs(shard) or ".." in parts or not shard:
            raise errors.SourceError(f"shard name {shard!r} points outside the index's folder",
                                     path=path)
    metadata = index.get("metadata")
    return {"metadata": metadata if isinstance(metadata, dict) else {}, "weight_map": weight_map}


class ShardedSource(TensorSource):
    """Every shard an index names, read as one checkpoint."""

    format = "sharded"

    def __init__(self, path: str, open_shard: Callable[[str], TensorSource]) -> None:
        super().__init__(path)
        index = read_index(path)
        folder = os.path.dirname(os.path.abspath(path))
        self.index_metadata = index["metadata"]
        weight_map = index["weight_map"]
        self.shards: dict[str, TensorSource] = {}
        self._shard_of: dict[str, TensorSource] = {}
        self._infos: dict[str, TensorInfo] = {}
        try:
            for name, shard_name in weight_map.items():
                shard = self.shards.get(shard_name)
                if shard is None:
                    shard_path = os.path.join(folder, shard_name)
                    if not os.path.isfile(shard_path):
                        raise errors.SourceError(f"the index names shard {shard_name!r}, which does "
                                                 "not exist or is not a file", path=path, tensor=name)
                    shard = self.shards[shard_name] = open_shard(shard_path)
                    if isinstance(shard, ShardedSource):
                        raise errors.SourceError(f"shard {shard_name!r} is itself an index", path=path)
                if name not in shard.infos:
                    raise errors.SourceError(f"the index puts this tensor in {shard_name!r}, which "
                                             "does not hold it", path=path, tensor=name)
        except BaseException:
            self.close()
            raise
        self.shards = dict(sorted(self.shards.items()))
        for shard_name, shard in self.shards.items():
            for name, info in shard.infos.items():
                if weight_map.get(name) == shard_name:
                    self._infos[name] = info
                    self._shard_of[name] = shard
                    if shard.aliases.get(name) in weight_map:
                        self.aliases[name] = shard.aliases[name]
        for shard_name, shard in self.shards.items():
            extra = [n for n in shard.infos if n not in self._infos]
            if extra:
                self.notes.append(f"{shard_name} holds {len(extra)} tensors the index does not "
                                  f"name (e.g. {extra[0]!r}); they are left out")
        self.tree = {"metadata": self.index_metadata, "shards": sorted(self.shards)}
        self.metadata = self._common_metadata()

    def _common_metadata(self) -> Optional[dict[str, str]]:
        """The shards' metadata when they agree (sharded writers repeat it in every shard)."""
        found = [s.metadata for s in self.shards.values() if s.metadata]
        if not found:
            return None
        if any(m != found[0] for m in found[1:]):
            self.notes.append("the shards' metadata differ; none is carried over")
            return None
        return dict(found[0])

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> np.ndarray:
        self[name]
        return self._shard_of[name].read(name)

    def file_span(self, name: str) -> Optional[FileSpan]:
        self[name]
        return self._shard_of[name].file_span(name)

    def files(self) -> list[str]:
        """Each shard's file, in shard order; an index that names no shard reads only itself."""
        return [shard.path for shard in self.shards.values()] or [self.path]

    def release(self, name: str) -> None:
        shard = self._shard_of.get(name)
        if shard is not None and hasattr(shard, "release"):
            shard.release(name)

    def describe(self) -> str:
        formats = sorted({s.format for s in self.shards.values()})
        return f"sharded checkpoint, {len(self.shards)} {'/'.join(formats)} shards, {len(self)} tensors"

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()


def find_index(directory: str) -> Any:
    """The index file of a model folder, or None."""
    for name in INDEX_NAMES:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    found = sorted(n for n in os.listdir(directory) if n.endswith(".index.json"))
    return os.path.join(directory, found[0]) if found else None
