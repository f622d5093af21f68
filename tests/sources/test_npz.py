"""numpy .npy/.npz files as sources: real files from numpy.save/savez, hostile ones by hand."""

from __future__ import annotations

import io
import json
import mmap
import os
import pickle
import struct
import tracemalloc
import zipfile

import ml_dtypes
import numpy as np
import pytest

from safeckpt.errors import SafeckptError, SourceError, TensorNotFoundError
from safeckpt.sources.npz import (MAX_HEADER_SIZE, NpyHeader, NpySource, NpzSource, is_npy,
                                  numpy_header, read_npy_header)

PLAIN = {  # numpy dtype -> safetensors dtype
    "bool": "BOOL", "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
    "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "float16": "F16", "float32": "F32", "float64": "F64", "complex64": "C64",
}


def sample(dtype, shape=(3, 4), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape) * 100
    if np.dtype(dtype).kind == "c":
        values = values + 1j * rng.standard_normal(shape)
    return values.astype(dtype)


def npy_bytes(header: "str | bytes", data: bytes = b"", version=(1, 0)) -> bytes:
    """An npy file made byte by byte (the header is used as given, not padded)."""
    if isinstance(header, str):
        raw = header.encode("utf-8" if version == (3, 0) else "latin-1")
    else:
        raw = header
    length = struct.pack("<H" if version == (1, 0) else "<I", len(raw))
    return b"\x93NUMPY" + bytes(version) + length + raw + data


def npy_header(descr="'<f4'", fortran="False", shape="(2,)") -> str:
    return f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}\n"


def check_same(source, name, expected):
    got = source.read(name)
    assert not got.flags.writeable
    assert got.dtype == expected.dtype.newbyteorder("<") or got.dtype == expected.dtype
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


# --- real files -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", sorted(PLAIN))
@pytest.mark.parametrize("order", ["<", ">"])
def test_every_plain_dtype_equals_numpy_load(tmp_path, dtype, order):
    array = sample(np.dtype(dtype).newbyteorder(order) if np.dtype(dtype).itemsize > 1 else dtype)
    path = tmp_path / "weights.npy"
    np.save(path, array)
    with NpySource(path) as src:
        assert src.keys() == ["weights"]
        assert src["weights"] == (PLAIN[dtype], (3, 4), array.nbytes)
        check_same(src, "weights", np.load(path))
        assert src.read("weights").dtype.byteorder in "<|="  # big-endian comes back swapped
        assert src.format == "npy" and src.globals == [] and src.pickle_findings == []


def test_little_endian_data_is_a_zero_copy_view_of_the_file(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(1000, dtype=np.float32))
    with NpySource(path) as src:
        a, b = src.read("a"), src.read("a")
        assert not a.flags.owndata and np.shares_memory(a, b)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (2, 3, 4)])
def test_zero_d_and_zero_size_arrays(tmp_path, shape):
    array = np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape)
    path = tmp_path / "x.npy"
    np.save(path, array)
    with NpySource(path) as src:
        assert src["x"].shape == shape
        check_same(src, "x", np.load(path))


@pytest.mark.parametrize("dtype", ["<f8", ">i4", "<c8"])
def test_fortran_order_gives_the_logical_array(tmp_path, dtype):
    array = np.asfortranarray(sample(dtype, (2, 3, 5)))
    path = tmp_path / "f.npy"
    np.save(path, array)
    assert b"'fortran_order': True" in path.read_bytes()[:128]
    with NpySource(path) as src:
        check_same(src, "f", np.load(path))
        assert "Fortran" in src.describe()


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_every_format_version(tmp_path, version):
    array = sample("float32")
    path = tmp_path / "v.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array(f, array, version=version)
    with NpySource(path) as src:
        check_same(src, "v", array)


def test_python2_header_with_long_ints_and_16_byte_alignment(tmp_path):
    data = np.arange(6, dtype="<i8").tobytes()
    header = "{'descr': '<i8', 'fortran_order': False, 'shape': (2L, 3L), }"
    header += " " * (-(len(header) + 11) % 16) + "\n"
    path = tmp_path / "py2.npy"
    path.write_bytes(npy_bytes(header, data))
    with pytest.warns(UserWarning, match="Python 2"):
        assert np.load(path).shape == (2, 3)  # numpy reads it too
    with NpySource(path) as src:
        check_same(src, "py2", np.arange(6).reshape(2, 3))


