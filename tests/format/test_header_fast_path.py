"""The fast path for headers in the layout writers emit makes exactly what the general path makes.

`header._read_canonical` reads compact headers (``__metadata__`` first, fields in
writer order, entries in offset order) without building the JSON document; anything
else must be left to `header._read_document`, which gives the precise error. Here
headers written by our writer (byte-identical to Hugging Face's) are edited a little
at random, and both paths must agree: the same tensors and metadata in the same
order, or the fast path declines (returns None).
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safeckpt import errors
from safeckpt.format import header
from safeckpt.format.dtypes import DTYPES


def _general(text: str, data_size: int):
    try:
        return header._read_document(text, data_size, "f")
    except errors.HeaderError as exc:
        return type(exc)


def _agree(text: str, data_size: int) -> None:
    fast = header._read_canonical(text, data_size, "f")
    general = _general(text, data_size)
    if fast is None:
        return
    assert not isinstance(general, type), f"fast path accepted what the general path refuses: {general}"
    assert list(fast[0].items()) == list(general[0].items())
    assert fast[1] == general[1]


def _written(tensors: list, metadata) -> tuple[str, int]:
    ordered = [(name, DTYPES[dtype], shape, header.tensor_nbytes(DTYPES[dtype], shape))
               for name, dtype, shape in tensors]
    raw, data_size = header.build_header(ordered, metadata)
    return raw[8:].decode("utf-8"), data_size


NAMES = st.text(st.characters(codec="utf-8"), min_size=0, max_size=8)
DTYPE_NAMES = st.sampled_from(["F32", "BF16", "U8", "I64", "BOOL", "F4", "F8_E4M3", "C64"])
SHAPES = st.lists(st.integers(0, 5), max_size=3).map(tuple)
METADATA = st.none() | st.dictionaries(NAMES, NAMES, max_size=3)

# Small edits of the header text: each may keep it valid, make it invalid, or leave the layout.
EDITS = [
    lambda t, r: t.replace('"data_offsets":[', '"data_offsets": [', 1),
    lambda t, r: t.replace('],"data_offsets"', '], "data_offsets"', 1),
    lambda t, r: " " + t,
    lambda t, r: t.rstrip() + "x",
    lambda t, r: t.replace('"dtype":"F32"', '"dtype":"f32"', 1),
    lambda t, r: t.replace('"shape":[', '"shape":[0', 1),
    lambda t, r: t.replace('"shape":[', '"shape":[-0,', 1),
    lambda t, r: t.replace('"shape":[', '"shape":[1' + "0" * 19 + ",", 1),
    lambda t, r: t.replace('"data_offsets":[0,', '"data_offsets":[00,', 1),
    lambda t, r: t.replace('"data_offsets":[0,', '"data_offsets":[1,', 1),
    lambda t, r: t.replace("]}", ",1]}", 1),
    lambda t, r: t.replace('"__metadata__"', '"__metadata__x"', 1),
    lambda t, r: t.replace('":{"dtype"', '\\u0041":{"dtype"', 1),
    lambda t, r: t.replace('{"dtype"', '{"shape":[],"dtype"', 1),
    lambda t, r: t.replace('"}', '\\ud800"}', 1),
    lambda t, r: t.replace("},", "}}", 1),
    lambda t, r: t.replace("},", "},,", 1),
    lambda t, r: _duplicate_first(t),
    lambda t, r: _swap_entries(t, r),
    lambda t, r: t[:r.randrange(len(t) + 1)],
    lambda t, r: t[:(i := r.randrange(len(t) + 1))] + r.choice('{}[]":,0 9\\') + t[i:],
]


def _entries(text: str) -> tuple[str, list[str]]:
    try:
        document = json.loads(text)
    except ValueError:  # an earlier edit broke it: nothing to reorder
        return "", []
    if not isinstance(document, dict):
        return "", []
    metadata = document.pop("__metadata__", None)
    head = "{" + ('"__metadata__":' + json.dumps(metadata, separators=(",", ":"), ensure_ascii=False) + ","
                  if metadata is not None else "")
    return head, [json.dumps({k: v}, separators=(",", ":"), ensure_ascii=False)[1:-1] for k, v in document.items()]


def _duplicate_first(text: str) -> str:
    head, entries = _entries(text)
    return head + ",".join(entries[:1] + entries) + "}" if entries else text


def _swap_entries(text: str, rng: random.Random) -> str:
    head, entries = _entries(text)
    rng.shuffle(entries)
    return head + ",".join(entries) + "}" if entries else text


@settings(max_examples=400, deadline=None)
@given(tensors=st.lists(st.tuples(NAMES, DTYPE_NAMES, SHAPES), max_size=6, unique_by=lambda t: t[0]),
       metadata=METADATA, seed=st.integers(0, 2**32 - 1), edits=st.integers(0, 3))
def test_the_fast_path_agrees_with_the_general_path(tensors, metadata, seed, edits) -> None:
    tensors = _whole_bytes(tensors)
    text, data_size = _written(tensors, metadata)
    if tensors and not any(set(name) & _ESCAPED for name, _, _ in tensors):  # writers' layout: fast
        assert header._read_canonical(text, data_size, "f") is not None
    rng = random.Random(seed)
    for _ in range(edits):
        text = rng.choice(EDITS)(text, rng) if text.strip().startswith("{") else text
    for size in (data_size, data_size + 1, max(0, data_size - 1)):
        _agree(text, size)


# Characters JSON writes escaped: a name holding one is left to the general path.
_ESCAPED = set('"\\') | {chr(c) for c in range(32)}


def _whole_bytes(tensors: list) -> list:
    kept = []
    for name, dtype, shape in tensors:
        if name == "__metadata__":
            continue
        try:
            header.tensor_nbytes(DTYPES[dtype], shape)
        except errors.HeaderError:
            continue
        kept.append((name, dtype, shape))
    return kept


@pytest.mark.parametrize("text", [
    '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}   \n',
    '{"__metadata__":null,"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
    '{"__metadata__":{"k":"v\\n\\"x\\""},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
    '{"z":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
])
def test_valid_layouts_take_the_fast_path(text: str) -> None:
    assert header._read_canonical(text, 1, "f") is not None
    _agree(text, 1)


@pytest.mark.parametrize("text, error", [
    ('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
     errors.DuplicateKeyError),
    ('{"__metadata__":{"k":"v","k":"w"},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,2]}}',
     errors.DuplicateKeyError),
    ('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
     errors.SizeMismatchError),
    ('{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
     None),  # valid, out of order: the general path sorts it
    ('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
     errors.HeaderJSONError),
    ('{"__metadata__":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', errors.MetadataError),
    ('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"__metadata__":{"dtype":"U8","shape":[0],'
     '"data_offsets":[2,2]}}', errors.MetadataError),
    ('{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', errors.SubByteSizeError),
    ('{"a":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,2]}}', errors.InvalidShapeError),
])
def test_every_other_header_goes_to_the_general_path(text: str, error) -> None:
    """The fast path declines; `parse_header` then gives the general path's precise error."""
    assert header._read_canonical(text, 2, "f") is None
    raw = text.encode()
    if error is None:
        assert list(header.parse_header(raw, 8 + len(raw) + 2).tensors) == ["b", "a"]
    else:
        with pytest.raises(error):
            header.parse_header(raw, 8 + len(raw) + 2)


def test_a_header_of_many_tensors_is_read() -> None:
    """Built as a writer lays it out: every tensor listed, in order, with the right offsets
    (the benchmarks time a million: `python -m benchmarks --only header`)."""
    n = 100_000
    text = "{" + ",".join(f'"layers.{i // 100}.t{i % 100}":{{"dtype":"U8","shape":[1],'
                          f'"data_offsets":[{i},{i + 1}]}}' for i in range(n)) + "}"
    raw = text.encode() + b" " * (-len(text) % 8)
    parsed = header.parse_header(raw, 8 + len(raw) + n)
    assert len(parsed.tensors) == n
    assert list(parsed.tensors)[-1] == "layers.999.t99"
    assert parsed.tensors["layers.999.t99"] == header.HeaderEntry("U8", (1,), (n - 1, n))
