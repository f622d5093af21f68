"""HDF5 files read as data, through the pure-Python reader `pyfive`, with bounds.

The format (HDF Group, "HDF5 File Format Specification Version 3.0")
------------------------------------------------------------------
An HDF5 file starts with a superblock whose 8-byte signature ``\\x89HDF\\r\\n\\x1a\\n``
lies at offset 0, 512, 1024, 2048, ... (a power of two of at least 512: the
"user block" before it holds anything). The superblock points to the root group's
object header; a group's object header lists its links (name -> the object header of
a group or dataset) and its attributes (small named values). A dataset's object
header gives its datatype, dataspace (shape), filters (compression) and layout:

- compact: the bytes are in the object header itself;
- contiguous: one run of ``prod(shape) * itemsize`` bytes at an address;
- chunked: chunks indexed by a B-tree, each maybe filtered (deflate, shuffle, ...).

Addresses are relative to the superblock's base address (the user block's size).

What this module does
---------------------
`H5File` hands the bytes (a mapped file, or a member of a zip: a buffer, never a
path) to pyfive, which parses the structure; every call into pyfive is made inside
`_pyfive_errors`, which turns any exception a hostile file provokes into a
`SourceError` naming the file (KeyboardInterrupt and the like pass through). pyfive
reads through a `ViewFile`, which refuses any single read larger than
`MAX_METADATA_READ`. The walk is bounded in depth (`MAX_DEPTH`) and objects
(`MAX_OBJECTS`), and a group reached twice (hard links can make cycles) is walked
once. A dataset's declared size is checked before any byte of it is read:
uncompressed data must lie inside the file (a contiguous dataset is then a
zero-copy view of the buffer, bounds checked by us, not pyfive); compressed or
chunked data is read by pyfive only up to `MAX_DECODED_BYTES`.

pyfive was chosen over h5py so that untrusted bytes never reach the C library
libhdf5 (a long history of memory-safety CVEs on crafted files); pyfive reads
what Keras writes (contiguous, uncompressed datasets; attributes; opaque ``|V2``
bfloat16 data) and is maintained by NCAS.

    >>> with mapped("model.weights.h5") as data:
    ...     h5 = H5File(memoryview(data), "model.weights.h5")
    ...     [d.path for d in h5.datasets.values()][:2]
    ['/layers/dense/vars/0', '/layers/dense/vars/1']
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from ..errors import SafeckptError, SourceError
from .base import ViewFile

__all__ = ["HDF5_SIGNATURE", "is_hdf5", "H5Dataset", "H5File", "MAX_DEPTH", "MAX_OBJECTS",
           "MAX_METADATA_READ", "MAX_DECODED_BYTES", "MAX_ATTRIBUTE_ITEMS"]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

# --- limits: each bounds work or memory a hostile file could otherwise make unbounded ------
# Groups below groups: Keras nests two levels per nested model (``layers/<name>``), so
# real files stay far below this; a deeper tree is a hostile file (or a cycle of soft links).
MAX_DEPTH = 64
# Groups and datasets walked in one file: a large Keras model has a few thousand.
MAX_OBJECTS = 200_000
# The most bytes pyfive may read at once while parsing the structure (an object header,
# a heap, a B-tree node): real ones are kilobytes; a larger request is a lie about a size.
MAX_METADATA_READ = 64 << 20
# The most bytes a compressed or chunked dataset may decode to (uncompressed data is
# bounded by the file's own size instead). Set on this module to read larger ones.
MAX_DECODED_BYTES = 4 << 30
# Items of one array-valued attribute kept in the tree; longer ones are summarised.
MAX_ATTRIBUTE_ITEMS = 10_000
# Characters of a string attribute kept (Keras' model_config of a legacy .h5 file is
# tens of kilobytes; a large model's a few megabytes).
MAX_ATTRIBUTE_CHARS = 64 << 20

# Where the superblock may start within the bytes `is_hdf5` sees (the first 4096).
_SIGNATURE_OFFSETS = (0, 512, 1024, 2048)
_LAYOUT_COMPACT, _LAYOUT_CONTIGUOUS, _LAYOUT_CHUNKED = 0, 1, 2


def is_hdf5(head: bytes) -> bool:
    """Whether `head` (a file's first 4096 bytes) holds an HDF5 superblock signature.

    The signature may follow a user block of 512, 1024 or 2048 bytes; a user block of
    4096 bytes or more puts it past `head` (Keras never writes one).

    >>> is_hdf5(b"\\x89HDF\\r\\n\\x1a\\n\\x00")
    True
    """
    return any(bytes(head[at:at + len(HDF5_SIGNATURE)]) == HDF5_SIGNATURE for at in _SIGNATURE_OFFSETS)


@dataclass(frozen=True)
class H5Dataset:
    """One dataset: its path, the numpy type and shape it declares, its attributes, and
    (for uncompressed contiguous data) where its bytes lie in the buffer."""

    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    attrs: dict[str, Any]
    offset: Optional[int]          # absolute offset of contiguous, unfiltered bytes; else None
    node: Any = field(repr=False, compare=False)   # pyfive's Dataset, for data read by pyfive

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@contextlib.contextmanager
def _pyfive_errors(path: str, what: str, tensor: Optional[str] = None) -> Iterator[None]:
    """Any exception pyfive raises on a malformed file becomes a `SourceError` naming the file.

    pyfive parses with struct, numpy and recursion: a hostile file can make it raise
    almost anything (ValueError, KeyError, struct.error, RecursionError, MemoryError,
    NotImplementedError); none of that may escape as anything but our error.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pyfive warns of parts it skips; the error, if any, says it
            yield
    except SafeckptError:
        raise
    except Exception as exc:  # the boundary with a parser of untrusted bytes: anything it raises
        raise SourceError(f"HDF5: cannot read {what}: {type(exc).__name__}: {str(exc)[:200]} "
                          "(a malformed or unsupported HDF5 file)", path=path, tensor=tensor) from None


class H5File:
    """The groups and datasets of an HDF5 file held in a buffer; nothing is trusted.

    `groups` maps each group's path (``/``, ``/layers``, ...) to its attributes;
    `datasets` maps each dataset's path to an `H5Dataset`; both in walk order
    (depth first, links in the order pyfive lists them).

    >>> h5 = H5File(memoryview(open("m.weights.h5", "rb").read()), "m.weights.h5")
    >>> h5.groups["/layers/dense/vars"]
    {'name': 'dense'}
    >>> h5.read(h5.datasets["/layers/dense/vars/0"]).shape
    (19, 16)
    """

    def __init__(self, buffer: memoryview, path: str) -> None:
        try:
            import pyfive  # optional: the ``keras`` extra
        except ImportError:
            raise SourceError("reading HDF5 (Keras .keras, .weights.h5 and .h5 files) needs the pure-Python "
                              "HDF5 reader pyfive: pip install 'safeckpt[keras]' (or pip install pyfive)",
                              path=path) from None
        self.path = path
        self._buffer = buffer
        self.groups: dict[str, dict[str, Any]] = {}
        self.datasets: dict[str, H5Dataset] = {}
        self.notes: list[str] = []
        with _pyfive_errors(path, "the superblock"):
            self._file = pyfive.File(ViewFile(buffer, max_read=MAX_METADATA_READ))
            self._base = int(self._file.userblock_size or 0)
        self._walk(pyfive)

    def _walk(self, pyfive: Any) -> None:
        seen: set[int] = set()
        stack: list[tuple[Any, str, int]] = [(self._file, "/", 0)]
        count = 0
        while stack:
            group, where, depth = stack.pop()
            with _pyfive_errors(self.path, f"the group {where!r}"):
                key = id(group._dataobjects)  # pyfive caches one per object header
                if key in seen:
                    self.notes.append(f"HDF5: the group {where!r} is linked twice; walked once")
                    continue
                seen.add(key)
                self.groups[where] = _attributes(group.attrs, self.path, where)
                children = list(group.keys())
            if depth >= MAX_DEPTH:
                if children:
                    raise SourceError(f"HDF5: groups nest deeper than {MAX_DEPTH} levels at {where!r} "
                                      "(a hostile file or a cycle of links)", path=self.path)
                continue
            count += len(children)
            if count > MAX_OBJECTS:
                raise SourceError(f"HDF5: more than {MAX_OBJECTS} groups and datasets; refused "
                                  "(raise hdf5_reader.MAX_OBJECTS to read it)", path=self.path)
            subgroups = []
            for name in children:
                child_path = f"{where.rstrip('/')}/{name}"
                with _pyfive_errors(self.path, f"the object {child_path!r}"):
                    child = group.get_lazy_view(name)  # a chunk index is read only when the data is
                    if isinstance(child, pyfive.Group):
                        subgroups.append((child, child_path, depth + 1))
                    else:
                        self.datasets[child_path] = self._dataset(child, child_path)
            stack.extend(reversed(subgroups))

    def _dataset(self, node: Any, where: str) -> H5Dataset:
        dsid = node.id
        dtype = np.dtype(node.dtype)
        shape = tuple(int(n) for n in node.shape)
        if any(n < 0 for n in shape):
            raise SourceError(f"HDF5: the dataset declares the shape {list(shape)}", path=self.path,
                              tensor=where)
        offset = None
        if dsid.layout_class == _LAYOUT_CONTIGUOUS and not dsid.filter_pipeline:
            offset = self._base + int(dsid.data_offset)
        return H5Dataset(where, dtype, shape, _attributes(node.attrs, self.path, where), offset, node)

    def read(self, dataset: H5Dataset) -> np.ndarray:
        """The dataset's values as stored (its own numpy type): a read-only zero-copy view of
        the buffer for uncompressed contiguous data, else decoded by pyfive within
        `MAX_DECODED_BYTES`.

        >>> h5.read(h5.datasets["/layers/dense/vars/1"]).dtype
        dtype('float32')
        """
        nbytes = dataset.nbytes
        if dataset.dtype.hasobject or dataset.dtype.itemsize == 0:
            raise SourceError(f"HDF5: the dataset holds {dataset.dtype} values, not numbers",
                              path=self.path, tensor=dataset.path)
        if dataset.offset is not None:
            if nbytes == 0:
                return np.zeros(dataset.shape, dtype=dataset.dtype)
            if dataset.offset < 0 or dataset.offset + nbytes > len(self._buffer):
                raise SourceError(f"HDF5: the dataset's {nbytes} bytes at offset {dataset.offset} run "
                                  f"past the end of the file ({len(self._buffer)} bytes): truncated "
                                  "or corrupt", path=self.path, tensor=dataset.path)
            array = np.frombuffer(self._buffer, dtype=dataset.dtype, count=math.prod(dataset.shape),
                                  offset=dataset.offset)
            return array.reshape(dataset.shape)
        if nbytes > MAX_DECODED_BYTES:
            raise SourceError(f"HDF5: the compressed or chunked dataset declares {nbytes} bytes, more "
                              f"than the limit of {MAX_DECODED_BYTES} (raise "
                              "hdf5_reader.MAX_DECODED_BYTES if the file is trusted)",
                              path=self.path, tensor=dataset.path)
        with _pyfive_errors(self.path, "the dataset's data", dataset.path):
            array = np.asarray(dataset.node[()])
            if array.shape != dataset.shape or array.dtype.itemsize != dataset.dtype.itemsize:
                raise SourceError(f"HDF5: the dataset declares {dataset.dtype}{list(dataset.shape)} "
                                  f"but decodes to {array.dtype}{list(array.shape)}", path=self.path,
                                  tensor=dataset.path)
            return array.view(dataset.dtype)

    def close(self) -> None:
        """Drop pyfive's objects and the buffer (mapped files can then be closed)."""
        self._file = None
        self.datasets = {}
        self._buffer = memoryview(b"")


def _attributes(attrs: Any, path: str, where: str) -> dict[str, Any]:
    """An object's attributes as JSON-able values: text decoded, arrays as bounded lists."""
    with _pyfive_errors(path, f"the attributes of {where!r}"):
        return {str(key): _attribute_value(value) for key, value in dict(attrs).items()}


def _attribute_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value[:MAX_ATTRIBUTE_CHARS].decode("utf-8", "replace")
    if isinstance(value, str):
        return value[:MAX_ATTRIBUTE_CHARS]
    if isinstance(value, np.ndarray):
        if value.size > MAX_ATTRIBUTE_ITEMS:
            return {"__array__": str(value.dtype), "shape": list(value.shape)}
        if value.dtype.kind in "biufSUO":
            return [_attribute_value(v) for v in value.reshape(-1).tolist()]
        return {"__array__": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return _attribute_value(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return {"__repr__": repr(value)[:200]}
