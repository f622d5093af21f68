"""A restricted pickle machine: read a pickle as data, never as a program.

The format
----------
A pickle (protocols 0 to 5, as written by Python 2.x/3.x `pickle`) is a program
for a small stack machine. Each instruction is one opcode byte followed by an
argument whose encoding depends on the opcode (a newline-terminated line, a
1/2/4/8-byte little-endian length plus that many bytes, a fixed-size integer or
float). The machine has a stack, a stack of marks (``MARK`` saves the stack and
starts a new one; ``LIST``, ``TUPLE``, ``DICT``, ``APPENDS``, ``SETITEMS``,
``ADDITEMS``, ``FROZENSET``, ``INST``, ``OBJ`` and ``POP_MARK`` consume the items
since the last mark) and a memo (``PUT``/``MEMOIZE`` store the top of the
stack, ``GET`` pushes a stored object again). ``STOP`` ends the program and the
top of the stack is the result. ``PROTO`` (protocol 2+) and ``FRAME``
(protocol 4+) are headers with no effect on the result.

What makes pickles dangerous is that ``GLOBAL``/``STACK_GLOBAL``/``INST`` name
any importable object and ``REDUCE``/``NEWOBJ``/``NEWOBJ_EX``/``OBJ``/``INST``
call it, ``BUILD`` calls ``__setstate__``, ``APPEND(S)``/``SETITEM(S)`` call
methods of whatever is on the stack, ``PERSID``/``BINPERSID`` call the loader's
hook and ``EXT1/2/4`` look names up in the process-wide ``copyreg`` registry.

What this module does
---------------------
`load` runs the program with every opcode dispatched from `OPCODE_TABLE` (one
handler per opcode of protocols 0-5, names from `pickletools`), following
CPython's ``_pickle`` unpickler wherever it accepts a pickle (a scanner that
refuses what the loader accepts would stop reading where the loader goes on), but:

* Nothing is ever imported and nothing named by the file is ever called. A
  global name (after Python 2 names are mapped as ``_compat_pickle`` maps them)
  is looked up in `ALLOWLIST`, a table from ``"module.qualname"`` to our own
  side-effect-free rebuild functions and records (torch tensor and storage
  rebuilds, numpy arrays/dtypes/scalars, ``OrderedDict``, a few builtins,
  plain-data classes such as ``argparse.Namespace``, ``datetime`` or
  ``uuid.UUID`` which become plain data). Every other name becomes an inert
  `Placeholder`; calling it or building it makes a `PlaceholderCall` recording
  the arguments.
* ``EXT1/2/4`` resolve only against `EXTENSION_TABLE`, which is empty:
  ``copyreg`` is never consulted. An EXT code becomes a placeholder and a finding.
* Torch tensors become `TensorRef` records over `StorageRef` records (the
  persistent ids of the torch formats); the bytes are mapped elsewhere
  (``sources/torch_file.py``). torch is never imported.
* numpy arrays and scalars are rebuilt from their raw bytes (checked against
  shape x itemsize); object, structured and void dtypes are never built: such an
  array stays an inert `PlaceholderCall` and is reported in `findings`.
* Out-of-band buffers (``NEXT_BUFFER``) fail, as they do in every loader that
  passes no ``buffers``.
* Where an allowlisted rebuild declines its arguments, `load(strict=True)`
  (reading a checkpoint) raises; `load(strict=False)` (scanning) records the
  refusal in `PickleResult.refusals`, keeps an inert placeholder and reads on,
  as CPython would run on with the real function's result.
* Values CPython builds but no reader needs are kept inert instead of refused:
  an integer longer than ``max_long_bytes`` becomes a `HugeInt`, a container
  nested deeper than ``max_nesting`` is wrapped in a placeholder (so that no
  later recursive walk, hash or repr can overflow the C stack).
* Frames are read the two ways CPython reads them (`READERS`): ``"bytes"`` is
  ``pickle.loads`` (a frame changes nothing), ``"file"`` is ``pickle.load`` of a
  file without ``peek()`` (``io.BytesIO``, an unbuffered file; a buffered file
  does the same for frames of 128 KiB or more): the whole frame is read at once,
  so an argument that runs past the frame's end is read from after it, and the
  next pickle starts after the frame, not after STOP. Any place where the two
  readings differ is an anomaly (`PickleResult.anomalies`; `strict` raises):
  no pickler writes one.
* Everything an attacker controls is bounded by a `Limits` value (defaults
  are the ``MAX_*`` constants below) and every failure is a `PickleError`
  naming the opcode and its byte offset (also as ``.opcode``/``.offset``, with the
  ``.globals`` seen before the failure, so a scan still reports them); no other
  exception escapes. ``PickleError.bounded`` tells a failure at one of our own
  limits (CPython might have read on) from a pickle CPython refuses too.

The machine is iterative (no recursion on the data). ``DUP``/``GET`` make
shared references, not copies, so a small pickle can describe a DAG whose
*tree* walk is exponential: a later consumer that walks the result must
de-duplicate by identity (or bound its work).

Example::

    >>> import pickle
    >>> load(pickle.dumps({"a": [1, 2.5]}, protocol=2)).value
    {'a': [1, 2.5]}
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import datetime
import decimal
import fractions
import ntpath
import pickletools
import posixpath
import re
import reprlib
import struct
import uuid
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from safeckpt.errors import SafeckptError

__all__ = [
    "PickleError", "Limits", "PickleResult", "GlobalUse", "Placeholder", "PlaceholderCall",
    "TensorRef", "StorageRef", "TorchDType", "TorchStorageType", "HugeInt", "load", "load_all",
    "READERS",
    "ALLOWLIST", "EXTENSION_TABLE", "OPCODE_TABLE",
    "MAX_OPCODES", "MAX_STACK", "MAX_MEMO", "MAX_NESTING", "MAX_TOTAL_BYTES",
    "MAX_LINE", "MAX_LONG_BYTES",
]


class PickleError(SafeckptError, ValueError):
    """A pickle that is malformed, truncated, refused, or past one of our limits.

    Raised by `load` with `opcode`, `offset` and the `globals`/`findings` seen so far.
    `bounded` is True when the machine stopped at one of its own limits (or met an
    operation it cannot model): CPython might have read on from there.
    """

    opcode: str = "?"
    offset: int = -1
    bounded: bool = False
    framed: bool = False  # a FRAME came before the failure: the file reader may read on
    globals: list = []  # noqa: RUF012 - replaced per instance by load
    findings: list = []  # noqa: RUF012


# --- limits ----------------------------------------------------------------
# Each bounds something the file controls so that reading cannot be turned into a
# denial of service. Lift one by passing `Limits(name=...)` to `load`.

# Opcodes executed per pickle: a state dict of 100k tensors takes about 3M.
MAX_OPCODES = 20_000_000
# Items on the stack (all marks together): an APPENDS of a million items is plausible.
MAX_STACK = 5_000_000
# Memo entries: each costs a dict slot; real pickles have about one per object.
MAX_MEMO = 5_000_000
# Container nesting depth kept as real containers: a later recursive walk (repr, ==,
# JSON) fails near Python's recursion limit of 1000 and hash() of nested tuples recurses
# in C without a limit. Deeper values are wrapped in an inert placeholder (CPython builds
# them, so the machine reads on). MARKs may nest as deep as the stack allows.
MAX_NESTING = 900
# Total bytes of all strings/bytes arguments (each one is also never more than the
# bytes left in the data, so no claimed length allocates memory it cannot fill).
MAX_TOTAL_BYTES = 1 << 34
# One newline-terminated argument (protocol 0 ints, floats, names, strings): CPython
# reads a line of any length, so this is only the total bound (each line also counts
# toward it, and is searched without copying).
MAX_LINE = MAX_TOTAL_BYTES
# Bytes of one integer (LONG1/LONG4, or digits of INT/LONG text) that is kept as a
# number: int.from_bytes is linear, but str() and arithmetic on huge ints later are
# not. A longer one becomes an inert `HugeInt`.
MAX_LONG_BYTES = 1 << 16


@dataclass(frozen=True)
class Limits:
    """The bounds one `load` runs under; see the ``MAX_*`` constants for reasons."""

    max_opcodes: int = MAX_OPCODES
    max_stack: int = MAX_STACK
    max_memo: int = MAX_MEMO
    max_nesting: int = MAX_NESTING
    max_total_bytes: int = MAX_TOTAL_BYTES
    max_line: int = MAX_LINE
    max_long_bytes: int = MAX_LONG_BYTES


# --- records -----------------------------------------------------------------

# Values from the file shown in messages: DUP/GET share objects, so a small pickle can
# describe a DAG whose full repr is exponentially long; reprlib bounds depth and width.
_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 3, 60, 60, 40
_BRIEF.maxtuple = _BRIEF.maxlist = _BRIEF.maxdict = _BRIEF.maxset = _BRIEF.maxfrozenset = 4


def brief(x: Any) -> str:
    """A short, bounded description of a value built from a file."""
    try:
        text = _BRIEF.repr(x)
    except Exception:  # noqa: BLE001 - a record's own repr failing must not hide the real error
        text = f"<{type(x).__name__}>"
    return text[:120]


@dataclass(frozen=True)
class GlobalUse:
    """One global named by the pickle (GLOBAL, STACK_GLOBAL, INST or EXT)."""

    module: str
    name: str
    offset: int
    allowed: bool


@dataclass(eq=False)
class Placeholder:
    """An inert stand-in for a global that is not on the allowlist."""

    module: str
    name: str
    offset: int

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False, repr=False)
class PlaceholderCall:
    """What calling or building a placeholder would have made; nothing was called.

    `kind` is the opcode that asked for the call (REDUCE, NEWOBJ, NEWOBJ_EX, OBJ,
    INST, PERSID, BINPERSID); `state` holds BUILD states, `items` APPEND(S) items
    and `setitems` SETITEM(S) pairs applied to it afterwards.
    """

    func: Any
    args: tuple
    kwargs: dict
    kind: str
    offset: int
    state: list = field(default_factory=list)
    items: list = field(default_factory=list)
    setitems: list = field(default_factory=list)

    def __repr__(self) -> str:  # bounded: args may share objects (a DAG)
        return f"PlaceholderCall({brief(self.func)}, {self.kind} at {self.offset}, args={brief(self.args)})"


@dataclass(frozen=True)
class HugeInt:
    """An integer longer than ``Limits.max_long_bytes``: its size is kept, not its value."""

    nbytes: int

    def __repr__(self) -> str:
        return f"<integer of {self.nbytes} bytes>"


@dataclass(frozen=True)
class TorchDType:
    """A torch dtype named in a pickle (``torch.float32``), with its item size in bytes."""

    name: str
    itemsize: int


@dataclass(frozen=True)
class TorchStorageType:
    """A torch storage class (``torch.FloatStorage``, ``torch.storage.UntypedStorage``)."""

    name: str
    dtype: TorchDType


@dataclass(frozen=True)
class StorageRef:
    """A torch storage named by a persistent id: key (``data/<key>`` in a zip), dtype, element count."""

    key: str
    dtype: TorchDType
    numel: int
    location: str


@dataclass(frozen=True)
class TensorRef:
    """A torch tensor as the rebuild functions describe it; offset and strides count elements.

    `dtype` is the tensor's dtype; it differs from `storage.dtype` when the storage is
    untyped (``_rebuild_tensor_v3``, used for fp8 and other newer dtypes: `numel` then
    counts bytes). A view is checked to lie inside a `StorageRef` storage.
    """

    storage: Any
    storage_offset: int
    size: tuple
    stride: tuple
    requires_grad: bool = False
    dtype: Optional[TorchDType] = None
    parameter: bool = False


@dataclass
class PickleResult:
    """The value of one pickle, every global it named, and where its reader stops.

    `end` is the offset after STOP for the ``"bytes"`` reader; for the ``"file"``
    reader it is where the file is left, the end of the frame around STOP when there
    is one. `storages` lists the torch storages its persistent ids named (default
    loader only), so that their records can be checked against the sizes the pickle
    claims. `refusals` are the allowlisted rebuilds that declined their arguments
    (``strict=False`` only) and `anomalies` the places where the two readers of
    frames disagree; each text starts with the opcode and its offset.
    """

    value: Any
    globals: list
    end: int
    findings: list = field(default_factory=list)
    storages: list = field(default_factory=list)
    refusals: list = field(default_factory=list)
    anomalies: list = field(default_factory=list)


# --- the allowlist -----------------------------------------------------------

class _Rebuild:
    """An allowlisted callable: our function, called with the pickle's arguments."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable) -> None:
        self.name, self.fn = name, fn

    def __repr__(self) -> str:
        return f"<allowed {self.name}>"


