"""numpy ``.npy`` and ``.npz`` files as TensorSources; object arrays are never unpickled.

The npy format (numpy/lib/format.py, NEP 1)
-------------------------------------------
An ``.npy`` file holds one array:

* 6 bytes of magic, ``b"\\x93NUMPY"``;
* 1 byte major and 1 byte minor version: 1.0, 2.0 or 3.0;
* the header length N, little-endian: 2 bytes (1.0) or 4 bytes (2.0, 3.0);
* N bytes of header: the ``repr`` of a Python dict, ASCII/latin-1 (1.0, 2.0) or
  UTF-8 (3.0), with exactly three keys:

  - ``'descr'``: the dtype as ``numpy.lib.format.dtype_to_descr`` writes it: a
    type string (``'<f4'``, ``'|b1'``, ``'>i8'``, ``'|O'``, ``'<U10'``,
    ``'<M8[ns]'``, ``'|V16'``) or, for a structured dtype, a list of
    ``(name, descr)`` / ``(name, descr, shape)`` tuples (nested lists for
    nested records; a name may be a ``(title, name)`` tuple);
  - ``'fortran_order'``: ``True`` if the data is in Fortran (column-major) order;
  - ``'shape'``: a tuple of ints (``()`` for a 0-d array; Python 2 wrote
    ``3L``);

  padded with spaces and ending in ``\\n`` so that magic + length + header is
  a multiple of 64 bytes (16 before numpy 1.9; readers do not rely on it);
* the data: ``prod(shape) * itemsize`` raw bytes in the header's byte order and
  memory order, or, when the dtype holds Python objects (``'|O'``), a pickle
  of the whole array (what ``numpy.save`` writes when pickles are allowed; protocol 3).

numpy reads the header with ``ast.literal_eval`` (literals only: nothing is
evaluated) and caps it at 10,000 bytes (``max_header_size``) so that parsing it
cannot be turned into a denial of service. An ``.npz`` file
(``numpy.savez``/``savez_compressed``) is a zip archive of ``NAME.npy`` members,
stored or deflated.

What this module does
---------------------
`numpy_header` reads a header with numpy's own reader, the one ``numpy.load``
uses, so that whoever reads an npy header here sees what numpy sees.
`read_npy_header` adds our checks around it: the header's size against a limit
before numpy parses it, truncation, and shapes that numpy's reader lets through
but no array can have (bools as sizes, negative sizes, more than 64 dimensions,
more bytes than any array). Arrays of a dtype safetensors has (bool, ints, uints,
float16/32/64, complex64) are tensors: zero-copy read-only views of the mapped
file, Fortran arrays as transposed views; big-endian arrays are byte-swapped into
little-endian copies when read. Object arrays' pickles go through `pickle_vm`: the
arrays inside become tensors named by their dotted path and the rest goes into
`tree`; the globals the pickle named are kept on the source (``globals``,
``pickle_findings``) for the scan. Structured, string, datetime and other dtypes
are not tensors: the tree describes them and `notes` says so.

    >>> with NpzSource("weights.npz") as src:
    ...     w = src.read("layer0")
"""

from __future__ import annotations

import math
import os
import re
import zlib
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
from numpy.lib import format as npy_format

from .. import errors
from ..format.dtypes import dtype_for_numpy
from ..format.header import MAX_ARRAY_BYTES, MAX_NDIM  # numpy's limits on any array
from . import pickle_vm
from .base import TensorInfo, TensorSource, flatten
from .base import describe_object as describe_pickle_record
from .base import ViewFile, map_file, unmap
from .zip_archive import ZipArchive

MAGIC = b"\x93NUMPY"
# (major, minor) -> bytes of the header length
VERSIONS = {(1, 0): 2, (2, 0): 4, (3, 0): 4}

