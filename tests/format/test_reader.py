"""Reading: zero-copy private maps, copies on request, slices that read only what they need."""

from __future__ import annotations

import os
import resource

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeckpt
from safeckpt import errors
from safeckpt.format.reader import SafetensorsFile

from tests.files import safetensors_bytes

BACKENDS = ["mmap", "pread"]


@pytest.fixture
def model_file(tmp_path, model_like):
    path = tmp_path / "model.safetensors"
    safeckpt.save_file(model_like, path, {"format": "np"})
    return path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("copy", [False, True])
def test_load_file_values(model_file, model_like, backend, copy):
    loaded = safeckpt.load_file(model_file, copy=copy, backend=backend)
    assert list(loaded) == list(safeckpt.SafetensorsFile(model_file).keys())
    for name, array in model_like.items():
        assert loaded[name].dtype == array.dtype
        assert loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)


def test_default_load_is_a_writable_private_map(model_file):
    before = model_file.read_bytes()
    loaded = safeckpt.load_file(model_file)
    weight = loaded["embed.weight"]
    assert not weight.flags.owndata  # a view of the map, not a copy
    assert weight.flags.writeable
    weight[:] = 42.0
    np.testing.assert_array_equal(safeckpt.load_file(model_file)["embed.weight"] == 42.0, False)
    assert model_file.read_bytes() == before


def test_copy_true_owns_memory(model_file):
    loaded = safeckpt.load_file(model_file, copy=True)
    for array in loaded.values():
        base = array
        while base.base is not None and isinstance(base.base, np.ndarray):
            base = base.base
        assert base.flags.owndata


def test_arrays_outlive_the_file_object(model_file, model_like):
    with safeckpt.safe_open(model_file) as f:
        weight = f.get_tensor("embed.weight")
    np.testing.assert_array_equal(weight, model_like["embed.weight"])


def test_safe_open_api(model_file, model_like):
    with safeckpt.safe_open(model_file, framework="numpy") as f:
        assert f.keys() == sorted(model_like)
        assert f.metadata() == {"format": "np"}
        np.testing.assert_array_equal(f.get_tensor("layers.0.ids"), model_like["layers.0.ids"])
        piece = f.get_slice("embed.weight")
        assert piece.get_shape() == [64, 16] and piece.get_dtype() == "F32"
        np.testing.assert_array_equal(piece[3:5, ::3], model_like["embed.weight"][3:5, ::3])
        with pytest.raises(errors.TensorNotFoundError, match="no tensor named 'nope'"):
            f.get_tensor("nope")


def test_unknown_framework_and_backend(model_file):
    with pytest.raises(errors.FrameworkError, match="unknown framework"):
        safeckpt.safe_open(model_file, framework="caffe")
    with pytest.raises(errors.SafeckptError, match="unknown backend"):
        safeckpt.safe_open(model_file, backend="carrier-pigeon")


def test_missing_file_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        safeckpt.load_file(tmp_path / "absent.safetensors")


# --- slicing ------------------------------------------------------------------

def _index_strategy(shape):
    def axis(dim):
        ints = st.integers(-dim, dim - 1) if dim else st.nothing()
        bound = st.none() | st.integers(-dim - 3, dim + 3)
        steps = st.none() | st.integers(-4, 4).filter(lambda s: s != 0)
        return ints | st.builds(slice, bound, bound, steps)
    full = st.tuples(*[axis(d) for d in shape])
    return full.flatmap(lambda items: st.integers(0, len(items)).flatmap(
        lambda cut: st.sampled_from([items[:cut], items[:cut] + (Ellipsis,), (Ellipsis,) + items[len(items) - cut:]])))


SLICE_SHAPES = [(7,), (5, 6), (3, 4, 5), (2, 1, 3, 4), (0, 3), ()]


@pytest.fixture(scope="module")
def slice_file(tmp_path_factory):
    rng = np.random.default_rng(7)
    tensors = {f"t{i}": rng.standard_normal(shape).astype(np.float32) for i, shape in enumerate(SLICE_SHAPES)}
    tensors["bf16"] = rng.standard_normal((6, 5)).astype(ml_dtypes.bfloat16)
    path = tmp_path_factory.mktemp("slices") / "s.safetensors"
    safeckpt.save_file(tensors, path)
    return path, tensors


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_get_slice_matches_numpy(slice_file, data):
    path, tensors = slice_file
    name = data.draw(st.sampled_from(sorted(tensors)))
    array = tensors[name]
    index = data.draw(_index_strategy(array.shape))
    expected = array[index]
    for backend in BACKENDS:
        with safeckpt.safe_open(path, backend=backend) as f:
            got = f.get_slice(name)[index]
        assert got.shape == np.shape(expected), (backend, index)
        assert got.dtype == array.dtype
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", [(9,), (0, 6), (Ellipsis, Ellipsis), (None,), (True,), ("a",), (1.5,)],
                         ids=str)