def test_read_npy_header_and_is_npy():
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 4), np.float32))
    data = b"junk" + buf.getvalue()
    assert is_npy(data[4:]) and not is_npy(data) and not is_npy(b"\x93NUMP")
    h = read_npy_header(data, 4, "mem", "a")
    assert h == NpyHeader(np.dtype("float32"), (3, 4), False, 4 + 128)
    assert h.nbytes == 48


def test_empty_stem_is_named_array(tmp_path):
    path = tmp_path / ".npy"
    np.save(path, np.ones(2))
    with NpySource(path) as src:
        assert src.keys() == ["array"]


# --- not tensors ------------------------------------------------------------------------

@pytest.mark.parametrize("array, why", [
    (np.zeros(2, [("a", "<f4"), ("b", "<i4", (2,))]), "structured"),
    (np.array(["ab", "c"]), "text strings"),
    (np.array([b"ab", b"c"]), "byte strings"),
    (np.array(["2024-01-01"], dtype="M8[D]"), "datetimes"),
    (np.zeros(3, np.complex128), "complex128"),
    (np.zeros(2, ml_dtypes.bfloat16), "bfloat16"),
])
def test_other_dtypes_are_described_not_read(tmp_path, array, why):
    path = tmp_path / "odd.npy"
    np.save(path, array)
    with NpySource(path) as src:
        assert len(src) == 0
        assert any(why in note for note in src.notes)
        assert src.tree["shape"] == list(array.shape)
        if array.dtype.kind == "U":
            assert src.tree["values"] == array.tolist()
        if array.dtype.kind == "S":  # bytes are summarised, as everywhere in trees
            assert src.tree["values"][0] == {"__bytes__": 2, "head": b"ab".hex()}


# --- object arrays: through the restricted pickle machine ---------------------------------

def test_object_array_of_arrays_and_a_dict(tmp_path):
    inner = {"w": sample("float32", (2, 2)), "step": 7, "name": "run", "big": sample(">i8", (3,))}
    array = np.empty(3, dtype=object)
    array[0], array[1], array[2] = sample("float64", (4,)), inner, "text"
    path = tmp_path / "obj.npy"
    np.save(path, array, allow_pickle=True)
    expected = np.load(path, allow_pickle=True)  # benign file made here: numpy is the oracle
    with NpySource(path) as src:
        assert set(src) == {"0", "1.w", "1.big"}
        check_same(src, "0", expected[0])
        check_same(src, "1.w", expected[1]["w"])
        check_same(src, "1.big", expected[1]["big"])
        assert src.tree == [
            {"__tensor__": "0"},
            {"w": {"__tensor__": "1.w"}, "step": 7, "name": "run", "big": {"__tensor__": "1.big"}},
            "text"]
        assert src.globals and all(g.allowed for g in src.globals)
        assert "obj" in src.pickles


def test_pickled_dict_and_shared_arrays(tmp_path):
    shared = np.arange(5, dtype=np.float32)
    path = tmp_path / "d.npy"
    np.save(path, {"a": shared, "b": shared, "nested": [shared[:2]]}, allow_pickle=True)
    with NpySource(path) as src:
        assert set(src) == {"a", "b", "nested.0"}
        assert src.aliases == {"b": "a"}
        check_same(src, "b", shared)


def test_two_d_object_array_in_fortran_order(tmp_path):
    array = np.asfortranarray(np.array([["a", 1], [2.5, None]], dtype=object))
    path = tmp_path / "o2.npy"
    np.save(path, array, allow_pickle=True)
    with NpySource(path) as src:
        assert src.tree == np.load(path, allow_pickle=True).tolist()


def canary_pickle(canary) -> list[tuple[str, bytes]]:
    """Hostile pickles whose execution would create `canary`."""
    cmd = f"touch {canary}".encode()
    code = f"open({str(canary)!r}, 'w').close()".encode()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    array = np.empty(1, dtype=object)
    array[0] = {"w": np.ones(2, np.float32), "payload": Evil()}
    return [
        ("os.system", b"cos\nsystem\n(S'" + cmd + b"'\ntR."),
        ("builtins.exec", b"c__builtin__\nexec\n(S'" + code + b"'\ntR."),
        ("posix.system", pickle.dumps(array, protocol=3)),
    ]


@pytest.mark.parametrize("index", range(3))
def test_malicious_object_array_does_not_run_and_is_reported(tmp_path, index):
    canary = tmp_path / "canary"
    qualname, payload = canary_pickle(canary)[index]
    path = tmp_path / "evil.npy"
    path.write_bytes(npy_bytes(npy_header("'|O'", shape="(1,)"), payload))
    with NpySource(path) as src:
        assert [f"{g.module}.{g.name}" for g in src.globals if not g.allowed] == [qualname]
        assert f'"__object__": "{qualname}"' in json.dumps(src.tree)  # what it wanted to call, as data
        assert src.keys() == (["0.w"] if index == 2 else [])
    assert not canary.exists()


