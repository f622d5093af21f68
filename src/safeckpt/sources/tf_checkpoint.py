"""TensorFlow checkpoints (tensor bundles) as a TensorSource, read without TensorFlow.

The format (tensorflow/core/util/tensor_bundle/tensor_bundle.{h,cc,proto})
--------------------------------------------------------------------------
``tf.train.Checkpoint``, ``tf.train.CheckpointManager``, ``tf.compat.v1.train.Saver`` and the
variables of a SavedModel (``variables/variables.*``) write a *bundle* under a prefix ``P``::

    P.index                      a sorted string table (`tf_table`): key -> serialized proto
    P.data-00000-of-0000N        the tensors' bytes, back to back, one file per shard

In the index, the empty key holds a ``BundleHeaderProto`` (1: num_shards int32,
2: endianness enum LITTLE=0 BIG=1, 3: version VersionDef {1: producer, 2: min_consumer,
3: repeated bad_consumers}); every other key a ``BundleEntryProto``:

    1 dtype DataType enum     2 shape TensorShapeProto {2: repeated dim {1: size int64}, 3: unknown_rank}
    3 shard_id int32          4 offset int64          5 size int64
    6 crc32c fixed32: the masked CRC32C of the tensor's ``size`` bytes
    7 repeated slices TensorSliceProto {1: repeated extent {1: start int64, 2: length int64 (absent: all)}}

A numeric tensor's bytes are its elements in C order in the header's byte order. A
string tensor (DT_STRING) is ``varint64 length`` per element, a 4-byte masked CRC32C of
those lengths, then the strings back to back. Both CRCs take each length as a
little-endian uint32 (uint64 past 4 GiB), not as its varint bytes; the entry's then goes
on over the 4 checksum bytes and the strings.

A *partitioned* variable's entry has no bytes of its own: it lists its ``slices``, and
each slice is an entry of its own under the key
``OrderedCode(0) + OrderedCode(name) + OrderedCode(rank) + (signed start, signed length or -1) per dim``
(`slice_key`, tensorflow/core/util/saved_tensor_slice_util.cc), sorted before every
plain name since it starts with a 0 byte.

A ``checkpoint`` state file beside the bundles (written by CheckpointManager) is a text
proto whose ``model_checkpoint_path: "ckpt-3"`` names the latest.

Object-based checkpoints (TF2) also hold the key ``_CHECKPOINTABLE_OBJECT_GRAPH``: a string
tensor with one serialized ``TrackableObjectGraph`` (1: repeated nodes {1: repeated children
{1: node_id, 2: local_name}, 2: repeated attributes {1: name, 2: full_name, 3: checkpoint_key},
3: repeated slot_variables {1: original_variable_node_id, 2: slot_name, 3: slot_variable_node_id}}).
Node 0 is the checkpoint object; a variable's key is the path of local names that first
reached it (``optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE`` for a Keras 3
kernel that the optimizer also tracks), and its ``full_name`` is the variable's own name
(Keras 3: the variable's path, ``tiny/hidden/kernel``; ``tf.Variable(name=...)``).

Names and groups (what this reader chooses)
-------------------------------------------
By default each tensor is named for what a user recognises, and falls in a group:

- ``weights``: variables reachable from the model (any child of the checkpoint object
  that is not an optimizer or ``save_counter``; in a SavedModel the root is the model);
- ``optimizer``: everything only an optimizer reaches (children of the checkpoint object
  named like ``optimizer``, or with slot variables, or with a step counter child named
  ``_iterations`` or ``iter``) and slot variables; their names start with ``optimizer.``;
- ``checkpoint``: the checkpoint's own bookkeeping (``save_counter``, and the object graph
  in the tree); their names start with ``checkpoint.``.

Within a group the name is the variable's ``full_name`` with ``/`` read as ``.``
(``tiny.hidden.kernel``, ``optimizer.adam.tiny_hidden_kernel_momentum``) when every
variable has one and they are all different; otherwise every name is the object path
from the checkpoint object (``model.layer_with_weights-0.kernel``), a slot being its
variable's name and the slot's (``optimizer.model.dense.kernel.m``). An attribute other
than ``VARIABLE_VALUE`` adds its own name. Checkpoints without an object graph (TF1
savers) keep their keys with ``/`` read as ``.``, all in ``weights``. ``raw_names=True``
keeps the index keys exactly (the groups stay). `groups` maps each name to its group, `keys_of` each name
to its index key.

String tensors and tensors of dtypes safetensors lacks (complex128, resource, variant,
quantized) are not tensors: `tree` holds them (strings decoded where UTF-8) or
describes them. Numeric tensors are read-only views of the mapped shard where their
offset is aligned to their element size (a copy otherwise, or when byte-swapped from a
big-endian bundle); each tensor's CRC32C is checked the first time it is read.
"""

from __future__ import annotations

import math
import os
import re
from collections import deque
from typing import Any, NamedTuple, Optional

import numpy as np

