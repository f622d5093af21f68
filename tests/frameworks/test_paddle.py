"""The paddle adapter: every paddle dtype round-trips bit for bit, bytes match safetensors.paddle."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # paddle warns about its own optional dependencies on import
    paddle = pytest.importorskip("paddle", reason="paddlepaddle not installed")

import safeckpt  # noqa: E402
from safeckpt import errors  # noqa: E402
from safeckpt.format.dtypes import DTYPES, dtype_for_numpy  # noqa: E402
from safeckpt.frameworks import paddle as adapter  # noqa: E402
from tests.frameworks.framework_samples import SHAPES, SLICES, assert_same_bytes, run_python, sample  # noqa: E402

PADDLE = {"BOOL": paddle.bool, "U8": paddle.uint8, "I8": paddle.int8, "I16": paddle.int16, "U16": paddle.uint16,
          "F16": paddle.float16, "BF16": paddle.bfloat16, "I32": paddle.int32, "U32": paddle.uint32,
          "F32": paddle.float32, "C64": paddle.complex64, "F64": paddle.float64, "I64": paddle.int64,
          "U64": paddle.uint64, "F8_E4M3": paddle.float8_e4m3fn, "F8_E5M2": paddle.float8_e5m2}
# safetensors.paddle cannot write U16 (it names paddle.uint16 "bfloat16"), U32 or U64.
THEIR_DTYPES = [name for name in PADDLE if name not in ("U16", "U32", "U64")]


def paddle_tensor(source: np.ndarray):
    """A paddle tensor holding `source`'s bytes, made with paddle's own (copying) API."""
    name = dtype_for_numpy(source.dtype).name
    if name in ("BF16", "F8_E4M3", "F8_E5M2", "U16", "U32", "U64"):  # to_tensor lacks these: through ints
        carrier = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[source.dtype.itemsize]
        return paddle.to_tensor(source.view(carrier)).view(PADDLE[name])
    return paddle.to_tensor(source)


def assert_same(actual, expected: np.ndarray) -> None:
    """Same dtype, shape and bytes (so NaN payloads count)."""
    name = dtype_for_numpy(expected.dtype).name
    if isinstance(actual, paddle.Tensor):
        assert actual.dtype == PADDLE[name]
        assert tuple(actual.shape) == expected.shape
        assert actual.numpy().tobytes() == expected.tobytes()  # bf16 and fp8 come out as same-width integers
    else:
        assert_same_bytes(actual, expected)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(PADDLE))
def test_round_trip_bit_exact(tmp_path, name, shape):
    source = sample(name, shape)
    path = tmp_path / "t.safetensors"
    safeckpt.save_file({"t": paddle_tensor(source)}, path)

    with safeckpt.safe_open(path) as f:  # the file holds the paddle tensor's bytes
        assert_same(f.get_tensor("t"), source)
    loaded = safeckpt.load_file(path, framework="paddle")["t"]
    assert isinstance(loaded, paddle.Tensor)
    assert_same(loaded, source)
    with safeckpt.safe_open(path, framework="paddle") as f:
        assert_same(f.get_tensor("t"), source)
        part = f.get_slice("t")[SLICES[shape]]
        assert isinstance(part, paddle.Tensor)
        assert_same(part, source[SLICES[shape]])
    assert_same(safeckpt.load(safeckpt.save({"t": paddle_tensor(source)}), framework="paddle")["t"], source)


def test_bytes_identical_to_safetensors_paddle():
    st_paddle = pytest.importorskip("safetensors.paddle", reason="the safetensors oracle is not installed")
    tensors = {f"{name.lower()}.{i}": paddle_tensor(sample(name, shape, seed=i))
               for name in THEIR_DTYPES for i, shape in enumerate(SHAPES)}
    ours = safeckpt.save(tensors, metadata={"format": "paddle"})
    assert ours == st_paddle.save(tensors, metadata={"format": "paddle"})


def test_files_from_safetensors_paddle_load_through_ours(tmp_path):
    st_paddle = pytest.importorskip("safetensors.paddle", reason="the safetensors oracle is not installed")
    sources = {name: sample(name, (3, 4)) for name in THEIR_DTYPES}
    st_paddle.save_file({name: paddle_tensor(a) for name, a in sources.items()}, tmp_path / "t.safetensors")
    loaded = safeckpt.load_file(tmp_path / "t.safetensors", framework="paddle")
    assert loaded.keys() == sources.keys()
    for name, source in sources.items():
        assert_same(loaded[name], source)


def test_files_of_ours_load_through_safetensors_paddle(tmp_path):
    st_paddle = pytest.importorskip("safetensors.paddle", reason="the safetensors oracle is not installed")
    sources = {name: sample(name, (3, 4)) for name in THEIR_DTYPES}
    safeckpt.save_file({name: paddle_tensor(a) for name, a in sources.items()}, tmp_path / "t.safetensors")
    theirs = st_paddle.load_file(tmp_path / "t.safetensors")
    for name, source in sources.items():
        assert_same(theirs[name], source)


def test_non_contiguous_tensors_are_written_in_logical_order():
    st_paddle = pytest.importorskip("safetensors.paddle", reason="the safetensors oracle is not installed")
    base = paddle.arange(24, dtype="float32").reshape([4, 6])
    tensors = {"t": paddle.transpose(base, [1, 0]), "b": paddle.transpose(base.astype("bfloat16"), [1, 0]),
               "step": base[1:, ::2]}
    assert not tensors["t"].is_contiguous()
    ours = safeckpt.save(tensors)
    with pytest.raises(ValueError, match="non contiguous"):  # safetensors.paddle refuses them
        st_paddle.save(tensors)
    assert ours == st_paddle.save({name: t.contiguous() for name, t in tensors.items()})


def test_model_state_dict_round_trips(tmp_path):
    model = paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.LayerNorm(3))
    state = model.state_dict()
    assert any(not p.stop_gradient for p in state.values())  # parameters that require gradients
    safeckpt.save_file(dict(state), tmp_path / "m.safetensors")
    fresh = paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.LayerNorm(3))
    fresh.set_state_dict(safeckpt.load_file(tmp_path / "m.safetensors", framework="paddle"))
    for name, value in fresh.state_dict().items():
        assert value.numpy().tobytes() == state[name].numpy().tobytes()


# --- zero-copy ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["F32", "BF16", "F8_E4M3", "U16", "BOOL"])
def test_to_numpy_shares_the_tensor_buffer(name):
    tensor = paddle_tensor(sample(name, (16, 8)))
    array = adapter.to_numpy(tensor)
    assert array.dtype == DTYPES[name].numpy
    assert array.ctypes.data == tensor.data_ptr()


@pytest.mark.parametrize("name", ["F32", "BF16", "F8_E5M2", "U16", "I64"])
@pytest.mark.parametrize("misalign", [0, 8])
def test_storage_loads_zero_copy_at_any_alignment(name, misalign):
    source = sample(name, (16, 16))
    buffer = np.zeros(source.nbytes + 128, np.uint8)
    start = (-buffer.ctypes.data) % 64 + misalign
    storage = buffer[start:start + source.nbytes]
    storage[:] = source.reshape(-1).view(np.uint8)
    tensor = adapter.from_storage(storage.view(DTYPES[name].numpy), DTYPES[name], (16, 16))
    assert tensor.data_ptr() == storage.ctypes.data
    assert_same(tensor, source)


def test_unaligned_tensors_compute_correctly(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal((n, n)).astype(np.float64) for i, n in enumerate([1, 3, 5, 8])}
    tensors["odd"] = np.ones(3, np.float32)  # pushes the float64 tensors off 16-byte alignment
    safeckpt.save_file(tensors, tmp_path / "t.safetensors")
    loaded = safeckpt.load_file(tmp_path / "t.safetensors", framework="paddle")
    for name, value in tensors.items():
        if value.ndim == 2:
            np.testing.assert_allclose(paddle.matmul(loaded[name], loaded[name]).numpy(), value @ value)


def test_loaded_tensors_are_writable_and_writes_never_reach_the_file(tmp_path):
    path = tmp_path / "t.safetensors"
    safeckpt.save_file({"w": np.zeros(8, np.float32)}, path)
    before = path.read_bytes()
    tensor = safeckpt.load_file(path, framework="paddle")["w"]
    tensor.add_(paddle.ones([8]))
    assert tensor.numpy().tolist() == [1.0] * 8
    assert path.read_bytes() == before


# --- devices and errors ---------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", None, "CPU_PLACE"])
def test_cpu_devices(tmp_path, device):
    device = paddle.CPUPlace() if device == "CPU_PLACE" else device
    safeckpt.save_file({"w": np.ones(3, np.float32)}, tmp_path / "t.safetensors")
    tensor = safeckpt.load_file(tmp_path / "t.safetensors", framework="paddle", device=device)["w"]
    assert tensor.place.is_cpu_place()


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="this paddle has CUDA")
@pytest.mark.parametrize("device", ["gpu:0", "cuda:0", 0])
def test_gpu_without_cuda_is_refused(tmp_path, device):
    safeckpt.save_file({"w": np.ones(3, np.float32)}, tmp_path / "t.safetensors")
    with pytest.raises(errors.FrameworkError):
        safeckpt.load_file(tmp_path / "t.safetensors", framework="paddle", device=device)


def test_unsupported_paddle_dtypes_are_refused():
    with pytest.raises(errors.UnsupportedTensorError, match="no safetensors equivalent"):
        safeckpt.save({"x": paddle.to_tensor(np.ones(2, np.complex128))})


@pytest.mark.parametrize("dtype, nbytes", [("F8_E8M0", 4), ("F8_E4M3FNUZ", 4), ("F4", 2), ("F6_E2M3", 3)])
def test_dtypes_paddle_lacks_are_refused_on_load(raw_file, dtype, nbytes):
    path = raw_file({"x": {"dtype": dtype, "shape": [4], "data_offsets": [0, nbytes]}}, b"\x00" * nbytes)
    with pytest.raises(errors.DTypeConversionError, match="framework='numpy'"):
        safeckpt.load_file(path, framework="paddle")


def test_is_tensor():
    assert adapter.is_tensor(paddle.ones([2]))
    assert adapter.is_tensor(paddle.nn.Linear(2, 2).weight)
    assert not adapter.is_tensor(np.ones(2))


def test_missing_paddle_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "paddle", None)  # `import paddle` now raises ImportError
    adapter.tables.cache_clear()
    with pytest.raises(errors.FrameworkError, match="pip install"):
        adapter.from_numpy(np.ones(2, np.float32))


def test_importing_safeckpt_does_not_import_paddle(tmp_path):
    code = f"""
        import sys, numpy as np, safeckpt
        import safeckpt.frameworks.paddle
        safeckpt.save_file({{"w": np.ones(2)}}, {str(tmp_path / "t.safetensors")!r})
        safeckpt.load_file({str(tmp_path / "t.safetensors")!r})
        assert "paddle" not in sys.modules, "paddle was imported"
    """
    run_python(code)