def test_a_pickle_hidden_after_the_first_stop_is_reported(tmp_path):
    canary = tmp_path / "canary"
    path = tmp_path / "hide.npy"
    benign = pickle.dumps(np.array([1, "x"], dtype=object), protocol=2)
    path.write_bytes(npy_bytes(npy_header("'|O'", shape="(2,)"), benign + canary_pickle(canary)[0][1]))
    with NpySource(path) as src:
        assert src.tree == [1, "x"]
        assert ("os", "system", False) in [(g.module, g.name, g.allowed) for g in src.globals]
        assert any("numpy never reads them" in f for f in src.pickle_findings)
    assert not canary.exists()


# --- hostile npy files ----------------------------------------------------------------------

def real_npy(array=None, **kwargs) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.arange(12, dtype=np.float32).reshape(3, 4) if array is None else array, **kwargs)
    return buf.getvalue()


def open_bad(tmp_path, data: bytes, match: str, **kwargs) -> SourceError:
    path = tmp_path / "bad.npy"
    path.write_bytes(data)
    with pytest.raises(SourceError, match=match) as info:
        NpySource(path, **kwargs).close()
    assert str(path) in str(info.value)
    return info.value


def test_truncated_at_every_point(tmp_path):
    for data in (real_npy(), real_npy(np.array([{"a": 1}], dtype=object), allow_pickle=True)):
        for cut in range(1, len(data)):
            path = tmp_path / "cut.npy"
            path.write_bytes(data[:cut])
            with pytest.raises(SourceError):
                NpySource(path).close()


# numpy's reader (numpy.lib.format, the one numpy.load uses) reads the header; what it
# refuses is refused with its reason, and so is a shape no array can have.
@pytest.mark.parametrize("header, data, match", [
    (npy_header(), b"\0" * 4, "needs 8 bytes of data"),
    (npy_header(), b"\0" * 12, "4 bytes follow"),
    (npy_header(shape="(2**40,)"), b"", "numpy refuses the npy header: malformed node"),
    (npy_header(shape="(4611686018427387904, 4611686018427387904)"), b"", "larger than any array"),
    (npy_header(shape="(0, 99999999999999999999)"), b"", "larger than any array"),
    (npy_header(shape="(1000000000000,)"), b"\0" * 8, "needs 4000000000000 bytes"),
    (npy_header(shape="[2]"), b"", "shape is not valid: \\[2\\]"),
    (npy_header(shape="(-1,)"), b"", "negative"),
    (npy_header(shape="(1.5,)"), b"", "shape is not valid: \\(1.5,\\)"),
    (npy_header(shape="(True,)"), b"", "not a tuple of ints"),
    (npy_header(shape="(" + "1," * 65 + ")"), b"", "65 dimensions"),
    (npy_header(fortran="'no'"), b"", "fortran_order is not a valid bool: 'no'"),
    (npy_header(fortran="1"), b"", "fortran_order is not a valid bool: 1"),
    (npy_header(descr="5"), b"", "not a valid dtype descriptor: 5"),
    (npy_header(descr="'<f3'"), b"", "not a valid dtype descriptor: '<f3'"),
    (npy_header(descr="[('a', 7)]"), b"", "not a valid dtype descriptor"),
    (npy_header(descr="'" + "f" * 100 + "'"), b"", "not a valid dtype descriptor"),
    ("[1, 2]\n", b"", "not a dictionary: \\[1, 2\\]"),
    ("'descr'\n", b"", "not a dictionary: 'descr'"),
    ("{'descr': '<f4', 'shape': (2,)}\n", b"", "correct keys: \\['descr', 'shape'\\]"),
    (npy_header()[:-3] + "'x': 1}\n", b"", "correct keys: .*'x'"),
    ("{'descr': __import__('os').system('touch x'), 'fortran_order': False, 'shape': (2,)}", b"",
     "numpy refuses the npy header: malformed node or string on line 1: Call"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (1+1,)}", b"", "malformed node"),
    ("{'descr': '<f4' 'fortran_order': False}", b"", "Cannot parse header"),
    ("{'descr': '<f4", b"", "numpy refuses the npy header"),
    ("{'descr': '\\q'}", b"", "correct keys"),
    ("(" * 40 + ")" * 40, b"", "not a dictionary: \\(\\)"),
    ("{(1, [2]): 3}", b"", "unhashable"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': {1, 2}}", b"", "correct keys"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), } trailing", b"", "Cannot parse header"),
])
def test_bad_headers(tmp_path, header, data, match):
    error = open_bad(tmp_path, npy_bytes(header, data), match)
    assert "\n" not in str(error)
    if "numpy refuses" in str(error):  # numpy.load refuses it too (not always with a ValueError)
        with pytest.raises(Exception):  # noqa: B017, PT011
            np.load(tmp_path / "bad.npy")


def test_a_repeated_header_key_counts_once_as_in_numpy(tmp_path):
    header = "{'descr': '|O', 'descr': '<f4', 'fortran_order': False, 'shape': (2,)}\n"
    path = tmp_path / "twice.npy"
    path.write_bytes(npy_bytes(header, np.float32([1, 2]).tobytes()))
    with NpySource(path) as src:  # the last value counts, for numpy.load and for the scan too
        check_same(src, "twice", np.load(path))


@pytest.mark.parametrize("header", [
    "-" * 60_000 + "1",  # the parser's own stack (MemoryError)
    "a" + ".a" * 30_000,  # the compiler's recursion limit (RecursionError)
    "(" * 30_000,  # Python 2 header clean-up on versions 1.0 and 2.0 (tokenize.TokenError)
    "lambda: " * 8000 + "1",
    "{'descr': " + "[('a', " * 190 + "'<f4'" + ")]" * 190 + ", 'fortran_order': False, 'shape': (1,)}",
])
@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_headers_made_to_exhaust_the_parser_fail_in_one_line(tmp_path, header, version):
    error = open_bad(tmp_path, npy_bytes(header, version=version), "numpy refuses the npy header")
    assert "\n" not in str(error) and len(str(error)) < 600


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
@pytest.mark.parametrize("array", [np.zeros((3, 4), "<f4"), np.asfortranarray(np.ones((2, 3), ">i2")),
                                   np.zeros(2, [("a", "<f4"), ("b", "<i8", (2,))])])
def test_numpy_header_is_what_numpy_load_reads(tmp_path, version, array):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version)
    data = b"junk" + buf.getvalue()
    h = numpy_header(data, 4)
    assert h.dtype == array.dtype and h.shape == array.shape
    assert h.fortran_order == (array.flags.f_contiguous and not array.flags.c_contiguous)
    assert h.data_offset == len(data) - array.nbytes


