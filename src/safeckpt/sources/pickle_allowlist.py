"""The pickle allowlist: the globals a pickle may name, and what each one becomes.

A global a pickle names (``GLOBAL``, ``STACK_GLOBAL``, ``INST``) is looked up in
`ALLOWLIST`, a table from ``"module.qualname"`` to one of:

* a `Rebuild`: our own side-effect-free function, called by the pickle machine with
  the pickle's arguments instead of the real callable: torch tensor and parameter
  rebuilds (`TensorRef` records over `StorageRef` storages, checked to lie inside
  them), numpy arrays, dtypes and scalars rebuilt from their raw bytes,
  ``OrderedDict``, a few builtins, plain-data classes (``argparse.Namespace``,
  Lightning's ``AttributeDict``, omegaconf containers, ``datetime``, ``uuid.UUID``,
  paths) kept as plain data, type references as their names;
* a record standing for the object itself (``torch.float32`` is a `TorchDType`,
  ``torch.FloatStorage`` a `TorchStorageType`, ``builtins.Ellipsis`` is ``...``).

A rebuild declines arguments it does not expect with a `PickleError`, or returns
an inert `PlaceholderCall` for what it never builds (object and structured numpy
dtypes, the arrays using them). An object whose value is known only after
``BUILD`` gives it its state starts as a `Pending` and is finished by the machine.
Every name not in the table stays an inert `Placeholder` (`pickle_vm`): nothing
is imported by name from a file, ever. ``EXT1/2/4`` codes resolve only against
`EXTENSION_TABLE`, which is empty: ``copyreg``'s registry is never read.

    >>> ALLOWLIST["torch.float32"]
    TorchDType(name='float32', itemsize=4)
    >>> ALLOWLIST["torch._utils._rebuild_tensor_v2"].fn("storage", 0, (2, 3), (3, 1)).size
    (2, 3)
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import fractions
import ntpath
import posixpath
import uuid
from typing import Any, Callable, Optional

import numpy as np

from .pickle_records import (DcpIndex, KeptDict, KeptList, PathText, PickleError, Placeholder, PlaceholderCall, StorageRef,
                             TensorRef, TorchDevice, TorchDType, TorchSize, TorchStorageType, WindowsPathText, brief)

__all__ = ["ALLOWLIST", "EXTENSION_TABLE", "Rebuild", "Pending"]


class Rebuild:
    """An allowlisted callable: our function, called with the pickle's arguments."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable) -> None:
        self.name, self.fn = name, fn

    def __repr__(self) -> str:
        return f"<allowed {self.name}>"


class Pending:
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
    if isinstance(func, Rebuild):
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


class _PendingDType(Pending):
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


class _PendingArray(Pending):
    def finish(self, state: Any) -> np.ndarray:
        if not isinstance(state, tuple) or len(state) != 5:
            raise PickleError("numpy array state is not (version, shape, dtype, fortran, data)")
        _, shape, dt, fortran, raw = state
        if isinstance(dt, PlaceholderCall):
            return PlaceholderCall(Placeholder("numpy", "ndarray", -1), (), {}, "BUILD", -1, [state])
        return _array_from_bytes(raw, _as_dtype(dt), shape, bool(fortran))


def _numpy_reconstruct(cls: Any, shape: Any, dtype_code: Any) -> _PendingArray:
    if not (isinstance(cls, Rebuild) and cls.name.endswith("ndarray")):
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
    return TorchSize(_int_tuple(tuple(dims) if isinstance(dims, list) else dims, "torch.Size"))


def _torch_device(kind: Any, index: Any = None) -> str:
    if not isinstance(kind, str) or len(kind) > 64 or (index is not None and type(index) is not int):
        raise PickleError("torch.device() only from a short name and an optional index")
    return TorchDevice(kind if index is None else f"{kind}:{index}")


def _defaultdict(default_factory: Any = None, items: Any = ()) -> dict:
    # the factory is never called; missing keys are not a concern of data
    return _container_type(dict)(items)


def _ordered_dict(items: Any = ()) -> collections.OrderedDict:
    return collections.OrderedDict(_plain_iterable(items))


