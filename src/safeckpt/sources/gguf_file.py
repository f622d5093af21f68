"""GGUF, llama.cpp's model file, as a TensorSource: read as data, zero-copy where it can be.

The format (ggml's ``docs/gguf.md``, versions 2 and 3; numbers little-endian,
but see "Byte order" below)::

    header        magic         4 bytes   b"GGUF"
                  version       u32       2 or 3
                  tensor_count  u64
                  kv_count      u64
    metadata      kv_count times:
                  key           string    UTF-8, unique, at most 65535 bytes ("general.architecture")
                  value_type    u32       one of the 13 `VALUE_TYPES`
                  value                   a fixed-size number, a string or an array
    tensor infos  tensor_count times:
                  name          string    UTF-8, unique
                  n_dims        u32       at most GGML_MAX_DIMS (4)
                  dims          u64 × n_dims, ggml order: dims[0] varies fastest (numpy's last axis)
                  type          u32       a ggml type (`GGML_TYPES`)
                  offset        u64       from the start of the data section; a multiple of the alignment
    padding       to a multiple of the alignment: ``general.alignment`` (u32, a power of two), else 32
    data          the tensors' bytes, each at its offset

    string        u64 byte count, then that many bytes of UTF-8, no terminator
    array         u32 item type, u64 item count, the items (arrays of arrays are allowed)
    bool          one byte, 0 or 1

Version 1 (until October 2023) had 32-bit counts and lengths; it is refused
with a message. llama.cpp's own reader additionally wants tensors packed in the
order of their infos, each padded to the alignment; a file laid out otherwise
is read if its tensors stay inside the file and apart, with a note.

Byte order. A file written for a big-endian machine (``GGUFWriter(...,
endianess=BIG)``, s390x) keeps the magic as bytes but stores every number
big-endian; its version field reads as ``0x03000000`` little-endian, which is
how it is told apart. Such files are read: their plain tensors come back
byte-swapped into little-endian copies (not zero-copy), their quantized tensors
as the raw blocks stored (whose scales are big-endian too, so they are not
dequantized: convert the file with gguf's ``gguf-convert-endian FILE little``).

Tensors. ggml types are either plain (F32, F16, BF16, F64, I8, I16, I32, I64:
read as the safetensors dtype of the same name, views of the mapped file) or
quantized: blocks of `block_size` values stored in `type_size` bytes each
(Q4_0: 32 values in 18 bytes, 4.5 bits a weight), along the fastest axis, whose
length must be a multiple of the block size. A quantized tensor is given as its
raw blocks by default, a U8 tensor of shape ``logical_shape[:-1] + (bytes per
row,)`` (gguf's own ``GGUFReader`` gives the same array; `quantization(name)`
tells what it holds); with ``dequantize=True`` it is a F32 tensor of the
logical shape, decoded by the ``gguf`` package's numpy code (``gguf.quants``;
types the installed ``gguf`` cannot decode stay raw, with a note). Types
llama.cpp wrote for a while and dropped (Q4_0_4_4, Q4_0_4_8, Q4_0_8_8) are read
raw with a note; numbers it dropped before that (Q4_2, Q4_3) or never stored
are refused, as are unknown ones: their sizes are unknown. Tensors whose bytes
overlap, or lie past the end of the file, are refused.

What the source holds besides tensors (`tree`, JSON-able)::

    {"gguf": {"version", "byteorder", "alignment", "tensor_count", "kv_count"},
     "metadata": {key: value, ...},        # every KV; arrays as lists (tokenizer vocabularies too)
     "quantized": {name: {"ggml_type", "shape", "bits_per_weight"}, ...}}   # when any

Floats that JSON cannot hold are ``{"__float__": "nan"}``; strings that are
not UTF-8 are ``{"__bytes__": n, "hex": "..."}``. `metadata` (str -> str, carried
into a converted file's header) holds the KVs that are single values.

Every count, length and offset is checked against the file's size before
anything is allocated for it, and what a file can make us build in memory is
bounded by `Limits`; errors are `SourceError`s naming the file, the tensor or
KV, the byte offset and what is wrong.

    >>> with GgufSource("llama-7b.Q4_K_M.gguf") as src:
    ...     src.describe(), src.quantization("blk.0.attn_q.weight")
    ('GGUF v3 file (llama), 291 tensors, Q4_K_M', {'ggml_type': 'Q4_K', 'shape': [4096, 4096], 'bits_per_weight': 4.5})
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from .. import errors
from ..format.dtypes import DTYPES
from ..format.header import MAX_ARRAY_BYTES, MAX_DIM
from .base import FileSpan, TensorInfo, TensorSource, map_file, unmap

MAGIC = b"GGUF"
VERSIONS = (2, 3)
# magic, version, tensor_count, kv_count
HEADER_BYTES = 24
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
# ggml tensors have at most this many dimensions; the format stores no more.
GGML_MAX_DIMS = 4
# The spec's bound on a key; tensor names are held to the same (llama.cpp's own are under 64 bytes).
MAX_KEY_BYTES = 65535
# The smallest a KV (empty key, type, one-byte value) and a tensor info (empty name, no
# dims, type, offset) can be: a count the rest of the file cannot hold fails at once.
MIN_KV_BYTES = 8 + 4 + 1
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8

# Tensors in one file: 20 times the most a real model has (Snowflake Arctic's per-expert
# tensors, about 13,000); each costs about a kilobyte of Python objects.
MAX_TENSORS = 262_144
# Values in the metadata, array items included: 4 times the largest real tokenizer
# (about a million: tokens, scores, types and merges); a few hundred MB of Python objects.
MAX_METADATA_VALUES = 4_000_000
# Bytes of text in keys, string values and tensor names: real files have under 10 MB
# (merges and vocabularies); a file could otherwise make us decode gigabytes.
MAX_METADATA_STRING_BYTES = 64 << 20
# Arrays inside arrays: real files nest none; a bound keeps the reader's recursion shallow.
MAX_ARRAY_NESTING = 16


@dataclass(frozen=True)
class Limits:
    """The bounds one file is read under (see the ``MAX_*`` constants for the reasons).

    >>> GgufSource("huge-vocab.gguf", limits=Limits(max_metadata_values=10_000_000))
    """

    max_tensors: int = MAX_TENSORS
    max_metadata_values: int = MAX_METADATA_VALUES
    max_string_bytes: int = MAX_METADATA_STRING_BYTES
    max_array_nesting: int = MAX_ARRAY_NESTING


# --- the tables ---------------------------------------------------------------------

class ValueType(NamedTuple):
    """A metadata value type: its name and, for fixed-size ones, its struct code."""

    name: str
    code: Optional[str]  # struct (and numpy) code without byte order; None: string or array


STRING, ARRAY, BOOL = 8, 9, 7
VALUE_TYPES: dict[int, ValueType] = {
    0: ValueType("uint8", "B"), 1: ValueType("int8", "b"),
    2: ValueType("uint16", "H"), 3: ValueType("int16", "h"),
    4: ValueType("uint32", "I"), 5: ValueType("int32", "i"),
    6: ValueType("float32", "f"), BOOL: ValueType("bool", "B"),  # checked to be 0 or 1
    STRING: ValueType("string", None), ARRAY: ValueType("array", None),
    10: ValueType("uint64", "Q"), 11: ValueType("int64", "q"), 12: ValueType("float64", "d"),
}
# The fewest bytes one item of each type takes (a string's length, an array's type and count).
_MIN_VALUE_BYTES = {t: struct.calcsize(v.code) if v.code else (8 if t == STRING else 12)
                    for t, v in VALUE_TYPES.items()}


class GgmlType(NamedTuple):
    """A ggml tensor type: `block_size` values stored in `type_size` bytes; plain types name
    their safetensors dtype."""

    name: str
    block_size: int
    type_size: int
    dtype: Optional[str] = None  # the safetensors dtype of a plain type; None: quantized

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size


# ggml.h's ggml_type, with ggml-common.h's block sizes (checked against gguf.constants in the tests).
GGML_TYPES: dict[int, GgmlType] = {
    0: GgmlType("F32", 1, 4, "F32"), 1: GgmlType("F16", 1, 2, "F16"),
    2: GgmlType("Q4_0", 32, 18), 3: GgmlType("Q4_1", 32, 20),
    6: GgmlType("Q5_0", 32, 22), 7: GgmlType("Q5_1", 32, 24),
    8: GgmlType("Q8_0", 32, 34), 9: GgmlType("Q8_1", 32, 40),
    10: GgmlType("Q2_K", 256, 84), 11: GgmlType("Q3_K", 256, 110), 12: GgmlType("Q4_K", 256, 144),
    13: GgmlType("Q5_K", 256, 176), 14: GgmlType("Q6_K", 256, 210), 15: GgmlType("Q8_K", 256, 292),
    16: GgmlType("IQ2_XXS", 256, 66), 17: GgmlType("IQ2_XS", 256, 74), 18: GgmlType("IQ3_XXS", 256, 98),
    19: GgmlType("IQ1_S", 256, 50), 20: GgmlType("IQ4_NL", 32, 18), 21: GgmlType("IQ3_S", 256, 110),
    22: GgmlType("IQ2_S", 256, 82), 23: GgmlType("IQ4_XS", 256, 136),
    24: GgmlType("I8", 1, 1, "I8"), 25: GgmlType("I16", 1, 2, "I16"),
    26: GgmlType("I32", 1, 4, "I32"), 27: GgmlType("I64", 1, 8, "I64"),
    28: GgmlType("F64", 1, 8, "F64"), 29: GgmlType("IQ1_M", 256, 56), 30: GgmlType("BF16", 1, 2, "BF16"),
    31: GgmlType("Q4_0_4_4", 32, 18), 32: GgmlType("Q4_0_4_8", 32, 18), 33: GgmlType("Q4_0_8_8", 32, 18),
    34: GgmlType("TQ1_0", 256, 54), 35: GgmlType("TQ2_0", 256, 66),
    39: GgmlType("MXFP4", 32, 17), 40: GgmlType("NVFP4", 64, 36), 41: GgmlType("Q1_0", 128, 18),
}
# Types llama.cpp wrote into files for a while, then dropped (late 2024: it now repacks Q4_0
# for ARM at load time): their blocks are still read, raw, with this note.
RETIRED_GGML_TYPES: dict[int, str] = {
    31: "interleaved Q4_0 for ARM", 32: "interleaved Q4_0 for ARM", 33: "interleaved Q4_0 for ARM",
}
# Type numbers ggml once had and dropped before any file we can read used them: refused with the reason.
REMOVED_GGML_TYPES: dict[int, str] = {
    4: "Q4_2, dropped by llama.cpp in 2023",
    5: "Q4_3, dropped by llama.cpp in 2023",
    36: "IQ4_NL_4_4, a layout llama.cpp makes at load time and never stores",
    37: "IQ4_NL_4_8, a layout llama.cpp makes at load time and never stores",
    38: "IQ4_NL_8_8, a layout llama.cpp makes at load time and never stores",
}
# llama.h's llama_ftype: what `general.file_type` says the file mostly holds.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
    18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M",
    32: "BF16", 33: "Q4_0_4_4", 34: "Q4_0_4_8", 35: "Q4_0_8_8", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
    39: "NVFP4", 40: "Q1_0",
}
# llama.cpp marks a file type it inferred from the tensors, rather than was told, with this bit.
FILE_TYPE_GUESSED = 1024


def is_gguf(head: bytes) -> bool:
    """True if `head` (a file's first bytes) starts a GGUF file of a version this module
    answers for: 2 or 3, little- or big-endian, and 1 (which `GgufSource` refuses with a message).

    >>> is_gguf(b"GGUF\\x03\\x00\\x00\\x00" + bytes(16))
    True
    """
    if len(head) < 8 or head[:4] != MAGIC:
        return False
    little, big = struct.unpack_from("<I", head, 4)[0], struct.unpack_from(">I", head, 4)[0]
    return little in (1, *VERSIONS) or big in (1, *VERSIONS)


# --- reading the header --------------------------------------------------------------

class TensorEntry(NamedTuple):
    """One tensor info, checked: numpy-order shape, ggml type, absolute file offset, bytes."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    ggml: GgmlType
    start: int
    nbytes: int


class _Cursor:
    """Reads the header's fields in order, each checked against the end of the file, and
    counts what the metadata makes us build against the `Limits`."""

    def __init__(self, data: Any, path: str, byteorder: str, limits: Limits) -> None:
        self.data, self.path, self.limits = data, path, limits
        self.size = len(data)
        self.pos = HEADER_BYTES
        self.order = "<" if byteorder == "little" else ">"
        self.values = 0
        self.string_bytes = 0
        self.bad_strings = 0
        self._structs: dict[str, struct.Struct] = {}

    def fail(self, detail: str, tensor: Optional[str] = None) -> errors.SourceError:
        return errors.SourceError(detail, path=self.path, tensor=tensor)

    def take(self, n: int, what: str) -> int:
        """Step over `n` bytes; where they start."""
        if n > self.size - self.pos:
            raise self.fail(f"{what}: needs {n} bytes at offset {self.pos} but the file ends at "
                            f"{self.size} (it is truncated or the lengths before it are wrong)")
        start = self.pos
        self.pos += n
        return start

    def number(self, code: str, what: str) -> Any:
        fmt = self._structs.get(code)
        if fmt is None:
            fmt = self._structs[code] = struct.Struct(self.order + code)
        return fmt.unpack_from(self.data, self.take(fmt.size, what))[0]

    def count(self, n: int, what: str) -> None:
        self.values += n
        if self.values > self.limits.max_metadata_values:
            raise self.fail(f"{what}: the metadata holds more than {self.limits.max_metadata_values} "
                            "values; pass limits=Limits(max_metadata_values=...) to read it")

    def raw_string(self, what: str, max_bytes: Optional[int] = None) -> bytes:
        n = self.number("Q", f"{what}: length")
        if max_bytes is not None and n > max_bytes:
            raise self.fail(f"{what}: {n} bytes long, more than the {max_bytes} a key or name may have")
        start = self.take(n, f"{what}: {n} bytes of text")
        self.string_bytes += n
        if self.string_bytes > self.limits.max_string_bytes:
            raise self.fail(f"{what}: the header holds more than {self.limits.max_string_bytes} bytes "
                            "of text; pass limits=Limits(max_string_bytes=...) to read it")
        return self.data[start:start + n]

    def name(self, what: str) -> str:
        """A key or tensor name: UTF-8, or the file is refused."""
        raw = self.raw_string(what, MAX_KEY_BYTES)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start} of "
                            f"{raw[:40]!r})") from None

    def string(self, what: str) -> Any:
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.bad_strings += 1
            self.string_bytes += len(raw)  # its hex takes twice the room
            return {"__bytes__": len(raw), "hex": raw.hex()}

    def value(self, type_id: int, what: str, depth: int = 0) -> Any:
        """One metadata value of type `type_id`, JSON-able."""
        vtype = VALUE_TYPES.get(type_id)
        if vtype is None:
            raise self.fail(f"{what}: value type {type_id} is not one of GGUF's 0..{len(VALUE_TYPES) - 1}")
        if type_id == ARRAY:
            return self.array(what, depth + 1)
        self.count(1, what)
        if type_id == STRING:
            return self.string(what)
        return _json_values(self._fixed(type_id, 1, what), type_id, what, self)[0]

    def array(self, what: str, depth: int) -> list:
        if depth > self.limits.max_array_nesting:
            raise self.fail(f"{what}: arrays nested more than {self.limits.max_array_nesting} deep; pass "
                            "limits=Limits(max_array_nesting=...) to read it")
        item_type = self.number("I", f"{what}: array item type")
        if item_type not in VALUE_TYPES:
            raise self.fail(f"{what}: array item type {item_type} is not one of GGUF's "
                            f"0..{len(VALUE_TYPES) - 1}")
        n = self.number("Q", f"{what}: array length")
        least = n * _MIN_VALUE_BYTES[item_type]
        if least > self.size - self.pos:
            raise self.fail(f"{what}: an array of {n} {VALUE_TYPES[item_type].name} values needs at least "
                            f"{least} bytes at offset {self.pos} but the file ends at {self.size}")
        self.count(n, what)
        if VALUE_TYPES[item_type].code is not None:
            return _json_values(self._fixed(item_type, n, what), item_type, what, self)
        if item_type == STRING:
            return [self.string(what) for _ in range(n)]
        return [self.array(what, depth + 1) for _ in range(n)]  # each item: its own type and count

    def _fixed(self, type_id: int, n: int, what: str) -> np.ndarray:
        dtype = np.dtype(self.order + VALUE_TYPES[type_id].code)
        start = self.take(n * dtype.itemsize, f"{what}: {n} {VALUE_TYPES[type_id].name} values")
        return np.frombuffer(self.data, dtype, n, start)


