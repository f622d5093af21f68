"""The tensorflow adapter: every tf dtype round-trips bit for bit, bytes match safetensors.tensorflow."""

from __future__ import annotations

import os
import sys

import ml_dtypes
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="tensorflow not installed")

import safeckpt  # noqa: E402
from safeckpt import errors  # noqa: E402
from safeckpt.format.dtypes import DTYPES  # noqa: E402
from safeckpt.frameworks import tensorflow as adapter  # noqa: E402
from tests.frameworks.framework_samples import (  # noqa: E402
    SHAPES, SLICES, aligned_array, assert_same_bytes, fits, run_python, sample,
)

# Every safetensors dtype tensorflow holds (F8_E8M0 and F6 it does not).
TF_DTYPES = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
             "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4"]
THEIR_DTYPES = [name for name in TF_DTYPES if name != "F4"]  # safetensors.numpy cannot write F4


def tf_bytes(tensor) -> np.ndarray:
    """A tensor's values through tensorflow's own (copying) `.numpy()`."""
    return tensor.numpy() if isinstance(tensor, (tf.Tensor, tf.Variable)) else np.asarray(tensor)


def assert_same(actual, expected: np.ndarray) -> None:
    """Same dtype, shape and bytes (so NaN payloads count)."""
    assert_same_bytes(tf_bytes(actual), expected)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", TF_DTYPES)
def test_round_trip_bit_exact(tmp_path, name, shape):
    source = sample(name, shape)
    path = tmp_path / "t.safetensors"
    if not fits(name, shape):
        with pytest.raises(errors.UnsupportedTensorError, match="two per byte"):
            safeckpt.save_file({"t": tf.convert_to_tensor(source)}, path)
        return
    safeckpt.save_file({"t": tf.convert_to_tensor(source)}, path)

    with safeckpt.safe_open(path) as f:  # the file holds the tf tensor's bytes
        assert_same(f.get_tensor("t"), source)
    loaded = safeckpt.load_file(path, framework="tf")["t"]
    assert isinstance(loaded, tf.Tensor)
    assert_same(loaded, source)
    with safeckpt.safe_open(path, framework="tensorflow") as f:
        assert_same(f.get_tensor("t"), source)
        part = f.get_slice("t")[SLICES[shape]]
        assert isinstance(part, tf.Tensor)
        assert_same(part, source[SLICES[shape]])
    assert_same(safeckpt.load(safeckpt.save({"t": tf.convert_to_tensor(source)}), framework="tf")["t"], source)


def test_bytes_identical_to_safetensors_tensorflow():
    st_tf = pytest.importorskip("safetensors.tensorflow", reason="the safetensors oracle is not installed")
    # Not scalars: safetensors.tensorflow fails on them (.numpy() of a 0-d tensor is a numpy scalar).
    tensors = {f"{name.lower()}.{i}": tf.convert_to_tensor(sample(name, shape, seed=i))
               for name in THEIR_DTYPES for i, shape in enumerate(SHAPES) if shape}
    tensors["transposed"] = tf.transpose(tf.reshape(tf.range(12.0), (3, 4)))
    tensors["variable"] = tf.Variable(tf.ones((2, 2), tf.bfloat16))
    ours = safeckpt.save(tensors, metadata={"format": "tf"})
    assert ours == st_tf.save(dict(tensors), metadata={"format": "tf"})  # theirs mutates the dict


def test_files_from_safetensors_tensorflow_load_through_ours(tmp_path):
    st_tf = pytest.importorskip("safetensors.tensorflow", reason="the safetensors oracle is not installed")
    sources = {name: sample(name, (3, 4)) for name in THEIR_DTYPES}
    st_tf.save_file({name: tf.convert_to_tensor(a) for name, a in sources.items()}, tmp_path / "t.safetensors")
    loaded = safeckpt.load_file(tmp_path / "t.safetensors", framework="tf")
    assert loaded.keys() == sources.keys()
    for name, source in sources.items():
        assert_same(loaded[name], source)


def test_files_of_ours_load_through_safetensors_tensorflow(tmp_path):
    st_tf = pytest.importorskip("safetensors.tensorflow", reason="the safetensors oracle is not installed")
    sources = {name: sample(name, (3, 4)) for name in ("F16", "F32", "F64", "I8", "I32", "I64", "U8", "BOOL")}
    safeckpt.save_file({name: tf.convert_to_tensor(a) for name, a in sources.items()}, tmp_path / "t.safetensors")
    theirs = st_tf.load_file(tmp_path / "t.safetensors")
    for name, source in sources.items():
        assert_same(theirs[name], source)


def test_keras_model_weights_round_trip(tmp_path):
    keras = pytest.importorskip("keras", reason="keras not installed")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("keras runs on another backend here")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.LayerNormalization()])
    weights = {v.path: v for v in model.weights}
    safeckpt.save_file(weights, tmp_path / "k.safetensors")
    loaded = safeckpt.load_file(tmp_path / "k.safetensors", framework="tf")
    for name, variable in weights.items():
        assert_same(loaded[name], variable.numpy())


# --- zero-copy, and never an unaligned buffer -----------------------------------

@pytest.mark.parametrize("name", ["F32", "BF16", "I64", "BOOL"])
def test_to_numpy_shares_the_tensor_buffer(name):
    tensor = tf.convert_to_tensor(sample(name, (64, 8)))
    first, second = adapter.to_numpy(tensor), adapter.to_numpy(tensor)
    assert first.dtype == DTYPES[name].numpy
    assert first.ctypes.data == second.ctypes.data  # .numpy() would give two copies
    assert not first.flags.writeable