# --- limits: each bounds something the file controls ------------------------------
# Header bytes numpy may parse. numpy refuses more than 10,000 by default (a guard against
# slow parsing); structured dtypes with many fields legitimately come close, so we allow
# a little more. Lift it with ``max_header_size=`` for a file you trust.
MAX_HEADER_SIZE = 65_536
# An object array's pickle is decompressed whole to be read; a compressed member may
# not claim more than this (its bytes are all in memory at once).
MAX_OBJECT_PICKLE_BYTES = 1 << 31
# Pickles read after the first one's STOP (numpy never reads them; the scan should).
MAX_TRAILING_PICKLES = 16
# A string array's values are shown in the tree up to this many elements and bytes (a
# compressed member is inflated to read them, so its size is bounded too).
MAX_VALUES_IN_TREE = 1000
MAX_VALUES_BYTES = 1 << 16
# Zip compression methods numpy writes: stored and deflated.
STORED, DEFLATED = 0, 8
# Zip flag bits of encryption (0, 6, 13): such members are left to the zip reader to refuse.
_ENCRYPTED_FLAGS = 0x0001 | 0x0040 | 0x2000


class NpyHeader(NamedTuple):
    """An npy header: the dtype, the shape, the memory order and where the data starts.

    `data_offset` counts from the start of the buffer the header was read from.
    """

    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    data_offset: int

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def is_npy(head: bytes) -> bool:
    """True if `head` (the first bytes of a file) starts with the npy magic.

    The version is not checked here: `read_npy_header` says precisely what is wrong.

    >>> is_npy(b"\\x93NUMPY\\x01\\x00v\\x00{'descr': ...")
    True
    """
    return bytes(head[:len(MAGIC)]) == MAGIC


# --- the header --------------------------------------------------------------------

try:  # numpy >= 2.0 keeps the implementation in a private module
    from numpy.lib._format_impl import _read_array_header
except ImportError:  # numpy 1.24 - 1.26
    from numpy.lib.format import _read_array_header  # type: ignore[attr-defined,no-redef]


def _read_array_header_3_0(fp: Any, max_header_size: int) -> tuple:
    # Version 3.0 (UTF-8 field names) has no public reader: read_array_header_1_0 and
    # _2_0 are one-line wrappers of this private function, which numpy.load itself calls
    # for every version, with this signature in every numpy we support (1.24 and later).
    return _read_array_header(fp, (3, 0), max_header_size=max_header_size)


# numpy's reader of each header version
_NUMPY_READERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0,
                  (3, 0): _read_array_header_3_0}


def numpy_header(buf: Any, offset: int = 0, *, max_header_size: int = MAX_HEADER_SIZE) -> NpyHeader:
    """The npy header at `offset` of `buf` (bytes, memoryview, mmap), read by numpy's own reader.

    Only numpy's checks apply (`read_npy_header` adds ours). Whatever numpy refuses
    raises ValueError with numpy's reason on one line.

    >>> numpy_header(open("a.npy", "rb").read())
    NpyHeader(dtype=dtype('float32'), shape=(3, 4), fortran_order=False, data_offset=128)
    """
    view = memoryview(buf).cast("B")[offset:]
    try:
        f = ViewFile(view)
        version = npy_format.read_magic(f)
        if version not in _NUMPY_READERS:
            raise ValueError(f"npy format version {version[0]}.{version[1]} is not one numpy reads")
        # (numpy warns, as numpy.load does, when a header was written by Python 2; the
        # warning is let through: silencing it would change the process's warning filters)
        shape, fortran_order, dtype = _NUMPY_READERS[version](f, max_header_size=max_header_size)
        return NpyHeader(dtype, shape, fortran_order, offset + f.tell())
    except Exception as exc:  # noqa: BLE001 - numpy parses text from the file: anything it raises is a refusal
        raise ValueError(_numpy_reason(exc)) from None
    finally:
        view.release()  # (a mapping with views into it cannot be closed)


_AST_NODE = re.compile(r"<ast\.(\w+) object at 0x[0-9a-fA-F]+>")  # in literal_eval's messages