def test_a_python2_header_warns_as_numpy_load_does():
    header = "{'descr': '<i8', 'fortran_order': False, 'shape': (2L, 3L), }\n"
    with pytest.warns(UserWarning, match="Python 2"):
        assert numpy_header(npy_bytes(header)).shape == (2, 3)


def test_numpy_header_leaves_no_view_into_a_mapping(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.ones(2))
    good = path.read_bytes()
    path.write_bytes(good + npy_bytes("[1, 2]\n"))
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    assert numpy_header(mapping).shape == (2,)
    with pytest.raises(ValueError, match="not a dictionary"):
        numpy_header(mapping, len(good))
    mapping.close()  # BufferError if a view were left


def test_a_malformed_object_pickle_is_a_clear_error_that_keeps_the_globals(tmp_path):
    data = npy_bytes(npy_header("'|O'", shape="(1,)"), b"cos\nsystem\n(S'echo'\ntR")  # no STOP
    error = open_bad(tmp_path, data, "object array's pickle is unreadable.*without STOP")
    assert [(g.module, g.name, g.allowed) for g in error.globals] == [("os", "system", False)]


def test_reading_after_close_is_a_clear_error(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.ones(2))
    src = NpySource(path)
    src.close()
    with pytest.raises(SourceError, match="closed"):
        src.read("a")


def test_version_3_headers_are_utf8_and_only_ascii_digits_count(tmp_path):
    path = tmp_path / "ok.npy"
    path.write_bytes(npy_bytes(npy_header(descr="[(u'gewicht\u00e9', '<f4')]", shape="(1,)"),
                               b"\0" * 4, version=(3, 0)))
    with NpySource(path) as src:
        assert "gewicht\u00e9" in src.tree["__array__"]
    open_bad(tmp_path, npy_bytes(npy_header(shape="(\u0663,)"), version=(3, 0)), "Cannot parse header")