@pytest.mark.parametrize("name", ["F32", "BF16", "U16", "C64"])
def test_aligned_storage_loads_zero_copy(name):
    source = sample(name, (16, 16))
    storage = aligned_array(source.nbytes, np.uint8)
    storage[:] = source.reshape(-1).view(np.uint8)
    tensor = adapter.from_storage(storage.view(DTYPES[name].numpy), DTYPES[name], (16, 16))
    assert adapter.to_numpy(tensor).ctypes.data == storage.ctypes.data
    assert_same(tensor, source)


@pytest.mark.parametrize("misalign", [8, 16, 32])
def test_unaligned_storage_is_copied_and_safe_for_every_op(misalign):
    # TensorFlow aborts the process on an op over an unaligned buffer; we must copy these.
    storage = aligned_array(32 * 32 * 4, np.float32, misalign)
    storage[:] = np.arange(1024)
    tensor = adapter.from_storage(storage, DTYPES["F32"], (32, 32))
    assert adapter.to_numpy(tensor).ctypes.data % adapter.TF_ALIGNMENT == 0
    expected = storage.reshape(32, 32)
    assert float(tf.reduce_sum(tensor[1:, ::3])) == float(expected[1:, ::3].sum())
    np.testing.assert_allclose(tf.matmul(tensor, tensor).numpy(), expected @ expected, rtol=1e-6)


def test_every_tensor_of_a_file_survives_ops(tmp_path):
    # Tensors of odd sizes put later tensors at every 8-byte alignment.
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate([1, 3, 5, 7, 9, 64, 2])}
    tensors.update({f"h{i}": rng.standard_normal(n).astype(ml_dtypes.bfloat16) for i, n in enumerate([1, 3, 7])})
    safeckpt.save_file(tensors, tmp_path / "t.safetensors")
    loaded = safeckpt.load_file(tmp_path / "t.safetensors", framework="tf")
    for name, value in tensors.items():
        total = tf.reduce_sum(tf.cast(loaded[name][::2], tf.float32))
        assert float(total) == pytest.approx(float(value[::2].astype(np.float32).sum()), rel=1e-5)


def test_zero_copy_tensor_outlives_the_file(tmp_path):
    path = tmp_path / "t.safetensors"
    safeckpt.save_file({"w": np.arange(4096, dtype=np.float32)}, path)
    tensor = safeckpt.load_file(path, framework="tf")["w"]
    os.unlink(path)
    assert float(tf.reduce_sum(tensor)) == float(np.arange(4096, dtype=np.float32).sum())


# --- devices and errors ---------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", "CPU:0", "/CPU:0", "/device:CPU:0", None])
def test_cpu_device_names(tmp_path, device):
    safeckpt.save_file({"w": np.ones(3, np.float32)}, tmp_path / "t.safetensors")
    tensor = safeckpt.load_file(tmp_path / "t.safetensors", framework="tf", device=device)["w"]
    assert tensor.device.endswith("CPU:0")


@pytest.mark.parametrize("device", ["gpu:99", "cuda:99", 99, "tpu:99", "/CPU:5", 2.5])
def test_unavailable_devices_are_refused(tmp_path, device):
    safeckpt.save_file({"w": np.ones(3, np.float32)}, tmp_path / "t.safetensors")
    with pytest.raises(errors.FrameworkError):
        safeckpt.load_file(tmp_path / "t.safetensors", framework="tf", device=device)


@pytest.mark.parametrize("make, match", [
    (lambda: tf.constant(["a", "b"]), "no safetensors equivalent"),
    (lambda: tf.constant([1, 2], tf.dtypes.experimental.int4), "no safetensors equivalent"),
    (lambda: tf.sparse.from_dense(tf.eye(2)), "tf.sparse.to_dense"),
    (lambda: tf.ragged.constant([[1], [2, 3]]), "to_tensor"),
])
def test_values_without_a_safetensors_form_are_refused(make, match):
    with pytest.raises(errors.UnsupportedTensorError, match=match):
        safeckpt.save({"x": make()})


def test_symbolic_tensors_cannot_be_saved():
    @tf.function(autograph=False)
    def save_inside(x):
        safeckpt.save({"x": x})
        return x

    with pytest.raises(errors.UnsupportedTensorError, match="tf.function"):
        save_inside(tf.ones(2))


@pytest.mark.parametrize("dtype", ["F8_E8M0", "F6_E3M2"])
def test_dtypes_tensorflow_lacks_are_refused_on_load(raw_file, dtype):
    path = raw_file({"x": {"dtype": dtype, "shape": [4], "data_offsets": [0, 4 if dtype == "F8_E8M0" else 3]}},
                    b"\x00" * (4 if dtype == "F8_E8M0" else 3))
    with pytest.raises(errors.DTypeConversionError, match="framework='numpy'"):
        safeckpt.load_file(path, framework="tf")


def test_is_tensor():
    assert adapter.is_tensor(tf.ones(2))
    assert adapter.is_tensor(tf.Variable([1.0]))
    assert not adapter.is_tensor(np.ones(2))
    assert not adapter.is_tensor([1.0])


def test_missing_tensorflow_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now raises ImportError
    adapter.tables.cache_clear()
    with pytest.raises(errors.FrameworkError, match="pip install"):
        adapter.from_numpy(np.ones(2, np.float32))


def test_importing_safeckpt_does_not_import_tensorflow(tmp_path):
    code = f"""
        import sys, numpy as np, safeckpt
        import safeckpt.frameworks.tensorflow
        safeckpt.save_file({{"w": np.ones(2)}}, {str(tmp_path / "t.safetensors")!r})
        safeckpt.load_file({str(tmp_path / "t.safetensors")!r})
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules, "tensorflow was imported"
    """
    run_python(code)
