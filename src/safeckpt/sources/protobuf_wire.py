"""A small, strict reader of the protocol buffers wire format (no protobuf runtime, nothing generated).

The wire format (https://protobuf.dev/programming-guides/encoding/)
--------------------------------------------------------------------
A message is a sequence of fields, each a *tag* then a value. The tag is a varint
``field_number << 3 | wire_type``; field numbers are 1 .. 2**29 - 1. Wire types:

====  =============  ==========================================================
type  name           value
====  =============  ==========================================================
0     VARINT         a base-128 varint, least significant group first, at most
                     10 bytes (the 10th may only hold bit 63): int32, int64,
                     uint32, uint64, sint32/64 (zigzag), bool, enum
1     I64            8 bytes little-endian: fixed64, sfixed64, double
2     LEN            a varint length, then that many bytes: string, bytes, an
                     embedded message, or a *packed* repeated scalar field
3, 4  SGROUP/EGROUP  groups (proto2, deprecated): refused here
5     I32            4 bytes little-endian: fixed32, sfixed32, float
====  =============  ==========================================================

int32 and int64 fields hold negative values as the 64-bit two's complement (so a
negative int32 takes 10 bytes). A field seen twice in a message: the last value wins
for a scalar, the values are appended for a repeated field; a repeated scalar may come
packed (one LEN field of back-to-back values) or one value per field.

What this module gives
----------------------
`iter_fields(data)` yields ``(field_number, wire_type, value)`` for each field of one
message: an int for VARINT, I64 and I32 (the raw unsigned bits), a memoryview of the
bytes for LEN (zero-copy: an embedded message is parsed by calling `iter_fields` on it).
`decode_message(data, schema)` turns a message into a dict through a small schema of
`Field` records, which is how a format's reader states the messages it needs (unknown
fields are skipped, as protobuf does). Helpers convert raw values: `signed64`,
`signed32`, `zigzag`, `packed_varints`, `packed_fixed` (little-endian floats, doubles,
fixed ints as a numpy array).

Every length and count is checked against the bytes that are there; a malformed
message raises `errors.SourceError` naming the file and what was being read. Nothing
is ever allocated beyond the size of the input.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional

import numpy as np

from .. import errors

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
WIRE_TYPE_NAMES = {VARINT: "varint", I64: "64-bit", LEN: "length-delimited", SGROUP: "start-group",
                   EGROUP: "end-group", I32: "32-bit"}
MAX_FIELD_NUMBER = (1 << 29) - 1
# A varint of more than 10 bytes (or a 10th byte above 1) does not fit in 64 bits.
MAX_VARINT_BYTES = 10
# Messages nested in messages: protobuf's own parsers stop at 100; the formats read here
# nest a handful of levels, and a deeper file would only be a way to exhaust the stack.
MAX_DEPTH = 64

# scalar kinds -> wire type
_SCALAR_WIRE = {"int32": VARINT, "int64": VARINT, "uint32": VARINT, "uint64": VARINT, "sint32": VARINT,
                "sint64": VARINT, "bool": VARINT, "enum": VARINT, "fixed32": I32, "sfixed32": I32,
                "float": I32, "fixed64": I64, "sfixed64": I64, "double": I64}
# fixed-width kinds -> numpy type of one packed element
_FIXED_NUMPY = {"fixed32": "<u4", "sfixed32": "<i4", "float": "<f4", "fixed64": "<u8", "sfixed64": "<i8",
                "double": "<f8"}


class WireContext(NamedTuple):
    """Where a message lies, for error messages: the file and what the message is."""

    path: Optional[str]
    what: str


def _fail(ctx: WireContext, detail: str) -> errors.SourceError:
    return errors.SourceError(f"{ctx.what}: {detail}", path=ctx.path)


def read_varint(data: Any, pos: int, end: int, ctx: WireContext) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos`; it must end before `end`."""
    result = shift = 0
    for i in range(MAX_VARINT_BYTES):
        if pos >= end:
            raise _fail(ctx, f"a varint runs past the end of the message (at byte {pos})")
        byte = data[pos]
        pos += 1
        if i == MAX_VARINT_BYTES - 1 and byte > 1:
            raise _fail(ctx, f"a varint at byte {pos - MAX_VARINT_BYTES} does not fit in 64 bits")
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise _fail(ctx, f"a varint at byte {pos - MAX_VARINT_BYTES} is longer than {MAX_VARINT_BYTES} bytes")