class _Pending:
    """An object whose value is known only after BUILD gives it its state."""

    def finish(self, state: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError


_TORCH_DTYPES = {
    "float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1,
    "int16": 2, "int32": 4, "int64": 8, "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1,
    "complex32": 4, "complex64": 8, "complex128": 16, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
}
_TORCH_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16",
                        "short": "int16", "int": "int32", "long": "int64",
                        "cfloat": "complex64", "cdouble": "complex128", "chalf": "complex32"}
_TORCH_STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


def _torch_dtype(name: str) -> TorchDType:
    name = _TORCH_DTYPE_ALIASES.get(name, name)
    return TorchDType(name, _TORCH_DTYPES[name])


def _int_tuple(x: Any, what: str) -> tuple:
    if not isinstance(x, (tuple, list)) or not all(type(v) is int for v in x):
        raise PickleError(f"{what} must be a tuple of ints, got {type(x).__name__}")
    return tuple(x)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, dtype=None):
    if type(storage_offset) is not int or storage_offset < 0:
        raise PickleError("tensor storage_offset must be a non-negative int")
    size, stride = _int_tuple(size, "tensor size"), _int_tuple(stride, "tensor stride")
    if len(size) != len(stride):
        raise PickleError("tensor size and stride differ in length")
    if any(v < 0 for v in size + stride):
        raise PickleError("tensor size or stride is negative")
    if dtype is None:
        dtype = getattr(storage, "dtype", None)
    if isinstance(storage, StorageRef) and isinstance(dtype, TorchDType) and all(size):
        # the view must lie inside its storage (a short storage is an out-of-bounds read later)
        last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride))
        if (last + 1) * dtype.itemsize > storage.numel * storage.dtype.itemsize:
            raise PickleError(f"tensor of size {size}, stride {stride}, offset {storage_offset} "
                              f"runs past its storage {storage.key!r} of {storage.numel} elements")
    return TensorRef(storage, storage_offset, size, stride, bool(requires_grad),
                     dtype if isinstance(dtype, TorchDType) else None)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _rebuild_tensor(storage, storage_offset, size, stride, requires_grad)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    return _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, TensorRef):
        raise PickleError("a Parameter must wrap a tensor")
    return dataclasses.replace(data, requires_grad=bool(requires_grad), parameter=True)


def _rebuild_from_type_v2(func, new_type, args, state):
    if isinstance(func, _Rebuild):
        return func.fn(*args)
    return PlaceholderCall(func, tuple(args), {}, "REDUCE", -1, [state])  # func is a placeholder


_NUMPY_KINDS = frozenset("biufcSU")


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = True) -> Any:
    if isinstance(spec, np.dtype):
        dt = spec
    elif isinstance(spec, str) and len(spec) <= 16:
        dt = np.dtype(spec)
    else:
        raise PickleError(f"numpy dtype spec {brief(spec)} is not a plain type string")
    if dt.kind not in _NUMPY_KINDS or dt.fields is not None or dt.subdtype is not None:
        # object/structured/void dtypes are never built; the array using it becomes inert
        return PlaceholderCall(Placeholder("numpy", "dtype", -1), (spec, align, copy), {}, "REDUCE", -1)
    return _PendingDType(dt)