def test_bad_slices_are_slice_errors(slice_file, backend, index):
    path, _ = slice_file
    with safeckpt.safe_open(path, backend=backend) as f:
        with pytest.raises(errors.SliceError) as info:
            f.get_slice("t1")[index]
    assert "t1" in str(info.value) and str(path) in str(info.value)


def test_one_row_reads_one_row(tmp_path):
    path = tmp_path / "big.safetensors"
    safeckpt.save_file({"w": np.arange(4096 * 4096, dtype=np.float32).reshape(4096, 4096)}, path)
    with SafetensorsFile(path, backend="pread") as f:
        row = f.slice("w", 1234)
        np.testing.assert_array_equal(row, np.arange(1234 * 4096, 1235 * 4096, dtype=np.float32))
        assert f.bytes_read == 4096 * 4
        column = f.slice("w", (slice(None), 7))
        np.testing.assert_array_equal(column, np.arange(4096, dtype=np.float32) * 4096 + 7)
        assert f.bytes_read < 4096 * 4 + 64 * 1024 * 1024 // 8  # far below the 64 MiB tensor


# --- sub-byte and raw dtypes ----------------------------------------------------

def test_f4_packs_two_per_byte_low_nibble_first(tmp_path):
    values = np.array([0.5, -1.0, 6.0, 0.0, 1.5, -6.0], dtype=ml_dtypes.float4_e2m1fn).reshape(2, 3)
    path = tmp_path / "f4.safetensors"
    safeckpt.save_file({"q": values}, path)
    data = path.read_bytes()[-3:]
    nibbles = values.reshape(-1).view(np.uint8)
    assert list(data) == [int(nibbles[i]) | int(nibbles[i + 1]) << 4 for i in (0, 2, 4)]
    with safeckpt.safe_open(path) as f:
        assert f.get_slice("q").get_dtype() == "F4"
        back = f.get_tensor("q")
    assert back.dtype == ml_dtypes.float4_e2m1fn and back.shape == (2, 3)
    np.testing.assert_array_equal(back.astype(np.float32), values.astype(np.float32))


def test_f6_reads_as_raw_bytes_with_dtype_reported(raw_file):
    path = raw_file({"x": {"dtype": "F6_E2M3", "shape": [2, 4], "data_offsets": [0, 6]}}, bytes(range(6)))
    with safeckpt.safe_open(path) as f:
        assert f.get_slice("x").get_dtype() == "F6_E2M3"
        raw = f.get_tensor("x")
    assert raw.dtype == np.uint8 and raw.tobytes() == bytes(range(6))
    out = safeckpt.save({"x": safeckpt.RawTensor("F6_E2M3", (2, 4), raw)})
    assert safeckpt.load(out)["x"].tobytes() == bytes(range(6))


# --- files larger than memory ------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_file_larger_than_ram(tmp_path, backend):
    """A 64 GiB tensor (a sparse file, no disk used) opens and slices without reading it."""
    rows, cols = 1 << 22, 1 << 12  # 2**34 float32 = 64 GiB
    header = safetensors_bytes({"huge": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, rows * cols * 4]}})
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as out:
        out.write(header)
        out.truncate(len(header) + rows * cols * 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with safeckpt.safe_open(path, backend=backend) as f:
        last = f.get_slice("huge")[-1, :8]
    assert last.shape == (8,) and not last.any()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 256 * 1024
    os.unlink(path)


def test_directory_is_an_oserror_not_a_map_failure(tmp_path):
    with pytest.raises(IsADirectoryError):
        safeckpt.load_file(tmp_path)


def test_release_gives_back_a_tensors_mapped_pages(tmp_path):
    psutil = pytest.importorskip("psutil")
    big = np.arange(16 * 1024 * 1024, dtype=np.float32)  # 64 MiB
    safeckpt.save_file({"big": big, "small": np.ones(3, np.float32)}, tmp_path / "m.safetensors")
    process = psutil.Process()
    with safeckpt.SafetensorsFile(tmp_path / "m.safetensors") as f:
        view = f.array("big")
        before = process.memory_info().rss
        assert float(view[::1024].sum()) == float(big[::1024].sum())  # touches every page
        touched = process.memory_info().rss
        f.release("big")
        released = process.memory_info().rss
        assert touched - before > 48 * 2**20 and touched - released > 48 * 2**20
        assert np.array_equal(view[-5:], big[-5:])  # still valid: read again from the file