from .. import errors
from ..format.dtypes import DTYPES
from ..format.header import MAX_NDIM
from ..format.storage import open_regular_file
from . import tf_table
from .base import MAX_NAME_CHARS, TensorInfo, TensorSource, map_file, unique_name, unmap
from .protobuf_wire import Field, WireContext, decode_message, read_varint

INDEX_SUFFIX = ".index"
STATE_FILE = "checkpoint"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
# Children of the checkpoint object that are its own bookkeeping, not the model's.
CHECKPOINT_VARIABLES = frozenset({"save_counter"})
# An object with a child of one of these names is an optimizer (its step count: Keras 3
# "_iterations", Keras 2 "iter"), whatever the checkpoint calls it; so is one with slot variables.
OPTIMIZER_CHILDREN = frozenset({"_iterations", "iter", "iterations"})
# The bundle format version this reader knows (tensor_bundle.h: kTensorBundleVersion).
BUNDLE_VERSION = 1

# --- limits: each bounds something the file controls -----------------------------------
# Bytes of an index read into memory: an index holds ~100 bytes per tensor, so a million
# tensors take ~100 MB; more is no checkpoint.
MAX_INDEX_BYTES = 1 << 30
# Shards: the file names hold 5 digits.
MAX_SHARDS = 99_999
# Bytes of a ``checkpoint`` state file (a line per kept checkpoint).
MAX_STATE_BYTES = 1 << 20
# Elements of one string tensor parsed (their lengths are varints read one by one); a
# larger string tensor (a vocabulary) is described by shape and size only.
MAX_STRING_ELEMENTS = 1_000_000
# Strings of one tensor, and characters of one string, shown in the tree.
MAX_STRINGS_IN_TREE = 1000
MAX_STRING_CHARS = 10_000
# Largest dimension: 2**62 (a product of such dims is checked against the bytes there).
MAX_DIM = 1 << 62

# TF DataType enum (tensorflow/core/framework/types.proto) -> safetensors dtype (same bytes per element)
TF_DTYPES: dict[int, str] = {
    1: "F32", 2: "F64", 3: "I32", 4: "U8", 5: "I16", 6: "I8", 8: "C64", 9: "I64", 10: "BOOL", 14: "BF16",
    17: "U16", 19: "F16", 22: "U32", 23: "U64", 24: "F8_E5M2", 25: "F8_E4M3", 26: "F8_E4M3FNUZ",
    28: "F8_E5M2FNUZ",
}
TF_DTYPE_NAMES: dict[int, str] = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string", 8: "complex64",
    9: "int64", 10: "bool", 11: "qint8", 12: "quint8", 13: "qint32", 14: "bfloat16", 15: "qint16",
    16: "quint16", 17: "uint16", 18: "complex128", 19: "float16", 20: "resource", 21: "variant", 22: "uint32",
    23: "uint64", 24: "float8_e5m2", 25: "float8_e4m3fn", 26: "float8_e4m3fnuz", 27: "float8_e4m3b11fnuz",
    28: "float8_e5m2fnuz", 29: "int4", 30: "uint4", 31: "int2", 32: "uint2", 33: "float4_e2m1fn",
}
DT_STRING = 7
# Element sizes of dtypes kept in the tree rather than as tensors (to check their sizes).
_OTHER_ITEMSIZE = {11: 1, 12: 1, 13: 4, 15: 2, 16: 2, 18: 16, 27: 1}

# --- the protos, as wire-format schemas --------------------------------------------------
_VERSION = {1: Field("producer", "int32"), 2: Field("min_consumer", "int32"),
            3: Field("bad_consumers", "int32", True)}
HEADER_SCHEMA = {1: Field("num_shards", "int32"), 2: Field("endianness", "enum"),
                 3: Field("version", "message", schema=_VERSION)}
_SHAPE = {2: Field("dim", "message", True, {1: Field("size", "int64"), 2: Field("name", "string")}),
          3: Field("unknown_rank", "bool")}
_SLICE = {1: Field("extent", "message", True, {1: Field("start", "int64"), 2: Field("length", "int64")})}
ENTRY_SCHEMA = {1: Field("dtype", "enum"), 2: Field("shape", "message", schema=_SHAPE),
                3: Field("shard_id", "int32"), 4: Field("offset", "int64"), 5: Field("size", "int64"),
                6: Field("crc32c", "fixed32"), 7: Field("slices", "message", True, _SLICE)}
_OBJECT = {1: Field("children", "message", True, {1: Field("node_id", "int32"), 2: Field("local_name", "string")}),
           2: Field("attributes", "message", True, {1: Field("name", "string"), 2: Field("full_name", "string"),
                                                    3: Field("checkpoint_key", "string")}),
           3: Field("slot_variables", "message", True, {1: Field("original_variable_node_id", "int32"),
                                                        2: Field("slot_name", "string"),
                                                        3: Field("slot_variable_node_id", "int32")})}
OBJECT_GRAPH_SCHEMA = {1: Field("nodes", "message", True, _OBJECT)}


