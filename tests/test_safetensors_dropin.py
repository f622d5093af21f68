"""safeckpt's top level is a drop-in for `safetensors`': each name checked against the real package.

Same inputs to both; the same outputs, bytes, and errors (theirs a SafetensorError,
ours a SafeckptError, which `safeckpt.SafetensorError` names). Where we deliberately
differ, the test says so and checks our behaviour against numpy's.
"""

from __future__ import annotations

import importlib
import inspect
import io
import os

import ml_dtypes
import numpy as np
import pytest

safetensors = pytest.importorskip("safetensors", reason="the safetensors oracle is not installed")
st_numpy = pytest.importorskip("safetensors.numpy")

import safeckpt  # noqa: E402
from safeckpt import numpy as scn  # noqa: E402
from safeckpt.tensor_spec import DTYPE_CODES  # noqa: E402

# Public in safetensors 0.8 and not here: none.
KNOWN_GAPS: set = set()


def _spec(module, array: np.ndarray, dtype: str | None = None, shape=None):
    return module.TensorSpec(dtype=dtype or array.dtype.name, shape=array.shape if shape is None else shape,
                             data_ptr=array.ctypes.data, data_len=array.nbytes)


def _raises_both(call):
    """Run `call(module)` for theirs and ours; both must refuse: theirs a SafetensorError, ours a SafeckptError."""
    with pytest.raises(safetensors.SafetensorError):
        call(safetensors)
    with pytest.raises(safeckpt.SafetensorError) as info:
        call(safeckpt)
    assert isinstance(info.value, safeckpt.SafeckptError)
    return info.value


# --- the names -------------------------------------------------------------------

def test_every_public_name_of_safetensors_exists():
    theirs = {name for name in dir(safetensors) if not name.startswith("__") and name != "_safetensors_rust"}
    theirs -= {name for name in theirs if inspect.ismodule(getattr(safetensors, name))}
    missing = {name for name in theirs if not hasattr(safeckpt, name)}
    assert missing == KNOWN_GAPS
    for name in ("serialize", "serialize_file", "deserialize", "TensorSpec", "SafetensorError", "safe_open"):
        assert name in safeckpt.__all__