def _json_values(values: np.ndarray, type_id: int, what: str, cursor: _Cursor) -> list:
    """numpy values of a metadata type as JSON-able Python values."""
    if type_id == BOOL:
        if values.size and values.max() > 1:
            raise cursor.fail(f"{what}: a bool is {int(values.max())}, not 0 or 1")
        return values.astype(bool).tolist()
    out = values.tolist()
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        out = [x if math.isfinite(x) else {"__float__": repr(x)} for x in out]
    return out


class Header(NamedTuple):
    """The fixed start of a GGUF file."""

    version: int
    byteorder: str  # "little" or "big"
    tensor_count: int
    kv_count: int


def read_header(data: Any, path: str, limits: Limits) -> Header:
    """Magic, version (and from it the byte order) and the two counts, checked against what
    the rest of the file can hold, so that a file claiming 2**60 KVs fails here."""
    if bytes(data[:4]) != MAGIC:
        raise errors.SourceError(f"not a GGUF file: it starts with {bytes(data[:8])!r}, not {MAGIC!r}",
                                 path=path)
    if len(data) < HEADER_BYTES:
        raise errors.SourceError(f"the file is {len(data)} bytes, shorter than GGUF's {HEADER_BYTES}-byte "
                                 "header (magic, version, tensor count, KV count)", path=path)
    little, big = struct.unpack_from("<I", data, 4)[0], struct.unpack_from(">I", data, 4)[0]
    version, byteorder = (little, "little") if little < 1 << 16 else (big, "big")
    if version == 1:
        raise errors.SourceError(
            "GGUF version 1 (files written before October 2023, with 32-bit counts and lengths) is not "
            "read: convert the model again with a current llama.cpp, or download a newer file", path=path)
    if version not in VERSIONS:
        raise errors.SourceError(f"GGUF version {little} (bytes {bytes(data[4:8]).hex()}) is not one this "
                                 f"reader knows ({', '.join(map(str, VERSIONS))})", path=path)
    order = "<" if byteorder == "little" else ">"
    tensor_count, kv_count = struct.unpack_from(order + "QQ", data, 8)
    if tensor_count > limits.max_tensors:
        raise errors.SourceError(f"the header lists {tensor_count} tensors, more than {limits.max_tensors}; "
                                 "pass limits=Limits(max_tensors=...) to read it", path=path)
    if kv_count > limits.max_metadata_values:
        raise errors.SourceError(f"the header lists {kv_count} metadata KVs, more than "
                                 f"{limits.max_metadata_values}; pass limits=Limits(max_metadata_values=...) "
                                 "to read it", path=path)
    least = kv_count * MIN_KV_BYTES + tensor_count * MIN_TENSOR_INFO_BYTES
    if least > len(data) - HEADER_BYTES:
        raise errors.SourceError(
            f"the header lists {kv_count} KVs and {tensor_count} tensors, which take at least {least} bytes, "
            f"but only {len(data) - HEADER_BYTES} follow the header (the file is truncated or the counts "
            "are wrong)", path=path)
    return Header(version, byteorder, tensor_count, kv_count)


