"""A state tree as tensors plus a JSON document: stored without pickle, restored exactly.

A *state* is what a run needs to resume: nested dicts, lists and tuples whose
leaves are tensors (numpy arrays and scalars, torch tensors, jax arrays) or
plain values (None, bool, int, float, str, bytes). `split_state` takes it apart
into two pieces:

- tensors, ``{name: numpy array}``, for `safeckpt.save_file`; any safetensors
  reader opens them. A tensor is named after its path in the tree, keys joined
  with ``/`` (``model/layer.weight``, ``optimizer/state/0/exp_avg``). A ``~`` or
  ``/`` inside a key is written ``~0`` / ``~1`` as in JSON Pointer; a name taken
  twice (int key ``0`` beside str key ``"0"``) gets a suffix ``~2``, ``~3``...,
  which escaping never produces, so names never collide.
- a document, JSON without NaN literals::

    {"schema": 1,
     "tree": <the skeleton>,
     "tensors": {name: {"framework", "dtype", "shape", "device", "requires_grad"}}}

  A record may add ``"scalar": true`` (a numpy scalar, stored 0-d),
  ``"parameter": true`` (a torch ``nn.Parameter``) or ``"byteorder": ">"``
  (a big-endian numpy array).

The skeleton is the tree with JSON's own values as they are (null, booleans,
strings, lists, finite floats, ints within int64, objects whose keys are
strings) and every other value a one-key object whose key is a tag::

    {"__tensor__": name}               a tensor; two paths to one tensor share the name
    {"__float__": "nan" | "inf" | "-inf"}
    {"__int__": "-123..."}             an int outside int64 (hex "0x..." past 4300 digits)
    {"__bytes__": base64}
    {"__tuple__": [items]}
    {"__dict__": [[key, value], ...]}  a dict with a key that is not a str, or is a tag
    {"__object__": [kind, parts]}      one of the `KEPT_TYPES` (schema 2), e.g.
                                       ["argparse.Namespace", {"lr": 0.1}]
    {"__type__": "module.QualName"}    a class object, by name only (schema 2)

`join_state` is the exact inverse: the same types, dtypes and values (NaN,
-0.0, big ints), key types and order, and tensors back in their framework, on
their device when it is present (the CPU otherwise), with ``requires_grad``.
The container types training frameworks put in their checkpoints come back as
themselves (`KEPT_TYPES`: OrderedDict with torch's ``_metadata``,
argparse.Namespace, Lightning's AttributeDict, OmegaConf's DictConfig and
ListConfig, torch.Size); every other subclass comes back as its base type (a
namedtuple as a tuple, a str subclass as str). A class object (Lightning's
``hparams_type``) is stored by its qualified name and given back as the class
only for `KNOWN_CLASSES` (never imported by a name read from the file); any
other comes back as its name, with a warning. Code is never stored: a
function, a set or any other object in the tree is refused with its path.

A document is written with schema 1 unless it needs ``__object__`` or
``__type__`` (schema 2), so that older readers still read what they can.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple, Optional

import numpy as np

from .. import errors, frameworks
from ..format.dtypes import DTYPES, byte_size, dtype_for_numpy
from ..format.header import METADATA_KEY
from ..format.reader import to_logical
from ..format.writer import RawTensor

SCHEMA_VERSION = 2

# Real states nest a handful of levels. The cap turns a runaway structure into a clear
# error long before Python's recursion limit (1000 frames; walking takes two per level).
MAX_DEPTH = 200

_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1

TENSOR, FLOAT, INT, BYTES, TUPLE, DICT = "__tensor__", "__float__", "__int__", "__bytes__", "__tuple__", "__dict__"
OBJECT, TYPE = "__object__", "__type__"
_SCHEMA_1_TAGS = frozenset((TENSOR, FLOAT, INT, BYTES, TUPLE, DICT))
_TAGS = _SCHEMA_1_TAGS | {OBJECT, TYPE}
_SCALAR_TAGS = frozenset((FLOAT, INT, BYTES))
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_FRAMEWORKS = ("numpy", "torch", "jax")
_KEY_TYPES = (str, int, float, bytes, type(None))  # bool is an int

# Set on a snapshot's CPU copy of a GPU tensor, so the document still records the GPU.
_SOURCE_DEVICE = "_safeckpt_source_device"
# Threads that fill a snapshot: one per core (memory copies scale with cores until bandwidth).
_COPY_THREADS = max(1, min(8, os.cpu_count() or 1))


# --- container types kept as themselves -------------------------------------------

class KeptType(NamedTuple):
    """A container type a state may hold, stored as its parts and rebuilt as itself.

    `parts(value)` is the value as a plain dict or list, walked like any other (its
    tensors are named by the value's own path); `extra(value)` anything else the type
    carries (torch's ``_metadata`` on a state_dict), or None; `rebuild(parts, extra)`
    makes the value again. They use only the modules named here: nothing is ever
    imported by a name from a file.
    """

    module: str  # the top-level package of the type (checked before anything is imported)
    qualname: str
    parts: Callable[[Any], Any]
    rebuild: Callable[[Any, Any], Any]
    extra: Callable[[Any], Any] = lambda value: None


def _ordered_dict(parts, metadata) -> Any:
    result = OrderedDict(parts)
    if metadata is not None:
        result._metadata = metadata  # torch's per-module versions, read by load_state_dict
    return result


def _namespace(parts, _) -> Any:
    import argparse

    return argparse.Namespace(**parts)


def _attribute_dict(parts, _=None) -> Any:
    try:
        from lightning.fabric.utilities.data import AttributeDict
    except ImportError:
        try:
            from lightning_fabric.utilities.data import AttributeDict
        except ImportError:
            warnings.warn("an AttributeDict comes back as a dict: Lightning is not installed", stacklevel=4)
            return dict(parts)
    return AttributeDict(parts)


def _omegaconf_parts(value) -> Any:
    from omegaconf import OmegaConf

    # unresolved: interpolations stay "${...}" and missing values "???", as they were
    return OmegaConf.to_container(value, resolve=False, enum_to_str=True)


def _omegaconf(parts, _) -> Any:
    try:
        from omegaconf import OmegaConf
    except ImportError:
        warnings.warn("an OmegaConf config comes back as a plain dict or list: omegaconf is not installed",
                      stacklevel=4)
        return parts
    return OmegaConf.create(parts)


def _torch_size(parts, _) -> Any:
    return _torch().Size(parts)


# kind (written in the document) -> how it is stored and rebuilt
KEPT_TYPES: dict[str, KeptType] = {
    "collections.OrderedDict": KeptType("collections", "OrderedDict", dict, _ordered_dict,
                                        lambda value: getattr(value, "_metadata", None)),
    "argparse.Namespace": KeptType("argparse", "Namespace", vars, _namespace),
    "lightning.AttributeDict": KeptType("lightning", "AttributeDict", dict, _attribute_dict),
    "omegaconf.DictConfig": KeptType("omegaconf", "DictConfig", _omegaconf_parts, _omegaconf),
    "omegaconf.ListConfig": KeptType("omegaconf", "ListConfig", _omegaconf_parts, _omegaconf),
    "torch.Size": KeptType("torch", "Size", list, _torch_size),
}
# The AttributeDict is one class under several packages (lightning, lightning_fabric, pytorch_lightning).
_LIGHTNING_PACKAGES = ("lightning", "lightning_fabric", "pytorch_lightning")
_PACKAGE_ALIASES = {package: "lightning" for package in _LIGHTNING_PACKAGES}
_BY_TYPE_NAME = {(kept.module, kept.qualname): kind for kind, kept in KEPT_TYPES.items()}


def kept_kind(value) -> Optional[str]:
    """The `KEPT_TYPES` kind of `value`'s exact type, or None (imports nothing)."""
    kind = type(value)
    package = kind.__module__.split(".")[0]
    return _BY_TYPE_NAME.get((_PACKAGE_ALIASES.get(package, package), kind.__qualname__))


#: qualified names of the classes `join_state` gives back as classes; any other comes back as its name.
KNOWN_CLASSES = ("builtins.dict", "collections.OrderedDict", "argparse.Namespace", "omegaconf.dictconfig.DictConfig",
                 "lightning.fabric.utilities.data.AttributeDict")


def _class_name(value: type) -> str:
    return f"{value.__module__}.{value.__qualname__}"


def _class_from_name(name: str) -> Any:
    """The class `name` stands for if it is one of `KNOWN_CLASSES`, else `name` (with a warning)."""
    if name == "builtins.dict":
        return dict
    if name == "collections.OrderedDict":
        return OrderedDict
    if name == "argparse.Namespace":
        import argparse

        return argparse.Namespace
    if name == "omegaconf.dictconfig.DictConfig":
        try:
            from omegaconf import DictConfig
        except ImportError:
            pass
        else:
            return DictConfig
    elif name.endswith(".AttributeDict") and name.split(".")[0] in _LIGHTNING_PACKAGES:
        return type(_attribute_dict({}))
    warnings.warn(f"the class {name!r} in this state comes back as its name: only {', '.join(KNOWN_CLASSES)} "
                  "come back as classes (a class named in a file is never imported)", stacklevel=4)
    return name


# --- what a value is -------------------------------------------------------------

def _framework(value) -> Optional[str]:
    """"numpy", "torch" or "jax" for a tensor of that framework, else None (imports nothing)."""
    if isinstance(value, (np.ndarray, np.generic)):
        return "numpy"
    package = type(value).__module__.split(".")[0]
    name = {"torch": "torch", "jax": "jax", "jaxlib": "jax"}.get(package)
    if name is not None and frameworks.get(name).is_tensor(value):
        return name
    return None


def _kind(value) -> str:
    """'scalar', 'tensor', 'object' (a `KEPT_TYPES` type), 'class', 'dict', 'list', 'tuple', or ''
    for a value a state cannot hold."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return "scalar"
    if isinstance(value, np.generic):  # before int/float: np.float64 is a float
        return "tensor"
    if isinstance(value, (int, float)):
        return "scalar"
    if _framework(value) is not None:
        return "tensor"
    if kept_kind(value) is not None:
        return "object"
    if isinstance(value, type):
        return "class"
    if isinstance(value, Mapping):
        return "dict"
    if isinstance(value, list):
        return "list"
    if isinstance(value, tuple):
        return "tuple"
    return ""


def _is_masked(value) -> bool:
    # Touching np.ma imports it (a sixth of a second, on a process's first save); no masked
    # array can exist before it is imported.
    masked = sys.modules.get("numpy.ma")
    return masked is not None and isinstance(value, masked.MaskedArray)


def _where(path: tuple) -> str:
    return "state" + "".join(f"[{key!r}]" for key in path)


def _refusal(value, path: tuple) -> errors.UnsupportedStateError:
    where, kind = _where(path), type(value)
    if isinstance(value, (set, frozenset)):
        fix = "convert it to a sorted list"
    elif isinstance(value, complex):
        fix = "store it as a numpy scalar (np.complex128(z)) or as [z.real, z.imag]"
    elif isinstance(value, (bytearray, memoryview)):
        fix = "convert it to bytes"
    elif type(value).__module__.split(".")[0] in ("tensorflow", "keras", "paddle", "mlx"):
        fix = "state trees hold numpy, torch and jax tensors: convert it with np.asarray(...)"
    elif callable(value):
        fix = ("code is never stored in a checkpoint: leave it out of the state and rebuild it "
               "when you build the object (as torch's LambdaLR does with lr_lambda)")
    else:
        fix = "convert it to a tensor, an array, a number, a string, bytes, None, or a dict/list/tuple of those"
    return errors.UnsupportedStateError(f"{where}: cannot store a {kind} ({_short(value)}); {fix}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_key(key, path: tuple) -> None:
    if isinstance(key, np.generic) or not isinstance(key, _KEY_TYPES):
        raise errors.UnsupportedStateError(
            f"{_where(path)}: cannot store a dict key of {type(key)} ({_short(key)}); keys must be "
            "str, int, float, bool, bytes or None (convert numpy keys with .item())")


def _check_dtype(dtype: np.dtype, shape: tuple, path: tuple) -> str:
    """The safetensors name of a numpy dtype, or a refusal naming the path."""
    found = dtype_for_numpy(np.dtype(dtype))
    if found is None:
        raise errors.UnsupportedStateError(
            f"{_where(path)}: dtype {dtype} has no safetensors equivalent; cast it first "
            f"(e.g. to float32); safetensors dtypes: {', '.join(DTYPES)}")
    if byte_size(found, tuple(shape)) is None:
        raise errors.UnsupportedStateError(
            f"{_where(path)}: {found.name} packs two values per byte, so its element count must be even")
    return found.name


@contextmanager
def _entered(open_ids: set, container, path: tuple) -> Iterator[None]:
    """Walk into a container: refuse cycles and runaway depth."""
    if len(path) >= MAX_DEPTH:
        raise errors.UnsupportedStateError(
            f"{_where(path[:3])}...: nested more than {MAX_DEPTH} levels deep; flatten the state")
    if id(container) in open_ids:
        raise errors.UnsupportedStateError(f"{_where(path)}: contains itself; a state must be a tree")
    open_ids.add(id(container))
    try:
        yield
    finally:
        open_ids.discard(id(container))


def _alias_key(value, framework: str):
    """Equal for two values that are one tensor (one object, or identical views of the same
    bytes, as model.state_dict() gives for tied weights); None for values never shared."""
    if isinstance(value, np.generic):
        return None
    if framework == "numpy" and value.size:
        return ("numpy", value.__array_interface__["data"][0], value.dtype, value.shape, value.strides)
    if framework == "torch" and _torch_has_bytes(value):
        return ("torch", str(value.device), value.data_ptr(), value.dtype, tuple(value.shape), value.stride(),
                value.is_conj(), value.is_neg(), value.requires_grad, type(value),
                getattr(value, _SOURCE_DEVICE, None))
    return ("object", id(value))  # jax arrays are immutable: sharing is identity


def _torch():
    return frameworks.require("torch", "torch", "pip install 'safeckpt[torch]'")


def _torch_has_bytes(tensor) -> bool:
    """A dense tensor with memory of its own (sparse, meta and empty ones are keyed by identity)."""
    torch = _torch()
    return tensor.layout == torch.strided and tensor.device.type != "meta" and tensor.numel() > 0


# --- split ------------------------------------------------------------------------

def split_state(state: Any) -> tuple[dict[str, np.ndarray], dict]:
    """Flatten a state tree into (tensors by name, a JSON-able document).

    Tensors are numpy views of the originals where the framework allows (torch
    on the CPU, numpy); a GPU tensor is copied to the host. A tensor reached by
    two paths is stored once. Save the tensors with `safeckpt.save_file` and
    the document with `json.dump`; `join_state` puts the tree back together.

    >>> tensors, document = split_state({"model": model.state_dict(), "step": 10})
    >>> safeckpt.save_file(tensors, "state.safetensors")
    >>> json.dumps(document, allow_nan=False)
    """
    splitter = _Splitter()
    tree = splitter.node(state, ())
    return splitter.tensors, {"schema": splitter.schema, "tree": tree, "tensors": splitter.records}


class _Splitter:
    def __init__(self) -> None:
        self.tensors: dict[str, Any] = {}
        self.records: dict[str, dict] = {}
        self._names: dict[Any, str] = {}  # alias key -> tensor name
        self._open: set[int] = set()
        self.schema = 1  # raised to 2 by the first value that needs a schema-2 tag

    def node(self, value, path: tuple):
        kind = _kind(value)
        if kind == "scalar":
            return _encode_scalar(value)
        if kind == "tensor":
            return {TENSOR: self._tensor(value, path)}
        if not kind:
            raise _refusal(value, path)
        if kind == "class":
            self.schema = 2
            return {TYPE: _class_name(value)}
        with _entered(self._open, value, path):
            if kind == "object":
                self.schema = 2
                name = kept_kind(value)
                kept = KEPT_TYPES[name]
                body = [name, self.node(kept.parts(value), path)]
                extra = kept.extra(value)
                if extra is not None:
                    body.append(self.node(extra, path + ("~extra",)))
                return {OBJECT: body}
            if kind == "list":
                return [self.node(item, path + (index,)) for index, item in enumerate(value)]
            if kind == "tuple":
                return {TUPLE: [self.node(item, path + (index,)) for index, item in enumerate(value)]}
            for key in value:
                _check_key(key, path)
            if all(isinstance(key, str) and key not in _TAGS for key in value):
                return {str(key): self.node(item, path + (key,)) for key, item in value.items()}
            return {DICT: [[_encode_scalar(key), self.node(item, path + (key,))] for key, item in value.items()]}

    def _tensor(self, value, path: tuple) -> str:
        framework = _framework(value)
        key = _alias_key(value, framework)
        if key is not None and key in self._names:
            return self._names[key]
        array, record = _describe(value, framework, path)
        name = _unique_name(path, self.tensors)
        self.tensors[name] = array
        self.records[name] = record
        if key is not None:
            self._names[key] = name
        return name


def _encode_scalar(value):
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        value = int(value)
        return value if _INT64_MIN <= value <= _INT64_MAX else {INT: _int_text(value)}
    if isinstance(value, float):
        value = float(value)
        if math.isfinite(value):
            return value
        return {FLOAT: "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, str):
        return str(value)
    return {BYTES: base64.b64encode(bytes(value)).decode("ascii")}


def _int_text(value: int) -> str:
    try:
        return str(value)
    except ValueError:  # past Python's 4300-digit limit on decimal conversion; hex has none
        return hex(value)


def _describe(value, framework: str, path: tuple) -> tuple[Any, dict]:
    """The array to store for a tensor and its record in the document."""
    record: dict[str, Any] = {"device": "cpu", "requires_grad": False}
    if framework == "numpy":
        if _is_masked(value):
            raise errors.UnsupportedStateError(
                f"{_where(path)}: a masked array would lose its mask; store .data and .mask separately")
        array = np.asarray(value)
        if isinstance(value, np.generic):
            record["scalar"] = True
        if array.dtype.byteorder == ">":
            record["byteorder"] = ">"
    else:
        try:
            array = frameworks.get(framework).to_numpy(value)
        except errors.SafeckptError as exc:
            raise errors.UnsupportedStateError(f"{_where(path)}: {exc.detail}") from None
        record["device"] = _device_name(value, framework)
        if framework == "torch":
            record["requires_grad"] = bool(value.requires_grad)
            if isinstance(value, _torch().nn.Parameter):
                record["parameter"] = True
    if isinstance(array, RawTensor):  # torch float4_e2m1fn_x2, already packed
        dtype, shape = array.dtype, tuple(array.shape)
    else:
        dtype, shape = _check_dtype(array.dtype, array.shape, path), tuple(array.shape)
    return array, {"framework": framework, "dtype": dtype, "shape": [int(dim) for dim in shape], **record}


def _device_name(value, framework: str) -> str:
    if framework == "torch":
        return getattr(value, _SOURCE_DEVICE, None) or str(value.device)
    devices = list(value.devices())
    if len(devices) != 1:  # sharded: gathered to the host, and put back on the default CPU
        return "cpu"
    return f"{devices[0].platform}:{devices[0].id}"


def _unique_name(path: tuple, taken: Mapping[str, Any]) -> str:
    base = "/".join(_escape(key) for key in path) if path else "~"
    name, count = base, 1
    while name in taken or name == METADATA_KEY:
        count += 1
        name = f"{base}~{count}"
    return name


def _escape(key) -> str:
    text = key if isinstance(key, str) else key.hex() if isinstance(key, bytes) else repr(key)
    return text.replace("~", "~0").replace("/", "~1")


# --- join -------------------------------------------------------------------------

def join_state(tensors: Mapping[str, np.ndarray], document: dict) -> Any:
    """The inverse of `split_state`: the same tree, tensors back in their framework and dtype.

    `tensors` is what `safeckpt.load_file` returns (numpy arrays; any
    framework's tensors work too). Numpy arrays are returned as they are (views
    of the loaded file); torch and jax tensors share that memory on the CPU.
    A tensor stored once for several paths comes back as one object.

    >>> state = join_state(safeckpt.load_file("state.safetensors"), json.load(open("state.json")))
    """
    if not isinstance(document, Mapping):
        raise errors.StateFormatError(f"a state document is a dict, got {type(document).__name__}")
    schema = document.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise errors.StateFormatError(f"the document has no valid 'schema' (found {_short(schema)}); "
                                      "it was not written by split_state")
    if schema > SCHEMA_VERSION:
        raise errors.StateFormatError(
            f"the document has schema {schema}, newer than this safeckpt reads ({SCHEMA_VERSION}); "
            "upgrade safeckpt to read it")
    records = document.get("tensors")
    if "tree" not in document or not isinstance(records, Mapping):
        raise errors.StateFormatError("the document lacks 'tree' or 'tensors'; it was not written by split_state")
    return _Joiner(tensors, records, _TAGS if schema >= 2 else _SCHEMA_1_TAGS).node(document["tree"], ())


def _malformed(path: tuple, detail: str) -> errors.StateFormatError:
    return errors.StateFormatError(f"{_where(path)}: {detail}; the document is damaged or was not "
                                   "written by split_state")


class _Joiner:
    def __init__(self, tensors: Mapping[str, Any], records: Mapping[str, Any], tags: frozenset) -> None:
        self._tensors, self._records = tensors, records
        self._tags = tags  # a schema-1 document may hold "__object__" as an ordinary key
        self._made: dict[str, Any] = {}

    def node(self, node, path: tuple):
        if len(path) > MAX_DEPTH:
            raise _malformed(path[:3], f"nested more than {MAX_DEPTH} levels deep")
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.node(item, path + (index,)) for index, item in enumerate(node)]
        if not isinstance(node, dict):
            raise _malformed(path, f"a {type(node).__name__} is not part of a state document")
        if len(node) != 1 or next(iter(node)) not in self._tags:
            if self._tags & node.keys():
                raise _malformed(path, f"an object mixes a tag with other keys ({sorted(node)[:5]})")
            return {key: self.node(item, path + (key,)) for key, item in node.items()}
        tag, body = next(iter(node.items()))
        if tag in _SCALAR_TAGS:
            return _decode_scalar(node, path)
        if tag == TENSOR:
            return self._tensor(body, path)
        if tag == TYPE:
            if not isinstance(body, str):
                raise _malformed(path, f"{TYPE} holds a {type(body).__name__}, not a class name")
            return _class_from_name(body)
        if tag == OBJECT:
            return self._object(body, path)
        if not isinstance(body, list):
            raise _malformed(path, f"{tag} holds a {type(body).__name__}, not a list")
        if tag == TUPLE:
            return tuple(self.node(item, path + (index,)) for index, item in enumerate(body))
        result = {}
        for pair in body:
            if not isinstance(pair, list) or len(pair) != 2:
                raise _malformed(path, f"a {DICT} entry is not a [key, value] pair: {_short(pair)}")
            key = _decode_scalar(pair[0], path)
            result[key] = self.node(pair[1], path + (key,))
        return result

    def _object(self, body, path: tuple):
        if not isinstance(body, list) or len(body) not in (2, 3) or body[0] not in KEPT_TYPES:
            raise _malformed(path, f"{OBJECT} holds {_short(body)}, not [kind, parts] of a kind this safeckpt "
                                   f"keeps ({', '.join(KEPT_TYPES)})")
        kind = body[0]
        value = self.node(body[1], path)
        extra = self.node(body[2], path + ("~extra",)) if len(body) == 3 else None
        expected = (dict, list) if kind.startswith("omegaconf.") else (list,) if kind == "torch.Size" else (dict,)
        if not isinstance(value, expected) or (kind == "argparse.Namespace" and not all(
                isinstance(key, str) for key in value)):
            raise _malformed(path, f"the parts of a {kind} are {_short(value)}")
        try:
            return KEPT_TYPES[kind].rebuild(value, extra)
        except Exception as exc:  # noqa: BLE001 - a type's own constructor refusing these parts
            raise _malformed(path, f"a {kind} cannot be made from its parts ({type(exc).__name__}: {exc})") from None

    def _tensor(self, name, path: tuple):
        if name in self._made:
            return self._made[name]
        record = self._records.get(name) if isinstance(name, str) else None
        if not isinstance(record, Mapping):
            raise _malformed(path, f"tensor {_short(name)} has no record in the document's 'tensors'")
        if name not in self._tensors:
            raise errors.StateFormatError(
                f"{_where(path)}: tensor {name!r} is missing from the tensors; load the tensors "
                "saved together with this document")
        value = _rebuild(self._tensors[name], record, name, path)
        self._made[name] = value
        return value


def _decode_scalar(node, path: tuple):
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, dict) and len(node) == 1:
        tag, body = next(iter(node.items()))
        if tag == FLOAT and body in _NON_FINITE:
            return _NON_FINITE[body]
        if tag == INT and isinstance(body, str):
            try:
                return int(body, 0)
            except ValueError:
                raise _malformed(path, f"{INT} holds {_short(body)}, not an integer") from None
        if tag == BYTES and isinstance(body, str):
            try:
                return base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                raise _malformed(path, f"{BYTES} holds text that is not base64") from None
    raise _malformed(path, f"{_short(node)} is not a scalar")


def _rebuild(stored, record: Mapping, name: str, path: tuple):
    """A stored tensor as its framework's tensor, checked against its record."""
    framework, dtype, shape = record.get("framework"), DTYPES.get(record.get("dtype")), record.get("shape")
    if framework not in _FRAMEWORKS or dtype is None or not isinstance(shape, list):
        raise _malformed(path, f"tensor {name!r} has an invalid record {_short(dict(record))}")
    if isinstance(stored, RawTensor):  # packed F4 straight from split_state, not via a file
        found = (stored.dtype, list(stored.shape))
        array = to_logical(np.frombuffer(stored.data, np.uint8), dtype, tuple(shape))
    else:
        try:
            array = frameworks.to_numpy(stored)
        except errors.SafeckptError as exc:
            raise errors.StateFormatError(f"{_where(path)}: tensor {name!r}: {exc.detail}") from None
        found_dtype = dtype_for_numpy(array.dtype)
        found = (found_dtype.name if found_dtype else str(array.dtype), list(array.shape))
    if found != (dtype.name, shape):
        raise errors.StateFormatError(
            f"{_where(path)}: tensor {name!r} is {found[0]} {found[1]} but the document says "
            f"{dtype.name} {shape}; the tensors and the document come from different saves")
    if not array.flags.writeable:  # the caller will train on it; torch also warns on read-only memory
        array = array.copy()
    if framework == "numpy":
        if record.get("byteorder") == ">":
            array = array.astype(array.dtype.newbyteorder(">"))
        return array[()] if record.get("scalar") else array
    if framework == "jax":
        adapter = frameworks.get("jax")
        try:
            return adapter.from_numpy(array, record.get("device"))
        except errors.FrameworkError:  # that device is not here
            return adapter.from_numpy(array, "cpu")
    tensor = frameworks.get("torch").from_numpy(array, _torch_device(record.get("device")))
    requires_grad = bool(record.get("requires_grad"))
    if record.get("parameter"):
        torch = _torch()
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_(True) if requires_grad else tensor


def _torch_device(name) -> str:
    """`name` if this machine has that device, else "cpu"."""
    torch = _torch()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        return "cpu"
    if device.type == "cpu":
        return "cpu"
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu...
    try:
        present = backend.is_available() and (device.index or 0) < backend.device_count()
    except (AttributeError, RuntimeError):
        present = False
    return str(device) if present else "cpu"


# --- snapshot ---------------------------------------------------------------------

def snapshot(state: Any) -> Any:
    """A copy of the tree that training cannot change: every mutable tensor is copied.

    numpy arrays are copied; torch tensors are detached and cloned on the CPU,
    and GPU tensors copied to the CPU (the copy remembers its device, so
    `split_state` records it); numpy scalars and jax arrays are immutable and
    kept (a jax buffer donated to a jitted call afterwards is deleted: save
    synchronously in that case). Aliases stay aliases. Containers are rebuilt
    as dict, list and tuple. Anything `split_state` would refuse is refused
    here, in the caller's thread, rather than in a background writer.

    >>> frozen = snapshot(state)       # then train on; `frozen` does not change
    >>> tensors, document = split_state(frozen)

    The copies of CPU tensors share one allocation (one large buffer is backed by
    transparent huge pages: a few hundred page faults per GiB instead of a quarter
    million), filled by torch/numpy copies that run outside the GIL.
    """
    snapshotter = _Snapshotter(_Arena(_cpu_bytes(state)))
    frozen = snapshotter.node(state, ())
    snapshotter.copy_all()
    return frozen


# Alignment of each copy inside the arena (what any dtype and SIMD copy wants).
_ARENA_ALIGN = 64


class _Arena:
    """One buffer that the CPU copies are carved from; it lives as long as any of them."""

    def __init__(self, nbytes: int) -> None:
        self.buffer = np.empty(nbytes, dtype=np.uint8)
        self.used = 0

    def take(self, nbytes: int) -> Optional[np.ndarray]:
        start = self.used
        if start + nbytes > self.buffer.size:
            return None  # not counted ahead (cannot happen): the caller copies on its own
        self.used += -(-nbytes // _ARENA_ALIGN) * _ARENA_ALIGN
        return self.buffer[start:start + nbytes]


def _cpu_bytes(state: Any) -> int:
    """Bytes (aligned) of the numpy arrays and CPU torch tensors in the tree, counted once each."""
    total, stack, seen = 0, [state], set()
    while stack:
        value = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if id(value) not in seen:
                seen.add(id(value))
                stack.extend(value.values() if isinstance(value, dict) else value)
        elif isinstance(value, np.ndarray) or (_framework(value) == "torch" and value.device.type == "cpu"
                                                and value.layout == _torch().strided):
            if id(value) not in seen:
                seen.add(id(value))
                total += -(-value.nbytes // _ARENA_ALIGN) * _ARENA_ALIGN
    return total


class _Snapshotter:
    def __init__(self, arena: _Arena) -> None:
        self._copies: dict[Any, Any] = {}  # alias key -> copy
        self._open: set[int] = set()
        self._arena = arena
        self._jobs: list = []  # (destination, source) copies made by copy_all

    def copy_all(self) -> None:
        """Fill the arena: the largest copies first, on every core (copies release the GIL)."""
        jobs = sorted(self._jobs, key=lambda job: -job[1].nbytes)
        if len(jobs) > 1 and _COPY_THREADS > 1:
            with ThreadPoolExecutor(_COPY_THREADS) as pool:
                for _ in pool.map(_copy_into, jobs):
                    pass
        else:
            for job in jobs:
                _copy_into(job)
        self._jobs.clear()

    def in_arena(self, value, like_torch: bool):
        """An empty copy of `value` inside the arena (its filling is deferred to copy_all)."""
        raw = self._arena.take(value.nbytes)
        if raw is None:
            return None
        if like_torch:
            torch = _torch()
            dest = torch.from_numpy(raw).view(value.dtype).view(tuple(value.shape))
        else:
            dest = raw.view(value.dtype).reshape(value.shape)
        self._jobs.append((dest, value))
        return dest

    def node(self, value, path: tuple):
        kind = _kind(value)
        if kind == "scalar":
            return value
        if kind == "tensor":
            return self._tensor(value, path)
        if not kind:
            raise _refusal(value, path)
        if kind == "class":
            return value
        with _entered(self._open, value, path):
            if kind == "object":
                kept = KEPT_TYPES[kept_kind(value)]
                extra = kept.extra(value)
                return kept.rebuild(self.node(kept.parts(value), path),
                                    None if extra is None else self.node(extra, path + ("~extra",)))
            if kind == "list":
                return [self.node(item, path + (index,)) for index, item in enumerate(value)]
            if kind == "tuple":
                return tuple(self.node(item, path + (index,)) for index, item in enumerate(value))
            for key in value:
                _check_key(key, path)
            return {key: self.node(item, path + (key,)) for key, item in value.items()}

    def _tensor(self, value, path: tuple):
        framework = _framework(value)
        key = _alias_key(value, framework)
        if key is not None and key in self._copies:
            return self._copies[key]
        if framework == "torch":
            copy = _copy_torch(value, path, self)
        else:
            _check_dtype(np.dtype(value.dtype), tuple(value.shape), path)
            if framework == "numpy" and isinstance(value, np.ndarray):
                if _is_masked(value):
                    _describe(value, framework, path)  # raises its refusal
                copy = self.in_arena(value, like_torch=False)
                if copy is None:
                    copy = np.array(value, copy=True)
            else:
                copy = value
        if key is not None:
            self._copies[key] = copy
        return copy


def _copy_into(job) -> None:
    destination, source = job
    if isinstance(destination, np.ndarray):
        np.copyto(destination, source)
    else:
        with _torch().no_grad():  # the copy may already be a Parameter that requires grad
            destination.copy_(source)


def _copy_torch(tensor, path: tuple, snapshotter: _Snapshotter):
    torch = _torch()
    adapter = frameworks.get("torch")
    detached = tensor.detach()
    try:
        if detached.layout != torch.strided or detached.device.type == "meta":
            adapter.to_numpy(detached)  # raises the adapter's explanation
        on_cpu = detached.device.type == "cpu"
        copy = snapshotter.in_arena(detached, like_torch=True) if on_cpu else None
        if copy is None:
            copy = detached.clone() if on_cpu else detached.to("cpu")
        adapter.to_numpy(copy)  # split_state's checks (the dtype), made now and not in a background writer
    except errors.SafeckptError as exc:
        raise errors.UnsupportedStateError(f"{_where(path)}: {exc.detail}") from None
    if isinstance(tensor, torch.nn.Parameter):
        copy = torch.nn.Parameter(copy, requires_grad=tensor.requires_grad)
    elif tensor.requires_grad:
        copy.requires_grad_(True)
    source = getattr(tensor, _SOURCE_DEVICE, None) or (None if on_cpu else str(detached.device))
    if source is not None:
        setattr(copy, _SOURCE_DEVICE, source)
    return copy
