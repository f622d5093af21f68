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
handler per opcode of protocols 0-5, names from `pickletools`), but:

* Nothing is ever imported and nothing named by the file is ever called. A
  global name is looked up in `ALLOWLIST`, a table from ``"module.qualname"``
  to our own side-effect-free rebuild functions and records (torch tensor and
  storage rebuilds, numpy arrays/dtypes/scalars, ``OrderedDict``, a few
  builtins, plain-data classes such as ``argparse.Namespace`` which become
  plain dicts/strings). Every other name becomes an inert `Placeholder`;
  calling it or building it makes a `PlaceholderCall` recording the arguments.
* ``EXT1/2/4`` resolve only against `EXTENSION_TABLE`, which is empty:
  ``copyreg`` is never consulted. An EXT code becomes a placeholder and a finding.
* Torch tensors become `TensorRef` records over `StorageRef` records (the
  persistent ids of the torch formats); the bytes are mapped elsewhere
  (``sources/torch_file.py``). torch is never imported.
* numpy arrays and scalars are rebuilt from their raw bytes (checked against
  shape x itemsize); object, structured and void dtypes are never built: such an
  array stays an inert `PlaceholderCall` and is reported in `findings`.
* Out-of-band buffers (``NEXT_BUFFER``/``READONLY_BUFFER``) are refused.
* Everything an attacker controls is bounded by a `Limits` value (defaults
  are the ``MAX_*`` constants below) and every failure is a `PickleError`
  naming the opcode and its byte offset (also as ``.opcode``/``.offset``, with the
  ``.globals`` seen before the failure, so a scan still reports them); no other
  exception escapes.

The machine is iterative (no recursion on the data). ``DUP``/``GET`` make
shared references, not copies, so a small pickle can describe a DAG whose
*tree* walk is exponential: a later consumer that walks the result must
de-duplicate by identity (or bound its work). Object nesting depth is
bounded by `MAX_NESTING` as containers are built; a container mutated after
it was placed in a parent (via the memo) is tracked on a best-effort basis.

Example::

    >>> import pickle
    >>> load(pickle.dumps({"a": [1, 2.5]}, protocol=2)).value
    {'a': [1, 2.5]}
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import ntpath
import pickletools
import posixpath
import reprlib
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from safeckpt.errors import SafeckptError

__all__ = [
    "PickleError", "Limits", "PickleResult", "GlobalUse", "Placeholder", "PlaceholderCall",
    "TensorRef", "StorageRef", "TorchDType", "TorchStorageType", "load", "load_all",
    "ALLOWLIST", "EXTENSION_TABLE", "OPCODE_TABLE",
    "MAX_OPCODES", "MAX_STACK", "MAX_MEMO", "MAX_NESTING", "MAX_TOTAL_BYTES",
    "MAX_LINE", "MAX_LONG_BYTES",
]


class PickleError(SafeckptError, ValueError):
    """A pickle that is malformed, truncated, refused, or past one of our limits.

    Raised by `load` with `opcode`, `offset` and the `globals`/`findings` seen so far.
    """

    opcode: str = "?"
    offset: int = -1
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
# Mark nesting and container nesting depth: a later recursive walk (repr, ==, JSON)
# fails near Python's recursion limit of 1000, and pickle.dumps itself cannot
# write deeper structures.
MAX_NESTING = 900
# Total bytes of all strings/bytes arguments (each one is also never more than the
# bytes left in the data, so no claimed length allocates memory it cannot fill).
MAX_TOTAL_BYTES = 1 << 34
# One newline-terminated argument (protocol 0 ints, floats, names, strings).
MAX_LINE = 1 << 20
# One LONG1/LONG4 integer, in bytes: int.from_bytes is linear, but arithmetic on
# huge ints later is not.
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
    """The value of one pickle, every global it named, and the offset after its STOP.

    `storages` lists the torch storages its persistent ids named (default loader only),
    so that their records can be checked against the sizes the pickle claims.
    """

    value: Any
    globals: list
    end: int
    findings: list = field(default_factory=list)
    storages: list = field(default_factory=list)


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
    for name in ("builtins.object", "typing.Any"):  # type references in omegaconf metadata
        add(name, _type_only(name))
    # tensor classes, named (never called) by the legacy tar format's tensor records
    for cls in _TORCH_STORAGES:
        for prefix in ("torch.", "torch.cuda."):
            name = prefix + cls.replace("Storage", "Tensor")
            add(name, _type_only(name))
    add("copyreg._reconstructor", _copyreg_reconstructor)
    add("argparse.Namespace", _plain_dict)
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