def test_header_length_past_the_file(tmp_path):
    data = real_npy()
    lie = data[:8] + struct.pack("<H", 60_000) + data[10:]
    open_bad(tmp_path, lie, "claims 60000 bytes but only")


def test_header_size_limit_says_how_to_lift_it(tmp_path):
    header = npy_header()[:-1] + " " * MAX_HEADER_SIZE + "\n"
    data = npy_bytes(header, np.zeros(2, np.float32).tobytes(), version=(2, 0))
    error = open_bad(tmp_path, data, "pass max_header_size=")
    assert f"max_header_size={len(header)}" in str(error)
    with NpySource(tmp_path / "bad.npy", max_header_size=len(header)) as src:
        assert src["bad"].shape == (2,)


@pytest.mark.parametrize("data, match", [
    (b"\x93NUMPY\x07\x00", "version 7.0"),
    (b"\x93NUMPX\x01\x00\x00\x00", "not an npy array"),
    (b"\x93NUMPY\x03\x00" + struct.pack("<I", 3) + b"\xff\xfe}", "not valid utf-8"),
])
def test_bad_magic_and_versions(tmp_path, data, match):
    open_bad(tmp_path, data, match)


def test_unknown_tensor_name(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.ones(2))
    with NpySource(path) as src, pytest.raises(TensorNotFoundError):
        src.read("b")


# --- npz ------------------------------------------------------------------------------------

@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_equals_numpy_load(tmp_path, save):
    arrays = {name: sample(name) for name in PLAIN}
    arrays.update(big=sample(">f8"), fortran=np.asfortranarray(sample("<i4", (3, 5))),
                  scalar=np.array(3.5), empty=np.zeros((0, 3), np.uint8))
    arrays["layers/0.weight"] = sample("float16", (2, 2))
    path = tmp_path / "w.npz"
    save(path, **arrays)
    with NpzSource(path) as src, np.load(path) as expected:
        assert set(src) == set(arrays)
        for name in arrays:
            check_same(src, name, expected[name])
            assert src[name].dtype == PLAIN.get(name, src[name].dtype)
        assert src.tree["big"] == {"__tensor__": "big"}
        assert ("compressed" in src.describe()) == (save is np.savez_compressed)
        assert src.zip_findings == []
        if save is np.savez:  # stored members are views of the mapped file
            assert not src.read("float32").flags.owndata


def test_npz_object_string_and_structured_members(tmp_path):
    path = tmp_path / "mixed.npz"
    np.savez(path, w=np.ones(3, np.float32), names=np.array(["a", "bc"]),
             rec=np.zeros(2, [("x", "<f4")]), obj=np.array({"m": np.arange(4.0), "lr": 0.1}, dtype=object))
    with NpzSource(path) as src, np.load(path, allow_pickle=True) as expected:
        assert set(src) == {"w", "obj.m"}
        check_same(src, "obj.m", expected["obj"].item()["m"])
        assert src.tree["names"]["values"] == ["a", "bc"]
        assert src.tree["obj"] == {"m": {"__tensor__": "obj.m"}, "lr": 0.1}
        assert "[('x', '<f4')]" in src.tree["rec"]["__array__"]
        assert all(g.allowed for g in src.globals) and "obj" in src.pickles
        json.dumps(src.tree)


def test_npz_member_that_is_not_npy(tmp_path):
    path = tmp_path / "extra.npz"
    with zipfile.ZipFile(path, "w") as z:
        with z.open("w.npy", "w") as f:
            np.save(f, np.arange(3))
        z.writestr("readme.txt", "hello")
        z.writestr("fake.npy", b"not an array at all")
    with NpzSource(path) as src:
        assert src.keys() == ["w"]
        assert src.tree["readme.txt"]["__member__"] == "readme.txt"
        assert src.tree["fake"]["size"] == 19
        assert sum("not an npy array" in n for n in src.notes) == 2


def test_npz_malicious_object_member(tmp_path):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.npz"
    for qualname, payload in canary_pickle(canary)[:2]:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("ok.npy", real_npy())
            z.writestr("evil.npy", npy_bytes(npy_header("'|O'", shape="(1,)"), payload))
        with NpzSource(path) as src:
            assert [f"{g.module}.{g.name}" for g in src.globals if not g.allowed] == [qualname]
            assert src.keys() == ["ok"]
    assert not canary.exists()


def test_npz_bad_member_header_names_the_member(tmp_path):
    path = tmp_path / "bad.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("w.npy", npy_bytes(npy_header(shape="(5,)"), b"\0" * 8))
    with pytest.raises(SourceError, match="'w'.*needs 20 bytes"):
        NpzSource(path)