def _numpy_reason(exc: BaseException) -> str:
    """What numpy's reader raised, on one bounded line."""
    if isinstance(exc, UnicodeDecodeError):
        return f"the header is not valid {exc.encoding}: {exc.reason} at byte {exc.start}"
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, ValueError):  # numpy's own refusals are ValueErrors; name the others
        text = f"{type(exc).__name__}: {text}"
    text = " ".join(text.split())[:200]
    cause = exc.__cause__  # "Cannot parse header: '...'" from the SyntaxError saying why
    if cause is not None:
        why = cause.msg if isinstance(cause, SyntaxError) else str(cause)
        text += f" ({' '.join(why.split())[:120]})"
    return _AST_NODE.sub(r"\1", text)


def read_npy_header(buf: Any, offset: int, path: str, name: str, *,
                    max_header_size: int = MAX_HEADER_SIZE) -> NpyHeader:
    """Read and check the npy header at `offset` of `buf` (bytes, memoryview, mmap).

    numpy reads it (`numpy_header`); errors are `SourceError`s naming `path` and
    the array `name`. The data is not checked against the buffer here (callers know
    whether trailing bytes are allowed).

    >>> h = read_npy_header(open("a.npy", "rb").read(), 0, "a.npy", "a")
    >>> h.dtype, h.shape, h.fortran_order, h.data_offset
    (dtype('float32'), (3, 4), False, 128)
    """
    def fail(detail: str) -> errors.SourceError:
        return errors.SourceError(detail, path=path, tensor=name)

    available = len(buf) - offset
    magic = bytes(buf[offset:offset + len(MAGIC)])
    if magic != MAGIC and len(magic) < len(MAGIC) and MAGIC.startswith(magic):
        raise fail(f"the npy data ends after {available} bytes, inside its magic (truncated)")
    if magic != MAGIC:
        raise fail(f"not an npy array: it starts with {magic!r}, not the npy magic {MAGIC!r}")
    if available < 8:
        raise fail(f"the npy data ends after {available} bytes, inside its version field (truncated)")
    version = tuple(bytes(buf[offset + 6:offset + 8]))
    if version not in VERSIONS:
        raise fail(f"npy format version {version[0]}.{version[1]} is not one we read "
                   f"({', '.join(f'{a}.{b}' for a, b in VERSIONS)})")
    start = offset + 8 + VERSIONS[version]
    if available < 8 + VERSIONS[version]:
        raise fail(f"the npy data ends after {available} bytes, inside its header length (truncated)")
    length = int.from_bytes(bytes(buf[offset + 8:start]), "little")
    if length > max_header_size:
        raise fail(f"the npy header is {length} bytes, more than the limit of {max_header_size} "
                   "(a guard against headers made to be slow to parse); if you trust the file, "
                   f"pass max_header_size={length}")
    if start + length > len(buf):
        raise fail(f"the npy header claims {length} bytes but only {len(buf) - start} are left (truncated)")
    try:
        header = numpy_header(buf, offset, max_header_size=max_header_size)
    except ValueError as exc:
        raise fail(f"numpy refuses the npy header: {exc}") from None
    _check_shape(header, fail)
    return header


def _check_shape(header: NpyHeader, fail: Callable[[str], Exception]) -> None:
    """What numpy's reader lets through but no array can have."""
    shape = header.shape
    if not all(type(d) is int for d in shape):  # numpy's reader takes True for 1
        raise fail(f"the npy header's shape is {shape!r:.100}, not a tuple of ints")
    if len(shape) > MAX_NDIM:
        raise fail(f"the npy header's shape has {len(shape)} dimensions; numpy allows at most {MAX_NDIM}")
    if any(d < 0 for d in shape):
        raise fail(f"the npy header's shape {shape} has a negative dimension")
    # numpy must be able to address the array even when it is empty (shape (0, 2**62));
    # each size is bounded first so that the product stays small
    if (any(d > MAX_ARRAY_BYTES for d in shape)
            or math.prod(d for d in shape if d) * max(header.dtype.itemsize, 1) > MAX_ARRAY_BYTES):
        raise fail(f"the shape {str(shape)[:200]} of {header.dtype.itemsize}-byte elements is larger "
                   f"than any array can be (more than {MAX_ARRAY_BYTES} bytes)")