def read_metadata(cursor: _Cursor, kv_count: int) -> dict[str, Any]:
    """The KVs, in file order; a key given twice is refused (llama.cpp refuses it too)."""
    cursor.count(kv_count, "the metadata")
    out: dict[str, Any] = {}
    for i in range(kv_count):
        key = cursor.name(f"KV {i}: the key")
        if key in out:
            raise cursor.fail(f"KV {i}: the key {key!r:.100} is given twice")
        what = f"KV {i} ({key!r:.100})"
        out[key] = cursor.value(cursor.number("I", f"{what}: value type"), what)
    return out


def alignment_of(metadata: dict[str, Any], path: str) -> int:
    """`general.alignment`, or the default; a positive power of two."""
    value = metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
    if type(value) is not int or value <= 0 or value & (value - 1):
        raise errors.SourceError(f"{ALIGNMENT_KEY} is {value!r:.60}; it must be a power of two", path=path)
    return value


def read_tensor_info(cursor: _Cursor, index: int) -> tuple[str, list[int], int, int]:
    """One tensor info as stored: name, dims (ggml order), ggml type number, offset."""
    name = cursor.name(f"tensor info {index}: the name")
    what = f"tensor info {index} ({name!r:.100})"
    n_dims = cursor.number("I", f"{what}: n_dims")
    if n_dims > GGML_MAX_DIMS:
        raise cursor.fail(f"{n_dims} dimensions; ggml tensors have at most {GGML_MAX_DIMS}", tensor=name)
    dims = [cursor.number("Q", f"{what}: dimension {d}") for d in range(n_dims)]
    return name, dims, cursor.number("I", f"{what}: type"), cursor.number("Q", f"{what}: offset")