def patch_sizes(data: bytearray, size: int) -> None:
    """Set every header's uncompressed size field (zipfile wrote one member)."""
    local = data.index(b"PK\x03\x04")
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, size)
    struct.pack_into("<I", data, central + 24, size)


def test_npz_zip_bomb_is_bounded(tmp_path):
    # The header says 2 float64 (16 bytes) and the sizes agree; the deflate stream
    # holds 64 MiB more. Reading stops at the declared size.
    member = npy_bytes(npy_header("'<f8'", shape="(2,)"), b"\0" * (64 << 20))
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", member)
    data = bytearray(path.read_bytes())
    assert len(data) < 1 << 20
    patch_sizes(data, len(member) - (64 << 20) + 16)
    path.write_bytes(bytes(data))
    with NpzSource(path) as src:
        assert src["x"].shape == (2,)
        with pytest.raises(SourceError, match="more than its declared"):
            src.read("x")


def test_npz_declared_size_beyond_deflate_ratio(tmp_path):
    path = tmp_path / "lie.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", real_npy(np.zeros(4, np.float64)))
    data = bytearray(path.read_bytes())
    patch_sizes(data, 0xFFFF_FFF0)
    path.write_bytes(bytes(data))
    with pytest.raises(SafeckptError):
        with NpzSource(path) as src:
            src.read("x")


def test_npz_corrupt_deflate_stream(tmp_path):
    path = tmp_path / "corrupt.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", real_npy())
    data = bytearray(path.read_bytes())
    start = data.index(b"x.npy") + 5
    data[start:start + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(SourceError):
        NpzSource(path)


def test_npz_truncated_at_many_points(tmp_path):
    buf = io.BytesIO()
    np.savez_compressed(buf, a=np.arange(10), b=np.ones((2, 2)))
    data = buf.getvalue()
    path = tmp_path / "cut.npz"
    for cut in range(1, len(data), 7):
        path.write_bytes(data[:cut])
        with pytest.raises(SafeckptError):
            NpzSource(path).close()


def test_npz_duplicate_member_names_are_kept_apart(tmp_path):
    path = tmp_path / "dup.npz"
    with pytest.warns(UserWarning):
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("a.npy", real_npy(np.ones(2)))
            z.writestr("a.npy", real_npy(np.zeros(3)))
    with NpzSource(path) as src:
        assert src.keys() == ["a", "a~2"]
        np.testing.assert_array_equal(src.read("a~2"), np.zeros(3))
        assert any(f.kind == "duplicate-name" for f in src.zip_findings)


def test_opening_a_compressed_npz_inflates_only_headers(tmp_path):
    path = tmp_path / "big.npz"
    np.savez_compressed(path, z=np.zeros(8 << 20, np.uint8))  # 8 MiB inflated, 8 KiB on disk
    tracemalloc.start()
    try:
        with NpzSource(path) as src:
            assert src["z"] == ("U8", (8 << 20,), 8 << 20)
            opening_peak = tracemalloc.get_traced_memory()[1]
            assert int(src.read("z").sum()) == 0
            reading_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert opening_peak < 1 << 20  # the member was not inflated to list it ...
    assert reading_peak >= 8 << 20  # ... only to read it


# --- fuzzing: whatever the bytes, a SafeckptError or a readable source -------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

HEADER_ALPHABET = st.sampled_from(list("{}()[],:' \"\\01289-_LTrueFalsNonedscrptiaphO<>|fiuVUM8xn")
                                  + ["'<f4'", "'shape'"])


def _open_and_read_all(path, cls):
    try:
        with cls(path) as src:
            for name in src:
                src.read(name)
    except SafeckptError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(HEADER_ALPHABET, max_size=60).map("".join), st.binary(max_size=24))
def test_fuzzed_headers_fail_cleanly(tmp_path, header, data):
    path = tmp_path / "fuzz.npy"
    path.write_bytes(npy_bytes(header, data))
    _open_and_read_all(path, NpySource)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_npz_bytes_fail_cleanly(tmp_path, data):
    buf = io.BytesIO()
    save = data.draw(st.sampled_from([np.savez, np.savez_compressed]))
    save(buf, a=np.arange(6, dtype=np.int16).reshape(2, 3), o=np.array([{"k": np.ones(2)}], dtype=object))
    raw = bytearray(buf.getvalue())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "fuzz.npz"
    path.write_bytes(bytes(raw))
    _open_and_read_all(path, NpzSource)