# --- the data -------------------------------------------------------------------

def npy_array(buf: Any, header: NpyHeader) -> np.ndarray:
    """The array `header` describes, a zero-copy view of `buf` (checked to hold it).

    Fortran-order data becomes the right logical array: a transposed view.

    >>> npy_array(data, read_npy_header(data, 0, "a.npy", "a"))
    array([[0., 1.], [2., 3.]], dtype=float32)
    """
    flat = np.frombuffer(buf, dtype=header.dtype, count=header.count, offset=header.data_offset)
    if header.fortran_order:
        return flat.reshape(header.shape[::-1]).transpose()
    return flat.reshape(header.shape)


class _Array:
    """A plain array of the file: its header and how to get the bytes it lies in."""

    __slots__ = ("header", "data", "info")

    def __init__(self, header: NpyHeader, data: Callable[[], Any], info: TensorInfo) -> None:
        self.header, self.data, self.info = header, data, info

    def array(self) -> np.ndarray:
        out = npy_array(self.data(), self.header)
        if out.dtype.byteorder == ">":  # safetensors (and every reader of ours) is little-endian
            out = out.astype(out.dtype.newbyteorder("<"))
        out.flags.writeable = False
        return out


class _Described:
    """An array that is not a tensor (or a member that is not an array): tree only."""

    __slots__ = ("parts",)

    def __init__(self, parts: dict) -> None:
        self.parts = parts


# What arrays of a numpy dtype kind hold, for notes (other kinds are named by their dtype).
_KIND_NAMES = {"U": "text strings", "S": "byte strings", "M": "datetimes", "m": "timedeltas",
               "V": "raw (void) values"}


def _not_tensor_reason(dtype: np.dtype) -> Optional[str]:
    """Why arrays of `dtype` are not tensors; None if they are."""
    if dtype.hasobject:
        return "it holds Python objects"
    if dtype.fields is not None:
        return "its dtype is structured (records with named fields)"
    if dtype.subdtype is not None:
        return "its dtype is a sub-array type"
    if dtype_for_numpy(dtype) is None:
        reason = f"safetensors has no type for {_KIND_NAMES.get(dtype.kind, dtype.name)}"
        if dtype.kind == "V" and dtype.itemsize in (1, 2):
            reason += (f" ({dtype.itemsize}-byte raw values: probably a bfloat16 or float8 array of "
                       "ml_dtypes, which numpy.save stores as raw bytes without their type)")
        return reason
    return None


def _array_entry(header: NpyHeader, size: int, data: Callable[[], Any], path: str,
                 name: str, notes: list) -> Any:
    """An `_Array` for a plain array, or a `_Described` for another dtype; checks sizes."""
    end = header.data_offset + header.nbytes
    if end > size:
        raise errors.SourceError(
            f"the array of shape {header.shape} and dtype {header.dtype.str} needs {header.nbytes} "
            f"bytes of data after its header but only {max(size - header.data_offset, 0)} are there "
            "(truncated)", path=path, tensor=name)
    if end < size:
        raise errors.SourceError(
            f"{size - end} bytes follow the array's {header.nbytes} bytes of data; an npy array "
            "ends with its data", path=path, tensor=name)
    reason = _not_tensor_reason(header.dtype)
    if reason is None:
        dtype = dtype_for_numpy(header.dtype)
        return _Array(header, data, TensorInfo(dtype.name, header.shape, header.nbytes))
    notes.append(f"{name}: the {header.dtype.str} array of shape {list(header.shape)} is not a "
                 f"tensor ({reason}); the tree describes it")
    parts: dict = {"__array__": str(header.dtype), "shape": list(header.shape)}
    if (header.dtype.kind in "SU" and header.dtype.itemsize and header.count <= MAX_VALUES_IN_TREE
            and header.nbytes <= MAX_VALUES_BYTES):
        parts["values"] = npy_array(data(), header).tolist()
    return _Described(parts)


# --- object arrays: their pickle goes through the restricted machine --------------------

