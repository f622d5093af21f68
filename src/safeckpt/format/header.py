"""The safetensors header: parse and validate it, or build it.

Specification (the Hugging Face format, https://github.com/huggingface/safetensors)::

    [8 bytes]  N, unsigned 64-bit little-endian: the length of the header
    [N bytes]  the header: UTF-8 JSON object
    [rest]     the data buffer

The header maps each tensor name to ``{"dtype": str, "shape": [int, ...],
"data_offsets": [begin, end]}``, offsets relative to the start of the data
buffer. An optional ``"__metadata__"`` maps strings to strings (``null`` is
accepted on read). Sorted by offset, the tensors must tile the data buffer
exactly: no gaps, no overlaps, no trailing bytes (zero-size tensors may share
an offset). ``shape × dtype bits / 8`` must equal the span.

JSON whitespace (space, tab, CR, LF) before and after the object is accepted,
as the Rust implementation accepts it; writers pad with spaces to a multiple
of 8 bytes. Numbers are read as serde_json reads them (``-0``, ``1.0``,
``1e2`` and integers past 64 bits are floats, so not valid sizes). Everything
else is strict, and stricter than Rust where Rust guesses or accepts what no
array can hold: duplicate tensor names or metadata keys (Rust keeps the last),
unknown fields and entries written as arrays (Rust ignores / accepts them),
shapes of more than 64 dimensions or whose non-zero dimensions overflow a
64-bit size (numpy cannot make such arrays) are all refused.
"""

from __future__ import annotations

import gc
import json
import math
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, NamedTuple, Optional

from .. import errors
from .dtypes import DTYPES, DType, byte_size

LENGTH_PREFIX = 8
# The format's own limit; it keeps a hostile file from making us parse gigabytes of JSON.
MAX_HEADER_BYTES = 100_000_000
# numpy addresses arrays with a signed 64-bit size (npy_intp): a larger dimension,
# or a tensor whose non-zero dimensions multiply past it, cannot be an array even
# with no elements. The Rust implementation accepts e.g. [0, 2**64-1, 2**64-1];
# we refuse it, as nothing could load it.
MAX_DIM = 2**63 - 1
MAX_ARRAY_BYTES = 2**63 - 1
# numpy's NPY_MAXDIMS. The Rust implementation has no limit; numpy cannot make
# an array of more dimensions, and the bound keeps shape arithmetic cheap.
MAX_NDIM = 64
# Values quoted in error messages are cut to this many characters, so that a
# hostile header cannot make a message megabytes long.
MAX_QUOTE = 80
METADATA_KEY = "__metadata__"
TENSOR_FIELDS = ("dtype", "shape", "data_offsets")


