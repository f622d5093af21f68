"""The jax adapter: every jax dtype round-trips bit for bit, bytes match safetensors.flax."""

from __future__ import annotations

import os
import sys
import warnings

import ml_dtypes
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax not installed")
import jax.numpy as jnp  # noqa: E402

import safeckpt  # noqa: E402
from safeckpt import errors  # noqa: E402
from safeckpt.format.dtypes import DTYPES  # noqa: E402
from safeckpt.frameworks import jax as adapter  # noqa: E402
from tests.frameworks.framework_samples import (  # noqa: E402
    SHAPES, SLICES, aligned_array, assert_same_bytes, fits, run_python, sample,
)

# Every safetensors dtype jax holds; the 64-bit ones need jax_enable_x64 (the x64 fixture).
JAX_DTYPES = [name for name, d in DTYPES.items() if d.numpy is not None]
THEIR_DTYPES = [name for name in JAX_DTYPES if name != "F4"]  # safetensors.numpy cannot write F4


def assert_same(actual, expected: np.ndarray) -> None:
    """Same dtype, shape and bytes (so NaN payloads count)."""
    assert_same_bytes(np.asarray(actual), expected)


@pytest.fixture
def x64():
    """jax with 64-bit types, restored afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", JAX_DTYPES)
def test_round_trip_bit_exact(tmp_path, x64, name, shape):
    source = sample(name, shape)
    path = tmp_path / "t.safetensors"
    if not fits(name, shape):
        with pytest.raises(errors.UnsupportedTensorError, match="two per byte"):
            safeckpt.save_file({"t": jax.device_put(source)}, path)
        return
    safeckpt.save_file({"t": jax.device_put(source)}, path)

    with safeckpt.safe_open(path) as f:  # the file holds the jax array's bytes
        assert_same(f.get_tensor("t"), source)
    loaded = safeckpt.load_file(path, framework="jax")["t"]
    assert isinstance(loaded, jax.Array)
    assert_same(loaded, source)
    with safeckpt.safe_open(path, framework="flax") as f:
        assert_same(f.get_tensor("t"), source)
        part = f.get_slice("t")[SLICES[shape]]
        assert isinstance(part, jax.Array)
        assert_same(part, source[SLICES[shape]])
    assert_same(safeckpt.load(safeckpt.save({"t": jax.device_put(source)}), framework="jax")["t"], source)


def test_bytes_identical_to_safetensors_flax(x64):
    st_flax = pytest.importorskip("safetensors.flax", reason="the safetensors oracle is not installed")
    tensors = {f"{name.lower()}.{i}": jax.device_put(sample(name, shape, seed=i))
               for name in THEIR_DTYPES for i, shape in enumerate(SHAPES)}
    tensors["transposed"] = jnp.arange(12, dtype=jnp.float32).reshape(3, 4).T
    ours = safeckpt.save(tensors, metadata={"format": "flax"})
    assert ours == st_flax.save(dict(tensors), metadata={"format": "flax"})  # theirs mutates the dict


def test_files_from_safetensors_flax_load_through_ours(tmp_path, x64):
    st_flax = pytest.importorskip("safetensors.flax", reason="the safetensors oracle is not installed")
    sources = {name: sample(name, (3, 4)) for name in THEIR_DTYPES}
    st_flax.save_file({name: jax.device_put(a) for name, a in sources.items()}, tmp_path / "t.safetensors")
    loaded = safeckpt.load_file(tmp_path / "t.safetensors", framework="flax")
    assert loaded.keys() == sources.keys()
    for name, source in sources.items():
        assert_same(loaded[name], source)


def test_files_of_ours_load_through_safetensors_flax(tmp_path, x64):
    st_flax = pytest.importorskip("safetensors.flax", reason="the safetensors oracle is not installed")
    sources = {name: sample(name, (3, 4)) for name in ("F16", "F32", "F64", "I8", "I32", "I64", "U8", "BOOL")}
    safeckpt.save_file({name: jax.device_put(a) for name, a in sources.items()}, tmp_path / "t.safetensors")
    theirs = st_flax.load_file(tmp_path / "t.safetensors")
    for name, source in sources.items():
        assert_same(theirs[name], source)


def test_model_like_state_round_trips(tmp_path, model_like):
    params = {name: jax.device_put(a) for name, a in model_like.items() if a.dtype.itemsize < 8}
    safeckpt.save_file(params, tmp_path / "m.safetensors")
    loaded = safeckpt.load_file(tmp_path / "m.safetensors", framework="jax")
    for name, value in params.items():
        assert_same(loaded[name], np.asarray(value))


# --- zero-copy ----------------------------------------------------------------

def test_to_numpy_is_a_view_of_the_jax_buffer():
    array = jnp.arange(1024, dtype=jnp.bfloat16)
    view = adapter.to_numpy(array)
    assert view.dtype == ml_dtypes.bfloat16
    assert view.ctypes.data == array.unsafe_buffer_pointer()


def test_aligned_storage_loads_zero_copy_and_unaligned_is_copied_correctly():
    for misalign, shared in ((0, True), (8, False)):
        storage = aligned_array(4096, np.float32, misalign)
        storage[:] = np.arange(1024)
        array = adapter.from_storage(storage, DTYPES["F32"], (32, 32))
        assert (array.unsafe_buffer_pointer() == storage.ctypes.data) is shared
        assert_same(array, storage.reshape(32, 32))
        assert float(jnp.sum(array[1:, ::3])) == float(storage.reshape(32, 32)[1:, ::3].sum())


def test_zero_copy_array_outlives_the_file(tmp_path):
    path = tmp_path / "t.safetensors"
    safeckpt.save_file({"w": np.arange(4096, dtype=np.float32)}, path)
    array = safeckpt.load_file(path, framework="jax")["w"]
    os.unlink(path)
    assert float(array.sum()) == float(np.arange(4096, dtype=np.float32).sum())


# --- 64-bit types with jax_enable_x64 off (jax's default) -----------------------

@pytest.fixture
def x32():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", previous)


def test_x32_narrows_64_bit_integers_that_fit(tmp_path, x32):
    safeckpt.save_file({"ids": np.arange(5, dtype=np.int64), "count": np.array(2**32 - 1, np.uint64)},
                       tmp_path / "t.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = safeckpt.load_file(tmp_path / "t.safetensors", framework="jax")
    assert loaded["ids"].dtype == jnp.int32 and loaded["ids"].tolist() == [0, 1, 2, 3, 4]
    assert loaded["count"].dtype == jnp.uint32 and int(loaded["count"]) == 2**32 - 1


def test_x32_refuses_64_bit_integers_that_do_not_fit(tmp_path, x32):
    safeckpt.save_file({"big": np.array([1, 2**40], np.int64)}, tmp_path / "t.safetensors")
    with pytest.raises(errors.DTypeConversionError, match="jax_enable_x64"):
        safeckpt.load_file(tmp_path / "t.safetensors", framework="jax")


def test_x32_rounds_f64_with_a_warning_only_when_values_change(tmp_path, x32):
    safeckpt.save_file({"exact": np.array([0.5, 2.0]), "rounded": np.array([0.1])}, tmp_path / "t.safetensors")
    with safeckpt.safe_open(tmp_path / "t.safetensors", framework="jax") as f:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert f.get_tensor("exact").dtype == jnp.float32
        with pytest.warns(UserWarning, match="jax_enable_x64"):
            assert f.get_tensor("rounded").dtype == jnp.float32


def test_x64_keeps_64_bit_types_exact(tmp_path, x64):
    values = {"i": np.array([-(2**62), 2**40], np.int64), "u": np.array([2**64 - 1], np.uint64),
              "f": np.array([0.1, np.pi]), "c": np.array([1 + 2j], np.complex64)}
    safeckpt.save_file(values, tmp_path / "t.safetensors")
    loaded = safeckpt.load_file(tmp_path / "t.safetensors", framework="jax")
    for name, value in values.items():
        assert_same(loaded[name], value)


# --- devices and errors ---------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", "cpu:0", None, 0, "CPU"])
def test_cpu_device_names(tmp_path, device):
    safeckpt.save_file({"w": np.ones(3, np.float32)}, tmp_path / "t.safetensors")
    array = safeckpt.load_file(tmp_path / "t.safetensors", framework="jax", device=device)["w"]
    assert array.devices() == {jax.devices("cpu")[0]}


def test_jax_device_and_sharding_objects_are_accepted(tmp_path):
    safeckpt.save_file({"w": np.ones(3, np.float32)}, tmp_path / "t.safetensors")
    device = jax.devices()[0]
    for where in (device, jax.sharding.SingleDeviceSharding(device)):
        array = safeckpt.load_file(tmp_path / "t.safetensors", framework="jax", device=where)["w"]
        assert array.devices() == {device}


@pytest.mark.parametrize("device", ["cpu:7", "tpu:99", "gpu:99", "nonsense", "cpu:x", 99, 2.5])
def test_unavailable_devices_are_refused(tmp_path, device):
    safeckpt.save_file({"w": np.ones(3, np.float32)}, tmp_path / "t.safetensors")
    with pytest.raises(errors.FrameworkError):
        safeckpt.load_file(tmp_path / "t.safetensors", framework="jax", device=device)


def test_traced_values_cannot_be_saved():
    @jax.jit
    def save_inside(x):
        safeckpt.save({"x": x})
        return x

    with pytest.raises(errors.UnsupportedTensorError, match="outside the transformation"):
        save_inside(jnp.ones(2))


@pytest.mark.parametrize("make, match", [
    (lambda: jax.random.key(0), "key_data"),
    (lambda: jnp.ones(4, jnp.int4), "has no safetensors equivalent"),
    (lambda: jnp.ones(4, jnp.float8_e4m3), "has no safetensors equivalent"),  # IEEE-style, not e4m3fn
])
def test_values_without_a_safetensors_dtype_are_refused(make, match):
    with pytest.raises(errors.UnsupportedTensorError, match=match):
        safeckpt.save({"x": make()})


def test_deleted_arrays_are_refused():
    array = jnp.ones(3)
    array.delete()
    with pytest.raises(errors.UnsupportedTensorError, match="deleted"):
        safeckpt.save({"x": array})


def test_f6_has_no_jax_form(raw_file):
    path = raw_file({"x": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}, b"\x00" * 3)
    with pytest.raises(errors.DTypeConversionError, match="framework='numpy'"):
        safeckpt.load_file(path, framework="jax")


def test_is_tensor():
    assert adapter.is_tensor(jnp.ones(2))
    assert not adapter.is_tensor(np.ones(2))
    assert not adapter.is_tensor([1.0])


def test_missing_jax_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)  # `import jax` now raises ImportError
    with pytest.raises(errors.FrameworkError, match="pip install"):
        adapter.from_numpy(np.ones(2, np.float32))


def test_importing_safeckpt_does_not_import_jax(tmp_path):
    run_python(f"""
        import sys, numpy as np, safeckpt
        import safeckpt.frameworks.jax
        safeckpt.save_file({{"w": np.ones(2)}}, {str(tmp_path / "t.safetensors")!r})
        safeckpt.load_file({str(tmp_path / "t.safetensors")!r})
        assert "jax" not in sys.modules, "jax was imported"
    """)


def test_arrays_sharded_over_several_devices_are_gathered(tmp_path):
    out = run_python(f"""
        import jax, jax.numpy as jnp, numpy as np, safeckpt
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
        x = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, PartitionSpec("a", "b")))
        assert len(x.addressable_shards) == 4
        safeckpt.save_file({{"x": x}}, {str(tmp_path / "s.safetensors")!r})
        y = safeckpt.load_file({str(tmp_path / "s.safetensors")!r})["x"]
        assert (y == np.arange(64.0).reshape(8, 8)).all()
        print("ok")
    """, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    assert out.strip() == "ok"
