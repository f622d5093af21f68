"""torch.distributed.checkpoint (DCP) without pickle: every rank's shards in safetensors, the metadata in JSON.

    >>> import torch.distributed.checkpoint as dcp
    >>> from safeckpt.torch.distributed import SafeStorageWriter, SafeStorageReader
    >>> dcp.save(state_dict, storage_writer=SafeStorageWriter("ckpt/step-100"))
    >>> dcp.load(state_dict, storage_reader=SafeStorageReader("ckpt/step-100"))   # any world size

DCP plans which rank saves which piece of every tensor (a `DTensor`'s shards, FSDP2's
flat parameters, a replicated tensor once) and, when loading, which piece of the
checkpoint each rank needs at its own sharding; this module is only its storage layer.
DCP's own format keeps its metadata as a pickle and loads non-tensor values with
``torch.load(weights_only=False)``; here nothing is a pickle.

The directory (committed whole: written under ``.tmp-<name>-<hex>`` and renamed once
every rank has finished, so a rank that dies leaves nothing under the real name)::

    rank-00000.safetensors   what rank 0 saved: one tensor per chunk, named "<fqn>@<offsets>"
    rank-00001.safetensors   ...
    dcp.json                 the checkpoint's layout (below)
    manifest.json            BLAKE3 of every file, range by range (written last)

``dcp.json`` holds ``{"format": "safeckpt-dcp", "version": 1, "dcp_version": ...,
"tensors": {fqn: {"dtype", "size", "requires_grad", "chunks": [{"offsets", "sizes",
"file", "name"}]}}, "values": {fqn: {"file", "document"}}, "planner_data": ...}``: every
tensor's global size and where each saved chunk lives; every non-tensor value as a state
document (`safeckpt.training.split_state`, its tensors in the rank's file), so it comes
back as itself (tuples, int keys, numpy arrays) without running anything.

`SafeStorageReader` reads only the byte ranges its rank's plan needs (the rows of each
chunk it overlaps), checking each range against the manifest first (``verify=True``).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.futures import Future
from torch.distributed.checkpoint import Metadata, StorageReader, StorageWriter
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlan, LoadPlanner, ReadItem, SavePlan,
                                                  SavePlanner, WriteItemType)
from torch.distributed.checkpoint.storage import WriteResult

from .. import errors
from ..format import integrity
from ..format.checkpoint_dir import MANIFEST_FILE, holder
from ..format.checkpoint_storage import stale_temporaries
from ..format.integrity import HASH, encode_manifest, hash_bytes
from ..format.writer import prepare
from ..sinks.checkpoint import manifest_entry
from ..sinks.safetensors import from_prepared, write_stream
from ..sources.dcp_dir import DCP_FILE, DCP_FORMAT, DCP_VERSION, chunk_name, rank_file, read_layout
from ..training.state import join_state, split_state

__all__ = ["SafeStorageWriter", "SafeStorageReader", "consolidate"]

PathLike = Union[str, "os.PathLike[str]"]


class SafeStorageWriter(StorageWriter):
    """A DCP `StorageWriter`: each rank writes a safetensors file, the coordinator JSON + a manifest.

    >>> dcp.save(state_dict, storage_writer=SafeStorageWriter("ckpt/step-100"))
    """

    def __init__(self, path: PathLike) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self._staging: Any = None  # the coordinator's staging directory, from planning to finish

    def reset(self, checkpoint_id: Optional[PathLike] = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self._staging = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Nothing to set up: the coordinator names the staging directory when it plans."""

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """On the coordinator: create the staging directory every rank writes into."""
        storage, name = holder(self.path, create=True)
        if storage.remote:
            raise errors.CheckpointError("distributed checkpoints are written to local (or shared) file systems "
                                         "for now", path=self.path)
        _remove_stale_temporaries(storage, name)
        self._staging = storage.begin(name)
        staging_dir = self._staging.temp
        return [_with_storage_data(plan, {"staging": staging_dir, "rank": rank}) for rank, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        """This rank's tensors (and non-tensor values' tensors) into its file, hashed while written."""
        staging_dir, rank = plan.storage_data["staging"], plan.storage_data["rank"]
        file_name = rank_file(rank)
        path = os.path.join(staging_dir, file_name)
        outputs, results, kept = [], [], []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                value = _lookup(planner, item.index)
                tensors, document = split_state(value)
                prefix = f"{item.index.fqn}@value/"
                for name, array in tensors.items():
                    outputs.append(from_prepared(prepare(prefix + name, array, path)))
                kept.append((item.index, {"file": file_name, "prefix": prefix, "document": document},
                             sum(int(a.nbytes) for a in tensors.values())))
                continue
            tensor = planner.resolve_data(item)
            array = _as_numpy(tensor.detach())
            name = chunk_name(item.index.fqn, item.tensor_data.chunk.offsets)
            outputs.append(from_prepared(prepare(name, array, path)))
            results.append(WriteResult(index=item.index, size_in_bytes=int(array.nbytes),
                                       storage_data={"file": file_name, "name": name}))
        with open(path, "xb") as out:
            written = write_stream(outputs, out, {"format": "pt"}, hashed=True, where=path)
            out.flush()
            os.fsync(out.fileno())
        entry = manifest_entry(written)
        results += [WriteResult(index=index, size_in_bytes=nbytes, storage_data=data) for index, data, nbytes in kept]
        # the file's manifest entry travels with the first result (every rank writes one file)
        results.insert(0, WriteResult(index=MetadataIndex(f"{file_name}@manifest"), size_in_bytes=0,
                                      storage_data={"manifest": {file_name: entry}}))
        future: Future = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """On the coordinator: write dcp.json and the manifest, then commit the directory."""
        files: dict[str, Any] = {}
        storage: dict[Any, Any] = {}
        for rank_results in results:
            for result in rank_results:
                data = result.storage_data
                if "manifest" in data:
                    files.update(data["manifest"])
                else:
                    storage[result.index] = data
        document = _encode_metadata(metadata, storage)
        raw = json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
        staging = self._staging
        try:
            with staging.open(DCP_FILE) as out:
                out.write(raw)
            files[DCP_FILE] = {"size": len(raw), HASH: hash_bytes(raw)}
            manifest = encode_manifest({
                "format": integrity.MANIFEST_FORMAT, "schema_version": integrity.MANIFEST_SCHEMA_VERSION,
                "step": 0, "time": time.time(), "metrics": {}, "monitor": None, "hash": HASH, "files": files})
            with staging.open(MANIFEST_FILE) as out:
                out.write(manifest)
            staging.commit(replace=True)
        except BaseException:
            staging.abort()
            raise

    def storage_meta(self) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        return StorageMeta(checkpoint_id=self.path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return not os.path.isfile(os.fspath(checkpoint_id))


class SafeStorageReader(StorageReader):
    """A DCP `StorageReader` for directories `SafeStorageWriter` wrote, at any world size.

    >>> dcp.load(state_dict, storage_reader=SafeStorageReader("ckpt/step-100"))
    """

    def __init__(self, path: PathLike, *, verify: bool = True) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.verify = verify
        self._layout: Optional[dict] = None
        self._manifest: Optional[dict] = None

    def reset(self, checkpoint_id: Optional[PathLike] = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self._layout = self._manifest = None

    def _read_layout(self) -> dict:
        if self._layout is None:
            self._layout, self._manifest = read_layout(self.path)
        return self._layout

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return _metadata_from(self._read_layout())

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._read_layout()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        """Copy each piece this rank's plan asks for straight from the mapped files into its tensor;
        each chunk touched is checked against its hash first (``verify``), then only its piece is copied."""
        from concurrent.futures import ThreadPoolExecutor

        layout = self._read_layout()
        files: dict[str, _RankFile] = {}
        pieces = []
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                continue
            where = layout["storage"].get(_index_key(item.storage_index))
            if where is None:
                raise errors.CheckpointError(f"{item.storage_index.fqn}: no chunk at "
                                             f"{list(item.storage_index.offset or ())} in the checkpoint",
                                             path=self.path)
            pieces.append((item, self._file(files, where["file"]), where["name"]))
        # chunk k+1 is hashed (blake3 and numpy release the GIL) while chunk k is copied
        checks: dict = {}
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="safeckpt-verify") as pool:
                for _, file, name in pieces:
                    if (file.path, name) not in checks:
                        checks[file.path, name] = pool.submit(file.check, name)
                for item, file, name in pieces:
                    checks[file.path, name].result()
                    region = file.array(name)[tuple(slice(int(o), int(o) + int(n))
                                                    for o, n in zip(item.storage_offsets, item.lengths))]
                    target = planner.resolve_tensor(item).detach()
                    _copy_into(target, region, item.dest_index.fqn, self.path)
                    planner.commit_tensor(item, target)
                    file.release(name)
            for item in plan.items:
                if item.type == LoadItemType.BYTE_IO:
                    _set_value(planner, item, self._value(item, layout, files))
        finally:
            for future in checks.values():
                future.cancel()
            for file in files.values():
                file.close()
        future: Future = Future()
        future.set_result(None)
        return future

    def _file(self, files: dict, name: str) -> "_RankFile":
        if name not in files:
            if os.path.basename(name) != name or name not in (self._manifest or {}).get("files", {}):
                raise errors.CheckpointError(f"names a file {name!r} its manifest does not list", path=self.path)
            files[name] = _RankFile(os.path.join(self.path, name), self._manifest["files"][name], self.verify)
        return files[name]

    def _value(self, item: ReadItem, layout: dict, files: dict) -> Any:
        where = layout["values"].get(item.storage_index.fqn)
        if where is None:
            raise errors.CheckpointError(f"{item.storage_index.fqn}: no value in the checkpoint", path=self.path)
        names = _document_tensors(where["document"])
        tensors = {name: np.array(self._file(files, where["file"]).array(where["prefix"] + name)) for name in names}
        return join_state(tensors, where["document"])

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return os.path.isfile(os.path.join(os.fspath(checkpoint_id), DCP_FILE))


# --- helpers ------------------------------------------------------------------------

def _remove_stale_temporaries(storage: Any, name: str) -> None:
    """What a save of `name` left when a rank died (DCP's collectives order the saves of a name):
    the rank files and layout in it are deleted, anything else stays."""
    for stale in stale_temporaries(storage, name):
        files = os.listdir(os.path.join(storage.root, stale))
        storage.remove_temporary(stale, tuple(f for f in files if _RANK_FILE.fullmatch(f)
                                              or f in (DCP_FILE, MANIFEST_FILE)))


# The rank files a save writes.
_RANK_FILE = re.compile(r"rank-[0-9]{5,}\.safetensors")


def _with_storage_data(plan: SavePlan, data: dict) -> SavePlan:
    import dataclasses

    return dataclasses.replace(plan, storage_data=data)


def _lookup(planner: SavePlanner, index: MetadataIndex) -> Any:
    lookup = getattr(planner, "lookup_object", None)
    if lookup is None:
        raise errors.CheckpointError(f"{index.fqn}: a non-tensor value, and the planner "
                                     f"{type(planner).__name__} cannot give it unpickled (no lookup_object): "
                                     "use DCP's DefaultSavePlanner or a subclass")
    return lookup(index)


def _set_value(planner: LoadPlanner, item: ReadItem, value: Any) -> None:
    """What DefaultLoadPlanner.load_bytes does with the value it unpickles, given the value itself."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    if not isinstance(planner, DefaultLoadPlanner):
        raise errors.CheckpointError(f"{item.dest_index.fqn}: a non-tensor value, and the planner "
                                     f"{type(planner).__name__} takes values only as pickles: use DCP's "
                                     "DefaultLoadPlanner or a subclass")
    if planner.flatten_state_dict:
        from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

        set_element(planner.original_state_dict, planner.mappings[item.dest_index.fqn], value)
    else:
        planner.state_dict[item.dest_index.fqn] = value


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    from ..frameworks.torch import to_numpy

    return to_numpy(tensor.cpu() if tensor.device.type != "cpu" else tensor)


class _RankFile:
    """A rank's file, mapped; with `verify`, its header and each tensor (a chunk) are checked against
    the manifest's range hashes the first time they are read, hashed from the mapped pages."""

    def __init__(self, path: str, entry: dict, verify: bool) -> None:
        from ..format.reader import SafetensorsFile

        self.path, self.entry, self.verify = path, entry, verify
        self.checked: set = set()
        if verify:
            recorded = self._recorded(None)
            with open(path, "rb") as f:
                header = f.read(recorded["range"][1])
            self._check(None, memoryview(header)[recorded["range"][0]:])
        self.file = SafetensorsFile(path)

    def _recorded(self, name: Optional[str]) -> dict:
        recorded = self.entry.get("header") if name is None else self.entry.get("tensors", {}).get(name)
        if not isinstance(recorded, dict) or not isinstance(recorded.get("range"), list) or \
                len(recorded["range"]) != 2 or not all(type(v) is int for v in recorded["range"]):
            raise errors.IntegrityError(f"the manifest records no hash for {'the header' if name is None else name}",
                                        path=self.path)
        return recorded

    def _check(self, name: Optional[str], data: Any) -> None:
        recorded = self._recorded(name)
        begin, end = recorded["range"]
        if len(data) != end - begin or hash_bytes(data) != recorded.get(HASH):
            raise errors.IntegrityError(f"{'the header' if name is None else name}: bytes {begin}-{end} do not "
                                        "match the manifest (the file was changed or damaged)", path=self.path,
                                        tensor=name)

    def check(self, name: str) -> None:
        """Tensor `name`'s bytes against the manifest (once; nothing without `verify`)."""
        if name not in self.file.header.tensors:
            raise errors.CheckpointError(f"holds no tensor {name!r}", path=self.path)
        if self.verify and name not in self.checked:
            self._check(name, memoryview(self.file.storage(name).reshape(-1).view(np.uint8)))
            self.checked.add(name)

    def array(self, name: str) -> np.ndarray:
        """The tensor's values, a view of the mapped file (checked first)."""
        self.check(name)
        return self.file.array(name)

    def release(self, name: str) -> None:
        """Give back the mapped pages of a tensor already copied out."""
        self.file.release(name)

    def close(self) -> None:
        self.file.close()


# Integer types of each item size: pieces are copied as bits, whatever the dtype (bf16, fp8, bool).
_BITS = {1: ("uint8", np.uint8), 2: ("int16", np.int16), 4: ("int32", np.int32), 8: ("int64", np.int64)}


def _copy_into(target: torch.Tensor, region: np.ndarray, fqn: str, path: str) -> None:
    """Copy a read-only numpy piece into the destination tensor (any strides), bit for bit."""
    if tuple(target.size()) != tuple(region.shape) or target.element_size() != region.dtype.itemsize:
        raise errors.CheckpointError(f"{fqn}: a piece of {region.dtype}{list(region.shape)} for a destination of "
                                     f"{target.dtype}{list(target.size())}", path=path)
    bits = _BITS.get(region.dtype.itemsize)
    if target.device.type == "cpu" and bits is not None:
        target.view(getattr(torch, bits[0])).numpy()[...] = region.view(bits[1])
    else:
        target.copy_(torch.from_numpy(np.ascontiguousarray(region)))


def _index_key(index: MetadataIndex) -> str:
    return chunk_name(index.fqn, index.offset or ())


def _document_tensors(document: Any) -> list[str]:
    """The names of the tensors a state document (`split_state`) records."""
    records = document.get("tensors") if isinstance(document, dict) else None
    return sorted(records) if isinstance(records, dict) else []


def _encode_metadata(metadata: Metadata, storage: dict) -> dict:
    tensors: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            continue
        chunks = []
        for chunk in entry.chunks:
            where = storage.get(MetadataIndex(fqn, chunk.offsets))
            if where is None:
                raise errors.CheckpointError(f"{fqn}: the chunk at {list(chunk.offsets)} was planned but no rank "
                                             "wrote it")
            chunks.append({"offsets": list(chunk.offsets), "sizes": list(chunk.sizes), **where})
        props = entry.properties
        tensors[fqn] = {"dtype": str(props.dtype).removeprefix("torch."), "size": list(entry.size),
                        "requires_grad": bool(props.requires_grad), "chunks": chunks}
    for index, where in storage.items():
        if "document" in where:
            values[index.fqn] = where
    planner_tensors, planner_document = split_state(metadata.planner_data)
    if planner_tensors:
        raise errors.CheckpointError("the planner's data holds tensors; it is stored as JSON only")
    return {"format": DCP_FORMAT, "version": DCP_VERSION, "dcp_version": metadata.version,
            "tensors": tensors, "values": values, "planner_data": planner_document}


def _metadata_from(layout: dict) -> Metadata:
    state: dict[str, Any] = {}
    for fqn, entry in layout["tensors"].items():
        dtype = getattr(torch, str(entry.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            raise errors.CheckpointError(f"{fqn}: dtype {entry.get('dtype')!r} is not a torch dtype")
        chunks = [ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"]))
                  for c in entry["chunks"]]  # checked by read_layout
        state[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype, requires_grad=bool(entry.get("requires_grad"))),
                                           torch.Size(entry["size"]), chunks)
    for fqn in layout.get("values", {}):
        state[fqn] = BytesStorageMetadata()
    planner_data = join_state({}, layout["planner_data"]) if layout.get("planner_data") is not None else None
    return Metadata(state_dict_metadata=state, planner_data=planner_data, version=layout.get("dcp_version"),
                    storage_data={})


def consolidate(path: PathLike, out: PathLike, *, shard_size: "int | str | None" = "5GB", **options: Any) -> Any:
    """One Hugging Face-style model (``format: pt``; shards of `shard_size` + index when larger) from a
    distributed checkpoint, each tensor assembled from its chunks; no process group needed.

    `options` are `safeckpt.ops.convert.convert`'s (``dtype``, ``select``, ``overwrite``, ...);
    ``safeckpt convert CKPT_DIR OUT/`` does the same.

    >>> consolidate("ckpt/step-100", "hf-model/")
    """
    from ..ops.convert import convert

    return convert(os.fspath(path), os.fspath(out), shard_size=shard_size, extract=None, **options)