def test_safe_open_handle_reads_the_open_file(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file({"w": np.arange(4, dtype=np.float32)}, str(path))
    with open(path, "rb") as f:
        with safetensors._safe_open_handle(f, "np") as theirs, safeckpt._safe_open_handle(f, "np") as ours:
            assert ours.keys() == theirs.keys() and ours.metadata() == theirs.metadata()
            np.testing.assert_array_equal(ours.get_tensor("w"), theirs.get_tensor("w"))
        os.replace(path, tmp_path / "moved.safetensors")
        path.write_bytes(b"another file")
        with pytest.raises(safeckpt.SafeckptError, match="no longer the file of that name"):
            safeckpt._safe_open_handle(f, "np")
    with pytest.raises(safeckpt.SafeckptError, match="opened from a path"):
        safeckpt._safe_open_handle(io.BytesIO(b""), "np")


@pytest.mark.parametrize("module_name", ["numpy", "torch"])
def test_framework_modules_hold_the_same_names(module_name):
    pytest.importorskip(module_name)
    theirs = importlib.import_module(f"safetensors.{module_name}")
    ours = importlib.import_module(f"safeckpt.{module_name}")
    public = {name for name, value in vars(theirs).items() if not name.startswith("_")
              and callable(value) and getattr(value, "__module__", "").startswith("safetensors")}
    assert public <= set(dir(ours))
    for name in ("safe_open", "serialize", "serialize_file", "deserialize", "TensorSpec"):
        assert getattr(ours, name) is getattr(safeckpt, name)


@pytest.mark.parametrize("name", ["serialize", "serialize_file", "deserialize", "TensorSpec", "safe_open"])
def test_same_signatures(name):
    theirs = inspect.signature(getattr(safetensors, name)).parameters.values()
    ours = inspect.signature(getattr(safeckpt, name)).parameters
    for param in theirs:
        assert ours[param.name].kind == param.kind
        if param.default not in (inspect.Parameter.empty, Ellipsis):  # their stubs show "..." for some
            assert ours[param.name].default == param.default
    assert list(ours)[:len(theirs)] == [param.name for param in theirs]


def test_safetensor_error_is_our_base_class():
    assert safeckpt.SafetensorError is safeckpt.SafeckptError
    importlib.import_module(safeckpt.SafetensorError.__module__)
    with pytest.raises(safeckpt.SafetensorError):
        safeckpt.load(b"\x00" * 3)


# --- TensorSpec ------------------------------------------------------------------

def test_tensor_spec_takes_the_same_dtype_names():
    with pytest.raises(safetensors.SafetensorError) as info:
        safetensors.TensorSpec(dtype="nonsense", shape=[1], data_ptr=0, data_len=0)
    theirs = set(str(info.value).split("Supported dtypes: ")[1].split(", "))
    assert set(DTYPE_CODES) == theirs
    for name in sorted(theirs):
        ours = safeckpt.TensorSpec(dtype=name, shape=(2, 3), data_ptr=8, data_len=6)
        reference = safetensors.TensorSpec(dtype=name, shape=(2, 3), data_ptr=8, data_len=6)
        assert (ours.dtype, ours.shape, ours.data_ptr, ours.data_len) == \
            (reference.dtype, reference.shape, reference.data_ptr, reference.data_len)
        assert repr(ours) == repr(reference)
    assert safeckpt.TensorSpec(dtype="float4_e2m1fn_x2", shape=[3, 2], data_ptr=8, data_len=6).shape == [3, 4]


@pytest.mark.parametrize("bad", [dict(dtype="F32"), dict(dtype="nonsense"), dict(shape=[-1]), dict(shape=[1.5]),
                                 dict(data_len=-1), dict(data_ptr=0, data_len=4)])
def test_tensor_spec_refuses_bad_fields(bad):
    fields = dict(dtype="float32", shape=[1], data_ptr=8, data_len=4)
    fields.update(bad)
    with pytest.raises(safeckpt.SafeckptError, match="TensorSpec"):
        safeckpt.TensorSpec(**fields)


def test_tensor_spec_is_keyword_only_and_read_only():
    for module in (safetensors, safeckpt):
        with pytest.raises(TypeError):
            module.TensorSpec("float32", [1], 8, 4)
        spec = module.TensorSpec(dtype="float32", shape=[1], data_ptr=8, data_len=4)
        with pytest.raises(AttributeError):
            spec.dtype = "F16"


# --- serialize, serialize_file, deserialize ------------------------------------------

def _arrays() -> dict:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "bf16": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
        "f8": rng.standard_normal((2, 2)).astype(ml_dtypes.float8_e4m3fn),
        "i64": np.arange(4, dtype=np.int64),
        "u16": np.arange(6, dtype=np.uint16).reshape(2, 3),
        "bool": np.array([True, False, True]),
        "c64": np.array([1 + 2j], dtype=np.complex64),
        "scalar": np.array(2.5, dtype=np.float64),
        "empty": np.zeros((0, 3), dtype=np.int8),
    }