class ObjectArray(NamedTuple):
    """What an object array's pickle held, and what the pickle named."""

    value: Any
    globals: list
    findings: list


def read_object_array(buf: Any, header: NpyHeader, path: str, name: str) -> ObjectArray:
    """Run the pickle after an object array's header through `pickle_vm`; nothing executes.

    The value is the array's contents as nested lists (a 0-d array: its one item),
    with numeric arrays inside as numpy arrays. Pickles after the first STOP
    (numpy never reads them) are run too, for their globals, and reported.
    """
    data = memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf
    try:
        first = pickle_vm.load(data, start=header.data_offset)
    except pickle_vm.PickleError as exc:
        error = errors.SourceError(f"the object array's pickle is unreadable: {exc.detail}",
                                   path=path, tensor=name)
        error.globals, error.findings = exc.globals, exc.findings
        raise error from None
    globals_, findings = list(first.globals), list(first.findings)
    pos, count = first.end, 0
    while pos < len(data) and count < MAX_TRAILING_PICKLES:
        findings.append(f"{len(data) - pos} bytes follow the object array's pickle at offset {pos}; "
                        "numpy never reads them")
        try:
            extra = pickle_vm.load(data, start=pos)
        except pickle_vm.PickleError as exc:
            globals_ += exc.globals
            findings += exc.findings
            break
        globals_ += extra.globals
        findings += extra.findings
        pos, count = extra.end, count + 1
    value = first.value
    items = object_array_items(value)
    if items is not None:
        shape, contents = items
        if shape != header.shape:  # numpy uses the pickled array and never looks at the header's
            findings.append(f"the header says shape {header.shape} but the pickled array has shape {shape}")
        value = contents
    return ObjectArray(value, globals_, findings)


def object_array_items(value: Any) -> Optional[tuple[tuple, Any]]:
    """(shape, contents as nested lists) of an object array the pickle machine left inert.

    numpy pickles an ndarray as ``_reconstruct(ndarray, ...)`` with the state
    ``(version, shape, dtype, is_fortran, items)``; `pickle_vm` never builds an
    object dtype, so such an array stays a `PlaceholderCall`; its items are data.
    """
    if not (isinstance(value, pickle_vm.PlaceholderCall) and isinstance(value.func, pickle_vm.Placeholder)
            and value.func.qualname == "numpy.ndarray" and len(value.state) == 1):
        return None
    state = value.state[0]
    if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[4], list)):
        return None
    _, shape, dtype, _, items = state
    if not (isinstance(dtype, pickle_vm.PlaceholderCall) and isinstance(dtype.func, pickle_vm.Placeholder)
            and dtype.func.qualname == "numpy.dtype" and dtype.args[:1] in (("O",), ("O8",), ("O4",))):
        return None
    if (not isinstance(shape, tuple) or len(shape) > MAX_NDIM
            or not all(type(d) is int and d >= 0 for d in shape) or math.prod(shape) != len(items)):
        return None
    if shape == ():
        return shape, items[0]
    holder = np.empty(len(items), dtype=object)  # our own array of references; nothing is unpickled
    for i, item in enumerate(items):
        holder[i] = item
    # numpy lists an object array's items in logical (C) order whatever its memory order
    return shape, holder.reshape(shape).tolist()


def _is_tensor(x: Any) -> bool:
    return isinstance(x, _Array) or (isinstance(x, np.ndarray) and _not_tensor_reason(x.dtype) is None)


def _describe(x: Any) -> Optional[dict]:
    if isinstance(x, _Described):
        return x.parts
    if isinstance(x, np.ndarray):
        parts: dict = {"__array__": str(x.dtype), "shape": list(x.shape)}
        if x.dtype.kind in "SU" and x.size <= MAX_VALUES_IN_TREE and x.nbytes <= MAX_VALUES_BYTES:
            parts["values"] = x.tolist()
        return parts
    items = object_array_items(x)
    if items is not None:  # an object array nested inside another one's pickle
        return {"__array__": "object", "shape": list(items[0]), "items": items[1]}
    return describe_pickle_record(x)


