"""The mlx adapter: every mlx dtype round-trips bit for bit, bytes match safetensors.mlx."""

from __future__ import annotations

import sys

import ml_dtypes
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx not installed (on Linux: pip install 'mlx[cpu]')")

import safeckpt  # noqa: E402
from safeckpt import errors  # noqa: E402
from safeckpt.format.dtypes import DTYPES, dtype_for_numpy  # noqa: E402
from safeckpt.frameworks import mlx as adapter  # noqa: E402
from tests.frameworks.framework_samples import SHAPES, SLICES, assert_same_bytes, run_python, sample  # noqa: E402

MLX = {"BOOL": mx.bool_, "U8": mx.uint8, "I8": mx.int8, "I16": mx.int16, "U16": mx.uint16, "F16": mx.float16,
       "BF16": mx.bfloat16, "I32": mx.int32, "U32": mx.uint32, "F32": mx.float32, "C64": mx.complex64,
       "F64": mx.float64, "I64": mx.int64, "U64": mx.uint64}
# safetensors.mlx goes through np.asarray, which refuses bf16 ("not a valid PEP 3118 buffer format").
THEIR_DTYPES = [name for name in MLX if name != "BF16"]


def mlx_array(source: np.ndarray):
    """An mlx array holding `source`'s bytes, made with mlx's own API."""
    name = dtype_for_numpy(source.dtype).name
    if name == "BF16":
        return mx.view(mx.array(source.view(np.uint16)), mx.bfloat16)
    return mx.array(source, dtype=MLX[name])  # without dtype, mlx makes float64 float32


def as_numpy(array) -> np.ndarray:
    """An mlx array's values through mlx's buffer protocol (bf16 as uint16)."""
    if array.dtype == mx.bfloat16:
        return np.asarray(mx.view(array, mx.uint16)).view(ml_dtypes.bfloat16)
    return np.asarray(array)


def assert_same(actual, expected: np.ndarray) -> None:
    """Same dtype, shape and bytes (so NaN payloads count)."""
    if isinstance(actual, mx.array):
        assert actual.dtype == MLX[dtype_for_numpy(expected.dtype).name]
        actual = as_numpy(actual)
    assert_same_bytes(actual, expected)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(MLX))
def test_round_trip_bit_exact(tmp_path, name, shape):
    source = sample(name, shape)
    path = tmp_path / "t.safetensors"
    safeckpt.save_file({"t": mlx_array(source)}, path)

    with safeckpt.safe_open(path) as f:  # the file holds the mlx array's bytes
        assert_same(f.get_tensor("t"), source)
    loaded = safeckpt.load_file(path, framework="mlx")["t"]
    assert isinstance(loaded, mx.array)
    assert_same(loaded, source)
    with safeckpt.safe_open(path, framework="mlx") as f:
        assert_same(f.get_tensor("t"), source)
        part = f.get_slice("t")[SLICES[shape]]
        assert isinstance(part, mx.array)
        assert_same(part, source[SLICES[shape]])
    assert_same(safeckpt.load(safeckpt.save({"t": mlx_array(source)}), framework="mlx")["t"], source)


def test_bytes_identical_to_safetensors_mlx():
    st_mlx = pytest.importorskip("safetensors.mlx", reason="the safetensors oracle is not installed")
    tensors = {f"{name.lower()}.{i}": mlx_array(sample(name, shape, seed=i))
               for name in THEIR_DTYPES for i, shape in enumerate(SHAPES)}
    assert safeckpt.save(tensors, metadata={"format": "mlx"}) == st_mlx.save(tensors, metadata={"format": "mlx"})


def test_files_from_safetensors_mlx_load_through_ours(tmp_path):
    st_mlx = pytest.importorskip("safetensors.mlx", reason="the safetensors oracle is not installed")
    sources = {name: sample(name, (3, 4)) for name in THEIR_DTYPES}
    st_mlx.save_file({name: mlx_array(a) for name, a in sources.items()}, tmp_path / "t.safetensors")
    loaded = safeckpt.load_file(tmp_path / "t.safetensors", framework="mlx")
    assert loaded.keys() == sources.keys()
    for name, source in sources.items():
        assert_same(loaded[name], source)


def test_files_of_ours_load_through_safetensors_mlx(tmp_path):
    st_mlx = pytest.importorskip("safetensors.mlx", reason="the safetensors oracle is not installed")
    sources = {name: sample(name, (3, 4)) for name in ("F16", "BF16", "F32", "I8", "I32", "I64", "U8", "BOOL")}
    safeckpt.save_file({name: mlx_array(a) for name, a in sources.items()}, tmp_path / "t.safetensors")
    theirs = st_mlx.load_file(tmp_path / "t.safetensors")
    for name, source in sources.items():
        assert_same(theirs[name], source)