# Python 2 names that protocol 0-2 pickles use for the same objects (fix_imports).
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_PY2_NAMES = {("builtins", "long"): ("builtins", "int"), ("builtins", "unicode"): ("builtins", "str")}

# EXT1/2/4 codes we resolve: deliberately empty; copyreg's registry is never read.
EXTENSION_TABLE: dict = {}


# --- the machine ---------------------------------------------------------------

_HIGHEST_PROTOCOL = 5
_CONTAINERS = (list, dict, tuple, set, frozenset, PlaceholderCall)


class _Machine:
    def __init__(self, data: Any, start: int, persistent_load: Optional[Callable], limits: Limits):
        self.data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self.n = len(self.data)
        self.start = start
        self.persistent_load = persistent_load
        self.limits = limits
        self.stack: list = []
        self.metastack: list = []
        self.saved = 0  # items in the stacks saved by MARK
        self.memo: dict = {}
        self.memo_of_pending: dict = {}
        self.depths: dict = {}
        self.total_bytes = 0
        self.globals: list = []
        self.findings: list = []
        self.storages: list = []
        self.op_special: Optional[str] = None  # a name for errors that are not at an opcode
        self.op_pos = start
        self.value: Any = None

    # errors and reading
    def fail(self, detail: str) -> PickleError:
        return PickleError(f"{self.op_name} at offset {self.op_pos}: {detail}")

    def take(self, pos: int, size: int) -> bytes:
        if size < 0 or pos + size > self.n:
            raise self.fail(f"needs {size} bytes but only {self.n - pos} are left (truncated data)")
        return bytes(self.data[pos:pos + size])

    def take_counted(self, pos: int, size: int) -> bytes:
        if size > self.n - pos:  # checked first: a claimed length never allocates anything
            return self.take(pos, size)
        self.total_bytes += max(size, 0)
        if self.total_bytes > self.limits.max_total_bytes:
            raise self.fail(f"strings and bytes exceed {self.limits.max_total_bytes} bytes in total "
                            "(raise Limits.max_total_bytes)")
        return self.take(pos, size)

    def line(self, pos: int) -> tuple:
        end_search = min(self.n, pos + self.limits.max_line + 1)
        if isinstance(self.data, bytes):
            nl = self.data.find(b"\n", pos, end_search)
        else:
            nl = self.find_newline(pos, end_search)
        if nl < 0:
            if end_search < self.n:
                raise self.fail(f"line argument longer than {self.limits.max_line} bytes "
                                "(raise Limits.max_line)")
            raise self.fail("line argument has no newline (truncated data)")
        self.total_bytes += nl - pos
        return self.take(pos, nl - pos), nl + 1

    def find_newline(self, pos: int, end: int) -> int:
        # in growing chunks: a view is copied to search it, and lines are usually short
        chunk = 256
        while pos < end:
            stop = min(end, pos + chunk)
            found = bytes(self.data[pos:stop]).find(b"\n")
            if found >= 0:
                return pos + found
            pos, chunk = stop, chunk * 4
        return -1

    def uint(self, pos: int, size: int, signed: bool = False) -> tuple:
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
        self.saved -= len(self.stack)
        return items

    # depth bookkeeping: id -> (depth, obj); the obj keeps the id from being reused
    def depth(self, x: Any) -> int:
        e = self.depths.get(id(x))
        return e[0] if e is not None and e[1] is x else 0

    def made(self, container: Any, children: Any) -> Any:
        d = 0
        for c in children:
            if isinstance(c, _CONTAINERS):
                d = max(d, self.depth(c) or 1)  # containers of depth 1 are not recorded
        self.set_depth(container, d + 1)
        return container

    def grew(self, container: Any, children: Any) -> None:
        d = self.depth(container) - 1
        for c in children:
            if isinstance(c, _CONTAINERS):
                d = max(d, self.depth(c) or 1)
        self.set_depth(container, d + 1)

    def set_depth(self, container: Any, d: int) -> None:
        if d <= 1:  # a leaf; depth() answers 0 for it and callers count it as 1
            return
        if d > self.limits.max_nesting:
            raise self.fail(f"containers nest deeper than {self.limits.max_nesting} "
                            "(raise Limits.max_nesting)")
        self.depths[id(container)] = (d, container)

    # globals and calls
    def find_global(self, module: Any, name: Any, pos: int) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise self.fail("global module and name must be strings")
        module = _PY2_MODULES.get(module, module)
        module, name = _PY2_NAMES.get((module, name), (module, name))
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
            out = func.fn(*args, **kwargs)
            if isinstance(out, PlaceholderCall) and out.offset == -1:
                self.refused(out)
            return out
        if isinstance(func, (Placeholder, PlaceholderCall)):
            return self.made(PlaceholderCall(func, args, dict(kwargs), kind, self.op_pos),
                             list(args) + list(kwargs.values()))
        raise self.fail(f"{type(func).__name__} is not callable here")

    def refused(self, out: PlaceholderCall) -> None:
        """An allowlisted function declined to build something: keep it inert and say so."""
        out.offset = self.op_pos
        if isinstance(out.func, Placeholder):
            out.func.offset = self.op_pos
            self.findings.append(f"{self.op_name} at offset {self.op_pos}: "
                                 f"{out.func.qualname} with {brief(out.args)} was not built")

    def memo_put(self, key: Any, value: Any) -> None:
        if key not in self.memo and len(self.memo) >= self.limits.max_memo:
            raise self.fail(f"memo exceeds {self.limits.max_memo} entries (raise Limits.max_memo)")
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
                raise self.fail(f"more than {max_opcodes} opcodes (raise Limits.max_opcodes)")
            try:
                pos = handler(self, pos + 1)
            except PickleError as e:
                if e.detail.startswith(self.op_name + " at offset"):
                    raise
                raise self.fail(e.detail) from None
            except (Exception, RecursionError) as e:  # noqa: BLE001 - nothing else may escape
                msg = f"missing {brief(e.args[0])}" if isinstance(e, KeyError) and e.args else str(e)[:200]
                raise self.fail(f"{type(e).__name__}: {msg}") from None
            if pos < 0:
                return -pos
            if len(self.stack) + self.saved > max_stack:
                raise self.fail(f"stack exceeds {max_stack} items (raise Limits.max_stack)")