# --- the sources -------------------------------------------------------------------

class _NumpySource(TensorSource):
    """What npy and npz share: tensors from a nested value, plain or pickled."""

    def __init__(self, path: "os.PathLike | str") -> None:
        super().__init__(os.fspath(path))
        self._map: Any = None
        self._objects: dict[str, Any] = {}
        self._infos: dict[str, TensorInfo] = {}
        #: globals every object-array pickle named, and what the pickle machine noticed
        self.globals: list = []
        self.pickle_findings: list[str] = []
        #: array or member name -> the `ObjectArray` read from its pickle
        self.pickles: dict[str, ObjectArray] = {}

    def _set_contents(self, root: Any, root_name: Optional[str] = None) -> None:
        if root_name is not None and _is_tensor(root):
            tensors, self.tree = {root_name: root}, {"__tensor__": root_name}
        else:
            flat = flatten(root, _is_tensor, _describe)
            tensors, self.tree = flat.tensors, flat.tree
            self.notes.extend(flat.notes)
        first_of: dict[int, str] = {}
        for name, obj in tensors.items():
            self._objects[name] = obj
            if isinstance(obj, _Array):
                self._infos[name] = obj.info
            else:
                dtype = dtype_for_numpy(obj.dtype)
                self._infos[name] = TensorInfo(dtype.name, tuple(obj.shape), obj.nbytes)
            if id(obj) in first_of:
                self.aliases[name] = first_of[id(obj)]
            else:
                first_of[id(obj)] = name

    def _add_pickle(self, name: str, result: ObjectArray) -> None:
        self.pickles[name] = result
        self.globals.extend(result.globals)
        self.pickle_findings.extend(f"{name}: {finding}" for finding in result.findings)
        self.notes.append(f"{name}: an object array; its pickle was read by the restricted pickle "
                          "machine, nothing was executed")

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> np.ndarray:
        self[name]  # a clear TensorNotFoundError for an unknown name
        obj = self._objects.get(name)
        if obj is None:
            raise errors.SourceError("the source is closed", path=self.path, tensor=name)
        if isinstance(obj, _Array):
            return obj.array()
        out = obj.astype(obj.dtype.newbyteorder("<")) if obj.dtype.byteorder == ">" else obj.view()
        out.flags.writeable = False
        return out

    def close(self) -> None:
        self._objects.clear()
        unmap(self._map)
        self._map = None


class NpySource(_NumpySource):
    """A ``.npy`` file: one array named by the file's stem ("weights.npy" -> "weights").

    An object array's contents are read through the restricted pickle machine:
    numeric arrays inside are tensors named by their dotted path.

    >>> with NpySource("weights.npy") as src:
    ...     src.read("weights").shape
    (3, 4)
    """

    format = "npy"

    def __init__(self, path: "os.PathLike | str", *, max_header_size: int = MAX_HEADER_SIZE) -> None:
        super().__init__(path)
        base = os.path.basename(self.path)
        self.name = (base[:-4] if base.lower().endswith(".npy") else os.path.splitext(base)[0]) or "array"
        self._map = map_file(self.path)
        try:
            buf = self._map
            self.header = read_npy_header(buf, 0, self.path, self.name, max_header_size=max_header_size)
            if self.header.dtype.hasobject:
                result = read_object_array(buf, self.header, self.path, self.name)
                self._add_pickle(self.name, result)
                self._set_contents(result.value, self.name)
            else:
                entry = _array_entry(self.header, len(buf), lambda: self._mapping(), self.path,
                                     self.name, self.notes)
                self._set_contents(entry, self.name)
        except BaseException:
            self.close()
            raise

    def _mapping(self) -> Any:
        if self._map is None:
            raise errors.SourceError("the source is closed", path=self.path, tensor=self.name)
        return self._map

    def describe(self) -> str:
        h = self.header
        text = f"numpy .npy array, {h.dtype.str} {list(h.shape)}"
        if h.fortran_order:
            text += ", Fortran order"
        return text + (f", {len(self)} tensors" if h.dtype.hasobject else "")