def _plain_dict(*args: Any, **kwargs: Any) -> dict:
    """A plain-data record (DCP metadata): BUILD and SETITEMS fill the dict."""
    out: dict = {}
    if len(args) == 1 and isinstance(args[0], dict):
        out.update(args[0])
    out.update(kwargs)
    return out


def _kept_dict(kind: str) -> Callable:
    """A plain-data class (Namespace, AttributeDict): BUILD and SETITEMS fill the dict."""
    def make(*args: Any, **kwargs: Any) -> KeptDict:
        return KeptDict(kind, _plain_dict(*args, **kwargs))
    return make


def _join_posix(*parts: Any) -> str:
    return PathText(posixpath.join(*_str_parts(parts)) if parts else ".")


def _join_windows(*parts: Any) -> str:
    return WindowsPathText(ntpath.join(*_str_parts(parts)) if parts else ".")


def _str_parts(parts: tuple) -> tuple:
    if not all(isinstance(p, str) for p in parts):
        raise PickleError("path parts must be strings")
    return parts


class _PendingOmega(Pending):
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
            return KeptDict("omegaconf.DictConfig", content)
        if isinstance(content, list):
            return KeptList("omegaconf.ListConfig", content)
        return content  # None, "???" or an interpolation string


def _omega(kind: str) -> Callable:
    def make(*args: Any, **kwargs: Any) -> _PendingOmega:
        return _PendingOmega(kind)
    return make


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if isinstance(cls, Rebuild):
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


class _PendingUUID(Pending):
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
        return KeptDict("collections.Counter", items)
    return KeptDict("collections.Counter", collections.Counter(_plain_iterable(items)))


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
    if isinstance(x, Rebuild) and (x.name.startswith("typing.") or x.name.startswith("builtins.")):
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
    if isinstance(form, Rebuild) and form.name.startswith("typing.") and _type_name(key) is not None:
        return f"{form.name}[{_type_name(key)}]"
    return _inert("operator.getitem", (form, key))


def _generic_alias(origin: Any, args: Any) -> Any:
    """types.GenericAlias(list, int) -> 'builtins.list[builtins.int]'."""
    if isinstance(origin, Rebuild) and origin.name.startswith("builtins.") and _type_name(args):
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


class _PendingProperties(Pending):
    """DCP's TensorProperties: its __setstate__ takes (dtype, layout, requires_grad, memory format, pin_memory)."""

    def finish(self, state: Any) -> dict:
        if isinstance(state, dict):
            return dict(state)
        if isinstance(state, tuple) and len(state) == 5:
            return dict(zip(("dtype", "layout", "requires_grad", "memory_format", "pin_memory"), state))
        raise PickleError("TensorProperties state is neither a dict nor its 5 fields")


class _PendingIndex(Pending):
    """DCP's MetadataIndex (a key of its storage_data): a hashable (fqn, offset) record once built."""

    def finish(self, state: Any) -> DcpIndex:
        if not isinstance(state, dict) or not isinstance(state.get("fqn"), str):
            raise PickleError("MetadataIndex state is not a dict with an fqn")
        offset = state.get("offset")
        if offset is not None and not (isinstance(offset, (tuple, list)) and all(type(v) is int for v in offset)):
            raise PickleError("MetadataIndex offset is not a tuple of ints")
        return DcpIndex(state["fqn"], None if offset is None else tuple(offset))


def _pending(kind: type) -> Callable:
    def make(*args: Any, **kwargs: Any) -> Pending:
        return kind()
    return make


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
            table[name] = Rebuild(name, fn)

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
    add("argparse.Namespace", _kept_dict("argparse.Namespace"))
    add("types.SimpleNamespace", _kept_dict("types.SimpleNamespace"))
    add(_DCP_RECORDS, _plain_dict)
    add("torch.distributed.checkpoint.metadata.TensorProperties", _pending(_PendingProperties))
    add("torch.distributed.checkpoint.metadata.MetadataIndex", _pending(_PendingIndex))
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
         "lightning_fabric.utilities.data.AttributeDict"], _kept_dict("lightning.AttributeDict"))
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


# "module.qualname" -> our rebuild function (wrapped in Rebuild) or a record.
ALLOWLIST: dict = _build_allowlist()

# EXT1/2/4 codes we resolve: deliberately empty; copyreg's registry is never read.
EXTENSION_TABLE: dict = {}