def test_transposed_arrays_are_written_in_logical_order():
    # safetensors.mlx writes these in memory order: its files hold the values scrambled.
    base = mx.reshape(mx.arange(24, dtype=mx.float32), (4, 6))
    tensors = {"t": mx.transpose(base), "b": mx.transpose(base.astype(mx.bfloat16)), "step": base[1:, ::2]}
    expected = {"t": np.arange(24, dtype=np.float32).reshape(4, 6).T}
    expected["b"] = expected["t"].astype(ml_dtypes.bfloat16)
    expected["step"] = np.arange(24, dtype=np.float32).reshape(4, 6)[1:, ::2]
    loaded = safeckpt.load(safeckpt.save(tensors))
    for name, value in expected.items():
        assert_same(loaded[name], value)


# --- zero-copy where mlx allows -------------------------------------------------

@pytest.mark.parametrize("name", ["F32", "BF16", "U64", "BOOL"])
def test_to_numpy_shares_the_array_buffer(name):
    array = mlx_array(sample(name, (16, 8)))
    first, second = adapter.to_numpy(array), adapter.to_numpy(array)
    assert first.dtype == DTYPES[name].numpy
    assert first.ctypes.data == second.ctypes.data


def test_lazy_arrays_are_evaluated_before_saving():
    lazy = mx.arange(6, dtype=mx.float32) * 2 + 1  # not evaluated yet
    assert_same(safeckpt.load(safeckpt.save({"x": lazy}))["x"], np.arange(6, dtype=np.float32) * 2 + 1)


def test_loaded_arrays_own_their_memory(tmp_path):
    path = tmp_path / "t.safetensors"
    safeckpt.save_file({"w": np.arange(1024, dtype=np.float32)}, path)
    array = safeckpt.load_file(path, framework="mlx")["w"]
    path.unlink()
    assert mx.sum(array).item() == float(np.arange(1024, dtype=np.float32).sum())


# --- devices and errors ---------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", None, "CPU_DEVICE", "CPU_TYPE"])
def test_cpu_devices(tmp_path, device):
    device = {"CPU_DEVICE": mx.Device(mx.cpu), "CPU_TYPE": mx.cpu}.get(device, device)
    safeckpt.save_file({"w": np.ones(3, np.float32)}, tmp_path / "t.safetensors")
    assert isinstance(safeckpt.load_file(tmp_path / "t.safetensors", framework="mlx", device=device)["w"], mx.array)


@pytest.mark.skipif(mx.is_available(mx.gpu), reason="this mlx has a GPU")
@pytest.mark.parametrize("device", ["gpu", "cuda:0", 0])
def test_gpu_without_one_is_refused(tmp_path, device):
    safeckpt.save_file({"w": np.ones(3, np.float32)}, tmp_path / "t.safetensors")
    with pytest.raises(errors.FrameworkError):
        safeckpt.load_file(tmp_path / "t.safetensors", framework="mlx", device=device)


@pytest.mark.parametrize("dtype, nbytes", [("F8_E4M3", 4), ("F8_E5M2", 4), ("F8_E8M0", 4), ("F4", 2), ("F6_E2M3", 3)])
def test_dtypes_mlx_lacks_are_refused_on_load(raw_file, dtype, nbytes):
    path = raw_file({"x": {"dtype": dtype, "shape": [4], "data_offsets": [0, nbytes]}}, b"\x00" * nbytes)
    with pytest.raises(errors.DTypeConversionError, match="framework='numpy'"):
        safeckpt.load_file(path, framework="mlx")


def test_is_tensor():
    assert adapter.is_tensor(mx.ones(2))
    assert not adapter.is_tensor(np.ones(2))


def test_missing_mlx_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx.core", None)  # `import mlx.core` now raises ImportError
    adapter.tables.cache_clear()
    with pytest.raises(errors.FrameworkError, match="pip install"):
        adapter.from_numpy(np.ones(2, np.float32))


def test_importing_safeckpt_does_not_import_mlx(tmp_path):
    code = f"""
        import sys, numpy as np, safeckpt
        import safeckpt.frameworks.mlx
        safeckpt.save_file({{"w": np.ones(2)}}, {str(tmp_path / "t.safetensors")!r})
        safeckpt.load_file({str(tmp_path / "t.safetensors")!r})
        assert "mlx" not in sys.modules, "mlx was imported"
    """
    run_python(code)
