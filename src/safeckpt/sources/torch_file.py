"""PyTorch checkpoints (and other pickles of tensors) as TensorSources, without torch.

The zip format (``torch.save`` since PyTorch 1.6)
-------------------------------------------------
A zip archive (members stored, not compressed) whose entries all sit under one
top folder, the *archive prefix* (the file's stem when it was saved, often
``archive``); the prefix is taken from the first entry, as torch does:

* ``<prefix>/data.pkl``: the pickled object. Each tensor is a call to
  ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
  requires_grad, backward_hooks)`` (``_rebuild_tensor_v3`` adds the dtype, for
  dtypes with no typed storage class: fp8, uint16, ...), and each storage is
  a persistent id ``('storage', storage_type, key, location, numel)``; numel
  counts elements of the storage type (bytes for ``UntypedStorage``).
* ``<prefix>/data/<key>``: the storage's raw bytes, aligned to 64 bytes in
  the file (``.storage_alignment``) since torch 2.x.
* ``<prefix>/byteorder``: ``little`` or ``big`` (absent before 1.13: little).
* ``<prefix>/version`` (``.format_version``): the format version, 1 to 3.
* ``<prefix>/.data/serialization_id``: an identifier, ignored.

Tensors are strided views into storages (a storage may hold several tensors, as
tied weights or slices do), so each becomes a read-only numpy view of the file
bytes; nothing is copied unless the file is big-endian.

The legacy formats (``_use_new_zipfile_serialization=False`` and the tar format)
are parsed in `torch_legacy` and come out here as the same records. A file that
is only a pickle (a ``pickle.dump`` of numpy arrays, a Paddle ``.pdparams``) is
read the same way: its numpy arrays are its tensors.
"""

from __future__ import annotations

import math
import mmap
from typing import Any, Callable, Optional

import numpy as np

from .. import errors
from ..format.dtypes import DTYPES, dtype_for_numpy
from . import pickle_vm
from .base import FileSpan, TensorInfo, TensorSource, describe_object, flatten, map_file, unmap
from .pickle_vm import StorageRef, TensorRef, TorchDType, brief
from .zip_archive import ZipArchive

# torch dtype name -> safetensors dtype name (complex128 and complex32 have none)
TORCH_TO_SAFETENSORS = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "complex64": "C64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ", "float8_e8m0fnu": "F8_E8M0",
}
# The zip members a data.pkl is read from; the largest data.pkl we accept.
DATA_PKL = "data.pkl"
# Dimensions of a tensor we read (numpy's own limit is 64).
MAX_DIMS = 64
MAX_PICKLE_BYTES = 1 << 31
# Logical bytes of all the *expanded* views of one file together: views whose size x stride
# reaches fewer elements than they hold (stride 0, as expand() makes, or overlapping
# strides). Every conversion, cast, merge or diff materialises a view at its logical size,
# so a 4-byte storage expanded by stride 0 to 2**40 elements would be written as 4 TiB, or
# allocated. Real checkpoints rarely save such views, and those are small (a mask or a
# bias broadcast over a batch); beyond this budget they stay listed (inspect shows them)
# but reading one raises SourceError. Counted over the file, not per view: a pickle names
# thousands of views of one storage for a few bytes each. To read a larger one, raise
# this module constant (the whole logical size is then held in memory or written).
MAX_EXPANDED_BYTES = 256 << 20
_PAGE = mmap.PAGESIZE


def is_tensor_like(x: Any) -> bool:
    return isinstance(x, (TensorRef, StorageRef, np.ndarray))