class HeaderEntry(NamedTuple):
    """What the header says of one tensor: dtype name, shape, and byte span.

    A named tuple: files may hold hundreds of thousands of these, and a tuple
    is the cheapest immutable record to make.
    """

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed, validated header. `tensors` is in file order (by offset)."""

    tensors: dict[str, HeaderEntry]
    metadata: Optional[dict[str, str]]
    data_start: int  # absolute file offset of the data buffer
    data_size: int = field(default=0)

    def places(self) -> Iterator[tuple[str, HeaderEntry, slice]]:
        """Each tensor, in file order, with where its bytes lie in the whole file (header included).

        >>> for name, entry, where in header.places():
        ...     storage = buffer[where]
        """
        for name, entry in self.tensors.items():
            begin = self.data_start + entry.data_offsets[0]
            yield name, entry, slice(begin, begin + entry.nbytes)


# What a header says: the tensors in offset order, and the metadata.
TensorsAndMetadata = tuple[dict[str, HeaderEntry], Optional[dict[str, str]]]


# --- parsing ------------------------------------------------------------------

def read_length_prefix(prefix: bytes, file_size: int, path=None) -> int:
    """Check and return N from the first 8 bytes of a file of `file_size` bytes."""
    if file_size < LENGTH_PREFIX:
        _raise_wrong_format(prefix, path)
        raise errors.FileTooSmallError(
            f"file is {file_size} bytes, smaller than the 8-byte header length of a safetensors file",
            path=path)
    (length,) = struct.unpack("<Q", prefix[:LENGTH_PREFIX])
    if length > MAX_HEADER_BYTES:
        _raise_wrong_format(prefix, path)
        raise errors.HeaderTooLargeError(
            f"header length {length} exceeds the format's limit of {MAX_HEADER_BYTES} bytes",
            path=path)
    if length > file_size - LENGTH_PREFIX:
        _raise_wrong_format(prefix, path)
        raise errors.HeaderLengthError(
            f"header length {length} runs past the end of the file "
            f"({file_size - LENGTH_PREFIX} bytes after the length prefix); the file may be truncated",
            path=path)
    return length


def parse_header(raw: "bytes | bytearray", file_size: int, path=None) -> Header:
    """Parse and validate the header bytes (without the length prefix).

    `file_size` is the size of the whole file; the tensors must tile
    ``file_size - 8 - len(raw)`` bytes exactly.
    """
    text = _decode(raw, path)
    data_size = file_size - LENGTH_PREFIX - len(raw)
    with collector_paused():
        tensors, metadata = _read_canonical(text, data_size, path) or _read_document(text, data_size, path)
    return Header(tensors, metadata, LENGTH_PREFIX + len(raw), data_size)


def _read_document(text: str, data_size: int, path) -> TensorsAndMetadata:
    """Any header text: parsed as JSON, then every rule checked, each with its own error."""
    document = _load_json(text, path)
    if not isinstance(document, dict):
        raise errors.HeaderNotObjectError(
            f"header is a JSON {_json_type(document)}, expected an object", path=path)
    metadata = _check_metadata(document.pop(METADATA_KEY, None), path)
    check_names = _SURROGATE_ESCAPE.search(text) is not None
    infos = {name: _check_entry(name, entry, path, check_names) for name, entry in document.items()}
    return _check_layout(infos, data_size, path), metadata


@contextmanager
def collector_paused():
    """Parsing (and writing) makes objects per tensor and no cycles; letting the
    garbage collector scan them, and the rest of the heap, would double the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _decode(raw: bytes, path) -> str:
    if raw.startswith(b"\xef\xbb\xbf"):
        raise errors.HeaderEncodingError(
            "header starts with a UTF-8 byte-order mark, which safetensors does not allow", path=path)
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise errors.HeaderJSONError(
            f"header contains a NUL byte at file offset {LENGTH_PREFIX + nul}; "
            "safetensors pads headers with spaces, not NULs", path=path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.HeaderEncodingError(
            f"header is not valid UTF-8 (byte {LENGTH_PREFIX + exc.start}: {exc.reason})", path=path) from None


# --- the layout every writer emits, read without building the JSON document ---------
# Hugging Face's writer and ours emit compact JSON: ``__metadata__`` (if any) first, then
# entries with the fields in the order dtype, shape, data_offsets, in offset order. For a
# header of a million tensors, json.loads builds ~600 MB of dicts and lists in seconds
# before any check runs; matching that layout entry by entry and making each HeaderEntry
# directly takes a fraction of the time and memory. The match accepts only a subset of what
# the general path accepts (no escapes in names, no whitespace, integers of at most 19
# digits, which serde_json and Python both read as the same integer) and makes the same
# Header. Anything else, valid or not, goes to the general path, which says what is wrong.

_NUMBER = r"(?:0|[1-9][0-9]{0,18})"
_ENTRY = re.compile(
    r'"([^"\\\x00-\x1f]*)":\{"dtype":"([0-9A-Z_]{1,16}","shape":\[(?:%s(?:,%s)*)?)\],'
    r'"data_offsets":\[(%s),(%s)\]\}([,}])' % ((_NUMBER,) * 4))
_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'
_METADATA_FIRST = re.compile(r'\{"__metadata__":(\{(?:%s:%s(?:,%s:%s)*)?\}|null),' % ((_STRING,) * 4))
_JSON_SPACE = re.compile(r"[ \t\r\n]*")
_SHAPE_FIELD = '","shape":['
_UNSEEN: Any = object()


def _read_canonical(text: str, data_size: int, path) -> Optional[TensorsAndMetadata]:
    """What `_read_document` makes of a header in the layout writers emit; None for any other."""
    metadata: Optional[dict[str, str]] = None
    found = _METADATA_FIRST.match(text)
    if found is not None:
        try:
            metadata = _check_metadata(_load_json(found.group(1), path), path)
        except errors.HeaderError:
            return None
        at = found.end()
    elif text.startswith("{"):
        at = 1
    else:
        return None
    tensors: dict[str, HeaderEntry] = {}
    kinds: dict[str, Optional[tuple[str, tuple[int, ...], int]]] = {}  # dtype and shape text -> checked
    match, position, position_text, count = _ENTRY.match, 0, "0", 0
    while True:
        entry = match(text, at)
        if entry is None:
            return None
        name, kind_text, begin, end_text, closing = entry.groups()
        kind = kinds.get(kind_text, _UNSEEN)
        if kind is _UNSEEN:
            kind = kinds[kind_text] = _canonical_kind(kind_text)
        if kind is None or begin != position_text:  # digits without leading zeros: equal text, equal value
            return None
        end = int(end_text)
        if end - position != kind[2]:
            return None
        tensors[name] = HeaderEntry(kind[0], kind[1], (position, end))
        position, position_text, count, at = end, end_text, count + 1, entry.end()
        if closing == "}":
            break
    if (position != data_size or len(tensors) != count or METADATA_KEY in tensors
            or _JSON_SPACE.match(text, at).end() != len(text)):
        return None
    return tensors, metadata


def _canonical_kind(text: str) -> Optional[tuple[str, tuple[int, ...], int]]:
    """``'F32","shape":[2,3'`` -> ("F32", (2, 3), 24), or None if the general path must judge it."""
    name, _, dims = text.partition(_SHAPE_FIELD)
    dtype = DTYPES.get(name)
    if dtype is None:
        return None
    shape = tuple(map(int, dims.split(","))) if dims else ()
    try:
        return dtype.name, shape, tensor_nbytes(dtype, check_shape(shape))
    except errors.HeaderError:
        return None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _pairs_without_duplicates(path):
    def hook(pairs):
        result = dict(pairs)
        if len(result) != len(pairs):
            seen = set()
            for key, _ in pairs:
                if key in seen:
                    raise errors.DuplicateKeyError(
                        f"key {_quote(key)} appears twice in the header; refusing to guess which one is "
                        "meant (the Rust implementation silently keeps the last)", path=path)
                seen.add(key)
        return result
    return hook


# Integer literals that serde_json reads as floats: -0, and anything of 20+ digits
# (which may not fit in 64 bits). Matches inside strings only cost the slower parse.
_SERDE_SPECIAL_INT = re.compile(r"-0(?![0-9.eE])|[0-9]{20}")
# A JSON escape of a UTF-16 surrogate: the only way a lone surrogate gets into a name.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _parse_int(text: str) -> "int | float":
    """An integer literal as serde_json (the Rust implementation's parser) reads it.

    serde_json reads ``-0`` and integers outside the 64-bit range as floats, so
    such a shape entry or offset is refused there; reading them as floats here
    refuses them too. The length test also keeps Python from converting a
    100 MB run of digits to an int (quadratic time).
    """
    if len(text) > 20 or text == "-0":
        return float(text)
    value = int(text)
    return value if -2**63 <= value < 2**64 else float(text)


def _load_json(text: str, path) -> Any:
    # Python's own int parsing is much faster; serde_json's reading is only needed
    # where the text holds a literal it would read differently.
    parse_int = _parse_int if _SERDE_SPECIAL_INT.search(text) else None
    try:
        return json.loads(text, object_pairs_hook=_pairs_without_duplicates(path),
                          parse_constant=_reject_constant, parse_int=parse_int)
    except errors.SafeckptError:
        raise
    except RecursionError:
        raise errors.HeaderJSONError("header JSON is nested too deeply", path=path) from None
    except ValueError as exc:
        raise errors.HeaderJSONError(f"header is not valid JSON: {exc}", path=path) from None


def _quote(value: Any) -> str:
    """repr(value), cut to MAX_QUOTE characters."""
    text = repr(value)
    return text if len(text) <= MAX_QUOTE else text[:MAX_QUOTE] + "..."


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"),
                       (list, "array"), (dict, "object"), (type(None), "null")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _check_text(value: str, what: str, path, tensor=None) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        quoted = "" if tensor is not None else f" {_quote(value)}"
        raise errors.HeaderEncodingError(
            f"{what}{quoted} contains a lone surrogate escape (\\ud800-\\udfff), which is not valid UTF-8",
            path=path, tensor=tensor) from None
    return value


def _check_metadata(metadata: Any, path) -> Optional[dict[str, str]]:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise errors.MetadataError(
            f"__metadata__ is a JSON {_json_type(metadata)}, expected an object of strings", path=path)
    for key, value in metadata.items():
        _check_text(key, "metadata key", path)
        if not isinstance(value, str):
            raise errors.MetadataError(
                f"__metadata__[{_quote(key)}] is a JSON {_json_type(value)}, expected a string", path=path)
        _check_text(value, f"metadata value of {_quote(key)}", path)
    return metadata


def _well_formed_entry(entry: Any) -> Optional[HeaderEntry]:
    """The usual, valid, non-empty entry, checked in few steps; None sends it to the full checks.

    Accepts nothing the full checks would refuse (the full checks say why).
    """
    if type(entry) is not dict or len(entry) != 3:
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if type(dtype) is not str or type(shape) is not list or type(offsets) is not list:
        return None
    dtype = DTYPES.get(dtype)
    if dtype is None or len(shape) > MAX_NDIM or len(offsets) != 2:
        return None
    count = 1
    for dim in shape:
        if type(dim) is not int or dim <= 0:
            return None
        count *= dim
    begin, end = offsets
    bits = count * dtype.bits
    if (type(begin) is not int or type(end) is not int or begin < 0 or bits % 8
            or end - begin != bits // 8 or count > MAX_DIM or end - begin > MAX_ARRAY_BYTES):
        return None
    return HeaderEntry(dtype.name, tuple(shape), (begin, end))


def _check_entry(name: str, entry: Any, path, check_name: bool = True) -> HeaderEntry:
    if check_name:
        _check_text(name, "the tensor name", path, tensor=name)
    info = _well_formed_entry(entry)
    if info is not None:
        return info
    if not isinstance(entry, dict):
        raise errors.HeaderNotObjectError(
            f"entry is a JSON {_json_type(entry)}, expected an object with {', '.join(TENSOR_FIELDS)}",
            path=path, tensor=name)
    missing = [f for f in TENSOR_FIELDS if f not in entry]
    if missing:
        raise errors.MissingFieldError(f"entry lacks {', '.join(missing)}", path=path, tensor=name)
    extra = sorted(set(entry) - set(TENSOR_FIELDS))
    if extra:
        raise errors.UnexpectedFieldError(
            f"entry has unknown field(s) {', '.join(map(_quote, extra))}; the format defines only "
            f"{', '.join(TENSOR_FIELDS)}", path=path, tensor=name)
    dtype = _check_dtype(entry["dtype"], name, path)
    if not isinstance(entry["shape"], list):
        raise errors.FieldTypeError(
            f"shape is a JSON {_json_type(entry['shape'])}, expected an array of integers", path=path, tensor=name)
    shape = check_shape(entry["shape"], path, name)
    offsets = _check_offsets(entry["data_offsets"], name, path)
    size = tensor_nbytes(dtype, shape, path, name)
    begin, end = offsets
    if end < begin:
        raise errors.ReversedOffsetsError(
            f"data_offsets [{begin}, {end}] end before they begin", path=path, tensor=name)
    if end - begin != size:
        raise errors.SizeMismatchError(
            f"data_offsets [{begin}, {end}] span {end - begin} bytes but shape {list(shape)} of "
            f"{dtype.name} needs {size}", path=path, tensor=name)
    return HeaderEntry(dtype.name, shape, offsets)


def _check_dtype(value: Any, name: str, path) -> DType:
    if not isinstance(value, str):
        raise errors.FieldTypeError(
            f"dtype is a JSON {_json_type(value)}, expected a string", path=path, tensor=name)
    dtype = DTYPES.get(value)
    if dtype is None:
        hint = f" (names are upper case: {value.upper()!r})" if value.upper() in DTYPES else ""
        raise errors.UnknownDTypeError(
            f"unknown dtype {_quote(value)}{hint}; known: {', '.join(DTYPES)}", path=path, tensor=name)
    return dtype


def _is_json_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_shape(shape: Any, path=None, tensor: Optional[str] = None) -> tuple[int, ...]:
    """`shape` as a tuple, if it is a sequence of at most 64 integers in [0, 2**63 - 1].

    Raises InvalidShapeError otherwise (booleans and floats are not integers).
    """
    if len(shape) > MAX_NDIM:
        raise errors.InvalidShapeError(
            f"shape has {len(shape)} dimensions; numpy supports at most {MAX_NDIM}", path=path, tensor=tensor)
    for dim in shape:
        if not _is_json_int(dim):
            raise errors.InvalidShapeError(
                f"shape {_quote(list(shape))} has a non-integer entry {_quote(dim)}", path=path, tensor=tensor)
        if dim < 0:
            raise errors.InvalidShapeError(
                f"shape {_quote(list(shape))} has a negative entry {dim}", path=path, tensor=tensor)
        if dim > MAX_DIM:
            raise errors.InvalidShapeError(
                f"shape {_quote(list(shape))} has an entry larger than 2**63 - 1", path=path, tensor=tensor)
    return tuple(shape)


def tensor_nbytes(dtype: DType, shape: tuple[int, ...], path=None, tensor: Optional[str] = None) -> int:
    """Bytes taken by a tensor of a checked `shape`; the same checks for readers and writers.

    Raises SizeOverflowError if no array could have this shape, SubByteSizeError
    if a sub-byte dtype does not fill whole bytes.

    >>> tensor_nbytes(DTYPES["F4"], (2, 3))
    3
    """
    # Zero dimensions are left out: numpy refuses [0, 2**62, 2**62] as well.
    addressable = math.prod(dim for dim in shape if dim) * max(dtype.bits, 8) // 8
    if addressable > MAX_ARRAY_BYTES:
        raise errors.SizeOverflowError(
            f"shape {_quote(list(shape))} of {dtype.name} overflows a 64-bit size: its non-zero "
            f"dimensions alone need {addressable} bytes, more than 2**63 - 1", path=path, tensor=tensor)
    size = byte_size(dtype, shape)
    if size is None:
        raise errors.SubByteSizeError(
            f"{math.prod(shape)} elements of {dtype.name} ({dtype.bits} bits each) do not fill whole bytes",
            path=path, tensor=tensor)
    return size


def _check_offsets(value: Any, name: str, path) -> tuple[int, int]:
    if not isinstance(value, list):
        raise errors.FieldTypeError(
            f"data_offsets is a JSON {_json_type(value)}, expected [begin, end]", path=path, tensor=name)
    if len(value) != 2:
        raise errors.InvalidOffsetsError(
            f"data_offsets has {len(value)} entries, expected 2 ([begin, end])", path=path, tensor=name)
    for offset in value:
        if not _is_json_int(offset) or offset < 0 or offset >= 2**64:
            raise errors.InvalidOffsetsError(
                f"data_offsets {_quote(value)} must be two non-negative 64-bit integers", path=path, tensor=name)
    return value[0], value[1]


def _check_layout(infos: dict[str, HeaderEntry], data_size: int, path) -> dict[str, HeaderEntry]:
    """Tensors sorted by offset must tile the data buffer exactly."""
    ordered = sorted(infos.items(), key=lambda item: item[1].data_offsets)
    position, previous = 0, None
    for name, info in ordered:
        begin, end = info.data_offsets
        if end > data_size:
            raise errors.OffsetOutOfBoundsError(
                f"data_offsets [{begin}, {end}] run past the end of the {data_size}-byte data buffer; "
                "the file may be truncated", path=path, tensor=name)
        if begin < position:
            raise errors.OverlapError(
                f"bytes [{begin}, {end}] overlap tensor {_quote(previous)}, which ends at {position}",
                path=path, tensor=name)
        if begin > position:
            raise errors.GapError(
                f"starts at {begin} but the previous tensor ends at {position}: "
                f"{begin - position} bytes belong to no tensor", path=path, tensor=name)
        position = end
        if end > begin:
            previous = name
    if position != data_size:
        raise errors.TrailingBytesError(
            f"the tensors cover {position} bytes but the data buffer has {data_size}: "
            f"{data_size - position} trailing bytes belong to no tensor", path=path)
    return dict(ordered)


# --- recognising other formats ---------------------------------------------

def sniff_other_format(head: bytes) -> Optional[tuple[str, str]]:
    """Name the format of a file that is not safetensors, with advice, or None."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip", ("it is a zip archive, as written by torch.save (PyTorch >= 1.6); it holds a "
                       "pickle that can run code when loaded: do not load it unless you trust its source; "
                       "`safeckpt scan` checks it and `safeckpt convert` turns it into safetensors "
                       "without running anything")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle", ("it is a Python pickle (a legacy torch.save or pickle.dump file) that "
                          "can run code when loaded: do not load it unless you trust its source; "
                          "`safeckpt scan` checks it and `safeckpt convert` turns it into safetensors "
                          "without running anything")
    if head.startswith(b"version https://git-lfs"):
        return "git-lfs-pointer", ("it is a Git LFS pointer, not the file itself: fetch the real "
                                   "content with `git lfs pull` (or download it from the Hub)")
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "html", ("it is an HTML page, probably an error or login page saved instead of "
                        "the model: download the file again (on the Hub use the /resolve/ URL, not /blob/)")
    if head.startswith(b"GGUF"):
        return "gguf", "it is a GGUF file (llama.cpp); read it with safeckpt.open_source"
    if head.startswith(b"\x93NUMPY"):
        return "npy", "it is a numpy .npy file; read it with safeckpt.open_source or `safeckpt convert`"
    if head.startswith(b"\x1f\x8b"):
        return "gzip", "it is gzip-compressed: decompress it first"
    # A real length prefix is never printable text: its high bytes are zero.
    if len(head) >= 8 and all(32 <= c < 127 or c in b"\t\r\n" for c in head[:8]):
        return "text", f"it is a text file (it starts with {bytes(head[:32])!r})"
    return None


def _raise_wrong_format(head: bytes, path) -> None:
    found = sniff_other_format(head)
    if found is not None:
        kind, advice = found
        raise errors.WrongFormatError(f"not a safetensors file: {advice}", detected=kind, path=path)


def check_not_other_format(head: bytes, path) -> None:
    """Raise WrongFormatError if `head` (the first bytes) shows another format.

    Called when the header failed to parse, so a pickle or an HTML page gets
    an error that says what the file really is.
    """
    _raise_wrong_format(head, path)


# --- building -----------------------------------------------------------------

def build_header(ordered: list[tuple[str, DType, tuple[int, ...], int]],
                 metadata: Optional[Mapping[str, str]]) -> tuple[bytes, int]:
    """Header bytes (length prefix included, padded) and the data size.

    `ordered` is ``(name, dtype, shape, nbytes)`` in write order. Produces the
    bytes the Hugging Face writer produces: compact JSON, ``__metadata__``
    first (keys sorted), entries in offset order, space padding to 8.
    """
    document: dict[str, Any] = {}
    if metadata is not None:
        document[METADATA_KEY] = dict(sorted(metadata.items()))
    offset = 0
    for name, dtype, shape, nbytes in ordered:
        document[name] = {"dtype": dtype.name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset
