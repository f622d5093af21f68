"""Strict validation: every malformed file gets its own error class, naming the file and the tensor.

Each row of the table below is a file made byte by byte. It is opened through
every entry point that reads files; the error class must be exactly the one
listed, and the message must name the file and (where one is at fault) the
tensor. Each row also records what the Rust implementation (through the real
`safetensors` package) does with the same bytes, and a test holds us to it:
where it rejects we reject, and where it accepts and we refuse the row says
why we are deliberately stricter.
"""

from __future__ import annotations

import pickle
import struct
import tracemalloc
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import pytest

import safeckpt
from safeckpt import errors

from tests.files import safetensors_bytes

safetensors = pytest.importorskip("safetensors", reason="the safetensors oracle is not installed")
st_numpy = pytest.importorskip("safetensors.numpy", reason="the safetensors oracle is not installed")

NAME = "layer.0.weight"
OTHER = "layer.1.bias"


# --- how files are opened ---------------------------------------------------------

def _through_safe_open(path, backend):
    with safeckpt.safe_open(path, backend=backend) as f:
        f.metadata()
        return {name: f.get_tensor(name) for name in f.keys()}


def _through_safetensors_file(path):
    with safeckpt.SafetensorsFile(path) as f:
        f.metadata()
        return {name: f.array(name) for name in f.keys()}


# name -> (read every tensor of the file at `path`, where the message says the file is)
ENTRY_POINTS = {
    "safe_open-mmap": (lambda path: _through_safe_open(path, "mmap"), str),
    "safe_open-pread": (lambda path: _through_safe_open(path, "pread"), str),
    "load_file": (lambda path: safeckpt.load_file(path), str),
    "load-bytes": (lambda path: safeckpt.load(path.read_bytes()), lambda path: "<bytes>"),
    "SafetensorsFile": (_through_safetensors_file, str),
}


def rust_accepts(data: bytes) -> bool:
    """Whether the Rust implementation accepts these bytes as a safetensors file.

    `safetensors.deserialize` runs the Rust parser and validator and nothing
    else, so it also answers for F4/F6 files that `safetensors.numpy` cannot
    turn into arrays.
    """
    try:
        safetensors.deserialize(data)
    except safetensors.SafetensorError:
        return False
    return True


# --- the table --------------------------------------------------------------------

@dataclass
class Case:
    id: str
    header: Union[str, bytes, dict]
    data: bytes
    error: Optional[type]  # None: a valid file
    tensor: Optional[str] = None  # the tensor the message must name
    rust: str = "same"  # "same": Rust agrees on accept/reject; "accepts": we are deliberately stricter
    raw: Optional[bytes] = None  # the whole file, where the length prefix itself is the fault

    @property
    def file(self) -> bytes:
        return self.raw if self.raw is not None else safetensors_bytes(self.header, self.data)


def prefixed(length: int, rest: bytes = b"{}") -> dict:
    return {"header": b"", "data": b"", "raw": struct.pack("<Q", length) + rest}


def entry(dtype="U8", shape=(1,), offsets=(0, 1)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def one(text: str) -> str:
    """A header whose only tensor is NAME with the entry given as JSON text."""
    return '{"%s":%s}' % (NAME, text)


def shape_is(text: str) -> str:
    return one('{"dtype":"U8","shape":%s,"data_offsets":[0,1]}' % text)


def offsets_are(text: str) -> str:
    return one('{"dtype":"U8","shape":[1],"data_offsets":%s}' % text)


U8 = '{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
GOOD = one(U8)

MALFORMED = [
    # -- the length prefix
    Case("length-beyond-file", error=errors.HeaderLengthError, **prefixed(100)),
    Case("length-one-beyond-file", error=errors.HeaderLengthError, **prefixed(3)),
    Case("length-2**64-1", error=errors.HeaderTooLargeError, **prefixed(2**64 - 1)),
    Case("length-100MB+1", error=errors.HeaderTooLargeError, **prefixed(100_000_001)),
    Case("length-short-of-json", error=errors.HeaderJSONError, **prefixed(1)),
    Case("length-zero", "", b"", errors.HeaderJSONError),
    # -- UTF-8
    Case("utf8-invalid-byte", b'{"\xff":' + U8.encode() + b"}", b"x", errors.HeaderEncodingError),
    Case("utf8-truncated-sequence", b'{"\xe2\x82":' + U8.encode() + b"}", b"x", errors.HeaderEncodingError),
    Case("utf8-overlong", b'{"\xc0\xaf":' + U8.encode() + b"}", b"x", errors.HeaderEncodingError),
    Case("utf8-encoded-surrogate", b'{"\xed\xa0\x80":' + U8.encode() + b"}", b"x", errors.HeaderEncodingError),
    Case("utf8-bom", b"\xef\xbb\xbf" + GOOD.encode(), b"x", errors.HeaderEncodingError),
    Case("lone-high-surrogate-name", '{"\\ud800":%s}' % U8, b"x", errors.HeaderEncodingError, "\ud800"),
    Case("lone-low-surrogate-name", '{"w\\udc00":%s}' % U8, b"x", errors.HeaderEncodingError, "w\udc00"),
    Case("swapped-surrogate-pair", '{"\\ude00\\ud83d":%s}' % U8, b"x", errors.HeaderEncodingError,
         "\ude00\ud83d"),
    Case("lone-surrogate-metadata", '{"__metadata__":{"k":"\\ud800"}}', b"", errors.HeaderEncodingError),
    # -- JSON syntax
    Case("nul-padding", GOOD + "\0\0\0", b"x", errors.HeaderJSONError),
    Case("truncated-json", GOOD[:-1], b"x", errors.HeaderJSONError),
    Case("trailing-comma", GOOD[:-1] + ",}", b"x", errors.HeaderJSONError),
    Case("nan-in-shape", shape_is("[NaN]"), b"x", errors.HeaderJSONError),
    Case("infinity-in-offsets", offsets_are("[0,Infinity]"), b"x", errors.HeaderJSONError),
    Case("minus-infinity-in-shape", shape_is("[-Infinity]"), b"x", errors.HeaderJSONError),
    Case("two-objects", "{}{}", b"", errors.HeaderJSONError),
    Case("single-quotes", "{'a':1}", b"", errors.HeaderJSONError),
    Case("comment", "{} // weights", b"", errors.HeaderJSONError),
    Case("raw-control-char", b'{"w\x01":' + U8.encode() + b"}", b"x", errors.HeaderJSONError),
    Case("leading-zero", shape_is("[01]"), b"x", errors.HeaderJSONError),
    # Python reads 1E400 as inf, a float in a shape; serde_json calls it out of range. Refused both ways.
    Case("exponent-out-of-range", shape_is("[1E400]"), b"x", errors.InvalidShapeError, NAME),
    Case("nested-arrays-100k", "[" * 100_000, b"", errors.HeaderJSONError),
    Case("nested-objects-100k", '{"a":' * 100_000, b"", errors.HeaderJSONError),
    Case("nested-in-metadata-100k", '{"__metadata__":' + "[" * 100_000, b"", errors.HeaderJSONError),
    Case("vertical-tab-whitespace", "\v{}", b"", errors.HeaderJSONError),
    Case("form-feed-whitespace", "{}\f", b"", errors.HeaderJSONError),
    Case("nbsp-whitespace", "\u00a0{}", b"", errors.HeaderJSONError),
    Case("only-spaces", " " * 8, b"", errors.HeaderJSONError),
    # -- not an object
    Case("header-array", "[]", b"", errors.HeaderNotObjectError),
    Case("header-string", '"weights"', b"", errors.HeaderNotObjectError),
    Case("header-null", "null", b"", errors.HeaderNotObjectError),
    Case("header-number", "8", b"", errors.HeaderNotObjectError),
    Case("entry-number", {NAME: 1}, b"", errors.HeaderNotObjectError, NAME),
    # Stricter: serde reads a struct from an array of its fields in order; the format says object.
    Case("entry-array", {NAME: ["U8", [1], [0, 1]]}, b"x", errors.HeaderNotObjectError, NAME, rust="accepts"),
    # -- duplicate keys
    # Stricter: for duplicate tensor names and metadata keys Rust silently keeps the last one.
    Case("duplicate-tensor", '{"%s":%s,"%s":%s}' % (NAME, U8, NAME, U8), b"x", errors.DuplicateKeyError,
         rust="accepts"),
    Case("duplicate-tensor-by-escape", '{"w":%s,"\\u0077":%s}' % (U8, U8), b"x", errors.DuplicateKeyError,
         rust="accepts"),
    Case("duplicate-metadata-key", '{"__metadata__":{"k":"1","k":"2"}}', b"", errors.DuplicateKeyError,
         rust="accepts"),
    Case("duplicate-metadata", '{"__metadata__":{},"__metadata__":{}}', b"", errors.DuplicateKeyError),
    Case("duplicate-field", one('{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}'), b"x",
         errors.DuplicateKeyError),
    # -- fields
    Case("missing-dtype", {NAME: {"shape": [1], "data_offsets": [0, 1]}}, b"x", errors.MissingFieldError, NAME),
    Case("missing-shape", {NAME: {"dtype": "U8", "data_offsets": [0, 1]}}, b"x", errors.MissingFieldError, NAME),
    Case("missing-offsets", {NAME: {"dtype": "U8", "shape": [1]}}, b"x", errors.MissingFieldError, NAME),
    Case("empty-entry", {NAME: {}}, b"", errors.MissingFieldError, NAME),
    # Stricter: Rust ignores fields it does not know; a misspelt or foreign field is refused here.
    Case("extra-field", {NAME: {**entry(), "offsets": [0, 1]}}, b"x", errors.UnexpectedFieldError, NAME,
         rust="accepts"),
    Case("dtype-number", {NAME: entry(dtype=1)}, b"x", errors.FieldTypeError, NAME),
    Case("dtype-null", {NAME: entry(dtype=None)}, b"x", errors.FieldTypeError, NAME),
    Case("shape-string", {NAME: {**entry(), "shape": "1"}}, b"x", errors.FieldTypeError, NAME),
    Case("shape-null", {NAME: {**entry(), "shape": None}}, b"x", errors.FieldTypeError, NAME),
    Case("shape-object", {NAME: {**entry(), "shape": {"0": 1}}}, b"x", errors.FieldTypeError, NAME),
    Case("offsets-string", {NAME: {**entry(), "data_offsets": "0,1"}}, b"x", errors.FieldTypeError, NAME),
    Case("offsets-object", {NAME: {**entry(), "data_offsets": {"begin": 0, "end": 1}}}, b"x",
         errors.FieldTypeError, NAME),
    # -- dtypes
    Case("dtype-unknown", {NAME: entry(dtype="F128")}, b"x", errors.UnknownDTypeError, NAME),
    Case("dtype-lowercase", {NAME: entry(dtype="u8")}, b"x", errors.UnknownDTypeError, NAME),
    Case("dtype-torch-name", {NAME: entry(dtype="uint8")}, b"x", errors.UnknownDTypeError, NAME),
    Case("dtype-empty", {NAME: entry(dtype="")}, b"x", errors.UnknownDTypeError, NAME),
    Case("dtype-padded", {NAME: entry(dtype="U8 ")}, b"x", errors.UnknownDTypeError, NAME),
    # -- shapes
    Case("shape-negative", shape_is("[-1]"), b"x", errors.InvalidShapeError, NAME),
    Case("shape-minus-zero", one('{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}'), b"",
         errors.InvalidShapeError, NAME),  # serde_json reads -0 as a float
    Case("shape-float", shape_is("[1.0]"), b"x", errors.InvalidShapeError, NAME),
    Case("shape-exponent", shape_is("[1e0]"), b"x", errors.InvalidShapeError, NAME),
    Case("shape-exponent-100", one('{"dtype":"U8","shape":[1e2],"data_offsets":[0,100]}'), bytes(100),
         errors.InvalidShapeError, NAME),
    Case("shape-bool", shape_is("[true]"), b"x", errors.InvalidShapeError, NAME),
    Case("shape-null-entry", shape_is("[null]"), b"x", errors.InvalidShapeError, NAME),
    Case("shape-nested", shape_is("[[1]]"), b"x", errors.InvalidShapeError, NAME),
    Case("shape-string-entry", shape_is('["1"]'), b"x", errors.InvalidShapeError, NAME),
    Case("shape-2**64", shape_is(f"[{2**64}]"), b"x", errors.InvalidShapeError, NAME),
    Case("shape-2**63", shape_is(f"[{2**63}]"), b"x", errors.InvalidShapeError, NAME),
    Case("shape-5000-digits", shape_is("[" + "9" * 5000 + "]"), b"x", errors.InvalidShapeError, NAME),
    Case("shape-1e30", shape_is(f"[{10**30}]"), b"x", errors.InvalidShapeError, NAME),
    # Stricter: numpy (and so every array we return) has at most 64 dimensions.
    Case("shape-65-dims", {NAME: entry(shape=[1] * 65)}, b"x", errors.InvalidShapeError, NAME, rust="accepts"),
    # -- shape x dtype overflow
    Case("overflow-2**62-squared", {NAME: entry(shape=[2**62, 2**62])}, b"x", errors.SizeOverflowError, NAME),
    Case("overflow-f32-2**32-squared", {NAME: entry("F32", [2**32, 2**32])}, b"x", errors.SizeOverflowError,
         NAME),
    Case("overflow-f64-2**61", {NAME: entry("F64", [2**61])}, b"x", errors.SizeOverflowError, NAME),
    # Stricter: no elements, but numpy cannot make an array of this shape either.
    Case("overflow-behind-zero-dim", {NAME: entry(shape=[0, 2**63 - 1, 2**63 - 1], offsets=[0, 0])}, b"",
         errors.SizeOverflowError, NAME, rust="accepts"),
    # -- sub-byte dtypes
    Case("f4-odd-count", {NAME: entry("F4", [3], [0, 1])}, b"x", errors.SubByteSizeError, NAME),
    Case("f4-one", {NAME: entry("F4", [1], [0, 1])}, b"x", errors.SubByteSizeError, NAME),
    Case("f4-odd-2d", {NAME: entry("F4", [3, 3], [0, 5])}, bytes(5), errors.SubByteSizeError, NAME),
    Case("f6-one", {NAME: entry("F6_E2M3", [1], [0, 1])}, b"x", errors.SubByteSizeError, NAME),
    Case("f6-two", {NAME: entry("F6_E3M2", [2], [0, 2])}, b"xy", errors.SubByteSizeError, NAME),
    Case("f6-three", {NAME: entry("F6_E2M3", [3], [0, 3])}, b"xyz", errors.SubByteSizeError, NAME),
    Case("f6-six", {NAME: entry("F6_E3M2", [2, 3], [0, 5])}, bytes(5), errors.SubByteSizeError, NAME),
    # -- offsets
    Case("offsets-one", offsets_are("[0]"), b"x", errors.InvalidOffsetsError, NAME),
    Case("offsets-three", offsets_are("[0,1,1]"), b"x", errors.InvalidOffsetsError, NAME),
    Case("offsets-empty", offsets_are("[]"), b"x", errors.InvalidOffsetsError, NAME),
    Case("offsets-negative", offsets_are("[-1,0]"), b"x", errors.InvalidOffsetsError, NAME),
    Case("offsets-float", offsets_are("[0,1.0]"), b"x", errors.InvalidOffsetsError, NAME),
    Case("offsets-string-entry", offsets_are('[0,"1"]'), b"x", errors.InvalidOffsetsError, NAME),
    Case("offsets-bool", offsets_are("[false,true]"), b"x", errors.InvalidOffsetsError, NAME),
    Case("offsets-2**64", offsets_are(f"[0,{2**64}]"), b"x", errors.InvalidOffsetsError, NAME),
    Case("offsets-reversed", {NAME: entry(shape=[1], offsets=[2, 1])}, b"xy", errors.ReversedOffsetsError, NAME),
    Case("offsets-reversed-empty", {NAME: entry(shape=[0], offsets=[1, 0])}, b"x", errors.ReversedOffsetsError,
         NAME),
    Case("size-mismatch", {NAME: entry("U16", [1], [0, 1])}, b"x", errors.SizeMismatchError, NAME),
    Case("size-mismatch-scalar", {NAME: entry("U8", [], [0, 0])}, b"", errors.SizeMismatchError, NAME),
    Case("size-mismatch-f4", {NAME: entry("F4", [4], [0, 1])}, b"x", errors.SizeMismatchError, NAME),
    Case("out-of-bounds", {NAME: entry(shape=[2], offsets=[0, 2])}, b"x", errors.OffsetOutOfBoundsError, NAME),
    Case("out-of-bounds-huge", {NAME: entry(shape=[2**62], offsets=[0, 2**62])}, b"x",
         errors.OffsetOutOfBoundsError, NAME),
    Case("out-of-bounds-empty-tensor", {OTHER: entry(shape=[1]), NAME: entry(shape=[0], offsets=[2, 2])}, b"x",
         errors.OffsetOutOfBoundsError, NAME),
    Case("overlap", {OTHER: entry(shape=[2], offsets=[0, 2]), NAME: entry(shape=[2], offsets=[1, 3])}, b"xyz",
         errors.OverlapError, NAME),
    Case("overlap-same-span", {OTHER: entry(shape=[2], offsets=[0, 2]), NAME: entry(shape=[2], offsets=[0, 2])},
         b"xy", errors.OverlapError, NAME),
    Case("overlap-empty-inside", {OTHER: entry(shape=[2], offsets=[0, 2]), NAME: entry(shape=[0], offsets=[1, 1])},
         b"xy", errors.OverlapError, NAME),
    Case("gap-at-start", {NAME: entry(offsets=[1, 2])}, b"xy", errors.GapError, NAME),
    Case("gap-between", {OTHER: entry(), NAME: entry(offsets=[2, 3])}, b"xyz", errors.GapError, NAME),
    Case("trailing-bytes", {NAME: entry()}, b"xy", errors.TrailingBytesError),
    Case("trailing-bytes-no-tensors", "{}", b"x", errors.TrailingBytesError),
    Case("trailing-bytes-metadata-only", {"__metadata__": {"k": "v"}}, b"\0" * 8, errors.TrailingBytesError),
    # -- metadata
    Case("metadata-int-value", {"__metadata__": {"epoch": 1}}, b"", errors.MetadataError),
    Case("metadata-null-value", {"__metadata__": {"epoch": None}}, b"", errors.MetadataError),
    Case("metadata-bool-value", {"__metadata__": {"ok": True}}, b"", errors.MetadataError),
    Case("metadata-object-value", {"__metadata__": {"cfg": {"lr": "1"}}}, b"", errors.MetadataError),
    Case("metadata-list", {"__metadata__": ["k", "v"]}, b"", errors.MetadataError),
    Case("metadata-string", {"__metadata__": "k=v"}, b"", errors.MetadataError),
    Case("metadata-as-tensor", {"__metadata__": entry()}, b"x", errors.MetadataError),
]

VALID = [
    Case("empty", "{}", b"", None),
    Case("empty-padded", "{}      ", b"", None),
    Case("metadata-null", '{"__metadata__":null}', b"", None),
    Case("metadata-empty", '{"__metadata__":{}}', b"", None),
    Case("leading-space", " " + GOOD, b"x", None),
    Case("whitespace-around", "\t\r\n " + GOOD + " \n\r\t", b"x", None),
    Case("whitespace-inside", '{ "w" :\n{ "dtype" : "U8" ,\t"shape" : [ 1 ] , "data_offsets" : [ 0 , 1 ] } }',
         b"x", None),
    Case("zero-size-share-offset", {"a": entry(shape=[0], offsets=[0, 0]), "b": entry(shape=[0, 3], offsets=[0, 0])},
         b"", None),
    Case("zero-size-at-end", {"a": entry(shape=[2], offsets=[0, 2]), "b": entry(shape=[0], offsets=[2, 2])},
         b"xy", None),
    Case("zero-size-between", {"a": entry(), "b": entry(shape=[0], offsets=[1, 1]), "c": entry(offsets=[1, 2])},
         b"xy", None),
    Case("zero-size-huge-dim", {"a": entry("F64", [0, 2**59], [0, 0])}, b"", None),
    Case("scalar", {"a": entry(shape=[])}, b"x", None),
    Case("offsets-not-in-json-order", {"b": entry(offsets=[1, 2]), "a": entry()}, b"xy", None),
    Case("escaped-surrogate-pair", '{"\\ud83d\\ude00":%s}' % U8, b"x", None),
    Case("escaped-nul-in-name", '{"w\\u0000":%s}' % U8, b"x", None),
    Case("empty-name", '{"":%s}' % U8, b"x", None),
    Case("f4-even", {"a": entry("F4", [2, 3], [0, 3])}, b"\x10\x32\x54", None),
    Case("f6-four", {"a": entry("F6_E2M3", [4], [0, 3])}, b"xyz", None),
    Case("f6-two-by-four", {"a": entry("F6_E3M2", [2, 4], [0, 6])}, bytes(6), None),
]


def _params(cases):
    return [pytest.param(case, id=case.id) for case in cases]


def test_table_is_large_and_ids_unique():
    assert len(MALFORMED) >= 50
    assert len({case.id for case in MALFORMED + VALID}) == len(MALFORMED + VALID)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("case", _params(MALFORMED))
def test_malformed_file_gets_its_error(tmp_path, case, entry_point):
    path = tmp_path / "model.safetensors"
    path.write_bytes(case.file)
    read, where = ENTRY_POINTS[entry_point]
    with pytest.raises(errors.SafeckptError) as info:
        read(path)
    assert type(info.value) is case.error, str(info.value)
    message = str(info.value)
    assert where(path) in message
    if case.tensor is not None:
        assert info.value.tensor == case.tensor
        assert f"tensor {case.tensor!r}" in message


@pytest.mark.parametrize("case", _params(MALFORMED))
def test_rust_implementation_on_malformed(case):
    accepted = rust_accepts(case.file)
    if case.rust == "accepts":
        assert accepted, "Rust now rejects this too: drop the 'deliberately stricter' note"
    else:
        assert not accepted


@pytest.mark.parametrize("case", _params(VALID))
def test_valid_edge_cases_load_everywhere_like_theirs(tmp_path, case):
    path = tmp_path / "model.safetensors"
    path.write_bytes(case.file)
    theirs = dict(safetensors.deserialize(case.file))  # raises if Rust rejects the file
    for entry_point, (read, _) in ENTRY_POINTS.items():
        assert sorted(read(path)) == sorted(theirs), entry_point
    with safeckpt.SafetensorsFile(path) as f:
        for name, spec in theirs.items():
            assert f.info(name).dtype == spec["dtype"]
            assert list(f.info(name).shape) == spec["shape"]
            assert f.storage(name).tobytes() == bytes(spec["data"])


def test_valid_edge_cases_match_their_numpy_values():
    """Where their numpy module can make arrays (no F4/F6), values and dtypes are equal."""
    for case in VALID:
        if b'"F4"' in case.file or b'"F6_' in case.file:
            continue  # their numpy module has no type for these
        theirs = st_numpy.load(case.file)
        ours = safeckpt.load(case.file)
        assert sorted(ours) == sorted(theirs), case.id
        for name in theirs:
            assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape
            np.testing.assert_array_equal(ours[name], theirs[name])


def test_metadata_null_reads_as_none(raw_file):
    with safeckpt.safe_open(raw_file('{"__metadata__":null,"w":%s}' % U8, b"x")) as f:
        assert f.metadata() is None and f.keys() == ["w"]


# --- limits that must hold without reading or allocating ----------------------------

@pytest.mark.parametrize("size", range(8))
@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_files_shorter_than_the_length_prefix(tmp_path, size, entry_point):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"{}\0\0\0\0\0\0"[:size])
    read, where = ENTRY_POINTS[entry_point]
    with pytest.raises(errors.FileTooSmallError) as info:
        read(path)
    assert where(path) in str(info.value) and f"{size} bytes" in str(info.value)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("length, error", [(100_000_001, errors.HeaderTooLargeError),
                                           (2**63, errors.HeaderTooLargeError),
                                           (100_000_000, errors.HeaderLengthError)])
def test_huge_header_length_is_refused_before_allocating(tmp_path, entry_point, length, error):
    path = tmp_path / "huge-header.safetensors"
    path.write_bytes(struct.pack("<Q", length) + b'{"w":' + U8.encode() + b"}x")
    read, where = ENTRY_POINTS[entry_point]
    tracemalloc.start()
    try:
        with pytest.raises(error) as info:
            read(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"allocated {peak} bytes to refuse a {length}-byte header"
    assert where(path) in str(info.value) and str(length) in str(info.value)


@pytest.mark.slow
def test_header_of_exactly_the_limit_is_read(tmp_path):
    """100,000,000 bytes is allowed, as in Rust: a metadata value that fills it loads."""
    prefix = '{"__metadata__":{"pad":"'
    text = prefix + "x" * (100_000_000 - len(prefix) - 3) + '"}}'
    path = tmp_path / "limit.safetensors"
    path.write_bytes(safetensors_bytes(text))
    assert rust_accepts(path.read_bytes())
    with safeckpt.safe_open(path) as f:
        assert len(f.metadata()["pad"]) == 100_000_000 - len(prefix) - 3


def test_messages_stay_short_whatever_the_header_holds(raw_file):
    long_name = "n" * 1_000_000
    path = raw_file({long_name: entry(dtype="x" * 1_000_000)}, b"x")
    with pytest.raises(errors.UnknownDTypeError) as info:
        safeckpt.load_file(path)
    assert info.value.tensor == long_name
    assert str(path) in str(info.value) and len(str(info.value)) < 2000


def test_lowercase_dtype_message_suggests_the_name(raw_file):
    with pytest.raises(errors.UnknownDTypeError, match="'BF16'"):
        safeckpt.load_file(raw_file({NAME: entry(dtype="bf16", shape=[0], offsets=[0, 0])}))


def test_messages_say_what_is_wrong(raw_file):
    """A few messages read in full: they name the fault, not just the class."""
    cases = [
        ({NAME: entry(offsets=[1, 2])}, b"xy", "1 bytes belong to no tensor"),
        ({NAME: entry()}, b"xyz", "2 trailing bytes"),
        ({OTHER: entry(shape=[2], offsets=[0, 2]), NAME: entry(offsets=[1, 2])}, b"xy", f"overlap tensor {OTHER!r}"),
        ({NAME: entry("U16", [1], [0, 1])}, b"x", "needs 2"),
        ('{"w":%s,"w":%s}' % (U8, U8), b"x", "'w' appears twice"),
    ]
    for header, data, fragment in cases:
        with pytest.raises(errors.HeaderError) as info:
            safeckpt.load_file(raw_file(header, data))
        assert fragment in str(info.value)


# --- files that are something else ------------------------------------------------

def _torch_zip(path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(2)}, path)


def _torch_legacy(path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)


def _gguf(path):
    """A GGUF v3 file with no tensors and one key, written by the spec: magic, version, counts, KV."""
    key, value = b"general.architecture", b"llama"
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", len(value)) + value
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv)


def _npy(path):
    with open(path, "wb") as out:
        np.save(out, np.arange(6, dtype=np.float32))


def _bytes(data: bytes):
    return lambda path: path.write_bytes(data)


LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
               b"size 1524\n")
HTML = (b"<!DOCTYPE html>\n<html lang=\"en\"><head><title>Hugging Face</title></head>"
        b"<body>Sign in to download this file</body></html>\n")

# id -> (make the file, .detected, a phrase of the advice)
OTHER_FORMATS = {
    "pickle-protocol-2": (_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2)), "pickle", "unless you trust its source"),
    "pickle-protocol-4": (_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4)), "pickle", "unless you trust its source"),
    "pickle-protocol-5-large": (_bytes(pickle.dumps({"w": bytes(1 << 16)}, protocol=5)), "pickle", "unless you trust its source"),
    "torch-zip": (_torch_zip, "zip", "unless you trust its source"),
    "torch-legacy": (_torch_legacy, "pickle", "unless you trust its source"),
    "git-lfs-pointer": (_bytes(LFS_POINTER), "git-lfs-pointer", "git lfs pull"),
    "html": (_bytes(HTML), "html", "download the file again"),
    "html-leading-newline": (_bytes(b"\n\n  <html><body>404</body></html>"), "html", "/resolve/"),
    "gguf": (_gguf, "gguf", "open_source"),
    "npy": (_npy, "npy", "open_source"),
}

def _other_format_params():
    params = []
    for fmt in OTHER_FORMATS:
        for entry_point in ENTRY_POINTS:
            params.append(pytest.param(fmt, entry_point, id=f"{fmt}-{entry_point}"))
    return params


@pytest.mark.parametrize("fmt, entry_point", _other_format_params())
def test_other_formats_are_named(tmp_path, fmt, entry_point):
    make, detected, advice = OTHER_FORMATS[fmt]
    path = tmp_path / "model.safetensors"  # the extension lies, as it does in the wild
    make(path)
    read, where = ENTRY_POINTS[entry_point]
    try:
        read(path)
    except errors.WrongFormatError as exc:
        assert exc.detected == detected
        assert where(path) in str(exc) and advice in str(exc)
        assert "not a safetensors file" in str(exc)
    else:
        pytest.fail(f"{fmt} opened as a safetensors file")


@pytest.mark.parametrize("fmt", OTHER_FORMATS)
def test_rust_implementation_rejects_other_formats(tmp_path, fmt):
    path = tmp_path / "f"
    OTHER_FORMATS[fmt][0](path)
    assert not rust_accepts(path.read_bytes())


def test_short_other_format_is_named_not_too_small(tmp_path):
    """A 4-byte file that starts with a zip signature is named as a zip, not just 'too small'."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"PK\x05\x06")
    with pytest.raises(errors.WrongFormatError) as info:
        safeckpt.load_file(path)
    assert info.value.detected == "zip"


# --- what we write, we can read ------------------------------------------------------

@pytest.mark.parametrize("shape, data", [((0, 2**63 - 1, 2**63 - 1), b""), ((1,) * 65, b"x"), ((-1, -1), b"x")],
                         ids=["overflow-behind-zero-dim", "65-dims", "negative-dims"])
def test_writer_refuses_shapes_the_reader_refuses(shape, data):
    """A RawTensor whose shape no header may hold is refused on save, not written and then refused on load."""
    with pytest.raises(errors.UnsupportedTensorError):
        safeckpt.save({"x": safeckpt.RawTensor("U8", shape, data)})