# --- opcode handlers: (machine, position after the opcode byte) -> next position ---

def op_mark(m: _Machine, pos: int) -> int:
    if len(m.metastack) >= m.limits.max_nesting:
        raise m.fail(f"MARKs nest deeper than {m.limits.max_nesting} (raise Limits.max_nesting)")
    m.metastack.append(m.stack)
    m.saved += len(m.stack)
    m.stack = []
    return pos


def op_stop(m: _Machine, pos: int) -> int:
    m.value = m.pop()
    if isinstance(m.value, _Pending):
        raise m.fail("the result is an object that was never given its state (BUILD)")
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


def op_float(m: _Machine, pos: int) -> int:
    text, pos = m.line(pos)
    m.push(float(text))
    return pos


def op_binfloat(m: _Machine, pos: int) -> int:
    m.push(struct.unpack(">d", m.take(pos, 8))[0])
    return pos + 8


def op_int(m: _Machine, pos: int) -> int:
    text, pos = m.line(pos)
    if text == b"00":
        m.push(False)
    elif text == b"01":
        m.push(True)
    else:
        m.push(int(text, 10))
    return pos


def op_long(m: _Machine, pos: int) -> int:
    text, pos = m.line(pos)
    if text.endswith(b"L"):
        text = text[:-1]
    m.push(int(text, 10))
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
        size, pos = m.uint(pos, width)
        if size > m.limits.max_long_bytes:
            raise m.fail(f"integer of {size} bytes exceeds {m.limits.max_long_bytes} "
                         "(raise Limits.max_long_bytes)")
        m.push(int.from_bytes(m.take_counted(pos, size), "little", signed=True))
        return pos + size
    return handler


def _counted(width: int, make: Callable) -> Callable:
    def handler(m: _Machine, pos: int) -> int:
        size, pos = m.uint(pos, width)
        if width == 4 and make is _py2_string and size >= 1 << 31:
            raise m.fail("BINSTRING length is negative")
        m.stack.append(make(m.take_counted(pos, size)))
        return pos + size
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
    m.push(_py2_string(codecs.escape_decode(text)[0]))
    return pos


def op_unicode(m: _Machine, pos: int) -> int:
    text, pos = m.line(pos)
    m.push(str(text, "raw-unicode-escape"))
    return pos