class PickleSource(TensorSource):
    """Tensors and structure of a pickle-based checkpoint, read through `pickle_vm`.

    `value` is the object the pickle machine made (records, placeholders and plain data,
    before it is flattened into `tree`); `storage_view(key)` gives a storage's raw bytes
    (a zero-copy view of the file, in the file's `byteorder`) and `storage_span(key)` where
    they lie in the file.
    """

    def __init__(self, path: str, *, format: str, result: Any, globals: list, findings: list,
                 storage_bytes: Callable[[str], memoryview], byteorder: str = "little",
                 mapping: Optional[mmap.mmap] = None, details: str = "") -> None:
        super().__init__(path)
        self.format = format
        self.globals = globals
        self.pickle_findings = list(findings)
        self.value = result
        self._storage_bytes = storage_bytes
        self.byteorder = byteorder
        self._mapping = mapping
        self._details = details
        flat = flatten(result, is_tensor_like, describe_object)
        self.tree = flat.tree
        self.notes = flat.notes
        self._objects: dict[str, Any] = {}
        self._infos: dict[str, TensorInfo] = {}
        #: name -> why reading it is refused (an expanded view past MAX_EXPANDED_BYTES)
        self._refused: dict[str, str] = {}
        expanded_bytes = 0
        first_of: dict[Any, str] = {}
        for name, obj in flat.tensors.items():
            info = self._info(name, obj)
            if info is None:
                continue
            self._objects[name], self._infos[name] = obj, info
            identity = _identity(obj)
            if identity in first_of:
                self.aliases[name] = first_of[identity]
                continue
            first_of[identity] = name
            expansion = _expansion(obj, info)
            if expansion is not None:
                expanded_bytes += info.nbytes
                if expanded_bytes > MAX_EXPANDED_BYTES:
                    self._refused[name] = (
                        f"a view of {expansion[0]:,} bytes expanded to {info.nbytes:,} bytes by "
                        f"{expansion[1]}: refused (the expanded views of a file may hold "
                        f"{MAX_EXPANDED_BYTES:,} bytes in all: torch_file.MAX_EXPANDED_BYTES); leave it "
                        "out (--exclude), or save it with .contiguous() where it was made")
                    self.note(f"{name}: {self._refused[name]}")

    # -- what each tensor is
    def _info(self, name: str, obj: Any) -> Optional[TensorInfo]:
        if isinstance(obj, np.ndarray):
            dtype = dtype_for_numpy(obj.dtype)
            if dtype is None:
                self.note(f"{name}: numpy dtype {obj.dtype} has no safetensors equivalent; skipped")
                return None
            return TensorInfo(dtype.name, tuple(obj.shape), obj.nbytes)
        torch_dtype = _torch_dtype_of(obj)
        st = TORCH_TO_SAFETENSORS.get(torch_dtype.name) if torch_dtype else None
        if st is None:
            what = torch_dtype.name if torch_dtype else "an unknown dtype"
            self.note(f"{name}: torch.{what} has no safetensors equivalent; skipped")
            return None
        shape = tuple(obj.size if isinstance(obj, TensorRef) else (obj.numel,))
        if len(shape) > MAX_DIMS or any(d >= 1 << 62 for d in shape) or \
                math.prod(d for d in shape if d) >= 1 << 62:
            self.note(f"{name}: shape {brief(shape)} is out of range; skipped")
            return None
        return TensorInfo(st, shape, math.prod(shape) * DTYPES[st].bits // 8)

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    # -- the data
    def read(self, name: str) -> np.ndarray:
        info = self[name]
        obj = self._objects[name]
        if self._refused:
            refused = self._refused.get(self.aliases.get(name, name))
            if refused is not None:
                raise errors.SourceError(refused, path=self.path, tensor=name)
        if isinstance(obj, np.ndarray):
            out = obj.view()
            out.flags.writeable = False
            return out
        dtype = DTYPES[info.dtype]
        np_dtype = np.dtype(dtype.numpy)
        if isinstance(obj, StorageRef):
            return self._typed_storage(obj, np_dtype, name)[:info.shape[0]]
        storage = self._typed_storage(obj.storage, np_dtype, name)
        itemsize = np_dtype.itemsize
        if not all(obj.size):
            return np.zeros(obj.size, np_dtype)
        strides = tuple(st if n > 1 else 0 for n, st in zip(obj.size, obj.stride))  # unused ones: any
        last = obj.storage_offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride))
        if last >= storage.size:
            raise errors.SourceError(
                f"tensor of shape {list(obj.size)} at element offset {obj.storage_offset} with "
                f"strides {list(obj.stride)} runs past its storage of {storage.size} elements",
                path=self.path, tensor=name)
        # as_strided cannot carry ml_dtypes (bf16, fp8): stride a same-width view, then relabel
        plain = np.dtype(f"V{itemsize}") if np_dtype.kind == "V" or np_dtype.isbuiltin != 1 else np_dtype
        base = storage.view(plain)[obj.storage_offset:]
        view = np.lib.stride_tricks.as_strided(
            base, shape=obj.size, strides=tuple(st * itemsize for st in strides), writeable=False)
        return view if plain is np_dtype else view.view(np_dtype)

    def _typed_storage(self, ref: Any, np_dtype: np.dtype, name: str) -> np.ndarray:
        if not isinstance(ref, StorageRef):
            raise errors.SourceError(f"the tensor's storage is {type(ref).__name__}, not a stored "
                                     "record", path=self.path, tensor=name)
        raw = self._storage_bytes(ref.key)
        declared = ref.numel * ref.dtype.itemsize
        if len(raw) < declared:  # the pickle claims more than the record holds
            raise errors.SourceError(
                f"storage {ref.key!r} is declared as {ref.numel} x {ref.dtype.itemsize} bytes "
                f"but its record holds only {len(raw)} bytes", path=self.path, tensor=name)
        usable = declared - declared % np_dtype.itemsize
        array = np.frombuffer(raw, np.uint8, usable).view(np_dtype)
        if self.byteorder == "big" and np_dtype.itemsize > 1:
            array = array.byteswap().view(np_dtype)
            array.flags.writeable = False
        return array

    def storage_view(self, key: str) -> memoryview:
        """The raw bytes of storage `key`, as the file holds them (SourceError if it holds none)."""
        return self._storage_bytes(key)

    def storage_span(self, key: str) -> Optional[FileSpan]:
        """Where storage `key`'s bytes lie in the file; None when they are not a plain range of it."""
        if self._mapping is None:
            return None
        span = _span_in(self._mapping, self._storage_bytes(key))
        return None if span is None else FileSpan(self.path, span[0], span[1] - span[0])

    def file_span(self, name: str) -> Optional[FileSpan]:
        obj = self._objects.get(name)
        if self._mapping is None or self.byteorder != "little" or not isinstance(obj, TensorRef) \
                or not isinstance(obj.storage, StorageRef):
            return None
        info = self._infos[name]
        itemsize = DTYPES[info.dtype].bits // 8
        expected, step = [], 1
        for n in reversed(obj.size):
            expected.append(step)
            step *= n
        if any(n != 1 and s != e for n, s, e in zip(obj.size, obj.stride, reversed(expected))):
            return None  # a view that is not C-contiguous: written from the array instead
        try:
            record = _span_in(self._mapping, self._storage_bytes(obj.storage.key))
        except errors.SafeckptError:
            return None
        start = obj.storage_offset * itemsize
        if record is None or start + info.nbytes > record[1] - record[0]:
            return None
        return FileSpan(self.path, record[0] + start, info.nbytes)

    def release(self, name: str) -> None:
        """Drop the mapped pages of a tensor's storage (they are re-read if needed again)."""
        obj = self._objects.get(name)
        ref = obj.storage if isinstance(obj, TensorRef) else obj
        if self._mapping is None or not isinstance(ref, StorageRef):
            return
        try:
            raw = self._storage_bytes(ref.key)
        except errors.SafeckptError:
            return
        span = _span_in(self._mapping, raw)
        if span is not None:
            start, end = -(-span[0] // _PAGE) * _PAGE, span[1] // _PAGE * _PAGE
            if end > start:
                self._mapping.madvise(mmap.MADV_DONTNEED, start, end - start)

    def describe(self) -> str:
        text = f"{_FORMAT_NAMES.get(self.format, self.format)}, {len(self)} tensors"
        return f"{text}, {self._details}" if self._details else text

    def close(self) -> None:
        self._objects.clear()
        self.value = None
        self._storage_bytes = _closed  # drops the archive and its views of the mapping
        unmap(self._mapping)


def _closed(key: str) -> memoryview:
    raise errors.SourceError("the source is closed", tensor=key)


_FORMAT_NAMES = {
    "torch-zip": "PyTorch checkpoint (zip, torch.save since 1.6)",
    "torch-legacy": "PyTorch checkpoint (legacy pre-1.6 format)",
    "torch-tar": "PyTorch checkpoint (legacy tar format)",
    "pickle": "Python pickle",
}


def _torch_dtype_of(obj: Any) -> Optional[TorchDType]:
    if isinstance(obj, TensorRef):
        dtype = obj.dtype or getattr(obj.storage, "dtype", None)
    else:
        dtype = obj.dtype
    return dtype if isinstance(dtype, TorchDType) else None


def _expansion(obj: Any, info: TensorInfo) -> Optional[tuple[int, str]]:
    """(bytes the view spans in its storage, "stride 0" or "overlapping strides") when a
    torch view holds more elements than the storage it spans; else None."""
    if not isinstance(obj, TensorRef) or not info.numel:
        return None
    used = [(n, s) for n, s in zip(obj.size, obj.stride) if n > 1]  # a dimension of 1 repeats nothing
    span = 1 + sum((n - 1) * s for n, s in used)
    if info.numel <= span:
        return None
    return span * (info.nbytes // info.numel), "stride 0" if any(s == 0 for _, s in used) else \
        "overlapping strides"


def _identity(obj: Any) -> Any:
    if isinstance(obj, TensorRef) and isinstance(obj.storage, StorageRef):
        return (obj.storage.key, obj.storage_offset, obj.size, obj.stride, _torch_dtype_of(obj))
    return id(obj)


def _span_in(mapping: mmap.mmap, raw: memoryview) -> Optional[tuple[int, int]]:
    """The byte range `raw` (a view into `mapping`) covers, or None."""
    try:
        base = np.frombuffer(mapping, np.uint8)
        start = np.frombuffer(raw, np.uint8).ctypes.data - base.ctypes.data
    except (ValueError, TypeError):
        return None
    if 0 <= start and start + len(raw) <= len(mapping):
        return start, start + len(raw)
    return None


# --- opening each format ----------------------------------------------------------

def _load_pickle(data: Any, path: str, member: Optional[str] = None, **kwargs: Any) -> Any:
    try:
        return pickle_vm.load(data, **kwargs)
    except pickle_vm.PickleError as exc:
        detail = exc.detail
    # raised outside the handler: the PickleError's frames (holding views of the file's
    # mapping, which would keep it from closing) are gone by now
    raise errors.SourceError(f"{member}: {detail}" if member else detail, path=path)


def open_torch_zip(path: str, readings: Optional[dict] = None) -> PickleSource:
    """A ``torch.save`` zip checkpoint; storages are mapped zero-copy from the file.

    `readings` maps data.pkl bytes to the pickle machine's reading of them, made by a scan
    of this file just before (`ops.scan.scan(path, keep=...)`): a data.pkl found there is
    not run a second time."""
    mapping = map_file(path)
    try:
        return torch_zip_in(mapping, path, readings, mapping=mapping)
    except BaseException:
        unmap(mapping)
        raise


def torch_zip_in(data: Any, path: str, readings: Optional[dict] = None,
                 mapping: Optional[mmap.mmap] = None) -> PickleSource:
    """A ``torch.save`` zip held in `data` (the whole of a mapped file, or a part of one: an item
    of a torch.distributed checkpoint's ``.distcp`` file); `path` names it in messages."""
    archive = ZipArchive(data, path)
    names = archive.names()
    if not names:
        raise errors.SourceError("the zip archive is empty: not a PyTorch checkpoint", path=path)
    prefix = names[0].split("/", 1)[0] if "/" in names[0] else ""
    member = lambda rel: f"{prefix}/{rel}" if prefix else rel  # noqa: E731
    pkl_names = [n for n in names if n == member(DATA_PKL)]
    if not pkl_names:
        raise errors.SourceError(
            f"no {member(DATA_PKL)} in the zip archive: not a PyTorch checkpoint "
            f"(members: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''})", path=path)
    byteorder = "little"
    if member("byteorder") in names:
        byteorder = bytes(archive.read(member("byteorder"), max_size=16)).decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise errors.SourceError(f"{member('byteorder')} says {byteorder!r}, not little or big",
                                     path=path)
    data_pkl = archive.read(member(DATA_PKL), max_size=MAX_PICKLE_BYTES)
    result = readings.get(bytes(data_pkl)) if readings else None
    if result is None:
        result = _load_pickle(data_pkl, path, member(DATA_PKL))

    def storage_bytes(key: str) -> memoryview:
        name = member(f"data/{key}")
        try:
            record = archive.member(name)
        except errors.SafeckptError:
            raise errors.SourceError(f"the pickle names storage {key!r} but the archive has "
                                     f"no member {name!r}", path=path) from None
        if record.method != 0:
            raise errors.SourceError(f"storage record {name!r} is compressed (method "
                                     f"{record.method}); torch writes them stored", path=path)
        return archive.read(record)

    details = f"archive prefix {prefix!r}" + (f", {byteorder}-endian" if byteorder != "little" else "")
    return PickleSource(path, format="torch-zip", result=result.value, globals=result.globals,
                        findings=result.findings, storage_bytes=storage_bytes,
                        byteorder=byteorder, mapping=mapping, details=details)


def open_pickle(path: str) -> PickleSource:
    """A file that is one pickle (numpy arrays inside are its tensors; Paddle ``.pdparams``)."""
    mapping = map_file(path)
    try:
        result = _load_pickle(mapping, path)

        def no_storages(key: str) -> memoryview:
            raise errors.SourceError(f"the pickle names torch storage {key!r}, but a plain pickle "
                                     "file holds no storage records", path=path)

        return PickleSource(path, format="pickle", result=result.value, globals=result.globals,
                            findings=result.findings, storage_bytes=no_storages, mapping=None)
    finally:
        unmap(mapping)


def open_torch_legacy(path: str) -> PickleSource:
    """A pre-1.6 ``torch.save`` file (or one saved with ``_use_new_zipfile_serialization=False``)."""
    from .torch_legacy import read_legacy
    return _from_layout(path, read_legacy)


def open_torch_tar(path: str) -> PickleSource:
    """A ``torch.save`` file in the oldest, tar-based format."""
    from .torch_legacy import read_legacy_tar
    return _from_layout(path, read_legacy_tar)


def _from_layout(path: str, reader: Callable) -> PickleSource:
    mapping = map_file(path)
    try:
        layout = reader(mapping, path)

        def storage_bytes(key: str) -> memoryview:
            try:
                offset, nbytes = layout.storages[key]
            except KeyError:
                raise errors.SourceError(f"the pickle names storage {key!r}, which the file does "
                                         "not hold", path=path) from None
            return memoryview(mapping)[offset:offset + nbytes]

        return PickleSource(path, format=layout.kind, result=layout.value, globals=layout.globals,
                            findings=layout.findings, storage_bytes=storage_bytes,
                            byteorder=layout.byteorder, mapping=mapping)
    except BaseException:
        unmap(mapping)
        raise