def check_tensor(name: str, dims: list[int], type_id: int, offset: int, data_start: int, alignment: int,
                 file_size: int, path: str) -> TensorEntry:
    """A tensor info checked: known type, dims that make an array, whole blocks per row, an
    aligned offset, bytes inside the file."""
    def fail(detail: str) -> errors.SourceError:
        return errors.SourceError(detail, path=path, tensor=name)

    ggml = GGML_TYPES.get(type_id)
    if ggml is None:
        removed = REMOVED_GGML_TYPES.get(type_id)
        if removed is not None:
            raise fail(f"ggml type {type_id} is {removed}: quantize the model again with a current llama.cpp")
        raise fail(f"ggml type {type_id} is not one safeckpt knows (the newest it knows is "
                   f"{max(GGML_TYPES)}, {GGML_TYPES[max(GGML_TYPES)].name}): the file may come from a newer "
                   "llama.cpp, or be corrupt")
    if any(d > MAX_DIM for d in dims):
        raise fail(f"dims {dims} (ggml order): ggml dimensions are signed 64-bit, at most 2**63 - 1")
    count = math.prod(dims)
    if count > MAX_ARRAY_BYTES:
        raise fail(f"dims {dims} (ggml order) multiply to {count} elements, more than a 64-bit size holds")
    row = dims[0] if dims else 1
    if row % ggml.block_size:
        raise fail(f"rows of {row} values are not whole {ggml.name} blocks of {ggml.block_size} values")
    nbytes = count // ggml.block_size * ggml.type_size
    if offset % alignment:
        raise fail(f"offset {offset} is not a multiple of the alignment ({alignment})")
    start = data_start + offset
    if start + nbytes > file_size:
        raise fail(f"{ggml.name} dims {dims} take {nbytes} bytes from offset {start} (data section offset "
                   f"{offset}), past the end of the file at {file_size}")
    return TensorEntry(name, tuple(reversed(dims)), type_id, ggml, start, nbytes)