def iter_fields(data: Any, ctx: Optional[WireContext] = None) -> Iterator[tuple[int, int, Any]]:
    """Each field of one message as ``(field_number, wire_type, value)``.

    `data` is bytes, a memoryview or an mmap; VARINT, I64 and I32 values are ints (the
    raw unsigned bits), LEN values memoryviews of `data`. Groups and unknown wire types
    are refused.

    >>> list(iter_fields(b"\\x08\\x96\\x01\\x12\\x02hi"))
    [(1, 0, 150), (2, 2, <memory at 0x...>)]
    """
    ctx = ctx or WireContext(None, "a protobuf message")
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    pos, end = 0, len(view)
    while pos < end:
        tag, pos = read_varint(view, pos, end, ctx)
        number, wire = tag >> 3, tag & 7
        if not 1 <= number <= MAX_FIELD_NUMBER:
            raise _fail(ctx, f"field number {number} at byte {pos} is outside 1..{MAX_FIELD_NUMBER}")
        if wire == VARINT:
            value, pos = read_varint(view, pos, end, ctx)
        elif wire == I64 or wire == I32:
            size = 8 if wire == I64 else 4
            if pos + size > end:
                raise _fail(ctx, f"field {number}: a {size * 8}-bit value runs past the end of the message")
            value = int.from_bytes(view[pos:pos + size], "little")
            pos += size
        elif wire == LEN:
            length, pos = read_varint(view, pos, end, ctx)
            if length > end - pos:
                raise _fail(ctx, f"field {number}: {length} bytes are declared but {end - pos} remain")
            value = view[pos:pos + length]
            pos += length
        else:
            raise _fail(ctx, f"field {number} has wire type {wire} ({WIRE_TYPE_NAMES.get(wire, 'unknown')}), "
                             "which this reader does not accept")
        yield number, wire, value


def signed64(value: int) -> int:
    """An int64 (or int32, sfixed64) field's value from its raw 64 unsigned bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def signed32(value: int) -> int:
    """An int32 field's value: its low 32 bits as two's complement (protobuf truncates likewise)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def zigzag(value: int) -> int:
    """A sint32/sint64 field's value from its zigzag encoding."""
    return (value >> 1) ^ -(value & 1)


def packed_varints(data: Any, ctx: WireContext) -> list[int]:
    """The raw values of a packed repeated varint field (one LEN field's bytes)."""
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
    out, pos, end = [], 0, len(view)
    while pos < end:
        value, pos = read_varint(view, pos, end, ctx)
        out.append(value)
    return out


def packed_fixed(data: Any, kind: str, ctx: WireContext) -> np.ndarray:
    """A packed repeated fixed-width field (``float``, ``double``, ``fixed32``, ``sfixed64``, ...) as
    a read-only numpy array over `data` (no copy)."""
    dtype = np.dtype(_FIXED_NUMPY[kind])
    if len(data) % dtype.itemsize:
        raise _fail(ctx, f"a packed {kind} field of {len(data)} bytes is not a whole number of values")
    return np.frombuffer(data, dtype)


def _scalar(kind: str, value: int) -> Any:
    if kind in ("int64", "sfixed64", "enum"):
        return signed64(value) if kind != "enum" else signed32(value)
    if kind in ("int32", "sfixed32"):
        return signed32(value)
    if kind == "uint32":
        return value & 0xFFFFFFFF
    if kind in ("sint32", "sint64"):
        return zigzag(value)
    if kind == "bool":
        return value != 0
    if kind in ("float", "double"):
        return float(np.frombuffer(value.to_bytes(4 if kind == "float" else 8, "little"),
                                   "<f4" if kind == "float" else "<f8")[0])
    return value  # uint64, fixed32, fixed64


class Field(NamedTuple):
    """One field of a message schema: its name, kind and whether it repeats.

    `kind` is a scalar type name (``"int64"``, ``"fixed32"``, ``"float"``, ``"bool"``, ``"enum"``,
    ...), ``"string"`` (UTF-8, checked), ``"bytes"`` (a memoryview, no copy) or ``"message"``
    (decoded by `schema`, itself ``{field_number: Field}``).
    """

    name: str
    kind: str
    repeated: bool = False
    schema: Optional[dict] = None


def decode_message(data: Any, schema: dict[int, Field], ctx: WireContext, depth: int = 0) -> dict[str, Any]:
    """The fields of one message that `schema` names, as a dict (absent fields are absent).

    Unknown fields are skipped; a known field with the wrong wire type is an error; a
    repeated scalar may come packed or not.

    >>> SHAPE = {2: Field("dim", "message", True, {1: Field("size", "int64")})}
    >>> decode_message(b"\\x12\\x02\\x08\\x03", SHAPE, WireContext(None, "shape"))
    {'dim': [{'size': 3}]}
    """
    if depth > MAX_DEPTH:
        raise _fail(ctx, f"messages are nested more than {MAX_DEPTH} deep")
    out: dict[str, Any] = {}
    for number, wire, value in iter_fields(data, ctx):
        field = schema.get(number)
        if field is None:
            continue
        if field.kind in ("string", "bytes", "message"):
            if wire != LEN:
                raise _fail(ctx, f"field {field.name} has wire type {wire}, not length-delimited")
            if field.kind == "message":
                item: Any = decode_message(value, field.schema or {}, ctx, depth + 1)
            elif field.kind == "string":
                try:
                    item = str(value, "utf-8")
                except UnicodeDecodeError:
                    raise _fail(ctx, f"field {field.name} is not UTF-8 text") from None
            else:
                item = value
            items = [item]
        else:
            expected = _SCALAR_WIRE[field.kind]
            if wire == expected:
                items = [_scalar(field.kind, value)]
            elif wire == LEN and field.repeated:
                raw = packed_varints(value, ctx) if expected == VARINT else \
                    [int(v) for v in packed_fixed(value, {I32: "fixed32", I64: "fixed64"}[expected], ctx)]
                items = [_scalar(field.kind, v) for v in raw]
            else:
                raise _fail(ctx, f"field {field.name} has wire type {wire}, not {expected}")
        if field.repeated:
            out.setdefault(field.name, []).extend(items)
        else:
            out[field.name] = items[-1]
    return out
