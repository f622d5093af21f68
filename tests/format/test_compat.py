"""Byte-for-byte compatibility with the Hugging Face `safetensors` package, both ways."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest

import safeckpt

from tests.files import tensor_bytes

st_numpy = pytest.importorskip("safetensors.numpy", reason="the safetensors oracle is not installed")
torch = pytest.importorskip("torch", reason="torch not installed")
st_torch = pytest.importorskip("safetensors.torch", reason="the safetensors oracle is not installed")

NUMPY_DTYPES = [np.bool_, np.uint8, np.int8, np.int16, np.uint16, np.float16, ml_dtypes.bfloat16,
                np.int32, np.uint32, np.float32, np.complex64, np.float64, np.int64, np.uint64,
                ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float8_e8m0fnu,
                ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e5m2fnuz]

TORCH_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.float16,
                torch.bfloat16, torch.int32, torch.uint32, torch.float32, torch.complex64,
                torch.float64, torch.int64, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2,
                torch.float8_e8m0fnu, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]


def random_array(rng, dtype, shape):
    dtype = np.dtype(dtype)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    if dtype == np.bool_:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def random_tensor(gen, dtype, shape):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (int(np.prod(shape)) * itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_bytes_identical_per_dtype(dtype):
    rng = np.random.default_rng(1)
    tensors = {"x": random_array(rng, dtype, (3, 5)), "scalar": random_array(rng, dtype, ()),
               "empty": random_array(rng, dtype, (0, 2))}
    assert safeckpt.save(tensors) == st_numpy.save(tensors)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_torch_bytes_identical_per_dtype(dtype):
    gen = torch.Generator().manual_seed(2)
    tensors = {"x": random_tensor(gen, dtype, (4, 3)), "scalar": random_tensor(gen, dtype, ()),
               "empty": random_tensor(gen, dtype, (2, 0))}
    ours = safeckpt.save(tensors)
    assert ours == st_torch.save(tensors)
    loaded = safeckpt.load(ours, framework="pt")
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert loaded[name].shape == tensor.shape
        assert tensor_bytes(loaded[name]) == tensor_bytes(tensor)


def test_torch_float4_packed_bytes_identical():
    packed = torch.randint(0, 256, (3, 4), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    ours = safeckpt.save({"w": packed})
    assert ours == st_torch.save({"w": packed})
    header = json.loads(ours[8:8 + struct.unpack("<Q", ours[:8])[0]])
    assert header["w"] == {"dtype": "F4", "shape": [3, 8], "data_offsets": [0, 12]}
    back = safeckpt.load(ours, framework="pt")["w"]
    assert back.dtype == torch.float4_e2m1fn_x2 and back.shape == (3, 4)
    assert torch.equal(back.view(torch.uint8), packed.view(torch.uint8))


def test_every_dtype_in_one_file_sorted_like_theirs():
    rng = np.random.default_rng(3)
    tensors = {f"t{i}": random_array(rng, dtype, (i + 1,)) for i, dtype in enumerate(NUMPY_DTYPES)}
    tensors.update({f"z{i}": random_array(rng, dtype, (0,)) for i, dtype in enumerate(NUMPY_DTYPES)})
    assert safeckpt.save(tensors) == st_numpy.save(tensors)


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"é": "ü \"quoted\" \\ \n\t\x01"}])
def test_metadata_bytes_identical(metadata):
    tensors = {"a": np.arange(6, dtype=np.float32)}
    assert safeckpt.save(tensors, metadata) == st_numpy.save(tensors, metadata)


def test_many_metadata_keys_same_content():
    # With two or more keys safetensors writes them in hash order; ours are sorted.
    tensors = {"a": np.arange(6, dtype=np.float32)}
    metadata = {f"key{i}": str(i) for i in range(20)}
    ours, theirs = safeckpt.save(tensors, metadata), st_numpy.save(tensors, metadata)
    assert len(ours) == len(theirs)
    assert st_numpy.load(ours).keys() == st_numpy.load(theirs).keys()
    with_metadata = json.loads(ours[8:8 + struct.unpack("<Q", ours[:8])[0]])
    assert list(with_metadata["__metadata__"]) == sorted(metadata)


def test_awkward_names_identical():
    names = ["", "é", "名前", "a\"b", "back\\slash", "tab\tnew\nline", "\x00\x1f", "emoji 🤗", "a" * 1000, "/", "<>&"]
    tensors = {name: np.full(2, i, dtype=np.int16) for i, name in enumerate(names)}
    ours = safeckpt.save(tensors)
    assert ours == st_numpy.save(tensors)
    back = safeckpt.load(ours)
    assert set(back) == set(names)


def test_many_tensors_identical():
    rng = np.random.default_rng(4)
    dtypes = [np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.uint8, np.bool_]
    tensors = {}
    for i in range(2000):
        dtype = dtypes[rng.integers(len(dtypes))]
        shape = tuple(int(d) for d in rng.integers(0, 4, size=rng.integers(0, 4)))
        tensors[f"layer.{rng.integers(10**6)}.{i}"] = random_array(rng, dtype, shape)
    assert safeckpt.save(tensors) == st_numpy.save(tensors)


def test_file_bytes_identical(tmp_path, model_like):
    safeckpt.save_file(model_like, tmp_path / "ours.safetensors", {"format": "np"})
    st_numpy.save_file(model_like, tmp_path / "theirs.safetensors", {"format": "np"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_their_files_load_through_ours(tmp_path):
    gen = torch.Generator().manual_seed(5)
    tensors = {f"t{i}": random_tensor(gen, dtype, (2, 3)) for i, dtype in enumerate(TORCH_DTYPES)}
    st_torch.save_file(tensors, tmp_path / "theirs.safetensors", metadata={"k": "v"})
    for backend in ("mmap", "pread"):
        loaded = safeckpt.load_file(tmp_path / "theirs.safetensors", framework="pt", backend=backend)
        assert loaded.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert loaded[name].dtype == tensor.dtype
            assert tensor_bytes(loaded[name]) == tensor_bytes(tensor)
    with safeckpt.safe_open(tmp_path / "theirs.safetensors") as f:
        assert f.metadata() == {"k": "v"}


def test_our_files_load_through_theirs(tmp_path, model_like):
    safeckpt.save_file(model_like, tmp_path / "ours.safetensors")
    with st_numpy.safe_open(tmp_path / "ours.safetensors", framework="np") as f:
        for name, array in model_like.items():
            got = f.get_tensor(name)
            assert got.dtype == array.dtype and got.shape == array.shape
            assert got.tobytes() == array.tobytes()


def test_keys_and_orders_match_theirs(tmp_path, model_like):
    path = tmp_path / "m.safetensors"
    st_numpy.save_file(model_like, path)
    with st_numpy.safe_open(path, framework="np") as theirs, safeckpt.safe_open(path, framework="np") as ours:
        assert ours.keys() == theirs.keys()
        assert ours.offset_keys() == theirs.offset_keys()
        assert list(ours.get_tensors()) == list(theirs.get_tensors())
        assert ours.get_slice("embed.weight").get_shape() == theirs.get_slice("embed.weight").get_shape()
        assert ours.get_slice("embed.weight").get_dtype() == theirs.get_slice("embed.weight").get_dtype()