class Entry(NamedTuple):
    """One checked index entry: the key, dtype enum, shape, where its bytes are, and its slices:
    ``(starts, lengths)`` per slice as listed (a length None: the whole dimension), then, once
    `read_index` has found them, ``(starts, lengths, the slice's own Entry)``."""

    key: str
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc: int
    parts: tuple


# --- finding the prefix --------------------------------------------------------------------

_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")


def data_file(prefix: str, shard: int, num_shards: int) -> str:
    """The data file of shard `shard` (0-based) of a bundle of `num_shards`."""
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


def _has_index_magic(index_path: str) -> bool:
    try:
        with open_regular_file(index_path) as f:
            size = f.seek(0, os.SEEK_END)
            if size < tf_table.FOOTER_SIZE:
                return False
            f.seek(size - 8)
            return int.from_bytes(f.read(8), "little") == tf_table.MAGIC
    except (OSError, errors.SafeckptError):
        return False


def resolve_prefix(path: "os.PathLike | str") -> str:
    """The checkpoint prefix that `path` names: a prefix, its ``.index`` or a data file, a
    directory with a ``checkpoint`` state file (its latest), or a SavedModel directory.
    Raises `errors.SourceError` saying what is missing otherwise.

    >>> resolve_prefix("training/")         # holds "checkpoint": model_checkpoint_path: "ckpt-3"
    'training/ckpt-3'
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        variables = os.path.join(path, "variables", "variables")
        if os.path.isfile(os.path.join(path, STATE_FILE)):
            prefix = latest_from_state(path)
        elif os.path.isfile(os.path.join(path, "saved_model.pb")) and os.path.isfile(variables + INDEX_SUFFIX):
            prefix = variables
        else:
            raise errors.SourceError("is a directory with neither a 'checkpoint' state file nor a SavedModel's "
                                     "variables/variables.index", path=path)
    elif path.endswith(INDEX_SUFFIX):
        prefix = path[:-len(INDEX_SUFFIX)]
    elif _DATA_SUFFIX.search(path):
        prefix = _DATA_SUFFIX.sub("", path)
    else:
        prefix = path
    if not _has_index_magic(prefix + INDEX_SUFFIX):
        raise errors.SourceError(f"{prefix + INDEX_SUFFIX} is missing or is not a TensorFlow checkpoint index "
                                 "(no table magic number at its end)", path=path)
    return prefix


def tf_checkpoint_prefix(path: "os.PathLike | str") -> Optional[str]:
    """The TensorFlow checkpoint prefix `path` names, or None if it names none; decided by the
    ``.index`` file's content (its footer magic), never by a name alone.

    >>> tf_checkpoint_prefix("training/ckpt-3.index")
    'training/ckpt-3'
    """
    try:
        return resolve_prefix(path)
    except (OSError, errors.SafeckptError):
        return None


_STATE_LINE = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*("(?:[^"\\]|\\.)*"|[-+0-9.eE]+)\s*')
_ESCAPES = {"n": b"\n", "t": b"\t", "r": b"\r", '"': b'"', "'": b"'", "\\": b"\\"}
_OCTAL_OR_HEX = re.compile(r"[0-7]{1,3}|x[0-9A-Fa-f]{1,2}")


def _unquote(text: str, path: str) -> str:
    """A text-format proto string's value: its C escapes (``\\n``, ``\\"``, octal and hex bytes, as
    protobuf's text printer writes non-ASCII) undone, the bytes read as UTF-8."""
    out, i = bytearray(), 1
    while i < len(text) - 1:
        c = text[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        code = _OCTAL_OR_HEX.match(text, i + 1)
        if text[i + 1] in _ESCAPES:
            out += _ESCAPES[text[i + 1]]
            i += 2
        elif code is not None:
            digits = code.group()
            out.append(int(digits[1:], 16) if digits[0] == "x" else int(digits, 8) & 0xFF)
            i = code.end()
        else:
            raise errors.SourceError(f"an unknown escape \\{text[i + 1]} in {text[:100]}", path=path)
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.SourceError(f"the path {text[:100]} is not UTF-8", path=path) from None


def latest_from_state(directory: str) -> str:
    """The prefix that a directory's ``checkpoint`` state file names as the latest
    (``model_checkpoint_path``), resolved inside the directory only."""
    state = os.path.join(directory, STATE_FILE)
    with open_regular_file(state) as f:
        raw = f.read(MAX_STATE_BYTES + 1)
    if len(raw) > MAX_STATE_BYTES:
        raise errors.SourceError(f"is larger than {MAX_STATE_BYTES} bytes; a checkpoint state file is a few lines",
                                 path=state)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.SourceError("is not UTF-8 text, so not a checkpoint state file", path=state) from None
    latest = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _STATE_LINE.fullmatch(line)
        if match is None:
            raise errors.SourceError(f"line {number} is not 'field: value' ({line[:100]!r})", path=state)
        if match.group(1) == "model_checkpoint_path":
            if not match.group(2).startswith('"'):
                raise errors.SourceError(f"line {number}: model_checkpoint_path is not a string", path=state)
            latest = _unquote(match.group(2), state)
    if not latest:
        raise errors.SourceError("names no model_checkpoint_path", path=state)
    root = os.path.realpath(directory)
    candidate = os.path.realpath(os.path.join(directory, latest))
    if os.path.commonpath([root, candidate]) != root:
        # an absolute path written before the directory was moved: its file name, here
        candidate = os.path.join(root, os.path.basename(latest))
        if not os.path.isfile(candidate + INDEX_SUFFIX):
            raise errors.SourceError(f"model_checkpoint_path {latest[:200]!r} lies outside the directory, and "
                                     f"{os.path.basename(latest)[:200]!r} is not in it", path=state)
    return os.path.join(directory, os.path.relpath(candidate, root))


# --- the index -------------------------------------------------------------------------------

def slice_key(name: bytes, starts: tuple[int, ...], lengths: tuple[int, ...]) -> bytes:
    """The index key of one slice of variable `name` (``checkpoint::EncodeTensorNameSlice``):
    OrderedCode's increasing encodings of 0, the name, the rank, then each dim's start and
    length; a length of -1 stands for the whole dimension (an extent with no length).

    >>> slice_key(b"w", (3, 0), (2, -1))
    b'\\x00w\\x00\\x01\\x01\\x02\\x83\\x82\\x80\\x7f'
    """
    out = bytearray(b"\x00")
    out += name.replace(b"\xff", b"\xff\x00").replace(b"\x00", b"\x00\xff") + b"\x00\x01"
    out += _num_increasing(len(starts))
    for start, length in zip(starts, lengths):
        out += _signed_increasing(start) + _signed_increasing(length)
    return bytes(out)


def _num_increasing(value: int) -> bytes:
    body = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return bytes([len(body)]) + body


# OrderedCode's header bits for a signed number of each encoded length (ordered_code.cc)
_SIGNED_HEADER = [b"", b"\x80", b"\xc0", b"\xe0", b"\xf0", b"\xf8", b"\xfc", b"\xfe", b"\xff",
                  b"\xff\x80", b"\xff\xc0"]


def _signed_increasing(value: int) -> bytes:
    x = ~value if value < 0 else value
    length = x.bit_length() // 7 + 1
    body = bytearray((value & ((1 << (8 * length)) - 1)).to_bytes(length, "big"))
    for i, bits in enumerate(_SIGNED_HEADER[length]):
        body[i] ^= bits
    return bytes(body)


class _Index(NamedTuple):
    header: dict
    entries: dict[str, Entry]   # every listed key (not slice keys), in index order
    orphans: int                # slice entries no variable lists


def read_index(prefix: str) -> _Index:
    """The checked header and entries of a bundle's ``.index``; shard sizes are checked later."""
    path = prefix + INDEX_SUFFIX
    with open_regular_file(path) as f:
        data = f.read(MAX_INDEX_BYTES + 1)
    if len(data) > MAX_INDEX_BYTES:
        raise errors.SourceError(f"is larger than {MAX_INDEX_BYTES} bytes, more than any checkpoint index needs",
                                 path=path)
    table = dict(tf_table.read_table(data, path))
    if b"" not in table:
        raise errors.SourceError("has no bundle header (the entry with the empty key)", path=path)
    header = decode_message(table.pop(b""), HEADER_SCHEMA, WireContext(path, "the bundle header"))
    num_shards = header.get("num_shards", 0)
    if not 1 <= num_shards <= MAX_SHARDS:
        raise errors.SourceError(f"the bundle header declares {num_shards} data shards; 1 to {MAX_SHARDS} are "
                                 "possible", path=path)
    if header.get("endianness", 0) not in (0, 1):
        raise errors.SourceError(f"the bundle header's endianness {header['endianness']} is neither LITTLE (0) "
                                 "nor BIG (1)", path=path)
    version = header.get("version", {})
    if version.get("min_consumer", 0) > BUNDLE_VERSION or BUNDLE_VERSION in version.get("bad_consumers", []):
        raise errors.SourceError(f"the bundle needs a reader of version {version.get('min_consumer')} (this one "
                                 f"reads version {BUNDLE_VERSION}); was it written by a newer TensorFlow?", path=path)
    entries, used = {}, set()
    for raw_key, value in table.items():
        if raw_key.startswith(b"\x00"):
            continue
        key = _key_text(raw_key, path)
        entry = _entry(decode_message(value, ENTRY_SCHEMA, WireContext(path, f"the entry of {key[:200]!r}")),
                       key, num_shards, path)
        if entry.parts:
            parts = []
            for starts, lengths in entry.parts:
                skey = slice_key(raw_key, starts, tuple(-1 if n is None else n for n in lengths))
                lengths = tuple(d if n is None else n for n, d in zip(lengths, entry.shape))
                if skey not in table:
                    raise errors.SourceError(f"the slice at {list(starts)} of {list(lengths)} that the entry lists "
                                             "has no entry of its own", path=path, tensor=key)
                used.add(skey)
                part = _entry(decode_message(table[skey], ENTRY_SCHEMA, WireContext(path, f"a slice of {key!r}")),
                              key, num_shards, path)
                if part.parts or part.dtype != entry.dtype or part.shape != lengths:
                    raise errors.SourceError(f"the slice at {list(starts)} holds {_dtype_name(part.dtype)}"
                                             f"{list(part.shape)}, not {_dtype_name(entry.dtype)}{list(lengths)}",
                                             path=path, tensor=key)
                parts.append((starts, lengths, part))
            entry = entry._replace(parts=tuple(parts))
        entries[key] = entry
    orphans = sum(1 for k in table if k.startswith(b"\x00") and k not in used)
    return _Index(header, entries, orphans)


def _key_text(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.SourceError(f"the key {raw[:100]!r} is not UTF-8 text", path=path) from None


def _dtype_name(dtype: int) -> str:
    return TF_DTYPE_NAMES.get(dtype, f"DataType {dtype}")


def _entry(proto: dict, key: str, num_shards: int, path: str) -> Entry:
    dtype = proto.get("dtype", 0)
    if dtype not in TF_DTYPE_NAMES:
        raise errors.SourceError(f"unknown TensorFlow DataType {dtype}", path=path, tensor=key)
    shape_proto = proto.get("shape", {})
    dims = [d.get("size", 0) for d in shape_proto.get("dim", [])]
    if shape_proto.get("unknown_rank") or len(dims) > MAX_NDIM or any(not 0 <= d <= MAX_DIM for d in dims):
        raise errors.SourceError(f"the shape {dims[:MAX_NDIM + 1]} is not a known shape of at most {MAX_NDIM} "
                                 f"dimensions of 0 to 2**62", path=path, tensor=key)
    shard, offset, size = proto.get("shard_id", 0), proto.get("offset", 0), proto.get("size", 0)
    if not 0 <= shard < num_shards:
        raise errors.SourceError(f"shard {shard} is outside the bundle's {num_shards} shards", path=path, tensor=key)
    if offset < 0 or size < 0:
        raise errors.SourceError(f"a negative offset ({offset}) or size ({size})", path=path, tensor=key)
    numel = math.prod(dims)
    slices = []
    for spec in proto.get("slices", []):
        extents = spec.get("extent", [])
        if len(extents) != len(dims):
            raise errors.SourceError(f"a slice of rank {len(extents)} in a tensor of rank {len(dims)}", path=path,
                                     tensor=key)
        starts = tuple(e.get("start", 0) for e in extents)
        lengths = tuple(e.get("length") for e in extents)  # None: the whole dimension
        if any(s < 0 or (n is not None and (n < 0 or s + n > d)) or (n is None and s != 0)
               for s, n, d in zip(starts, lengths, dims)):
            raise errors.SourceError(f"the slice at {list(starts)} of {list(lengths)} lies outside its shape "
                                     f"{dims}", path=path, tensor=key)
        slices.append((starts, lengths))
    if not slices:
        itemsize = DTYPES[TF_DTYPES[dtype]].bits // 8 if dtype in TF_DTYPES else _OTHER_ITEMSIZE.get(dtype)
        if itemsize is not None and numel * itemsize != size:
            raise errors.SourceError(f"{_dtype_name(dtype)}{dims} needs {numel * itemsize} bytes but the entry "
                                     f"holds {size}", path=path, tensor=key)
        if dtype == DT_STRING and numel > size:
            raise errors.SourceError(f"{numel} strings cannot fit in {size} bytes", path=path, tensor=key)
    return Entry(key, dtype, tuple(dims), shard, offset, size, proto.get("crc32c", 0), tuple(slices))


# --- names from the object graph ----------------------------------------------------------------

_ATTRIBUTES = "/.ATTRIBUTES/"
_SLOT = "/.OPTIMIZER_SLOT/"


def name_from_graph(graph: dict) -> dict[str, tuple[str, str]]:
    """Each attribute's checkpoint key -> (readable name, group), as the module docstring says."""
    nodes = graph.get("nodes", [])
    count = len(nodes)

    def children(n: int) -> list[tuple[int, str]]:
        return [(c.get("node_id", -1), c.get("local_name", "")) for c in nodes[n].get("children", [])
                if 0 <= c.get("node_id", -1) < count]

    if not count:
        return {}
    slots = {s.get("slot_variable_node_id", -1): (s.get("original_variable_node_id", -1), s.get("slot_name", ""))
             for node in nodes for s in node.get("slot_variables", [])}
    kinds: dict[str, list[int]] = {"weights": [], "checkpoint": [], "optimizer": []}
    top = dict(children(0))
    for child, local in top.items():
        if "optimizer" in local.lower() or nodes[child].get("slot_variables") or \
                any(name in OPTIMIZER_CHILDREN for _, name in children(child)):
            kinds["optimizer"].append(child)
        elif local in CHECKPOINT_VARIABLES:
            kinds["checkpoint"].append(child)
        else:
            kinds["weights"].append(child)
    # shortest path from the checkpoint object, through the model first, then the rest
    parent: dict[int, tuple[int, str]] = {}
    group: dict[int, str] = {}
    for kind, starts in kinds.items():
        queue = deque()
        for child in starts:
            if child not in group:
                parent[child], group[child] = (0, top[child]), kind
                queue.append(child)
        while queue:
            node = queue.popleft()
            for child, local in children(node):
                if child not in group and child != 0:
                    parent[child], group[child] = (node, local), kind
                    queue.append(child)

    def path_of(node: int) -> str:
        parts, length = [], 0
        while node in parent and length <= MAX_NAME_CHARS:
            node, local = parent[node]
            parts.append(local)
            length += len(local) + 1
        return ".".join(reversed(parts))

    def path_name(node: int) -> str:
        if node in slots and node not in group:  # reached through its variable only
            original, slot_name = slots[node]
            return f"{path_of(original) if 0 <= original < count else '?'}.{slot_name}"
        return path_of(node)

    attributes = [(n, a) for n in range(count) for a in nodes[n].get("attributes", []) if a.get("checkpoint_key")]
    full_names = [a.get("full_name", "") for _, a in attributes]
    named = [(full_name, a.get("name")) for full_name, (_, a) in zip(full_names, attributes)]
    use_full = all(full_names) and len(set(named)) == len(named)
    out: dict[str, tuple[str, str]] = {}
    for (node, attribute), full_name in zip(attributes, full_names):
        kind = "optimizer" if node in slots and node not in group else group.get(node, "checkpoint")
        base = full_name.replace("/", ".") if use_full else path_name(node)
        if kind != "weights" and not base.startswith(kind + "."):
            base = f"{kind}.{base}"
        if attribute.get("name", "VARIABLE_VALUE") != "VARIABLE_VALUE":
            base = f"{base}.{attribute.get('name')}"
        out[attribute["checkpoint_key"]] = (base, kind)
    return out


# --- the source -------------------------------------------------------------------------------

class TfCheckpointSource(TensorSource):
    """A TensorFlow checkpoint (``tf.train.Checkpoint``, ``CheckpointManager``, a TF1 ``Saver``, a
    SavedModel's variables), read without TensorFlow; names as the module docstring says.

    >>> with TfCheckpointSource("training/ckpt-3") as src:
    ...     src.read("tiny.hidden.kernel").shape, src.groups["optimizer.adam.iteration"]
    ((3, 4), 'optimizer')
    """

    format = "tf-checkpoint"

    def __init__(self, prefix: "os.PathLike | str", *, raw_names: bool = False) -> None:
        super().__init__(os.fspath(prefix))
        self.prefix = resolve_prefix(self.path)
        self.raw_names = raw_names
        index = read_index(self.prefix)
        self.num_shards = index.header["num_shards"]
        self.big_endian = index.header.get("endianness", 0) == 1
        self._maps: dict[int, Any] = {}
        self._closed = False
        self._checked: set[tuple[str, int, int]] = set()  # (key, shard, offset) of CRC-checked bytes
        self._entries: dict[str, Entry] = {}
        self._infos: dict[str, TensorInfo] = {}
        #: name -> the index key it was read from
        self.keys_of: dict[str, str] = {}
        self._repeats: dict[str, int] = {}  # for unique_name
        #: name -> "weights", "optimizer" or "checkpoint"
        self.groups: dict[str, str] = {}
        try:
            self._check_shards(index.entries)
            strings = {key: self._strings(entry) for key, entry in index.entries.items()
                       if entry.dtype == DT_STRING and key != OBJECT_GRAPH_KEY}
            naming = self._naming(index.entries, strings)
            values: dict[str, Any] = {}
            for key, entry in index.entries.items():
                name, group = naming[key]
                name = self._unique(name)
                self.keys_of[name], self.groups[name] = key, group
                if key in strings:
                    values[name] = strings[key]
                elif entry.dtype not in TF_DTYPES:
                    values[name] = {"__array__": _dtype_name(entry.dtype), "shape": list(entry.shape)}
                    self.note(f"{name}: a {_dtype_name(entry.dtype)} tensor, which safetensors has no dtype for; "
                              "the tree describes it")
                elif entry.parts and sum(math.prod(n) for _, n, _ in entry.parts) != math.prod(entry.shape):
                    values[name] = {"__array__": _dtype_name(entry.dtype), "shape": list(entry.shape),
                                    "slices": [[list(s), list(n)] for s, n, _ in entry.parts]}
                    self.note(f"{name}: its saved slices do not cover its shape {list(entry.shape)} exactly; the "
                              "tree describes it")
                else:
                    dtype = TF_DTYPES[entry.dtype]
                    self._entries[name] = entry
                    self._infos[name] = TensorInfo(dtype, entry.shape,
                                                   math.prod(entry.shape) * DTYPES[dtype].bits // 8)
                    values[name] = {"__tensor__": name}
            if index.orphans:
                self.note(f"{index.orphans} slice entries belong to no variable the index lists; skipped")
            version = index.header.get("version", {})
            self.tree = {"format": "tensorflow checkpoint", "prefix": os.path.basename(self.prefix),
                         "num_shards": self.num_shards, "endianness": "big" if self.big_endian else "little",
                         "version": dict(version), "values": values}
        except BaseException:
            self.close()
            raise

    def _unique(self, name: str) -> str:
        if len(name) > MAX_NAME_CHARS:  # a hostile key or full_name: keep the start, made unique below
            name = name[:MAX_NAME_CHARS]
        unique = unique_name(name, self.keys_of, self._repeats)
        if unique != name:
            self.note(f"two entries are both named {name[:200]!r}; the second is {unique[:200]}")
        return unique

    def _naming(self, entries: dict[str, Entry], strings: dict[str, Any]) -> dict[str, tuple[str, str]]:
        """Index key -> (name, group); with `raw_names` the name is the key (the group is kept)."""
        graph = self._object_graph(entries.get(OBJECT_GRAPH_KEY))
        if graph is None:
            names = {key: (key.replace("/", "."), "weights") for key in entries}
        else:
            from_graph = name_from_graph(graph)
            from_graph[OBJECT_GRAPH_KEY] = ("checkpoint.object_graph", "checkpoint")
            strings[OBJECT_GRAPH_KEY] = {"__object_graph__": f"{len(graph.get('nodes', []))} objects"}
            names = {key: from_graph.get(key) or _fallback_name(key) for key in entries}
        if self.raw_names:
            return {key: (key, group) for key, (_, group) in names.items()}
        return names

    def _object_graph(self, entry: Optional[Entry]) -> Optional[dict]:
        if entry is None or entry.dtype != DT_STRING or entry.shape != ():
            return None
        (value,) = self._string_values(entry)
        return decode_message(value, OBJECT_GRAPH_SCHEMA, WireContext(self._index_path, "the object graph"))

    @property
    def _index_path(self) -> str:
        return self.prefix + INDEX_SUFFIX

    def _check_shards(self, entries: dict[str, Entry]) -> None:
        """Every entry's bytes lie inside its shard, and no shard's bytes are claimed twice (which
        TensorFlow never writes, and which would let a small file describe a huge partitioned
        tensor made of one slice's bytes repeated)."""
        sizes: dict[int, int] = {}
        claimed: dict[int, int] = {}
        for entry in entries.values():
            for part in [p for _, _, p in entry.parts] or [entry]:
                shard_name = os.path.basename(data_file(self.prefix, part.shard, self.num_shards))
                if part.shard not in sizes:
                    try:
                        sizes[part.shard] = os.stat(data_file(self.prefix, part.shard, self.num_shards)).st_size
                    except OSError:
                        raise errors.SourceError(f"the data file {shard_name} it is stored in is missing",
                                                 path=self._index_path, tensor=entry.key) from None
                if part.offset + part.size > sizes[part.shard]:
                    raise errors.SourceError(f"its {part.size} bytes at offset {part.offset} run past the end of "
                                             f"{shard_name} ({sizes[part.shard]} bytes; truncated?)",
                                             path=self._index_path, tensor=entry.key)
                claimed[part.shard] = claimed.get(part.shard, 0) + part.size
                if claimed[part.shard] > sizes[part.shard]:
                    raise errors.SourceError(f"the entries claim more bytes of {shard_name} than its "
                                             f"{sizes[part.shard]}: some share bytes", path=self._index_path,
                                             tensor=entry.key)

    def _bytes(self, entry: Entry) -> memoryview:
        """The entry's bytes in its shard (CRC-checked the first time, unless a string tensor's)."""
        if entry.size == 0:
            data = memoryview(b"")
        else:
            if self._closed:
                raise errors.SourceError("the source is closed", path=self.path, tensor=entry.key)
            if entry.shard not in self._maps:
                self._maps[entry.shard] = map_file(data_file(self.prefix, entry.shard, self.num_shards))
            mapping = self._maps[entry.shard]
            if entry.offset + entry.size > len(mapping):
                raise errors.SourceError("its bytes run past the end of its data file (was it truncated since "
                                         "opening?)", path=self.path, tensor=entry.key)
            data = memoryview(mapping)[entry.offset:entry.offset + entry.size]
        if entry.dtype != DT_STRING and (entry.key, entry.shard, entry.offset) not in self._checked:
            self._check_crc(entry, tf_table.masked_crc32c(data))
        return data

    def _check_crc(self, entry: Entry, actual: int) -> None:
        if actual != entry.crc:
            raise errors.SourceError("CRC32C mismatch, the data file is damaged",
                                     path=data_file(self.prefix, entry.shard, self.num_shards), tensor=entry.key)
        self._checked.add((entry.key, entry.shard, entry.offset))

    def _string_values(self, entry: Entry) -> list[memoryview]:
        """A string tensor's values, checked against both its CRCs: the one over the lengths (as
        little-endian uint32s, uint64 past 4 GiB, for compatibility) and the entry's over those
        lengths, that checksum and the strings."""
        data = self._bytes(entry)
        ctx = WireContext(data_file(self.prefix, entry.shard, self.num_shards), f"string tensor {entry.key!r}")
        lengths, pos, crc = [], 0, 0
        for _ in range(math.prod(entry.shape)):
            length, pos = read_varint(data, pos, len(data), ctx)
            lengths.append(length)
            crc = tf_table.crc32c(length.to_bytes(4 if length < 1 << 32 else 8, "little"), crc)
        if pos + 4 + sum(lengths) != len(data):
            raise errors.SourceError(f"its string lengths add up to {sum(lengths)} bytes but its entry holds "
                                     f"{len(data) - pos - 4}", path=ctx.path, tensor=entry.key)
        if tf_table.mask(crc) != int.from_bytes(data[pos:pos + 4], "little"):
            raise errors.SourceError("CRC32C mismatch in the string lengths, the data file is damaged",
                                     path=ctx.path, tensor=entry.key)
        self._check_crc(entry, tf_table.mask(tf_table.crc32c(data[pos:], crc)))
        pos += 4
        out = []
        for length in lengths:
            out.append(data[pos:pos + length])
            pos += length
        return out

    def _strings(self, entry: Entry) -> Any:
        """A string tensor for the tree: its values (text where UTF-8) in its shape, or a description."""
        numel = math.prod(entry.shape)
        if entry.parts or numel > MAX_STRING_ELEMENTS:
            return {"__array__": "string", "shape": list(entry.shape), "bytes": entry.size}
        values = [_text(v) for v in self._string_values(entry)[:MAX_STRINGS_IN_TREE]]
        if numel > MAX_STRINGS_IN_TREE:
            return {"__array__": "string", "shape": list(entry.shape), "first": values}
        if not entry.shape:
            return values[0]
        return np.array(values, dtype=object).reshape(entry.shape).tolist()

    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> np.ndarray:
        info = self[name]
        entry = self._entries[name]
        dtype = np.dtype(DTYPES[info.dtype].numpy)
        if not entry.parts:
            return self._array(entry, dtype)
        out = np.zeros(entry.shape, dtype)
        seen = np.zeros(entry.shape, bool)
        for starts, lengths, part in entry.parts:
            region = tuple(slice(s, s + n) for s, n in zip(starts, lengths))
            if seen[region].any():
                raise errors.SourceError(f"its slice at {list(starts)} overlaps another", path=self.path, tensor=name)
            out[region] = self._array(part, dtype)
            seen[region] = True
        out.flags.writeable = False
        return out

    def _array(self, entry: Entry, dtype: np.dtype) -> np.ndarray:
        data = self._bytes(entry)
        if self.big_endian:
            return np.frombuffer(data, dtype.newbyteorder(">")).astype(dtype).reshape(entry.shape)
        if entry.offset % dtype.itemsize:
            array = np.frombuffer(bytes(data), dtype).reshape(entry.shape)
        else:
            array = np.frombuffer(data, dtype).reshape(entry.shape)
        array.flags.writeable = False
        return array

    def files(self) -> list[str]:
        return [self._index_path] + [data_file(self.prefix, k, self.num_shards) for k in range(self.num_shards)]

    def describe(self) -> str:
        kinds: dict[str, int] = {}
        for name in self._infos:
            kinds[self.groups[name]] = kinds.get(self.groups[name], 0) + 1
        parts = ", ".join(f"{n} {k}" for k, n in kinds.items())
        saved_model = os.path.join("variables", "variables")
        what = "TensorFlow SavedModel's variables" if self.prefix.endswith(os.sep + saved_model) else \
            f"TensorFlow checkpoint {os.path.basename(self.prefix)!r}"
        return (f"{what}, {len(self)} tensors ({parts}) in {self.num_shards} data "
                f"file{'s' if self.num_shards > 1 else ''}")

    def release(self, name: str) -> None:
        """Drop the mapped pages of the shard `name` is read from (they are mapped again when needed)."""
        entry = self._entries.get(name)
        if entry is not None:
            for part in [p for _, _, p in entry.parts] or [entry]:
                unmap(self._maps.pop(part.shard, None))

    def close(self) -> None:
        self._closed = True
        for mapping in self._maps.values():
            unmap(mapping)
        self._maps.clear()


def _fallback_name(key: str) -> tuple[str, str]:
    """A readable name for a key the object graph does not describe."""
    if _SLOT in key:
        return "optimizer." + key.replace(_ATTRIBUTES + "VARIABLE_VALUE", "").replace(_SLOT, ".").replace("/", "."), \
            "optimizer"
    return key.replace(_ATTRIBUTES + "VARIABLE_VALUE", "").replace("/", "."), "weights"


def _text(value: memoryview) -> Any:
    try:
        text = str(value, "utf-8")
    except UnicodeDecodeError:
        return {"__bytes__": len(value), "head": bytes(value[:32]).hex()}
    return text if len(text) <= MAX_STRING_CHARS else text[:MAX_STRING_CHARS] + f"... ({len(text)} characters)"