def op_buffer(m: _Machine, pos: int) -> int:
    raise m.fail("out-of-band buffers (pickle protocol 5 buffer_callback) are not supported; "
                 "save the pickle with in-band buffers")


def _push_const(value: Any) -> Callable:
    def handler(m: _Machine, pos: int) -> int:
        m.stack.append(value)
        return pos
    return handler


def _push_new(factory: Callable) -> Callable:
    def handler(m: _Machine, pos: int) -> int:
        obj = factory()
        m.set_depth(obj, 1)
        m.push(obj)
        return pos
    return handler


def _extend(m: _Machine, target: Any, items: list) -> None:
    if isinstance(target, list):
        target.extend(items)
    elif isinstance(target, PlaceholderCall):
        target.items.extend(items)
    elif isinstance(target, set):
        target.update(items)
    else:
        raise m.fail(f"cannot append to {type(target).__name__}")
    m.grew(target, items)


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
    if not isinstance(target, (set, PlaceholderCall)):
        raise m.fail(f"ADDITEMS on {type(target).__name__}, not a set")
    _extend(m, target, items)
    return pos


def _setitems(m: _Machine, target: Any, flat: list) -> None:
    if len(flat) % 2:
        raise m.fail("odd number of items for key/value pairs")
    pairs = list(zip(flat[::2], flat[1::2]))
    if isinstance(target, dict):
        for k, v in pairs:
            target[k] = v
    elif isinstance(target, PlaceholderCall):
        target.setitems.extend(pairs)
    else:
        raise m.fail(f"cannot set items on {type(target).__name__}")
    m.grew(target, flat)


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
    out: dict = {}
    m.set_depth(out, 1)
    _setitems(m, out, flat)
    m.push(out)
    return pos


def op_frozenset(m: _Machine, pos: int) -> int:
    items = m.pop_mark()
    m.push(m.made(frozenset(items), items))
    return pos


def op_global(m: _Machine, pos: int) -> int:
    start = m.op_pos
    module, pos = m.line(pos)
    name, pos = m.line(pos)
    m.push(m.find_global(module.decode("utf-8"), name.decode("utf-8"), start))
    return pos


def op_stack_global(m: _Machine, pos: int) -> int:
    name = m.pop()
    module = m.pop()
    m.push(m.find_global(module, name, m.op_pos))
    return pos


def op_inst(m: _Machine, pos: int) -> int:
    start = m.op_pos
    module, pos = m.line(pos)
    name, pos = m.line(pos)
    cls = m.find_global(module.decode("utf-8"), name.decode("utf-8"), start)
    args = m.pop_mark()
    m.push(m.call(cls, tuple(args), {}, "INST"))
    return pos


def op_obj(m: _Machine, pos: int) -> int:
    items = m.pop_mark()
    if not items:
        raise m.fail("OBJ needs a class after the MARK")
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
    state = m.pop()
    obj = m.top()
    if isinstance(obj, _Pending):
        new = obj.finish(state)
        if isinstance(new, PlaceholderCall) and new.offset == -1:
            m.refused(new)
        m.stack[-1] = new
        entry = m.memo_of_pending.pop(id(obj), None)
        if entry is not None:
            for key in entry[1]:
                m.memo[key] = new
    elif isinstance(obj, PlaceholderCall):
        obj.state.append(state)
        m.grew(obj, [state])
    elif isinstance(obj, collections.OrderedDict):
        pass  # attributes of an OrderedDict (torch's state_dict._metadata) are not items
    elif isinstance(obj, dict):
        # plain-data classes (Namespace, AttributeDict) keep their __dict__ as items
        inst, slots = (state if isinstance(state, tuple) and len(state) == 2 else (state, None))
        for part in (inst, slots):
            if isinstance(part, dict):
                obj.update(part)
            elif part is not None:
                raise m.fail("BUILD state for a plain-data object is not a dict")
        m.grew(obj, [state])
    elif isinstance(obj, TensorRef) or obj is None:
        pass  # tensors carry no state we keep
    else:
        raise m.fail(f"BUILD on {type(obj).__name__} is refused")
    return pos


def _persistent(m: _Machine, pid: Any) -> Any:
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
    text, pos = m.line(pos)
    m.push(_persistent(m, text.decode("ascii")))
    return pos


def op_binpersid(m: _Machine, pos: int) -> int:
    m.push(_persistent(m, m.pop()))
    return pos