class NpzSource(_NumpySource):
    """A ``.npz`` archive (``numpy.savez``/``savez_compressed``): one tensor per ``NAME.npy`` member.

    Stored members are zero-copy views of the file; deflated members are
    decompressed when read (no more than their declared size). Only the npy
    headers are read on opening. Members that are not npy arrays are described
    in the tree and noted.

    >>> with NpzSource("weights.npz") as src:
    ...     {name: src[name].shape for name in src}
    {'w': (3, 4), 'b': (4,)}
    """

    format = "npz"

    def __init__(self, path: "os.PathLike | str", *, max_header_size: int = MAX_HEADER_SIZE) -> None:
        super().__init__(path)
        self._max_header_size = max_header_size
        self._map = map_file(self.path)
        try:
            self.archive = ZipArchive(self._map, self.path)
            #: what the zip reader noticed (duplicate names, bad flags, ...), for the scan
            self.zip_findings = list(self.archive.findings)
            root: dict[str, Any] = {}
            for member in self.archive.members:
                if member.name.endswith("/"):
                    continue  # a directory entry
                key = member.name[:-4] if member.name.endswith(".npy") else member.name
                if key in root:  # duplicate members (a zip trick) or both "x" and "x.npy"
                    k = 2
                    while f"{key}~{k}" in root:
                        k += 1
                    self.notes.append(f"two members are both named {key!r}; the second is {key}~{k}")
                    key = f"{key}~{k}"
                root[key] = self._open_member(member, key)
            self.methods = sorted({m.method for m in self.archive.members})
            self._set_contents(root)
        except BaseException:
            self.close()
            raise

    def _open_member(self, member: Any, key: str) -> Any:
        head = self._member_head(member, len(MAGIC) + 4 + self._max_header_size + 4)
        if bytes(head[:len(MAGIC)]) != MAGIC:
            self.notes.append(f"{member.name}: not an npy array (it starts with {bytes(head[:8])!r}); "
                              "the tree describes it")
            return _Described({"__member__": member.name, "size": member.size,
                               "head": bytes(head[:16]).hex()})
        header = read_npy_header(head, 0, self.path, key, max_header_size=self._max_header_size)
        if header.dtype.hasobject:
            if member.size > MAX_OBJECT_PICKLE_BYTES:
                raise errors.SourceError(
                    f"the object array's pickle is {member.size} bytes, more than the "
                    f"{MAX_OBJECT_PICKLE_BYTES} we decompress to read one", path=self.path, tensor=key)
            result = read_object_array(self._member_data(member), header, self.path, key)
            self._add_pickle(key, result)
            return result.value
        return _array_entry(header, member.size, lambda: self._member_data(member), self.path, key,
                            self.notes)

    def _member_head(self, member: Any, limit: int) -> bytes:
        """The first bytes of a member, decompressing no more than `limit` of them."""
        if member.method != DEFLATED or member.size == 0 or member.flags & _ENCRYPTED_FLAGS:
            # (a max_length of 0 would mean no limit to zlib)
            return bytes(self._member_data(member)[:limit])  # the zip reader says what it supports
        start = member.data_offset
        raw = memoryview(self._map)[start:start + member.compressed_size]
        try:
            return zlib.decompressobj(-15).decompress(raw, min(limit, member.size))
        except zlib.error as exc:
            raise errors.SourceError(f"the deflated member is corrupt: {exc}", path=self.path,
                                     tensor=member.name) from None
        finally:
            raw.release()

    def _member_data(self, member: Any) -> Any:
        if self._map is None:
            raise errors.SourceError("the source is closed", path=self.path, tensor=member.name)
        return self.archive.read(member, max_size=member.size)

    def close(self) -> None:
        self.archive = None
        super().close()

    def describe(self) -> str:
        kinds = {STORED: "stored", DEFLATED: "compressed"}
        how = "/".join(kinds.get(m, f"method {m}") for m in getattr(self, "methods", []))
        return f"numpy .npz archive ({how or 'empty'}), {len(self)} tensors"
