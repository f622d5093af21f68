"""torch.distributed.checkpoint (DCP) without pickle: every rank's shards in safetensors, the metadata in JSON.

The storage layer of checkpoints saved by several ranks, used by `CheckpointManager` under a
process group and public as `safeckpt.torch.distributed`:

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
    rank-00001.safetensors   ...  (rank-00001-000.safetensors, -001, ... with thread_count > 1)
    dcp.json                 the checkpoint's layout (below)
    manifest.json            BLAKE3 of every file, range by range (written last)

``dcp.json`` holds ``{"format": "safeckpt-dcp", "version": 1, "dcp_version": ...,
"tensors": {fqn: {"dtype", "size", "requires_grad", "chunks": [{"offsets", "sizes",
"file", "name"}]}}, "values": {fqn: {"file", "document"}}, "planner_data": ...}``: every
tensor's global size and where each saved chunk lives; every non-tensor value as a state
document (`safeckpt.training.split_state`, its tensors in the rank's file), so it comes
back as itself (tuples, int keys, numpy arrays) without running anything.

`SafeStorageReader` reads only the byte ranges its rank's plan needs (the rows of each
chunk it overlaps), checking each range against the manifest first (``verify=True``);
`read_state` reads a whole checkpoint back as the nested state that was saved, no process
group needed.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Optional, Union

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
from ..format.checkpoint_dir import MANIFEST_FILE, holder, is_our_file, our_files, rank_file, step_from_name
from ..format.checkpoint_storage import stale_temporaries
from ..format.integrity import HASH, encode_manifest, hash_bytes
from ..format.writer import prepare
from ..sinks.checkpoint import library_versions, manifest_entry
from ..sinks.safetensors import from_prepared, write_stream
from ..sources.dcp_dir import DCP_FILE, DCP_FORMAT, DCP_VERSION, TORCH_DTYPES, chunk_name, read_layout
from .state import join_state, split_state

__all__ = ["SafeStorageWriter", "SafeStorageReader", "read_state"]

PathLike = Union[str, "os.PathLike[str]"]


class SafeStorageWriter(StorageWriter):
    """A DCP `StorageWriter`: each rank writes safetensors, the coordinator JSON + a manifest.

    `thread_count` files per rank are written at once (a big state on fast storage); `step`,
    `metrics`, `monitor` and `mode` go into the manifest as `CheckpointManager` records them
    (`step` defaults to the N of a directory named ``step-N``). A checkpoint already at `path` is
    replaced whole (as DCP's own writer does) unless ``overwrite=False``.

    >>> dcp.save(state_dict, storage_writer=SafeStorageWriter("ckpt/step-100"))
    """

    def __init__(self, path: PathLike, *, thread_count: int = 1, step: Optional[int] = None,
                 metrics: Optional[Mapping[str, Any]] = None, monitor: Optional[str] = None, mode: str = "min",
                 overwrite: bool = True) -> None:
        super().__init__()
        if isinstance(thread_count, bool) or not isinstance(thread_count, int) or not 1 <= thread_count <= 64:
            raise errors.CheckpointError(f"thread_count must be an integer from 1 to 64, got {thread_count!r}")
        self.path = os.fspath(path)
        self.thread_count = thread_count
        self.step, self.metrics, self.monitor, self.mode = step, dict(metrics or {}), monitor, mode
        self.overwrite = overwrite
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
        if not self.overwrite and storage.exists(name):
            raise errors.CheckpointError("already exists; checkpoints are never overwritten: save under a new "
                                         "step", path=self.path)
        self._staging = storage.begin(name)
        staging_dir = self._staging.temp
        return [_with_storage_data(plan, {"staging": staging_dir, "rank": rank}) for rank, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        """This rank's tensors (and non-tensor values' tensors) into its file(s), hashed while written."""
        staging_dir, rank = plan.storage_data["staging"], plan.storage_data["rank"]
        groups = []  # (outputs, [(index, storage_data, nbytes)]): what must share one file
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                value = _lookup(planner, item.index)
                tensors, document = split_state(value)
                prefix = f"{item.index.fqn}@value/"
                outputs = [from_prepared(prepare(prefix + name, array, staging_dir)) for name, array in tensors.items()]
                groups.append((outputs, [(item.index, {"prefix": prefix, "document": document},
                                          sum(int(a.nbytes) for a in tensors.values()))]))
                continue
            array = _as_numpy(planner.resolve_data(item).detach())
            name = chunk_name(item.index.fqn, item.tensor_data.chunk.offsets)
            groups.append(([from_prepared(prepare(name, array, staging_dir))],
                           [(item.index, {"name": name}, int(array.nbytes))]))
        parts = _balance(groups, self.thread_count)
        names = [rank_file(rank)] if len(parts) == 1 else [rank_file(rank, k) for k in range(len(parts))]
        if len(parts) == 1:
            entries = [_write_rank_file(os.path.join(staging_dir, names[0]), parts[0])]
        else:
            with ThreadPoolExecutor(len(parts), thread_name_prefix="safeckpt-dcp-write") as pool:
                entries = list(pool.map(_write_rank_file, [os.path.join(staging_dir, n) for n in names], parts))
        # each file's manifest entry travels as a result of its own
        results = [WriteResult(index=MetadataIndex(f"{file_name}@manifest"), size_in_bytes=0,
                               storage_data={"manifest": {file_name: entry}})
                   for file_name, entry in zip(names, entries)]
        for file_name, part in zip(names, parts):
            results += [WriteResult(index=index, size_in_bytes=nbytes, storage_data={"file": file_name, **data})
                        for _, kept in part for index, data, nbytes in kept]
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
        step = self.step if self.step is not None else step_from_name(os.path.basename(self.path.rstrip("/"))) or 0
        try:
            with staging.open(DCP_FILE) as out:
                out.write(raw)
            files[DCP_FILE] = {"size": len(raw), HASH: hash_bytes(raw)}
            manifest = encode_manifest({
                "format": integrity.MANIFEST_FORMAT, "schema_version": integrity.MANIFEST_SCHEMA_VERSION,
                "step": step, "time": time.time(), "metrics": self.metrics,
                "monitor": {"name": self.monitor, "mode": self.mode} if self.monitor else None,
                "versions": library_versions(), "hash": HASH, "files": files})
            with staging.open(MANIFEST_FILE) as out:
                out.write(manifest)
            staging.commit(replace=self.overwrite)
        except BaseException:
            self.abort()
            raise
        self._staging = None

    def abort(self) -> None:
        """On the coordinator, after a save failed on some rank: delete what it staged (nothing was
        committed). DCP itself never calls this; a staging left behind is deleted by the next save
        of the same path, or by `CheckpointManager` when it starts."""
        if self._staging is not None:
            self._staging.abort()
            self._staging = None

    def storage_meta(self) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        return StorageMeta(checkpoint_id=self.path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return not os.path.isfile(os.fspath(checkpoint_id))


def _balance(groups: list, count: int) -> list[list]:
    """`groups` ((outputs, kept) pairs) in at most `count` parts of about equal bytes, largest first;
    every part keeps the groups in the order they came (one part when `count` is 1)."""
    if count == 1 or len(groups) <= 1:
        return [groups]
    loads = [0] * min(count, len(groups))
    chosen: list[list[int]] = [[] for _ in loads]
    for position in sorted(range(len(groups)), key=lambda k: -sum(n for _, _, n in groups[k][1])):
        part = loads.index(min(loads))
        chosen[part].append(position)
        loads[part] += sum(n for _, _, n in groups[position][1])
    return [[groups[k] for k in sorted(positions)] for positions in chosen if positions]


def _write_rank_file(path: str, part: list) -> dict:
    """Write one rank file (fsynced), hashed while written; its manifest entry."""
    outputs = [output for group_outputs, _ in part for output in group_outputs]
    with open(path, "xb") as out:
        written = write_stream(outputs, out, {"format": "pt"}, hashed=True, where=path)
        out.flush()
        os.fsync(out.fileno())
    return manifest_entry(written)


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
        return _open_rank_file(files, self.path, self._manifest, name, self.verify)

    def _value(self, item: ReadItem, layout: dict, files: dict) -> Any:
        where = layout["values"].get(item.storage_index.fqn)
        if where is None:
            raise errors.CheckpointError(f"{item.storage_index.fqn}: no value in the checkpoint", path=self.path)
        return _read_value(where, self._file(files, where["file"]))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return os.path.isfile(os.path.join(os.fspath(checkpoint_id), DCP_FILE))


def read_state(path: PathLike, *, verify: bool = True) -> dict:
    """The whole state a distributed checkpoint holds, as it was given to ``dcp.save``: nested
    dicts and lists (DCP's flattening undone), every tensor a torch tensor at its global shape,
    assembled from its chunks (each checked against the manifest first with `verify`), every
    other value as it was saved. No process group needed; nothing in the files is run.

    >>> state = read_state("ckpt/step-100"); state["model"]["layer.weight"].shape
    torch.Size([4096, 4096])
    """
    path = os.fspath(path)
    layout, manifest = read_layout(path)
    files: dict[str, _RankFile] = {}
    flat: dict[str, Any] = {}
    try:
        for fqn, entry in layout["tensors"].items():
            dtype = getattr(torch, str(entry.get("dtype")), None) if str(entry.get("dtype")) in TORCH_DTYPES else None
            if not isinstance(dtype, torch.dtype):
                raise errors.CheckpointError(f"{fqn}: dtype {str(entry.get('dtype'))[:40]!r} is not one safetensors "
                                             "stores", path=path)
            out = torch.empty(entry["size"], dtype=dtype)
            covered = 0
            for chunk in entry["chunks"]:
                file = _open_rank_file(files, path, manifest, chunk["file"], verify)
                region = file.array(chunk["name"])
                if list(region.shape) != chunk["sizes"]:
                    raise errors.CheckpointError(f"{fqn}: its chunk {chunk['name']!r} holds {list(region.shape)}, "
                                                 f"not {chunk['sizes']}", path=file.path)
                _copy_into(out[tuple(slice(o, o + n) for o, n in zip(chunk["offsets"], chunk["sizes"]))], region,
                           fqn, file.path)
                file.release(chunk["name"])
                covered += math.prod(chunk["sizes"])
            if covered < out.numel():
                raise errors.CheckpointError(f"{fqn}: its chunks cover {covered} of its {out.numel()} elements",
                                             path=path)
            flat[fqn] = out
        for fqn, where in layout.get("values", {}).items():
            flat[fqn] = _read_value(where, _open_rank_file(files, path, manifest, where["file"], verify))
    finally:
        for file in files.values():
            file.close()
    mappings = join_state({}, layout["planner_data"]) if layout.get("planner_data") is not None else None
    return _unflatten(flat, mappings, path)


# --- helpers ------------------------------------------------------------------------

def _open_rank_file(files: dict, path: str, manifest: Optional[dict], name: str, verify: bool) -> "_RankFile":
    """Rank file `name` of the checkpoint at `path`, opened once per read (kept in `files`)."""
    if name not in files:
        if os.path.basename(name) != name or not is_our_file(name) or name not in (manifest or {}).get("files", {}):
            raise errors.CheckpointError(f"names a file {name[:200]!r} its manifest does not list", path=path)
        files[name] = _RankFile(os.path.join(path, name), manifest["files"][name], verify)
    return files[name]


def _read_value(where: dict, file: "_RankFile") -> Any:
    """A non-tensor value: its state document, with the tensors it holds from its rank file."""
    names = _document_tensors(where["document"])
    return join_state({name: np.array(file.array(where["prefix"] + name)) for name in names}, where["document"])


# The longest list a flattened key may index into (DCP's paths index lists such as param_groups).
_MAX_LIST_INDEX = 1 << 20


def _unflatten(flat: dict, mappings: Any, path: str) -> dict:
    """DCP's flattened keys back to the nested dicts and lists they came from, as `mappings`
    (``{flat key: (key, key, ...)}``, DCP's planner data) records; without them, `flat` itself."""
    if not isinstance(mappings, dict):
        return flat
    root: dict = {}
    for fqn, value in flat.items():
        keys = mappings.get(fqn, (fqn,))
        if not isinstance(keys, (tuple, list)) or not keys or \
                not all(isinstance(k, str) or (type(k) is int and 0 <= k < _MAX_LIST_INDEX) for k in keys):
            raise errors.CheckpointError(f"{fqn[:200]}: the layout maps it to {str(keys)[:200]}, not a path of "
                                         "names and list positions", path=path)
        node: Any = root
        for key, following in zip(keys, keys[1:]):
            node = _child(node, key, [] if isinstance(following, int) else {}, fqn, path)
        _put(node, keys[-1], value, fqn, path)
    return root


def _child(node: Any, key: Any, empty: Any, fqn: str, path: str) -> Any:
    if isinstance(node, list):
        _put(node, key, None, fqn, path, keep=True)
        if node[key] is None:
            node[key] = empty
        return node[key]
    if isinstance(node, dict):
        return node.setdefault(key, empty)
    raise errors.CheckpointError(f"{fqn[:200]}: its path runs through a value that holds nothing", path=path)


def _put(node: Any, key: Any, value: Any, fqn: str, path: str, keep: bool = False) -> None:
    if isinstance(node, list):
        if type(key) is not int:
            raise errors.CheckpointError(f"{fqn[:200]}: its path names {str(key)[:80]!r} in a list", path=path)
        node.extend([None] * (key + 1 - len(node)))
        if not keep:
            node[key] = value
    elif isinstance(node, dict):
        node[key] = value
    else:
        raise errors.CheckpointError(f"{fqn[:200]}: its path runs through a value that holds nothing", path=path)


def _remove_stale_temporaries(storage: Any, name: str) -> None:
    """What a save of `name` left when a rank died (DCP's collectives order the saves of a name):
    the files a save writes are deleted, anything else stays."""
    for stale in stale_temporaries(storage, name):
        storage.remove_temporary(stale, our_files(os.listdir(os.path.join(storage.root, stale))))


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