def test_serialize_bytes_equal_theirs(tmp_path):
    arrays = _arrays()
    packed_f4 = np.array([0x21, 0x43, 0x65], dtype=np.uint8)  # six F4 values, two per byte
    for metadata in (None, {"format": "pt"}):
        ours = safeckpt.serialize({**{k: _spec(safeckpt, a) for k, a in arrays.items()},
                                   "f4": _spec(safeckpt, packed_f4, "float4_e2m1fn_x2", [3])}, metadata)
        theirs = safetensors.serialize({**{k: _spec(safetensors, a) for k, a in arrays.items()},
                                        "f4": _spec(safetensors, packed_f4, "float4_e2m1fn_x2", [3])},
                                       metadata=metadata)
        assert ours == theirs
    assert safeckpt.serialize({}) == safetensors.serialize({})

    safeckpt.serialize_file({k: _spec(safeckpt, a) for k, a in arrays.items()}, tmp_path / "ours.safetensors",
                            metadata={"a": "b"})
    safetensors.serialize_file({k: _spec(safetensors, a) for k, a in arrays.items()},
                               tmp_path / "theirs.safetensors", metadata={"a": "b"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    loaded = scn.load_file(tmp_path / "ours.safetensors")
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)


def test_serialize_takes_the_dicts_of_safetensors_0_7():
    # safetensors 0.8 refuses these (TypeError); code written for 0.7 passes them.
    arrays = _arrays()
    legacy = {name: {"dtype": array.dtype.name, "shape": list(array.shape), "data": array.tobytes()}
              for name, array in arrays.items()}
    with pytest.raises(TypeError):
        safetensors.serialize(legacy)
    assert safeckpt.serialize(legacy) == safetensors.serialize({k: _spec(safetensors, a) for k, a in arrays.items()})
    with pytest.raises(safeckpt.SafeckptError, match="'data'"):
        safeckpt.serialize({"w": {"dtype": "float32", "shape": [1], "data_ptr": 0, "data_len": 0}})


def test_serialize_refuses_what_theirs_refuses():
    data = np.arange(6, dtype=np.float32)
    _raises_both(lambda m: m.serialize({"w": _spec(m, data, shape=[2, 2])}))  # 16 bytes declared, 24 given
    _raises_both(lambda m: m.serialize({"w": _spec(m, data, shape=[7])}))
    _raises_both(lambda m: m.serialize({"w": m.TensorSpec(dtype="float32", shape=[2], data_ptr=0, data_len=0)}))
    _raises_both(lambda m: m.serialize({"w": _spec(m, data, shape=[2**62, 2**62])}))


def test_serialize_is_stricter_than_theirs():
    data = np.arange(2, dtype=np.float32)
    # theirs writes a file nobody can read back (a tensor named like the metadata), or a broken header
    assert safetensors.serialize({"__metadata__": _spec(safetensors, data)})
    with pytest.raises(safeckpt.SafeckptError, match="reserved"):
        safeckpt.serialize({"__metadata__": _spec(safeckpt, data)})
    assert safeckpt.load(safeckpt.serialize({}, metadata={})) == {}
    with pytest.raises(safeckpt.SafeckptError, match="str to str"):
        safeckpt.serialize({"w": _spec(safeckpt, data)}, metadata={"a": 1})


def test_deserialize_equals_theirs(tmp_path):
    arrays = _arrays()
    data = st_numpy.save(arrays, metadata={"k": "v"})
    f4 = np.array([0x21, 0x43], dtype=np.uint8)
    with_f4 = safetensors.serialize({"f4": _spec(safetensors, f4, "float4_e2m1fn_x2", [2]),
                                     "x": _spec(safetensors, arrays["f32"])})
    for blob in (data, with_f4, scn.save({})):
        ours, theirs = safeckpt.deserialize(blob), safetensors.deserialize(blob)
        assert sorted(ours, key=lambda item: item[0]) == sorted(theirs, key=lambda item: item[0])
        assert all(isinstance(entry["data"], bytearray) for _, entry in ours)
    # theirs comes in hash order; ours in file order
    (tmp_path / "blob.safetensors").write_bytes(data)
    with safeckpt.safe_open(tmp_path / "blob.safetensors") as f:
        assert [name for name, _ in safeckpt.deserialize(data)] == f.offset_keys()
    assert safeckpt.deserialize(bytearray(data)) == safeckpt.deserialize(memoryview(data))


@pytest.mark.parametrize("blob", [b"abc", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ",
                                  b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"])
def test_deserialize_refuses_what_theirs_refuses(blob):
    error = _raises_both(lambda m: m.deserialize(blob))
    assert isinstance(error, safeckpt.HeaderError)


# --- safe_open -------------------------------------------------------------------

@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "x.safetensors"
    st_numpy.save_file({"a": np.arange(50, dtype=np.float32).reshape(10, 5), "b": np.zeros(3, np.int8),
                        "s": np.array(3.0)}, path, metadata={"k": "v"})
    return path


def test_safe_open_reads_like_theirs(small_file):
    with safetensors.safe_open(small_file, framework="np") as theirs, safeckpt.safe_open(small_file, "np") as ours:
        assert ours.keys() == theirs.keys()
        assert ours.offset_keys() == theirs.offset_keys()
        assert ours.metadata() == theirs.metadata()
        assert list(ours.get_tensors()) == list(theirs.get_tensors())
        for name in theirs.keys():
            np.testing.assert_array_equal(ours.get_tensor(name), theirs.get_tensor(name))
            assert ours.get_slice(name).get_shape() == theirs.get_slice(name).get_shape()
            assert ours.get_slice(name).get_dtype() == theirs.get_slice(name).get_dtype()
        _raises_both(lambda m: (ours if m is safeckpt else theirs).get_tensor("nope"))
        _raises_both(lambda m: (ours if m is safeckpt else theirs).get_slice("nope"))


@pytest.mark.filterwarnings("ignore:No ccache found")  # paddle, on import
@pytest.mark.parametrize("framework", ["np", "numpy", "pt", "torch", "pytorch", "tf", "tensorflow", "jax", "flax",
                                       "mlx", "paddle"])
def test_every_framework_name_theirs_accepts(small_file, framework):
    with safetensors.safe_open(small_file, framework=framework):
        pass
    with safeckpt.safe_open(small_file, framework=framework) as f:
        assert f.keys() == ["a", "b", "s"]


@pytest.mark.parametrize("use", ["keys", "offset_keys", "metadata", "get_tensors", "get_tensor", "get_slice"])
@pytest.mark.parametrize("how", ["with", "close"])
def test_a_closed_handle_raises(small_file, use, how):
    def closed(module):
        handle = module.safe_open(small_file, framework="np")
        with handle:
            pass
        if how == "close" and module is safeckpt:
            handle.close()  # theirs has no close(); twice is harmless
        return handle

    call = {"keys": lambda f: f.keys(), "offset_keys": lambda f: f.offset_keys(), "metadata": lambda f: f.metadata(),
            "get_tensors": lambda f: f.get_tensors(), "get_tensor": lambda f: f.get_tensor("a"),
            "get_slice": lambda f: f.get_slice("a")}[use]
    error = _raises_both(lambda m: call(closed(m)))
    assert "closed" in str(error) and str(small_file) in str(error)


def test_a_slice_outlives_its_shape_not_its_file(small_file):
    with safeckpt.safe_open(small_file) as f:
        part = f.get_slice("a")
        np.testing.assert_array_equal(part[1:3], np.arange(5, 15, dtype=np.float32).reshape(2, 5))
    assert part.get_shape() == [10, 5] and part.get_dtype() == "F32"
    # theirs still reads through the slice; ours says the file is closed
    with pytest.raises(safeckpt.SafetensorError, match="closed"):
        part[0]


A = np.arange(50, dtype=np.float32).reshape(10, 5)
s_ = np.s_

# indexes both accept, with the same results
SAME = [s_[[]], s_[()], s_[:], s_[...], s_[..., 0], s_[0, ...], s_[2:, -1], s_[2:, -5], s_[::2], s_[1:7:3, 1:],
        s_[np.int64(1)], s_[3:3], s_[0, :2], s_[-10]]
# indexes both refuse
REFUSED = [s_[[0, 2]], s_[[0]], s_[0:2, [1, 3]], s_[:, []], s_[([],)], s_[np.array([0, 2])], s_[None],
           s_[..., ...], s_[0, 0, 0], s_[1.0], s_[20], s_[-11], s_[2:, 20], s_[2:, -6], s_[::0]]
# indexes theirs refuses and we read as numpy does
NUMPY_ONLY = [s_[:20], s_[:, :20], s_[9:100], s_[10:], s_[::-1], s_[-3:], s_[:-3], s_[5:2], s_[-20:]]


@pytest.mark.parametrize("index", SAME, ids=repr)
@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_slices_theirs_accepts(small_file, index, backend):
    with safetensors.safe_open(small_file, framework="np") as theirs, \
            safeckpt.safe_open(small_file, framework="np", backend=backend) as ours:
        expected, got = theirs.get_slice("a")[index], ours.get_slice("a")[index]
    assert got.shape == expected.shape and got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("index", REFUSED, ids=repr)
def test_slices_theirs_refuses(small_file, index):
    with safetensors.safe_open(small_file, framework="np") as theirs, safeckpt.safe_open(small_file) as ours:
        error = _raises_both(lambda m: (ours if m is safeckpt else theirs).get_slice("a")[index])
    assert isinstance(error, safeckpt.errors.SliceError) and "'a'" in str(error)


@pytest.mark.parametrize("index", NUMPY_ONLY, ids=repr)
def test_slices_read_as_numpy_reads_them(small_file, index):
    with safeckpt.safe_open(small_file) as ours:
        np.testing.assert_array_equal(ours.get_slice("a")[index], A[index])


def test_slices_of_a_scalar(small_file):
    with safetensors.safe_open(small_file, framework="np") as theirs, safeckpt.safe_open(small_file) as ours:
        for index in (s_[()], s_[...]):
            np.testing.assert_array_equal(ours.get_slice("s")[index], theirs.get_slice("s")[index])
        for index in (s_[:], s_[0], s_[[]]):
            _raises_both(lambda m: (ours if m is safeckpt else theirs).get_slice("s")[index])


def test_empty_list_slice_in_torch(small_file):
    torch = pytest.importorskip("torch")
    with safetensors.safe_open(small_file, framework="pt") as theirs, safeckpt.safe_open(small_file, "pt") as ours:
        got, expected = ours.get_slice("a")[[]], theirs.get_slice("a")[list()]
    assert isinstance(got, torch.Tensor) and got.shape == expected.shape == (0, 5)