def check_apart(entries: list[TensorEntry], path: str) -> None:
    """Refuse tensors whose bytes overlap (empty tensors may share an offset)."""
    spans = sorted((e for e in entries if e.nbytes), key=lambda e: e.start)
    for first, second in itertools.pairwise(spans):  # sorted by start: an overlap shows between neighbours
        if second.start < first.start + first.nbytes:
            raise errors.SourceError(
                f"its bytes {second.start}..{second.start + second.nbytes} overlap those of tensor "
                f"{first.name!r:.100} ({first.start}..{first.start + first.nbytes})", path=path,
                tensor=second.name)


def llama_cpp_layout_note(entries: list[TensorEntry], data_start: int, alignment: int) -> Optional[str]:
    """A note when tensors are not packed as llama.cpp expects: in the order of their infos,
    each padded to the alignment (llama.cpp refuses other layouts)."""
    expected = data_start
    for e in entries:
        if e.start != expected:
            return (f"tensor {e.name!r:.100} starts at {e.start}, where llama.cpp expects {expected} (it "
                    "wants tensors packed in the order of their infos): llama.cpp would refuse this file")
        expected += -(-e.nbytes // alignment) * alignment
    return None


# --- the source ----------------------------------------------------------------------

def _gguf_quants(path: str) -> tuple[Any, Any]:
    """gguf's quants module and its GGMLQuantizationType, imported when first needed."""
    try:
        from gguf import quants
        from gguf.constants import GGMLQuantizationType
    except ImportError:
        raise errors.SourceError("dequantize=True needs the gguf package (llama.cpp's gguf-py): "
                                 "pip install 'safeckpt[gguf]' (or pip install gguf)", path=path) from None
    return quants, GGMLQuantizationType


def _dequantizer(quants: Any, qtypes: Any, type_id: int, ggml: GgmlType) -> Optional[Callable]:
    """A function from raw blocks to F32 values for `type_id`, if the installed gguf has one."""
    try:
        qtype = qtypes(type_id)
        quants.dequantize(np.zeros(ggml.type_size, np.uint8), qtype)
    except Exception:  # noqa: BLE001 - an old gguf without this type, or without its decoder
        return None
    return lambda blocks: quants.dequantize(blocks, qtype)


class GgufSource(TensorSource):
    """A GGUF file (llama.cpp): plain tensors as zero-copy views, quantized ones as their raw
    blocks (U8) or, with ``dequantize=True``, as F32 values; the metadata in `tree`.

    Besides `TensorSource`'s attributes: `header` (version, byte order, counts), `alignment`,
    `kvs` (the metadata, as in ``tree["metadata"]``). `limits` raises the bounds for a file
    that needs more (`Limits`).

    >>> with GgufSource("tinyllama.Q8_0.gguf") as src:
    ...     src["blk.0.attn_q.weight"], src.quantization("blk.0.attn_q.weight")["ggml_type"]
    (TensorInfo(dtype='U8', shape=(2048, 2176), nbytes=4456448), 'Q8_0')
    """

    format = "gguf"

    def __init__(self, path: "os.PathLike | str", *, dequantize: bool = False,
                 limits: Optional[Limits] = None) -> None:
        super().__init__(os.fspath(path))
        self._map: Any = map_file(self.path)
        try:
            self._open(limits or Limits(), dequantize)
        except BaseException:
            self.close()
            raise

    def _open(self, limits: Limits, dequantize: bool) -> None:
        data = self._map
        self.header = header = read_header(data, self.path, limits)
        cursor = _Cursor(data, self.path, header.byteorder, limits)
        kvs = read_metadata(cursor, header.kv_count)
        self.alignment = alignment_of(kvs, self.path)
        raw = [read_tensor_info(cursor, i) for i in range(header.tensor_count)]
        data_start = -(-cursor.pos // self.alignment) * self.alignment
        self._entries: dict[str, TensorEntry] = {}
        for name, dims, type_id, offset in raw:
            if name in self._entries:
                raise errors.SourceError("two tensor infos have this name", path=self.path, tensor=name)
            self._entries[name] = check_tensor(name, dims, type_id, offset, data_start, self.alignment,
                                               len(data), self.path)
        entries = list(self._entries.values())
        check_apart(entries, self.path)
        layout = llama_cpp_layout_note(entries, data_start, self.alignment)
        if layout:
            self.note(layout)
        for type_id in sorted({e.type_id for e in entries if e.type_id in RETIRED_GGML_TYPES}):
            self.note(f"{GGML_TYPES[type_id].name} ({RETIRED_GGML_TYPES[type_id]}) is no longer read by "
                      "llama.cpp: quantize the model again with a current llama.cpp to run it there")
        if cursor.bad_strings:
            self.note(f"{cursor.bad_strings} metadata strings are not UTF-8; the tree gives their bytes in hex")
        self.kvs = kvs
        self.metadata = {key: _metadata_text(value) for key, value in kvs.items()
                         if not isinstance(value, (list, dict))}
        self._decoders = self._find_decoders(entries) if dequantize else {}
        self._infos = {e.name: self._info(e) for e in entries}
        quantized = {e.name: self._quantization(e) for e in entries if e.ggml.dtype is None}
        self.tree = {"gguf": {"version": header.version, "byteorder": header.byteorder,
                              "alignment": self.alignment, "tensor_count": header.tensor_count,
                              "kv_count": header.kv_count},
                     "metadata": kvs}
        if quantized:
            self.tree["quantized"] = quantized
            self._note_quantized(entries, dequantize)

    def _find_decoders(self, entries: list[TensorEntry]) -> dict[str, Callable]:
        quantized = [e for e in entries if e.ggml.dtype is None]
        if not quantized:
            return {}
        if self.header.byteorder == "big":
            self.note("quantized tensors of a big-endian file are given as their raw blocks, not dequantized "
                      "(their scales are big-endian): convert it with `gguf-convert-endian FILE little` first")
            return {}
        quants, qtypes = _gguf_quants(self.path)
        by_type = {t: _dequantizer(quants, qtypes, t, GGML_TYPES[t]) for t in {e.type_id for e in quantized}}
        missing = sorted(GGML_TYPES[t].name for t, decode in by_type.items() if decode is None)
        if missing:
            self.note(f"the installed gguf package cannot dequantize {', '.join(missing)}: those tensors are "
                      "given as their raw blocks (a newer gguf may decode them)")
        return {e.name: by_type[e.type_id] for e in quantized if by_type[e.type_id] is not None}

    def _info(self, e: TensorEntry) -> TensorInfo:
        if e.ggml.dtype is not None:
            return TensorInfo(e.ggml.dtype, e.shape, e.nbytes)
        if e.name in self._decoders:
            return TensorInfo("F32", e.shape, math.prod(e.shape) * 4)
        return TensorInfo("U8", _block_shape(e), e.nbytes)

    @staticmethod
    def _quantization(e: TensorEntry) -> dict:
        return {"ggml_type": e.ggml.name, "shape": list(e.shape), "bits_per_weight": e.ggml.bits_per_weight}

    def _note_quantized(self, entries: list[TensorEntry], dequantize: bool) -> None:
        raw = [e for e in entries if e.ggml.dtype is None and e.name not in self._decoders]
        if raw:
            kinds = ", ".join(sorted({e.ggml.name for e in raw}))
            hint = "" if dequantize else "; GgufSource(..., dequantize=True) gives F32 values"
            self.note(f"quantized tensors ({len(raw)}, {kinds}) are given as their raw blocks (U8, a row of "
                      f"blocks per row){hint}")

    # -- the mapping
    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def quantization(self, name: str) -> Optional[dict]:
        """How a quantized tensor is stored: its ggml type, logical (numpy-order) shape and bits
        per weight; None for a plain tensor.

        >>> src.quantization("blk.0.ffn_down.weight")
        {'ggml_type': 'Q6_K', 'shape': [4096, 11008], 'bits_per_weight': 6.5625}
        """
        self[name]  # a clear TensorNotFoundError for an unknown name
        e = self._entries[name]
        return self._quantization(e) if e.ggml.dtype is None else None

    # -- the data
    def read(self, name: str) -> np.ndarray:
        self[name]  # a clear TensorNotFoundError for an unknown name
        if self._map is None:
            raise errors.SourceError("the source is closed", path=self.path, tensor=name)
        e = self._entries[name]
        if e.ggml.dtype is None:
            blocks = np.frombuffer(self._map, np.uint8, e.nbytes, e.start).reshape(_block_shape(e))
            decode = self._decoders.get(name)
            out = blocks if decode is None else self._dequantize(decode, blocks, e)
        else:
            dtype = DTYPES[e.ggml.dtype].numpy
            count = e.nbytes // dtype.itemsize
            if self.header.byteorder == "big" and dtype.itemsize > 1:
                swapped = np.frombuffer(self._map, f">u{dtype.itemsize}", count, e.start).astype(
                    f"<u{dtype.itemsize}")
                out = swapped.view(dtype).reshape(e.shape)
            else:
                out = np.frombuffer(self._map, dtype, count, e.start).reshape(e.shape)
        out.flags.writeable = False
        return out

    def _dequantize(self, decode: Callable, blocks: np.ndarray, e: TensorEntry) -> np.ndarray:
        try:
            values = decode(blocks)
        except Exception as exc:  # noqa: BLE001 - gguf's decoders are third-party code
            raise errors.SourceError(f"the gguf package could not dequantize this {e.ggml.name} tensor: "
                                     f"{type(exc).__name__}: {exc}", path=self.path, tensor=e.name) from None
        return np.ascontiguousarray(values, dtype=np.float32).reshape(e.shape)

    def file_span(self, name: str) -> Optional[FileSpan]:
        """Plain tensors of a little-endian file and raw blocks lie in the file as they are read."""
        self[name]
        e = self._entries[name]
        if name in self._decoders or (e.ggml.dtype is not None and self.header.byteorder == "big"
                                      and e.ggml.type_size > 1):
            return None
        return FileSpan(self.path, e.start, e.nbytes)

    def release(self, name: str) -> None:
        e = self._entries.get(name)
        if e is None or self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = -(-e.start // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (e.start + e.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def describe(self) -> str:
        h = self.header
        text = f"GGUF v{h.version} file"
        arch = self.kvs.get("general.architecture")
        if isinstance(arch, str):
            text += f" ({arch[:40]})"
        text += f", {len(self)} tensors"
        kind = self.file_type()
        if kind:
            text += f", {kind}"
        return text + (", big-endian" if h.byteorder == "big" else "")

    def file_type(self) -> Optional[str]:
        """What the file mostly holds: `general.file_type` by llama.cpp's name ("Q4_K_M"), else
        the ggml type of most bytes ("mostly Q8_0"), else None.

        >>> src.file_type()
        'Q4_K_M'
        """
        code = self.kvs.get("general.file_type")
        if type(code) is int:
            name = FILE_TYPES.get(code & ~FILE_TYPE_GUESSED)
            if name is not None:
                return name + (" (guessed)" if code & FILE_TYPE_GUESSED else "")
        weights: Counter[str] = Counter()
        for e in self._entries.values():
            weights[e.ggml.name] += e.nbytes
        return f"mostly {weights.most_common(1)[0][0]}" if weights else None

    def close(self) -> None:
        unmap(self._map)
        self._map = None


def _block_shape(e: TensorEntry) -> tuple[int, ...]:
    """The raw blocks of a quantized tensor as gguf's reader gives them: one row of blocks per row."""
    return (*e.shape[:-1], e.shape[-1] // e.ggml.block_size * e.ggml.type_size)


def _metadata_text(value: Any) -> str:
    """A single metadata value as the text of a str -> str mapping."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else repr(value)