def _ext(width: int) -> Callable:
    def handler(m: _Machine, pos: int) -> int:
        code, pos = m.uint(pos, width)
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
    if pos + 4 > m.n:
        raise m.fail(f"needs 4 bytes but only {m.n - pos} are left (truncated data)")
    m.memo_get(_U32(m.data, pos)[0])
    return pos + 4


def op_long_binput(m: _Machine, pos: int) -> int:
    # torch's data.pkl memoizes every object with LONG_BINPUT once past 256 of them
    if pos + 4 > m.n:
        raise m.fail(f"needs 4 bytes but only {m.n - pos} are left (truncated data)")
    m.memo_put(_U32(m.data, pos)[0], m.top())
    return pos + 4


def _get(width: Optional[int]) -> Callable:
    def handler(m: _Machine, pos: int) -> int:
        if width is None:
            text, pos = m.line(pos)
            key = int(text, 10)
        else:
            key, pos = m.uint(pos, width)
        m.memo_get(key)
        return pos
    return handler


def _put(width: Optional[int]) -> Callable:
    def handler(m: _Machine, pos: int) -> int:
        if width is None:
            text, pos = m.line(pos)
            key = int(text, 10)
        else:
            key, pos = m.uint(pos, width)
        m.memo_put(key, m.top())
        return pos
    return handler


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
    if size > m.n - pos:
        raise m.fail(f"frame of {size} bytes runs past the end of the data (truncated data)")
    return pos


_HANDLERS: dict = {
    "MARK": op_mark, "STOP": op_stop, "POP": op_pop, "POP_MARK": op_pop_mark, "DUP": op_dup,
    "FLOAT": op_float, "BINFLOAT": op_binfloat, "INT": op_int, "LONG": op_long,
    "BININT": _binint(4, True), "BININT1": op_binint1, "BININT2": _binint(2, False),
    "LONG1": _long_n(1), "LONG4": _long_n(4),
    "STRING": op_string, "BINSTRING": _counted(4, _py2_string),
    "SHORT_BINSTRING": _counted(1, _py2_string),
    "BINBYTES": _counted(4, bytes), "SHORT_BINBYTES": _counted(1, bytes),
    "BINBYTES8": _counted(8, bytes), "BYTEARRAY8": _counted(8, bytearray),
    "UNICODE": op_unicode, "SHORT_BINUNICODE": _counted(1, _utf8),
    "BINUNICODE": _counted(4, _utf8), "BINUNICODE8": _counted(8, _utf8),
    "NEXT_BUFFER": op_buffer, "READONLY_BUFFER": op_buffer,
    "NONE": _push_const(None), "NEWTRUE": _push_const(True), "NEWFALSE": _push_const(False),
    "APPEND": op_append, "APPENDS": op_appends, "BUILD": op_build,
    "GLOBAL": op_global, "STACK_GLOBAL": op_stack_global,
    "DICT": op_dict, "EMPTY_DICT": _push_new(dict), "EMPTY_LIST": _push_new(list),
    "EMPTY_TUPLE": _push_const(()), "EMPTY_SET": _push_new(set), "ADDITEMS": op_additems,
    "FROZENSET": op_frozenset, "TUPLE": op_tuple, "TUPLE1": _tuple_n(1), "TUPLE2": _tuple_n(2),
    "TUPLE3": _tuple_n(3), "GET": _get(None), "BINGET": op_binget, "LONG_BINGET": op_long_binget,
    "PUT": _put(None), "BINPUT": op_binput, "LONG_BINPUT": op_long_binput, "MEMOIZE": op_memoize,
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
         limits: Limits = Limits()) -> PickleResult:
    """Run one pickle from `data[start:]` as data; nothing is imported or called.

    `persistent_load(pid)` maps persistent ids (torch: ``('storage', storage_type,
    key, location, numel)``); by default they become `StorageRef` records.

    >>> import pickle
    >>> r = load(pickle.dumps([1, "a"]) + b"trailing")
    >>> r.value, r.end
    ([1, 'a'], 22)
    """
    m = _Machine(data, start, persistent_load, limits)
    try:
        end = m.run()
    except PickleError as e:
        # a scan still reports what the pickle named before it went wrong
        e.opcode, e.offset, e.globals, e.findings = m.op_name, m.op_pos, m.globals, m.findings
        raise
    return PickleResult(m.value, m.globals, end, m.findings, m.storages)


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
