"""Fuzzing: valid files, mutated at random, either read or fail with a SafeckptError.

Seeds are small files written by the real `safetensors` package and by
safeckpt. Each example applies a few mutations (bytes flipped or set anywhere,
a new length prefix, truncation, appended or spliced bytes, edits of the header
JSON text), then reads everything through every backend: keys, metadata, each
tensor, a random slice of each. Whatever happens must be a value or a
SafeckptError; nothing may escape from inside (ValueError, KeyError,
OverflowError, IndexError, MemoryError, RecursionError), no example may take
long, and a file of a few hundred bytes must never make us allocate much.

Where we accept a mutated file, the Rust implementation must accept it too,
with the same bytes for every tensor: we may be stricter than it, never looser.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import struct
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeckpt
from safeckpt import errors
from safeckpt.format.dtypes import DTYPES

safetensors = pytest.importorskip("safetensors", reason="the safetensors oracle is not installed")
st_numpy = pytest.importorskip("safetensors.numpy", reason="the safetensors oracle is not installed")
torch = pytest.importorskip("torch", reason="torch not installed")
st_torch = pytest.importorskip("safetensors.torch", reason="the safetensors oracle is not installed")

BACKENDS = ["mmap", "pread"]
# A file of a few hundred bytes: reading it may allocate a few copies of it, never this much.
MAX_PEAK_BYTES = 32 * 1024 * 1024

# The deadline (ms) only catches a mutant that hangs.
FUZZ = settings(max_examples=1000, deadline=10_000,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --- seeds --------------------------------------------------------------------

def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    f4 = np.array([0.5, -1.0, 6.0, 0.0, 1.5, -6.0, 2.0, 3.0], dtype=ml_dtypes.float4_e2m1fn).reshape(2, 4)
    return [
        st_numpy.save({"w": rng.standard_normal((2, 3)).astype(np.float32),
                       "ids": np.arange(3, dtype=np.int64),
                       "scale": np.array(1.5, dtype=np.float64),
                       "h": rng.standard_normal(4).astype(ml_dtypes.bfloat16)},
                      metadata={"format": "np", "step": "3"}),
        st_torch.save({"bf": torch.randn(2, 2, dtype=torch.bfloat16),
                       "f8": torch.zeros(4, dtype=torch.float8_e4m3fn),
                       "mask": torch.tensor([True, False, True]),
                       "empty": torch.zeros(0, 3),
                       "step": torch.tensor(7, dtype=torch.int16)},
                      metadata={"format": "pt"}),
        safeckpt.save({"q": f4,
                       "raw6": safeckpt.RawTensor("F6_E2M3", (4,), bytes([1, 2, 3])),
                       "c": np.array([1 + 2j, 3 - 4j], dtype=np.complex64),
                       "u": np.arange(6, dtype=np.uint16).reshape(3, 2),
                       "z": np.zeros((2, 0), dtype=np.float32)},
                      metadata={"a": "b", "é": "ü"}),
        safeckpt.save({"only": np.arange(5, dtype=np.int8)}),
        safeckpt.save({}),
    ]


SEEDS = _seeds()


# --- mutations ----------------------------------------------------------------

INTERESTING_LENGTHS = [0, 1, 2, 7, 8, 9, 64, 100_000_000, 100_000_001, 2**31, 2**32, 2**63, 2**64 - 1]
NUMBERS = ["0", "1", "-1", "2", "3", "7", "255", "256", "65535", "4294967296", "9223372036854775807",
           "9223372036854775808", "18446744073709551615", "18446744073709551616", "1.0", "1e2", "-0",
           "1E400", "0.5", "9" * 30, "4611686018427387904"]
STRINGS = [f'"{name}"' for name in DTYPES] + ['"f32"', '""', '"__metadata__"', '"dtype"', '"shape"',
                                              '"data_offsets"', '"\\ud800"', '"\\u0000"', '"x"']
TOKENS = [",", "[", "]", "{", "}", ":", '"', "null", "true", "NaN", "Infinity", " ", "\t", "\\", "\\u",
          '{"__metadata__":null}', '"shape":[1]', '"extra":1,', "0", "-", "\x00", "\ufeff", "é"]

_byte = st.integers(0, 255)
_pos = st.integers(0, 10**6)  # taken modulo the length it applies to

BYTE_OPS = st.one_of(
    st.tuples(st.just("flip"), _pos, st.integers(0, 7)),
    st.tuples(st.just("set"), _pos, _byte),
    st.tuples(st.just("prefix"), st.integers(0, 7), _byte),
    st.tuples(st.just("length"), st.sampled_from(INTERESTING_LENGTHS) | st.integers(0, 2**64 - 1)),
    st.tuples(st.just("length-delta"), st.integers(-9, 9)),
    st.tuples(st.just("data"), _pos, _byte),
    st.tuples(st.just("truncate"), _pos),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("insert"), _pos, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), _pos, st.integers(1, 8)),
)

TEXT_OPS = st.one_of(
    st.tuples(st.just("number"), _pos, st.sampled_from(NUMBERS) | st.integers(-10, 2**70).map(str)),
    st.tuples(st.just("string"), _pos, st.sampled_from(STRINGS)),
    st.tuples(st.just("delete-char"), _pos),
    st.tuples(st.just("insert-token"), _pos, st.sampled_from(TOKENS)),
    st.tuples(st.just("duplicate-entry"), _pos),
    st.tuples(st.just("drop-entry"), _pos),
    st.tuples(st.just("nest"), _pos, st.integers(1, 5000), st.sampled_from(["[", '{"a":'])),
)

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**65) | st.floats() | st.text(max_size=4)
    | st.sampled_from(list(DTYPES) + [[0], [2, 3], [0, 0], [1, 2], [2**62, 2**62], [0, 2**63 - 1], [3]]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=2),
    max_leaves=6)

STRUCT_OPS = st.one_of(
    st.tuples(st.just("set-field"), _pos, st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
              JSON_VALUES),
    st.tuples(st.just("set-dtype"), _pos, st.sampled_from(list(DTYPES))),
    st.tuples(st.just("set-shape"), _pos, st.lists(st.integers(0, 9) | st.sampled_from([2**31, 2**62, 2**63 - 1]),
                                                   max_size=4)),
    st.tuples(st.just("shift-offsets"), _pos, st.integers(-3, 3), st.integers(-3, 3)),
    st.tuples(st.just("swap-offsets"), _pos, _pos),
    st.tuples(st.just("set-metadata"), JSON_VALUES),
    st.tuples(st.just("set-entry"), _pos, JSON_VALUES),
)

_ENTRY = re.compile(r'"(?:[^"\\]|\\.)*":\{[^{}]*\}')
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _split(data: bytes) -> tuple[int, bytes, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return length, data[8:8 + length], data[8 + length:]


def apply_byte_op(data: bytes, op) -> bytes:
    kind, *args = op
    buf = bytearray(data)
    if kind == "flip" and buf:
        pos, bit = args[0] % len(buf), args[1]
        buf[pos] ^= 1 << bit
    elif kind == "set" and buf:
        buf[args[0] % len(buf)] = args[1]
    elif kind == "prefix" and len(buf) >= 8:
        buf[args[0]] = args[1]
    elif kind == "length" and len(buf) >= 8:
        buf[:8] = struct.pack("<Q", args[0])
    elif kind == "length-delta" and len(buf) >= 8:
        buf[:8] = struct.pack("<Q", (_split(data)[0] + args[0]) % 2**64)
    elif kind == "data" and len(buf) >= 8:
        length, _, rest = _split(data)
        if rest:
            buf[8 + length + args[0] % len(rest)] = args[1]
    elif kind == "truncate":
        del buf[args[0] % (len(buf) + 1):]
    elif kind == "append":
        buf += args[0]
    elif kind == "insert":
        at = args[0] % (len(buf) + 1)
        buf[at:at] = args[1]
    elif kind == "delete" and buf:
        at = args[0] % len(buf)
        del buf[at:at + args[1]]
    return bytes(buf)


def _pick(pattern: re.Pattern, text: str, which: int):
    found = list(pattern.finditer(text))
    return found[which % len(found)] if found else None


def apply_text_op(text: str, op) -> str:
    kind, *args = op
    if kind in ("number", "string"):
        match = _pick(_NUMBER if kind == "number" else _STRING, text, args[0])
        if match:
            text = text[:match.start()] + args[1] + text[match.end():]
    elif kind == "delete-char" and text:
        at = args[0] % len(text)
        text = text[:at] + text[at + 1:]
    elif kind == "insert-token":
        at = args[0] % (len(text) + 1)
        text = text[:at] + args[1] + text[at:]
    elif kind == "duplicate-entry":
        match = _pick(_ENTRY, text, args[0])
        if match:
            text = text[:match.end()] + "," + match.group() + text[match.end():]
    elif kind == "drop-entry":
        match = _pick(_ENTRY, text, args[0])
        if match:
            text = text[:match.start()] + text[match.end():]
            text = text.replace(",,", ",").replace("{,", "{").replace(",}", "}")
    elif kind == "nest":
        at = args[0] % (len(text) + 1)
        text = text[:at] + args[2] * args[1] + text[at:]
    return text


def apply_struct_op(header: dict, op) -> None:
    kind, *args = op
    names = [name for name in header if name != "__metadata__"]
    if kind == "set-metadata":
        header["__metadata__"] = args[0]
        return
    if not names:
        return
    name = names[args[0] % len(names)]
    entry = header[name]
    if kind == "set-entry":
        header[name] = args[1]
    elif not isinstance(entry, dict):
        return
    elif kind == "set-field":
        entry[args[1]] = args[2]
    elif kind == "set-dtype":
        entry["dtype"] = args[1]
    elif kind == "set-shape":
        entry["shape"] = args[1]
    elif kind == "shift-offsets":
        offsets = entry.get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
            entry["data_offsets"] = [offsets[0] + args[1], offsets[1] + args[2]]
    elif kind == "swap-offsets":
        other = header[names[args[1] % len(names)]]
        if isinstance(other, dict) and "data_offsets" in other and "data_offsets" in entry:
            entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]


def edit_header(data: bytes, ops, keep_length: bool, struct_ops=()) -> bytes:
    length, raw, rest = _split(data)
    text = raw.decode("utf-8")
    if struct_ops:
        header = json.loads(text)
        for op in struct_ops:
            apply_struct_op(header, op)
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    for op in ops:
        text = apply_text_op(text, op)
    header = text.encode("utf-8", "surrogatepass")
    prefix = data[:8] if keep_length else struct.pack("<Q", len(header))
    return prefix + header + rest


# --- reading everything ---------------------------------------------------------

def random_index(shape, rng: random.Random, negative_steps: bool = True):
    """A basic index for `shape`, usually valid, sometimes out of range."""
    items = []
    steps = [None, 1, 2, -1, -3] if negative_steps else [None, 1, 2, 3]
    for dim in shape[:rng.randint(0, len(shape))]:
        if dim and rng.random() < 0.4:
            items.append(rng.randrange(-dim, dim))
        else:
            start, stop = (rng.choice([None, rng.randint(-dim - 2, dim + 2)]) for _ in range(2))
            items.append(slice(start, stop, rng.choice(steps)))
    if rng.random() < 0.05:
        items.append(rng.choice([0, 10**20, -10**20]))
    if rng.random() < 0.2:
        items.insert(rng.randint(0, len(items)), Ellipsis)
    return tuple(items)


def read_everything(path, backend: str, framework: str, rng: random.Random):
    """Metadata and every tensor (bytes for numpy); None if the file was refused.

    A tensor the framework has no type for (torch and F6, say) is skipped.
    """
    try:
        with safeckpt.safe_open(path, framework=framework, backend=backend) as f:
            metadata = f.metadata()
            assert sorted(f.offset_keys()) == f.keys()
            tensors = {}
            for name in f.keys():
                view = f.get_slice(name)
                try:
                    tensor = f.get_tensor(name)
                except errors.DTypeConversionError:
                    assert framework != "numpy"
                    continue
                try:
                    view[random_index(view.get_shape(), rng, negative_steps=True)]
                except errors.SliceError:
                    pass
                except errors.DTypeConversionError:  # F6 values straddle bytes; torch's F4 pairs them
                    assert view.get_dtype().startswith("F6") or framework != "numpy"
                tensors[name] = tensor.tobytes() if framework == "numpy" else tensor.clone()
            return metadata, tensors
    except errors.HeaderError as exc:
        assert str(path) in str(exc), str(exc)
        return None


_counter = itertools.count()


def check_mutant(directory, data: bytes, seed: int) -> None:
    """Read `data` every way; only values or SafeckptErrors; small peak memory; never looser than Rust."""
    path = directory / f"mutant{next(_counter)}.safetensors"
    path.write_bytes(data)
    try:
        tracemalloc.start()
        try:
            results = [read_everything(path, backend, "numpy", random.Random(seed)) for backend in BACKENDS]
            read_everything(path, "mmap", "torch", random.Random(seed))
            try:
                in_memory = safeckpt.load(data)
            except errors.SafeckptError:
                in_memory = None
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < MAX_PEAK_BYTES, f"reading a {len(data)}-byte file allocated {peak} bytes"
        accepted = [result is not None for result in results] + [in_memory is not None]
        assert len(set(accepted)) == 1, "entry points disagree on whether the file is valid"
        if results[0] is None:
            return
        assert results[0] == results[1]
        _, tensors = results[0]
        assert {name: array.tobytes() for name, array in in_memory.items()} == tensors
        # Never looser than the Rust implementation: what we accept, it accepts, with the same bytes.
        theirs = dict(safetensors.deserialize(data))
        assert sorted(theirs) == sorted(tensors)
        with safeckpt.SafetensorsFile(path) as f:
            for name, spec in theirs.items():
                assert f.storage(name).tobytes() == bytes(spec["data"])
                assert list(f.info(name).shape) == spec["shape"] and f.info(name).dtype == spec["dtype"]
    finally:
        path.unlink()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def test_seeds_are_valid_everywhere(scratch):
    for index, data in enumerate(SEEDS):
        assert safetensors.deserialize(data) is not None
        check_mutant(scratch, data, index)


@FUZZ
@given(seed=st.sampled_from(range(len(SEEDS))), ops=st.lists(BYTE_OPS, min_size=1, max_size=4),
       rng_seed=st.integers(0, 2**32))
def test_byte_mutations(scratch, seed, ops, rng_seed):
    data = SEEDS[seed]
    for op in ops:
        data = apply_byte_op(data, op)
    check_mutant(scratch, data, rng_seed)


@FUZZ
@given(seed=st.sampled_from(range(len(SEEDS))), ops=st.lists(TEXT_OPS, min_size=1, max_size=4),
       keep_length=st.booleans(), rng_seed=st.integers(0, 2**32))
def test_header_text_mutations(scratch, seed, ops, keep_length, rng_seed):
    check_mutant(scratch, edit_header(SEEDS[seed], ops, keep_length), rng_seed)


@FUZZ
@given(seed=st.sampled_from(range(len(SEEDS))), struct_ops=st.lists(STRUCT_OPS, min_size=1, max_size=3),
       rng_seed=st.integers(0, 2**32))
def test_header_value_mutations(scratch, seed, struct_ops, rng_seed):
    """Well-formed JSON with wrong values: types, dtypes, shapes, offsets, metadata."""
    check_mutant(scratch, edit_header(SEEDS[seed], [], keep_length=False, struct_ops=struct_ops), rng_seed)


@FUZZ
@given(seed=st.sampled_from(range(len(SEEDS))), text_ops=st.lists(TEXT_OPS, max_size=2),
       byte_ops=st.lists(BYTE_OPS, max_size=2), rng_seed=st.integers(0, 2**32))
def test_mixed_mutations(scratch, seed, text_ops, byte_ops, rng_seed):
    data = edit_header(SEEDS[seed], text_ops, keep_length=False)
    for op in byte_ops:
        data = apply_byte_op(data, op)
    check_mutant(scratch, data, rng_seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_f6_slice_is_refused_cleanly(raw_file, backend):
    """F6 values straddle bytes; a slice must be a clear SafeckptError, not an IndexError from numpy."""
    path = raw_file({"x": {"dtype": "F6_E2M3", "shape": [2, 4], "data_offsets": [0, 6]}}, bytes(range(6)))
    with safeckpt.safe_open(path, backend=backend) as f:
        with pytest.raises(errors.SafeckptError):
            f.get_slice("x")[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_reversed_one_element_slice(tmp_path, backend):
    """Found by the fuzzer: w[0, 2:1:-1] is one element; numpy flags it contiguous with stride -4."""
    path = tmp_path / "w.safetensors"
    safeckpt.save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, path)
    with safeckpt.safe_open(path, framework="pt", backend=backend) as f:
        got = f.get_slice("w")[0, 2:1:-1]
    assert got.tolist() == [2.0]