class _PendingDType(_Pending):
    def __init__(self, dt: np.dtype) -> None:
        self.dt = dt

    def finish(self, state: Any) -> np.dtype:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise PickleError("numpy dtype state is not a plain (version, byteorder, ...) tuple")
        if len(state) >= 5 and (state[2] is not None or state[3] is not None or state[4] is not None):
            raise PickleError("structured/subarray numpy dtypes are refused")
        dt = self.dt
        if dt.kind in "SU" and len(state) >= 6 and type(state[5]) is int and state[5] > 0:
            dt = np.dtype((dt.type, state[5] // (4 if dt.kind == "U" else 1)))
        return dt.newbyteorder(state[1]) if state[1] in "<>" else dt


def _as_dtype(x: Any) -> np.dtype:
    if isinstance(x, _PendingDType):
        return x.dt
    if isinstance(x, np.dtype) and x.kind in _NUMPY_KINDS and x.fields is None:
        return x
    raise PickleError(f"expected a numeric numpy dtype, got {type(x).__name__}")


def _array_from_bytes(raw: Any, dt: np.dtype, shape: Any, fortran: bool) -> np.ndarray:
    shape = _int_tuple(shape, "numpy shape")
    if any(s < 0 for s in shape):
        raise PickleError("numpy shape has a negative dimension")
    if isinstance(raw, str):  # Python 2 pickles keep raw data in str
        raw = raw.encode("latin-1")
    if not isinstance(raw, (bytes, bytearray)):
        raise PickleError("numpy array data must be bytes (object arrays are refused)")
    count = 1
    for s in shape:
        count *= s
    if count * dt.itemsize != len(raw):
        raise PickleError(f"numpy array of shape {shape} and dtype {dt} needs "
                          f"{count * dt.itemsize} bytes, the pickle holds {len(raw)}")
    arr = np.frombuffer(bytes(raw), dtype=dt, count=count).reshape(shape, order="F" if fortran else "C")
    return arr.copy(order="F" if fortran else "C")


class _PendingArray(_Pending):
    def finish(self, state: Any) -> np.ndarray:
        if not isinstance(state, tuple) or len(state) != 5:
            raise PickleError("numpy array state is not (version, shape, dtype, fortran, data)")
        _, shape, dt, fortran, raw = state
        if isinstance(dt, PlaceholderCall):
            return PlaceholderCall(Placeholder("numpy", "ndarray", -1), (), {}, "BUILD", -1, [state])
        return _array_from_bytes(raw, _as_dtype(dt), shape, bool(fortran))


def _numpy_reconstruct(cls: Any, shape: Any, dtype_code: Any) -> _PendingArray:
    if not (isinstance(cls, _Rebuild) and cls.name.endswith("ndarray")):
        raise PickleError("numpy _reconstruct of a class other than ndarray is refused")
    return _PendingArray()


def _numpy_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    return _array_from_bytes(buf, _as_dtype(dtype), shape, order == "F")


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if isinstance(dtype, PlaceholderCall):  # an object scalar holds a pickled object: inert
        return PlaceholderCall(Placeholder("numpy", "scalar", -1), (dtype, data), {}, "REDUCE", -1)
    dt = _as_dtype(dtype)
    return _array_from_bytes(data, dt, (), False)[()]


def _numpy_ndarray(*args: Any) -> Any:
    raise PickleError("calling numpy.ndarray directly is refused")


_CODECS_ENCODINGS = {"latin1": "latin-1", "latin-1": "latin-1", "utf-8": "utf-8",
                     "utf8": "utf-8", "ascii": "ascii"}


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if not isinstance(obj, str) or encoding not in _CODECS_ENCODINGS or errors != "strict":
        raise PickleError("_codecs.encode only with a str and latin-1/utf-8/ascii")
    return obj.encode(_CODECS_ENCODINGS[encoding])


def _bytearray(*args: Any) -> bytearray:
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str):
        return bytearray(_codecs_encode(args[0], args[1]))
    raise PickleError("bytearray() only from bytes or (str, encoding)")


def _bytes(*args: Any) -> bytes:
    return bytes(_bytearray(*args))


def _set(items: Any = ()) -> set:
    return set(_plain_iterable(items))


def _frozenset(items: Any = ()) -> frozenset:
    return frozenset(_plain_iterable(items))


def _plain_iterable(items: Any) -> Any:
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise PickleError(f"expected a list or tuple of items, got {type(items).__name__}")
    return items


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not all(isinstance(v, (int, float)) for v in (real, imag)):
        raise PickleError("complex() only from numbers")
    return complex(real, imag)


def _slice(*args: Any) -> slice:
    if not 1 <= len(args) <= 3:
        raise PickleError("slice() takes 1 to 3 arguments")
    return slice(*args)


def _scalar_type(kind: type) -> Callable:
    def make(*args: Any) -> Any:
        if not all(isinstance(a, (int, float, str, bytes)) for a in args) or len(args) > 2:
            raise PickleError(f"{kind.__name__}() only from plain scalars")
        return kind(*args)
    return make


def _container_type(kind: type) -> Callable:
    def make(items: Any = ()) -> Any:
        if isinstance(items, dict):
            return kind(items)
        return kind(_plain_iterable(items))
    return make


def _type_only(name: str) -> Callable:
    def make(*args: Any, **kwargs: Any) -> Any:
        raise PickleError(f"{name} may be named (as a type) but not called")
    return make


def _torch_size(dims: Any = ()) -> tuple:
    return _int_tuple(tuple(dims) if isinstance(dims, list) else dims, "torch.Size")


def _torch_device(kind: Any, index: Any = None) -> str:
    if not isinstance(kind, str) or len(kind) > 64 or (index is not None and type(index) is not int):
        raise PickleError("torch.device() only from a short name and an optional index")
    return kind if index is None else f"{kind}:{index}"


def _defaultdict(default_factory: Any = None, items: Any = ()) -> dict:
    # the factory is never called; missing keys are not a concern of data
    return _container_type(dict)(items)


def _ordered_dict(items: Any = ()) -> collections.OrderedDict:
    return collections.OrderedDict(_plain_iterable(items))


def _plain_dict(*args: Any, **kwargs: Any) -> dict:
    """A plain-data class (Namespace, AttributeDict): BUILD and SETITEMS fill the dict."""
    out: dict = {}
    if len(args) == 1 and isinstance(args[0], dict):
        out.update(args[0])
    out.update(kwargs)
    return out


def _join_posix(*parts: Any) -> str:
    return posixpath.join(*_str_parts(parts)) if parts else "."


def _join_windows(*parts: Any) -> str:
    return ntpath.join(*_str_parts(parts)) if parts else "."


def _str_parts(parts: tuple) -> tuple:
    if not all(isinstance(p, str) for p in parts):
        raise PickleError("path parts must be strings")
    return parts


class _PendingOmega(_Pending):
    """omegaconf containers and nodes: their pickled __dict__ holds `_content` or `_val`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def finish(self, state: Any) -> Any:
        if not isinstance(state, dict):
            raise PickleError(f"omegaconf {self.kind} state is not a dict")
        if self.kind == "node":
            return state.get("_val")
        if self.kind == "metadata":
            return None
        content = state.get("_content")
        if isinstance(content, dict):
            return {k: v for k, v in content.items()}
        if isinstance(content, list):
            return list(content)
        return content  # None, "???" or an interpolation string


def _omega(kind: str) -> Callable:
    def make(*args: Any, **kwargs: Any) -> _PendingOmega:
        return _PendingOmega(kind)
    return make


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if isinstance(cls, _Rebuild):
        if state is None:
            return cls.fn()
        return cls.fn(state)
    return PlaceholderCall(cls, (base, state), {}, "REDUCE", -1)


# Plain-data classes of the standard library, rebuilt by their own (pure) constructors
# from plain arguments only, and kept as plain data: ISO text for dates, str for
# numbers and ids. timedelta and timezone stay objects (datetime takes a tzinfo).
_DATE_CLASSES = {"datetime": datetime.datetime, "date": datetime.date, "time": datetime.time}
_DATE_ARGUMENT = (int, bytes, str, datetime.tzinfo, type(None))


def _date(kind: str) -> Callable:
    def make(*args: Any) -> str:
        if not 1 <= len(args) <= 8 or not all(isinstance(a, _DATE_ARGUMENT) for a in args):
            raise PickleError(f"datetime.{kind}() only from its packed state or its fields")
        try:
            return _DATE_CLASSES[kind](*args).isoformat()
        except (TypeError, ValueError, OverflowError) as exc:
            raise PickleError(f"datetime.{kind}{brief(args)}: {exc}") from None
    return make


def _numbers(*args: Any) -> bool:
    return all(type(a) in (int, float, bool) for a in args)


def _timedelta(*args: Any) -> datetime.timedelta:
    if len(args) > 3 or not _numbers(*args):
        raise PickleError("datetime.timedelta() only from days, seconds, microseconds")
    try:
        return datetime.timedelta(*args)
    except (ValueError, OverflowError) as exc:
        raise PickleError(f"datetime.timedelta{brief(args)}: {exc}") from None


def _timezone(offset: Any, name: Any = None) -> datetime.timezone:
    if not isinstance(offset, datetime.timedelta) or not (name is None or isinstance(name, str)):
        raise PickleError("datetime.timezone() only from a timedelta and a name")
    try:
        return datetime.timezone(offset) if name is None else datetime.timezone(offset, name)
    except ValueError as exc:
        raise PickleError(f"datetime.timezone: {exc}") from None


def _decimal(value: Any = "0", context: Any = None) -> str:
    if type(value) not in (str, int) or context is not None:
        raise PickleError("decimal.Decimal() only from a string or an int")
    try:
        return str(decimal.Decimal(value))
    except (decimal.InvalidOperation, ValueError) as exc:
        raise PickleError(f"decimal.Decimal({brief(value)}): {type(exc).__name__}") from None


def _fraction(numerator: Any = 0, denominator: Any = None) -> str:
    if type(numerator) not in (str, int) or not (denominator is None or type(denominator) is int):
        raise PickleError("fractions.Fraction() only from a string or two ints")
    try:
        return str(fractions.Fraction(numerator, denominator))
    except (ValueError, ZeroDivisionError, TypeError) as exc:
        raise PickleError(f"fractions.Fraction: {exc}") from None


class _PendingUUID(_Pending):
    """uuid.UUID: NEWOBJ makes an empty one, BUILD gives ``{'int': ..., 'is_safe': ...}``."""

    def finish(self, state: Any) -> str:
        if not (isinstance(state, dict) and type(state.get("int")) is int and 0 <= state["int"] < 1 << 128):
            raise PickleError("uuid.UUID state is not {'int': a 128-bit integer}")
        return str(uuid.UUID(int=state["int"]))


def _uuid(*args: Any, **kwargs: Any) -> _PendingUUID:
    if args or kwargs:
        raise PickleError("uuid.UUID is rebuilt from its state (BUILD), not from arguments")
    return _PendingUUID()


def _regex(pattern: Any, flags: Any = 0) -> dict:
    # the pattern is kept as data, never compiled
    if not isinstance(pattern, (str, bytes)) or type(flags) is not int:
        raise PickleError("re._compile() only from a pattern and integer flags")
    return {"__regex__": pattern, "flags": flags}


def _counter(items: Any = ()) -> dict:
    if isinstance(items, dict):
        return dict(items)
    return dict(collections.Counter(_plain_iterable(items)))


def _deque(items: Any = (), maxlen: Any = None) -> list:
    if not (maxlen is None or (type(maxlen) is int and maxlen >= 0)):
        raise PickleError("collections.deque() maxlen must be None or a non-negative int")
    out = list(_plain_iterable(items))
    return out if maxlen is None else out[len(out) - min(maxlen, len(out)):]


def _range(*args: Any) -> range:
    if not 1 <= len(args) <= 3 or any(type(a) is not int for a in args):
        raise PickleError("range() takes 1 to 3 ints")
    try:
        return range(*args)
    except ValueError as exc:
        raise PickleError(f"range: {exc}") from None


# Type references, as configs pickle them (OmegaConf keeps typing.Optional[int] and the
# like in its metadata): typing forms are named, subscripted with _operator.getitem, and
# type(None) is builtins.type(None). Anything else those functions would do stays inert.
_TYPING_FORMS = ("Any", "Union", "Optional", "List", "Dict", "Tuple", "Set", "FrozenSet", "Type",
                 "Sequence", "Mapping", "MutableMapping", "Iterable", "Callable", "Literal")


def _type_name(x: Any) -> Optional[str]:
    if isinstance(x, _Rebuild) and (x.name.startswith("typing.") or x.name.startswith("builtins.")):
        return x.name
    if isinstance(x, str) and x.startswith(("typing.", "builtins.", "NoneType")):
        return x  # a type reference built before (typing.Optional[int], NoneType)
    if x is Ellipsis or x is None:
        return repr(x)
    if isinstance(x, tuple):
        names = [_type_name(v) for v in x]
        return None if None in names else ", ".join(names)
    return None


def _inert(name: str, args: tuple) -> PlaceholderCall:
    module, _, qualname = name.rpartition(".")
    return PlaceholderCall(Placeholder(module, qualname, -1), args, {}, "REDUCE", -1)


def _subscript(form: Any, key: Any) -> Any:
    """operator.getitem(typing.Optional, (int, NoneType)) -> 'typing.Optional[...]'."""
    if isinstance(form, _Rebuild) and form.name.startswith("typing.") and _type_name(key) is not None:
        return f"{form.name}[{_type_name(key)}]"
    return _inert("operator.getitem", (form, key))


def _generic_alias(origin: Any, args: Any) -> Any:
    """types.GenericAlias(list, int) -> 'builtins.list[builtins.int]'."""
    if isinstance(origin, _Rebuild) and origin.name.startswith("builtins.") and _type_name(args):
        return f"{origin.name}[{_type_name(args)}]"
    return _inert("types.GenericAlias", (origin, args))


def _type_of(*args: Any) -> Any:
    """builtins.type(None) is how NoneType pickles; type() of anything else is kept inert."""
    return "NoneType" if args == (None,) else _inert("builtins.type", args)


def _logger(name: Any = None) -> Any:
    """logging.getLogger(name), how a logger pickles: kept as its name."""
    return {"__logger__": name} if name is None or isinstance(name, str) else _inert("logging.getLogger", (name,))


# torch.distributed.checkpoint's .metadata (a pickle of torch's own dataclasses): what each
# chunk of each tensor is and where it lies. Plain data, kept as dicts; the memory-format
# enum as its value and a layout (torch.strided) as its name.
_DCP_RECORDS = tuple(f"torch.distributed.checkpoint.metadata.{name}" for name in (
    "Metadata", "MetadataIndex", "TensorProperties", "ChunkStorageMetadata", "TensorStorageMetadata",
    "BytesStorageMetadata", "StorageMeta")) + ("torch.distributed.checkpoint.filesystem._StorageInfo",)


def _enum_value(value: Any) -> Any:
    if value is None or type(value) in (int, str):
        return value
    return _inert("torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING", (value,))


def _torch_layout(name: Any) -> Any:
    return name if isinstance(name, str) and len(name) <= 64 else _inert("torch.serialization._get_layout",
                                                                          (name,))


def _build_allowlist() -> dict:
    table: dict = {}

    def add(names: Any, fn: Callable) -> None:
        for name in ([names] if isinstance(names, str) else names):
            table[name] = _Rebuild(name, fn)

    add("torch._utils._rebuild_tensor", _rebuild_tensor)
    add("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2)
    add("torch._utils._rebuild_tensor_v3", _rebuild_tensor_v3)
    add("torch._utils._rebuild_parameter", _rebuild_parameter)
    add("torch._utils._rebuild_parameter_with_state", _rebuild_parameter)
    add("torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2)
    for name in list(_TORCH_DTYPES) + list(_TORCH_DTYPE_ALIASES):
        table[f"torch.{name}"] = _torch_dtype(name)
    for cls, dt in _TORCH_STORAGES.items():
        for prefix in ("torch.", "torch.cuda."):
            table[prefix + cls] = TorchStorageType(prefix + cls, _torch_dtype(dt))
    for name in ("torch.storage.UntypedStorage", "torch.UntypedStorage",
                 "torch.storage.TypedStorage", "torch.TypedStorage"):
        table[name] = TorchStorageType(name, _torch_dtype("uint8"))
    add("collections.OrderedDict", _ordered_dict)
    for core in ("numpy.core", "numpy._core"):
        add(f"{core}.multiarray._reconstruct", _numpy_reconstruct)
        add(f"{core}.multiarray.scalar", _numpy_scalar)
        add(f"{core}.numeric._frombuffer", _numpy_frombuffer)
    add("numpy.ndarray", _numpy_ndarray)
    add("numpy.dtype", _numpy_dtype)
    add("_codecs.encode", _codecs_encode)
    add("builtins.set", _set)
    add("builtins.frozenset", _frozenset)
    add("builtins.bytearray", _bytearray)
    add("builtins.bytes", _bytes)
    add("builtins.complex", _complex)
    add("builtins.slice", _slice)
    for kind in (int, float, str, bool):
        add(f"builtins.{kind.__name__}", _scalar_type(kind))
    for kind in (dict, list, tuple):
        add(f"builtins.{kind.__name__}", _container_type(kind))
    add("collections.defaultdict", _defaultdict)
    add("torch.Size", _torch_size)  # shapes kept in checkpoints' metadata
    add("torch.device", _torch_device)
    for name in ["builtins.object"] + [f"typing.{form}" for form in _TYPING_FORMS]:
        add(name, _type_only(name))  # type references in config metadata
    add(["_operator.getitem", "operator.getitem"], _subscript)
    add("types.GenericAlias", _generic_alias)
    add("builtins.type", _type_of)
    table["builtins.Ellipsis"] = Ellipsis
    add("logging.getLogger", _logger)
    # tensor classes, named (never called) by the legacy tar format's tensor records
    for cls in _TORCH_STORAGES:
        for prefix in ("torch.", "torch.cuda."):
            name = prefix + cls.replace("Storage", "Tensor")
            add(name, _type_only(name))
    add("copyreg._reconstructor", _copyreg_reconstructor)
    add(["argparse.Namespace", "types.SimpleNamespace"], _plain_dict)
    add(_DCP_RECORDS, _plain_dict)
    add("torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING", _enum_value)
    add("torch.serialization._get_layout", _torch_layout)
    for kind in _DATE_CLASSES:
        add(f"datetime.{kind}", _date(kind))
    add("datetime.timedelta", _timedelta)
    add("datetime.timezone", _timezone)
    add("decimal.Decimal", _decimal)
    add("fractions.Fraction", _fraction)
    add("uuid.UUID", _uuid)
    add("re._compile", _regex)
    add("collections.Counter", _counter)
    add("collections.deque", _deque)
    add("builtins.range", _range)
    add(["pytorch_lightning.utilities.parsing.AttributeDict",
         "lightning.pytorch.utilities.parsing.AttributeDict",
         "lightning.fabric.utilities.data.AttributeDict",
         "lightning_fabric.utilities.data.AttributeDict"], _plain_dict)
    add(["pathlib.PosixPath", "pathlib.PurePosixPath", "pathlib.Path",
         "pathlib._local.PosixPath", "pathlib._local.PurePosixPath"], _join_posix)
    add(["pathlib.WindowsPath", "pathlib.PureWindowsPath",
         "pathlib._local.WindowsPath", "pathlib._local.PureWindowsPath"], _join_windows)
    add(["omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig"], _omega("container"))
    add([f"omegaconf.nodes.{n}" for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode",
                                         "BooleanNode", "BytesNode", "PathNode", "EnumNode")],
        _omega("node"))
    add(["omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata"], _omega("metadata"))
    return table


# "module.qualname" -> our rebuild function (wrapped in _Rebuild) or a record.
ALLOWLIST: dict = _build_allowlist()

# Modules torch.load renames before it imports them (torch/serialization.py, _load).
_TORCH_MODULES = {"torch.tensor": "torch._tensor"}

# EXT1/2/4 codes we resolve: deliberately empty; copyreg's registry is never read.
EXTENSION_TABLE: dict = {}

# How the bytes of a pickle reach the unpickler (see the module docstring).
READERS = ("bytes", "file")


# --- the machine ---------------------------------------------------------------

_HIGHEST_PROTOCOL = 5
_CONTAINERS = (list, dict, tuple, set, frozenset, PlaceholderCall)
# Values CPython could never call (REDUCE/NEWOBJ/OBJ on them fails there too); anything
# else the machine holds may stand for a callable object, so calling it reads on.
_NOT_CALLABLE = (type(None), bool, int, float, complex, str, bytes, bytearray, tuple, list, dict,
                 set, frozenset, slice, range, TensorRef, StorageRef, TorchDType, HugeInt,
                 np.ndarray, np.dtype, np.generic)


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


class _Machine:
    def __init__(self, data: Any, start: int, persistent_load: Optional[Callable], limits: Limits,
                 reader: str, strict: bool, persistent_ids: bool) -> None:
        if reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, not {reader!r}")
        self.data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self.n = len(self.data)
        self.start = start
        self.persistent_load = persistent_load
        self.persistent_ids = persistent_ids
        self.limits = limits
        self.file_reader = reader == "file"
        self.strict = strict
        self.stack: list = []
        self.metastack: list = []
        self.saved = 0  # items in the stacks saved by MARK, and one for each MARK
        self.memo: dict = {}
        self.memo_of_pending: dict = {}
        self.depths: dict = {}
        self.total_bytes = 0
        self.globals: list = []
        self.findings: list = []
        self.storages: list = []
        self.refusals: list = []
        self.anomalies: list = []
        self.frame_end = -1  # where the current frame (the file reader's buffer) ends; -1: none
        self.framed = False  # a FRAME was read: only then can the two readers differ
        self.op_special: Optional[str] = None  # a name for errors that are not at an opcode
        self.op_pos = start
        self.value: Any = None

    # errors
    def fail(self, detail: str, bounded: bool = False) -> PickleError:
        error = PickleError(f"{self.op_name} at offset {self.op_pos}: {detail}")
        error.bounded = bounded
        return error

    def limit(self, detail: str) -> PickleError:
        """One of our own bounds: CPython might have read on."""
        return self.fail(detail, bounded=True)

    def anomaly(self, detail: str) -> None:
        text = f"{self.op_name} at offset {self.op_pos}: {detail}"
        if self.strict:
            raise PickleError(f"{text}: the readers of pickle frames disagree on this file (no "
                              "pickler writes such frames; the file was crafted)")
        if len(self.anomalies) < 100:
            self.anomalies.append(text)

    # reading: where the bytes asked for really come from
    def straddle(self, pos: int, size: int, linear: bool = False) -> int:
        """`size` bytes at `pos` run past the end of the current frame. pickle.loads reads
        on; a file reader had read the whole frame, so it drops the frame's last bytes and
        reads from the frame's end (but copies counted bytes on: `linear`)."""
        end = self.frame_end
        self.anomaly(f"{size} bytes read at offset {pos} run past the end of the frame at {end}")
        self.frame_end = -1
        return end if self.file_reader and not linear else pos

    def take(self, pos: int, size: int, linear: bool = False) -> tuple:
        """`size` bytes from `pos` (counted toward the total): (bytes, position after)."""
        if pos < self.frame_end < pos + size:
            pos = self.straddle(pos, size, linear)
        if size < 0 or size > self.n - pos:  # checked first: a claimed length allocates nothing
            raise self.fail(f"needs {size} bytes but only {self.n - pos} are left (truncated data)")
        self.total_bytes += size
        if self.total_bytes > self.limits.max_total_bytes:
            raise self.limit(f"strings and bytes exceed {self.limits.max_total_bytes} bytes in total "
                             "(raise Limits.max_total_bytes)")
        return bytes(self.data[pos:pos + size]), pos + size

    def line(self, pos: int) -> tuple:
        """A newline-terminated argument: (its bytes without the newline, position after)."""
        nl = self.find_newline(pos)
        if pos < self.frame_end and not 0 <= nl < self.frame_end:
            moved = self.straddle(pos, (nl if nl >= 0 else self.n) + 1 - pos)
            if moved != pos:
                pos, nl = moved, self.find_newline(moved)
        if nl < 0:
            raise self.fail("line argument has no newline (truncated data)")
        if nl - pos > self.limits.max_line:
            raise self.limit(f"line argument longer than {self.limits.max_line} bytes "
                             "(raise Limits.max_line)")
        self.total_bytes += nl - pos
        if self.total_bytes > self.limits.max_total_bytes:
            raise self.limit(f"strings and bytes exceed {self.limits.max_total_bytes} bytes in total "
                             "(raise Limits.max_total_bytes)")
        return bytes(self.data[pos:nl]), nl + 1

    def find_newline(self, pos: int) -> int:
        if isinstance(self.data, bytes):
            return self.data.find(b"\n", pos)
        # in growing chunks: a view is copied to search it, and lines are usually short
        chunk = 256
        while pos < self.n:
            stop = min(self.n, pos + chunk)
            found = bytes(self.data[pos:stop]).find(b"\n")
            if found >= 0:
                return pos + found
            pos, chunk = stop, min(chunk * 4, 1 << 24)
        return -1

    def uint(self, pos: int, size: int, signed: bool = False) -> tuple:
        if pos < self.frame_end < pos + size:
            pos = self.straddle(pos, size)
        if pos + size > self.n:
            raise self.fail(f"needs {size} bytes but only {self.n - pos} are left (truncated data)")
        return _FIXED[size, signed].unpack_from(self.data, pos)[0], pos + size

    # stack
    def push(self, x: Any) -> None:
        self.stack.append(x)

    def pop(self) -> Any:
        if not self.stack:
            raise self.fail("stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise self.fail("stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.metastack:
            raise self.fail("no MARK to pop to (mark stack underflow)")
        items = self.stack
        self.stack = self.metastack.pop()
        self.saved -= len(self.stack) + 1
        return items

    # depth bookkeeping: id -> (depth, obj); the obj keeps the id from being reused
    def depth(self, x: Any) -> int:
        e = self.depths.get(id(x))
        return e[0] if e is not None and e[1] is x else 0

    def made(self, container: Any, children: Any) -> Any:
        """`container`, built from `children`; wrapped inert when it would nest too deep."""
        d = 0
        for c in children:
            if isinstance(c, _CONTAINERS):
                d = max(d, self.depth(c) or 1)  # containers of depth 1 are not recorded
        if d + 1 > self.limits.max_nesting:
            return self.too_deep(container)
        self.set_depth(container, d + 1)
        return container

    def fit(self, container: Any, children: list) -> list:
        """`children` about to go into `container` in place; any that would make it nest
        too deep is wrapped inert instead (its parents keep their recorded depth)."""
        d = self.depth(container) - 1
        out = children
        for i, c in enumerate(children):
            if isinstance(c, _CONTAINERS):
                cd = self.depth(c) or 1
                if cd + 1 > self.limits.max_nesting:
                    if out is children:
                        out = list(children)
                    out[i] = self.too_deep(c)
                    cd = 1
                d = max(d, cd)
        self.set_depth(container, d + 1)
        return out

    def too_deep(self, value: Any) -> PlaceholderCall:
        if len(self.findings) < 100:
            self.findings.append(f"{self.op_name} at offset {self.op_pos}: containers nest deeper "
                                 f"than {self.limits.max_nesting}; the deeper part is kept inert")
        return PlaceholderCall(Placeholder("<safeckpt>", "nested-too-deep", self.op_pos), (value,), {},
                               self.op_name, self.op_pos)

    def set_depth(self, container: Any, d: int) -> None:
        if d > 1:  # a leaf; depth() answers 0 for it and callers count it as 1
            self.depths[id(container)] = (d, container)

    # globals and calls
    def find_global(self, module: Any, name: Any, pos: int) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise self.fail("STACK_GLOBAL requires str")
        # as CPython's find_class maps Python 2 names (for every protocol: a superset)
        if (module, name) in NAME_MAPPING:
            module, name = NAME_MAPPING[module, name]
        elif module in IMPORT_MAPPING:
            module = IMPORT_MAPPING[module]
        module = _TORCH_MODULES.get(module, module)
        qual = f"{module}.{name}"
        allowed = qual in ALLOWLIST
        self.globals.append(GlobalUse(module, name, pos, allowed))
        return ALLOWLIST[qual] if allowed else Placeholder(module, name, pos)

    def call(self, func: Any, args: Any, kwargs: Any, kind: str) -> Any:
        if not isinstance(args, tuple):
            raise self.fail(f"call arguments must be a tuple, got {type(args).__name__}")
        if not isinstance(kwargs, dict):
            raise self.fail("keyword arguments must be a dict")
        if isinstance(func, _Rebuild):
            try:
                out = func.fn(*args, **kwargs)
            except (PickleError, TypeError, ValueError, OverflowError, RecursionError) as exc:
                out = self.refuse(func.name, args, exc)
            if isinstance(out, PlaceholderCall) and out.offset == -1:
                self.refused(out)
            return out
        if isinstance(func, _NOT_CALLABLE):
            raise self.fail(f"{type(func).__name__} is not callable")
        return self.made(PlaceholderCall(func, args, dict(kwargs), kind, self.op_pos),
                         list(args) + list(kwargs.values()))

    def refuse(self, name: str, args: tuple, exc: BaseException) -> PlaceholderCall:
        """An allowlisted rebuild declined its arguments: an error when reading strictly,
        else an inert placeholder (CPython would have run on with the real result)."""
        detail = exc.detail if isinstance(exc, PickleError) else f"{type(exc).__name__}: {str(exc)[:200]}"
        if detail.startswith(f"{self.op_name} at offset {self.op_pos}: "):
            detail = detail.split(": ", 1)[1]
        if self.strict:
            raise self.fail(detail)
        self.refusals.append(f"{self.op_name} at offset {self.op_pos}: {name}: {detail}")
        module, _, qualname = name.rpartition(".")
        return PlaceholderCall(Placeholder(module, qualname, self.op_pos), args, {}, self.op_name,
                               self.op_pos)

    def refused(self, out: PlaceholderCall) -> None:
        """An allowlisted function declined to build something: keep it inert and say so."""
        out.offset = self.op_pos
        if isinstance(out.func, Placeholder):
            out.func.offset = self.op_pos
            self.findings.append(f"{self.op_name} at offset {self.op_pos}: "
                                 f"{out.func.qualname} with {brief(out.args)} was not built")

    def memo_put(self, key: Any, value: Any) -> None:
        if key not in self.memo and len(self.memo) >= self.limits.max_memo:
            raise self.limit(f"memo exceeds {self.limits.max_memo} entries (raise Limits.max_memo)")
        self.memo[key] = value
        if isinstance(value, _Pending):
            self.memo_of_pending.setdefault(id(value), (value, []))[1].append(key)

    def memo_get(self, key: Any) -> Any:
        try:
            self.stack.append(self.memo[key])
        except KeyError:
            raise self.fail(f"memo key {brief(key)} was never stored") from None

    @property
    def op_name(self) -> str:
        if self.op_special is not None:
            return self.op_special
        return OPCODE_TABLE[self.data[self.op_pos]][0]

    def run(self) -> int:
        pos = self.start
        count = 0
        max_opcodes, max_stack = self.limits.max_opcodes, self.limits.max_stack
        handlers = _BY_BYTE
        data, n = self.data, self.n
        while True:
            if pos >= n:
                self.op_special, self.op_pos = "end of data", pos
                raise self.fail("the pickle ends without STOP (truncated data)")
            self.op_pos = pos
            handler = handlers[data[pos]]
            if handler is None:
                self.op_special = f"byte 0x{data[pos]:02x}"
                raise self.fail("not a pickle opcode")
            count += 1
            if count > max_opcodes:
                raise self.limit(f"more than {max_opcodes} opcodes (raise Limits.max_opcodes)")
            try:
                pos = handler(self, pos + 1)
            except PickleError as e:
                if e.detail.startswith(self.op_name + " at offset"):
                    raise
                raise self.fail(e.detail, e.bounded) from None
            except (Exception, RecursionError) as e:  # noqa: BLE001 - nothing else may escape
                msg = f"missing {brief(e.args[0])}" if isinstance(e, KeyError) and e.args else str(e)[:200]
                # not a failure we know CPython shares: the machine could not follow
                raise self.limit(f"{type(e).__name__}: {msg}") from None
            if pos < 0:
                return -pos
            if len(self.stack) + self.saved > max_stack:
                raise self.limit(f"stack exceeds {max_stack} items (raise Limits.max_stack)")


# --- opcode handlers: (machine, position after the opcode byte) -> next position ---
# Each follows the load_* function of CPython's Modules/_pickle.c of the same name.

def op_mark(m: _Machine, pos: int) -> int:
    m.metastack.append(m.stack)
    m.saved += len(m.stack) + 1
    m.stack = []
    return pos


def op_stop(m: _Machine, pos: int) -> int:
    value = m.pop()
    if isinstance(value, _Pending):
        if m.strict:
            raise m.fail("the result is an object that was never given its state (BUILD)")
        value = m.refuse(type(value).__name__, (), PickleError("never given its state (BUILD)"))
    m.value = value
    if pos < m.frame_end:
        m.anomaly(f"STOP leaves {m.frame_end - pos} bytes of its frame unread")
        if m.file_reader:
            pos = m.frame_end  # the file reader had read them: the next pickle starts after
    return -pos


def op_pop(m: _Machine, pos: int) -> int:
    if m.stack:
        m.stack.pop()
    else:
        m.pop_mark()
    return pos


def op_pop_mark(m: _Machine, pos: int) -> int:
    m.pop_mark()
    return pos


def op_dup(m: _Machine, pos: int) -> int:
    m.push(m.top())
    return pos


# Numbers in text, as CPython parses them: INT with C's strtol(s, &end, 0) (then, if that
# fails, Python's int(s, 0)), LONG with int(s, 0), FLOAT with a C strtod; C reads a
# string up to its first NUL, so a line may hide anything after one.
_STRTOL = re.compile(rb"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")
_LONG_MAX = (1 << 63) - 1


def _c_string(text: bytes) -> bytes:
    nul = text.find(b"\0")
    return text if nul < 0 else text[:nul]


def _py_int(m: _Machine, text: bytes, base: int) -> Any:
    """int(text, base) as PyLong_FromString reads it; a huge literal stays inert."""
    text = _c_string(text)
    if len(text) > 2 * m.limits.max_long_bytes:
        return HugeInt(len(text) // 2)
    try:
        return int(text.decode("ascii"), base)
    except UnicodeDecodeError:
        raise m.fail(f"invalid literal for an integer: {brief(text)}") from None
    except ValueError as exc:
        if "Exceeds the limit" in str(exc):  # Python 3.11+ refuses, 3.10 reads it: read on
            return HugeInt(len(text) // 2)
        raise m.fail(f"invalid literal for an integer: {brief(text)}") from None


def op_int(m: _Machine, pos: int) -> int:
    text, pos = m.line(pos)
    if not text:
        raise m.fail("empty INT argument")
    if text[:1] == b"\0":  # strtol converts nothing and stops at the NUL: that is accepted, as 0
        m.push(False if len(text) == 2 else 0)
        return pos
    match = _STRTOL.match(_c_string(text))
    if match is not None:
        sign, digits = match.groups()
        if digits[:2] in (b"0x", b"0X"):
            value = int(digits[2:], 16)
        elif digits[:1] == b"0":
            value = int(digits, 8)
        else:
            value = int(digits, 10) if len(digits) <= 2 * m.limits.max_long_bytes else None
        if value is not None and value <= _LONG_MAX + (sign == b"-"):
            value = -value if sign == b"-" else value
            m.push(bool(value) if len(text) == 2 and value in (0, 1) else value)
            return pos
    m.push(_py_int(m, text, 0))  # strtol overflowed or stopped early: Python's parser
    return pos


def op_long(m: _Machine, pos: int) -> int:
    text, pos = m.line(pos)
    if not text:
        raise m.fail("empty LONG argument")
    if text.endswith(b"L"):
        text = text[:-1]
    m.push(_py_int(m, text, 0))
    return pos


def op_float(m: _Machine, pos: int) -> int:
    text, pos = m.line(pos)
    if not text:
        raise m.fail("empty FLOAT argument")
    try:
        m.push(float(_c_string(text).decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        raise m.fail(f"could not convert {brief(text)} to a float") from None
    return pos


def op_binfloat(m: _Machine, pos: int) -> int:
    raw, pos = m.take(pos, 8)
    m.push(struct.unpack(">d", raw)[0])
    return pos


_FIXED = {(1, False): struct.Struct("<B"), (2, False): struct.Struct("<H"),
          (4, False): struct.Struct("<I"), (8, False): struct.Struct("<Q"),
          (4, True): struct.Struct("<i")}


def op_binint1(m: _Machine, pos: int) -> int:
    # the commonest opcode of all, with BINGET/BINPUT: one byte read inline
    if pos >= m.n:
        raise m.fail("needs 1 byte but none is left (truncated data)")
    m.stack.append(m.data[pos])
    return pos + 1


def _binint(size: int, signed: bool) -> Callable:
    def handler(m: _Machine, pos: int) -> int:
        value, pos = m.uint(pos, size, signed)
        m.stack.append(value)
        return pos
    return handler


def _long_n(width: int) -> Callable:
    def handler(m: _Machine, pos: int) -> int:
        size, pos = m.uint(pos, width, signed=width == 4)
        if size < 0:
            raise m.fail("LONG pickle has negative byte count")
        if size > m.limits.max_long_bytes:
            _, pos = m.take(pos, size)
            m.push(HugeInt(size))
            return pos
        raw, pos = m.take(pos, size)
        m.push(int.from_bytes(raw, "little", signed=True))
        return pos
    return handler


def _counted(width: int, make: Callable, linear: bool = False) -> Callable:
    # bytes and bytearray payloads are copied on past a frame's end (_Unpickler_ReadInto);
    # strings are read like every other argument
    def handler(m: _Machine, pos: int) -> int:
        size, pos = m.uint(pos, width)
        raw, pos = m.take(pos, size, linear)
        try:
            m.stack.append(make(raw))
        except UnicodeDecodeError as exc:
            raise m.fail(f"invalid UTF-8 in a string ({exc.reason})") from None
        return pos
    return handler


def _py2_string(raw: bytes) -> Any:
    # Python 2 str: text when it is ASCII, raw bytes otherwise (numpy data)
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return raw


def _utf8(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


def op_string(m: _Machine, pos: int) -> int:
    text, pos = m.line(pos)
    if len(text) >= 2 and text[0] == text[-1] and text[:1] in (b"'", b'"'):
        text = text[1:-1]
    else:
        raise m.fail("STRING argument is not quoted")
    try:
        m.push(_py2_string(codecs.escape_decode(text)[0]))
    except ValueError as exc:
        raise m.fail(f"STRING argument: {exc}") from None
    return pos


def op_unicode(m: _Machine, pos: int) -> int:
    text, pos = m.line(pos)
    try:
        m.push(str(text, "raw-unicode-escape"))
    except UnicodeDecodeError as exc:
        raise m.fail(f"UNICODE argument: {exc.reason}") from None
    return pos


def op_next_buffer(m: _Machine, pos: int) -> int:
    raise m.fail("out-of-band buffers (pickle protocol 5 buffer_callback) need a buffers= "
                 "argument no checkpoint loader passes")


def op_readonly_buffer(m: _Machine, pos: int) -> int:
    m.top()  # makes a read-only view of a bytearray; bytes and views are already read-only
    return pos


def _push_const(value: Any) -> Callable:
    def handler(m: _Machine, pos: int) -> int:
        m.stack.append(value)
        return pos
    return handler


def _push_new(factory: Callable) -> Callable:
    def handler(m: _Machine, pos: int) -> int:
        m.push(factory())
        return pos
    return handler


def _extend(m: _Machine, target: Any, items: list) -> None:
    """APPEND(S): CPython calls target.extend (or .append); no items is a no-op on anything."""
    if not items:
        return
    if isinstance(target, list):
        target.extend(m.fit(target, items))
    elif isinstance(target, PlaceholderCall):
        target.items.extend(m.fit(target, items))
    elif isinstance(target, set):
        target.update(x for x in m.fit(target, items) if _hashable(x))
    # anything else: CPython calls its extend/append, or fails; nothing we keep


def op_append(m: _Machine, pos: int) -> int:
    item = m.pop()
    _extend(m, m.top(), [item])
    return pos


def op_appends(m: _Machine, pos: int) -> int:
    items = m.pop_mark()
    _extend(m, m.top(), items)
    return pos


def op_additems(m: _Machine, pos: int) -> int:
    items = m.pop_mark()
    target = m.top()
    if not items:
        return pos
    if isinstance(target, set):
        target.update(x for x in m.fit(target, items) if _hashable(x))
    elif isinstance(target, PlaceholderCall):
        target.items.extend(m.fit(target, items))
    # anything else: CPython calls its add(), or fails; nothing we keep
    return pos


def _setitems(m: _Machine, target: Any, flat: list) -> None:
    """SETITEM(S): CPython calls target[key] = value on whatever target is."""
    if not flat:
        return
    if len(flat) % 2:
        raise m.fail("odd number of items for SETITEMS")
    flat = m.fit(target, flat)
    pairs = zip(flat[::2], flat[1::2])
    if isinstance(target, dict):
        for k, v in pairs:
            if _hashable(k):  # an unhashable stand-in may be a hashable object in CPython
                target[k] = v
    elif isinstance(target, PlaceholderCall):
        target.setitems.extend(pairs)
    elif isinstance(target, list):
        for k, v in pairs:
            if type(k) is int and -len(target) <= k < len(target):
                target[k] = v
    # anything else: CPython calls its __setitem__, or fails; nothing we keep


def op_setitem(m: _Machine, pos: int) -> int:
    value = m.pop()
    key = m.pop()
    _setitems(m, m.top(), [key, value])
    return pos


def op_setitems(m: _Machine, pos: int) -> int:
    flat = m.pop_mark()
    _setitems(m, m.top(), flat)
    return pos


def op_list(m: _Machine, pos: int) -> int:
    items = m.pop_mark()
    m.push(m.made(items, items))
    return pos


def op_tuple(m: _Machine, pos: int) -> int:
    items = m.pop_mark()
    m.push(m.made(tuple(items), items))
    return pos


def _tuple_n(k: int) -> Callable:
    def handler(m: _Machine, pos: int) -> int:
        if len(m.stack) < k:
            raise m.fail("stack underflow")
        items = m.stack[len(m.stack) - k:]
        del m.stack[len(m.stack) - k:]
        m.push(m.made(tuple(items), items))
        return pos
    return handler


def op_dict(m: _Machine, pos: int) -> int:
    flat = m.pop_mark()
    if len(flat) % 2:
        raise m.fail("odd number of items for DICT")
    out: dict = {}
    _setitems(m, out, flat)
    m.push(out)
    return pos


def op_frozenset(m: _Machine, pos: int) -> int:
    items = m.pop_mark()
    m.push(m.made(frozenset(x for x in items if _hashable(x)), items))
    return pos


def _names(m: _Machine, pos: int, encoding: str) -> tuple:
    """The module and name lines of GLOBAL (UTF-8) and INST (ASCII)."""
    module, pos = m.line(pos)
    name, pos = m.line(pos)
    if not module or not name:
        raise m.fail("empty module or name line")
    try:
        return module.decode(encoding), name.decode(encoding), pos
    except UnicodeDecodeError:
        raise m.fail(f"module or name is not {encoding}") from None


def op_global(m: _Machine, pos: int) -> int:
    start = m.op_pos
    module, name, pos = _names(m, pos, "utf-8")
    m.push(m.find_global(module, name, start))
    return pos


def op_stack_global(m: _Machine, pos: int) -> int:
    name = m.pop()
    module = m.pop()
    m.push(m.find_global(module, name, m.op_pos))
    return pos


def op_inst(m: _Machine, pos: int) -> int:
    start = m.op_pos
    if not m.metastack:
        raise m.fail("no MARK to pop to (mark stack underflow)")
    module, name, pos = _names(m, pos, "ascii")
    cls = m.find_global(module, name, start)
    args = m.pop_mark()
    m.push(m.call(cls, tuple(args), {}, "INST"))
    return pos


def op_obj(m: _Machine, pos: int) -> int:
    items = m.pop_mark()
    if not items:
        raise m.fail("OBJ needs a class after the MARK (stack underflow)")
    m.push(m.call(items[0], tuple(items[1:]), {}, "OBJ"))
    return pos


def op_newobj(m: _Machine, pos: int) -> int:
    args = m.pop()
    cls = m.pop()
    m.push(m.call(cls, args, {}, "NEWOBJ"))
    return pos


def op_newobj_ex(m: _Machine, pos: int) -> int:
    kwargs = m.pop()
    args = m.pop()
    cls = m.pop()
    m.push(m.call(cls, args, kwargs, "NEWOBJ_EX"))
    return pos


def op_reduce(m: _Machine, pos: int) -> int:
    args = m.pop()
    func = m.pop()
    m.push(m.call(func, args, {}, "REDUCE"))
    return pos


def op_build(m: _Machine, pos: int) -> int:
    if len(m.stack) < 2:
        raise m.fail("stack underflow")
    state = m.stack.pop()
    obj = m.stack[-1]
    if isinstance(obj, _Pending):
        try:
            new = obj.finish(state)
        except (PickleError, TypeError, ValueError, OverflowError) as exc:
            new = m.refuse(type(obj).__name__, (state,), exc)
        if isinstance(new, PlaceholderCall) and new.offset == -1:
            m.refused(new)
        m.stack[-1] = new
        entry = m.memo_of_pending.pop(id(obj), None)
        if entry is not None:
            for key in entry[1]:
                m.memo[key] = new
    elif isinstance(obj, PlaceholderCall):
        obj.state.extend(m.fit(obj, [state]))
    elif isinstance(obj, dict) and not isinstance(obj, collections.OrderedDict):
        # plain-data classes (Namespace, AttributeDict) keep their __dict__ as items;
        # attributes of an OrderedDict (torch's state_dict._metadata) are not items
        inst, slots = (state if isinstance(state, tuple) and len(state) == 2 else (state, None))
        for part in (inst, slots):
            if isinstance(part, dict):
                _setitems(m, obj, [x for pair in part.items() for x in pair])
    # anything else: CPython calls its __setstate__ or sets attributes; nothing we keep
    return pos


def _persistent(m: _Machine, pid: Any) -> Any:
    if not m.persistent_ids:
        raise m.fail("a persistent id, but this loader has no persistent_load")
    if m.persistent_load is not None:
        return m.persistent_load(pid)
    if (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
            and isinstance(pid[1], TorchStorageType) and isinstance(pid[2], str)
            and type(pid[4]) is int and pid[4] >= 0):
        ref = StorageRef(pid[2], pid[1].dtype, pid[4], pid[3] if isinstance(pid[3], str) else brief(pid[3]))
        m.storages.append(ref)
        return ref
    return PlaceholderCall(None, (pid,), {}, m.op_name, m.op_pos)


def op_persid(m: _Machine, pos: int) -> int:
    if not m.persistent_ids:
        raise m.fail("a persistent id, but this loader has no persistent_load")
    text, pos = m.line(pos)
    try:
        pid = text.decode("ascii")
    except UnicodeDecodeError:
        raise m.fail("persistent IDs in protocol 0 must be ASCII strings") from None
    m.push(_persistent(m, pid))
    return pos


def op_binpersid(m: _Machine, pos: int) -> int:
    m.push(_persistent(m, m.pop()))
    return pos


def _ext(width: int) -> Callable:
    def handler(m: _Machine, pos: int) -> int:
        code, pos = m.uint(pos, width, signed=width == 4)
        if code <= 0:
            raise m.fail("EXT specifies code <= 0")
        if code in EXTENSION_TABLE:
            module, name = EXTENSION_TABLE[code]
            m.push(m.find_global(module, name, m.op_pos))
            return pos
        m.globals.append(GlobalUse("copyreg.extension", str(code), m.op_pos, False))
        m.findings.append(f"{m.op_name} at offset {m.op_pos}: extension code {code} "
                          "(resolved by copyreg in the loading process) is not resolved")
        m.push(Placeholder("copyreg.extension", str(code), m.op_pos))
        return pos
    return handler


def op_binget(m: _Machine, pos: int) -> int:
    if pos >= m.n:
        raise m.fail("needs 1 byte but none is left (truncated data)")
    m.memo_get(m.data[pos])
    return pos + 1


def op_binput(m: _Machine, pos: int) -> int:
    if pos >= m.n:
        raise m.fail("needs 1 byte but none is left (truncated data)")
    m.memo_put(m.data[pos], m.top())
    return pos + 1


_U32 = struct.Struct("<I").unpack_from


def op_long_binget(m: _Machine, pos: int) -> int:
    if pos < m.frame_end < pos + 4:
        pos = m.straddle(pos, 4)
    if pos + 4 > m.n:
        raise m.fail(f"needs 4 bytes but only {m.n - pos} are left (truncated data)")
    m.memo_get(_U32(m.data, pos)[0])
    return pos + 4


def op_long_binput(m: _Machine, pos: int) -> int:
    # torch's data.pkl memoizes every object with LONG_BINPUT once past 256 of them
    if pos < m.frame_end < pos + 4:
        pos = m.straddle(pos, 4)
    if pos + 4 > m.n:
        raise m.fail(f"needs 4 bytes but only {m.n - pos} are left (truncated data)")
    m.memo_put(_U32(m.data, pos)[0], m.top())
    return pos + 4


def _memo_key(m: _Machine, text: bytes) -> int:
    key = _py_int(m, text, 10)
    if type(key) is not int:
        raise m.fail(f"memo key {brief(text)} is not an integer")
    return key


def op_get(m: _Machine, pos: int) -> int:
    text, pos = m.line(pos)
    m.memo_get(_memo_key(m, text))
    return pos


def op_put(m: _Machine, pos: int) -> int:
    text, pos = m.line(pos)
    key = _memo_key(m, text)
    if key < 0:
        raise m.fail("negative PUT argument")
    m.memo_put(key, m.top())
    return pos


def op_memoize(m: _Machine, pos: int) -> int:
    m.memo_put(len(m.memo), m.top())
    return pos


def op_proto(m: _Machine, pos: int) -> int:
    proto, pos = m.uint(pos, 1)
    if proto > _HIGHEST_PROTOCOL:
        raise m.fail(f"unsupported pickle protocol {proto}")
    return pos


def op_frame(m: _Machine, pos: int) -> int:
    size, pos = m.uint(pos, 8)
    end = m.frame_end
    if pos < end:  # a frame inside a frame: pickle.py refuses it, the C readers do not
        if pos + size <= end:
            m.anomaly(f"a frame of {size} bytes inside the frame that ends at {end}")
            return pos
        pos = m.straddle(pos, size)
    if size > m.n - pos:
        raise m.fail(f"frame of {size} bytes runs past the end of the data (truncated data)")
    m.frame_end = pos + size
    m.framed = True
    return pos


_HANDLERS: dict = {
    "MARK": op_mark, "STOP": op_stop, "POP": op_pop, "POP_MARK": op_pop_mark, "DUP": op_dup,
    "FLOAT": op_float, "BINFLOAT": op_binfloat, "INT": op_int, "LONG": op_long,
    "BININT": _binint(4, True), "BININT1": op_binint1, "BININT2": _binint(2, False),
    "LONG1": _long_n(1), "LONG4": _long_n(4),
    "STRING": op_string, "BINSTRING": _counted(4, _py2_string),
    "SHORT_BINSTRING": _counted(1, _py2_string),
    "BINBYTES": _counted(4, bytes, True), "SHORT_BINBYTES": _counted(1, bytes, True),
    "BINBYTES8": _counted(8, bytes, True), "BYTEARRAY8": _counted(8, bytearray, True),
    "UNICODE": op_unicode, "SHORT_BINUNICODE": _counted(1, _utf8),
    "BINUNICODE": _counted(4, _utf8), "BINUNICODE8": _counted(8, _utf8),
    "NEXT_BUFFER": op_next_buffer, "READONLY_BUFFER": op_readonly_buffer,
    "NONE": _push_const(None), "NEWTRUE": _push_const(True), "NEWFALSE": _push_const(False),
    "APPEND": op_append, "APPENDS": op_appends, "BUILD": op_build,
    "GLOBAL": op_global, "STACK_GLOBAL": op_stack_global,
    "DICT": op_dict, "EMPTY_DICT": _push_new(dict), "EMPTY_LIST": _push_new(list),
    "EMPTY_TUPLE": _push_const(()), "EMPTY_SET": _push_new(set), "ADDITEMS": op_additems,
    "FROZENSET": op_frozenset, "TUPLE": op_tuple, "TUPLE1": _tuple_n(1), "TUPLE2": _tuple_n(2),
    "TUPLE3": _tuple_n(3), "GET": op_get, "BINGET": op_binget, "LONG_BINGET": op_long_binget,
    "PUT": op_put, "BINPUT": op_binput, "LONG_BINPUT": op_long_binput, "MEMOIZE": op_memoize,
    "SETITEM": op_setitem, "SETITEMS": op_setitems, "LIST": op_list, "INST": op_inst,
    "OBJ": op_obj, "NEWOBJ": op_newobj, "NEWOBJ_EX": op_newobj_ex, "REDUCE": op_reduce,
    "PERSID": op_persid, "BINPERSID": op_binpersid,
    "EXT1": _ext(1), "EXT2": _ext(2), "EXT4": _ext(4), "PROTO": op_proto, "FRAME": op_frame,
}

# opcode byte -> (name, handler); every opcode pickletools knows must have a handler.
OPCODE_TABLE: dict = {ord(op.code): (op.name, _HANDLERS[op.name]) for op in pickletools.opcodes}
assert len(OPCODE_TABLE) == len(_HANDLERS), "an opcode handler has no pickletools opcode"
# the same, indexed by byte (None: not an opcode), for the machine's dispatch loop
_BY_BYTE: list = [OPCODE_TABLE[b][1] if b in OPCODE_TABLE else None for b in range(256)]


def load(data: Any, *, start: int = 0, persistent_load: Optional[Callable] = None,
         limits: Limits = Limits(), reader: str = "bytes", strict: bool = True,
         persistent_ids: bool = True) -> PickleResult:
    """Run one pickle from `data[start:]` as data; nothing is imported or called.

    `persistent_load(pid)` maps persistent ids (torch: ``('storage', storage_type,
    key, location, numel)``); by default they become `StorageRef` records, and with
    ``persistent_ids=False`` they fail, as in a loader that has no persistent_load.
    `reader` is how the bytes reach the unpickler (`READERS`); `strict` decides
    whether a refusal or a frame anomaly raises (reading) or is recorded (scanning).

    >>> import pickle
    >>> r = load(pickle.dumps([1, "a"]) + b"trailing")
    >>> r.value, r.end
    ([1, 'a'], 22)
    """
    m = _Machine(data, start, persistent_load, limits, reader, strict, persistent_ids)
    try:
        end = m.run()
    except PickleError as e:
        # a scan still reports what the pickle named before it went wrong
        e.opcode, e.offset, e.globals, e.findings = m.op_name, m.op_pos, m.globals, m.findings
        e.framed = m.framed
        raise
    return PickleResult(m.value, m.globals, end, m.findings, m.storages, m.refusals, m.anomalies)


def load_all(data: Any, *, persistent_load: Optional[Callable] = None,
             limits: Limits = Limits(), max_pickles: int = 64) -> list:
    """Every pickle in `data`, back to back (the legacy torch format holds five).

    Stops at the end of the data; a trailing part that is not a pickle raises PickleError.
    """
    out: list = []
    pos = 0
    n = len(data)
    while pos < n and len(out) < max_pickles:
        r = load(data, start=pos, persistent_load=persistent_load, limits=limits)
        out.append(r)
        pos = r.end
    return out
