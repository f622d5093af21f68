"""safeckpt.flax / .tensorflow / .paddle / .mlx against safetensors.<same>: names, signatures, bytes, values."""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest

FUNCTIONS = ("save", "save_file", "load", "load_file")

# paddle and TensorFlow crash when first imported after jax has computed (and paddle after
# TensorFlow): import them in that order while the tests are collected, as tests/frameworks does.
for _framework in ("paddle", "tensorflow"):
    try:
        importlib.import_module(_framework)
    except ImportError:
        pass


def framework_tensors(name: str) -> dict:
    """A few tensors of the framework, bf16 where its safetensors module can save it."""
    rng = np.random.default_rng(0)
    w, ids = rng.standard_normal((3, 5)).astype(np.float32), np.arange(6, dtype=np.int64).reshape(2, 3)
    if name == "flax":
        import jax.numpy as jnp
        return {"w": jnp.asarray(w), "ids": jnp.asarray(ids), "half": jnp.asarray(w, dtype=jnp.bfloat16)}
    if name == "tensorflow":
        import tensorflow as tf
        return {"w": tf.constant(w), "ids": tf.constant(ids), "half": tf.cast(tf.constant(w), tf.bfloat16)}
    if name == "paddle":
        import paddle
        return {"w": paddle.to_tensor(w), "ids": paddle.to_tensor(ids),
                "half": paddle.to_tensor(w).astype("bfloat16")}
    import mlx.core as mx  # safetensors.mlx goes through numpy, which has no bf16: no bf16 here
    return {"w": mx.array(w), "ids": mx.array(ids), "half": mx.array(w).astype(mx.float16)}


def as_numpy(value) -> np.ndarray:
    """The values as float32/int64 numpy, whatever the framework."""
    module = type(value).__module__.split(".")[0]
    if module == "tensorflow":
        return value.numpy().astype(np.float32 if value.dtype.is_floating else np.int64)
    if module == "paddle":
        return value.astype("float32" if value.dtype.name.startswith(("BF", "FP")) else "int64").numpy()
    if module == "mlx":
        return np.array(value)
    return np.asarray(value).astype(np.float32 if np.asarray(value).dtype.kind == "V" or "float" in str(value.dtype)
                                    else np.int64)


@pytest.fixture(params=["flax", "tensorflow", "paddle", "mlx"])
def pair(request):
    name = request.param
    pytest.importorskip({"flax": "jax", "tensorflow": "tensorflow", "paddle": "paddle", "mlx": "mlx.core"}[name])
    theirs = pytest.importorskip(f"safetensors.{name}")
    return name, importlib.import_module(f"safeckpt.{name}"), theirs


def test_same_functions_and_signatures(pair):
    _, ours, theirs = pair
    for function in FUNCTIONS:
        ours_params = inspect.signature(getattr(ours, function)).parameters
        their_params = inspect.signature(getattr(theirs, function)).parameters
        assert [(p.name, p.kind, p.default) for p in ours_params.values()] == \
            [(p.name, p.kind, p.default) for p in their_params.values()], function
    for name in ("safe_open", "serialize", "serialize_file", "deserialize"):
        assert hasattr(ours, name) == hasattr(theirs, name), name


def test_same_bytes_and_values_both_ways(pair, tmp_path):
    name, ours, theirs = pair
    tensors = framework_tensors(name)
    # safetensors' framework modules replace the values of the dict they are given: give them copies
    assert ours.save(tensors, {"k": "v"}) == theirs.save(dict(tensors), {"k": "v"})
    ours.save_file(tensors, tmp_path / "ours.safetensors")
    theirs.save_file(dict(tensors), str(tmp_path / "theirs.safetensors"))
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    for loaded in (ours.load_file(tmp_path / "theirs.safetensors"), ours.load(theirs.save(dict(tensors))),
                   theirs.load_file(str(tmp_path / "ours.safetensors"))):
        assert sorted(loaded) == sorted(tensors)
        for key, value in tensors.items():
            assert type(loaded[key]).__module__.split(".")[0] == type(value).__module__.split(".")[0], key
            assert str(loaded[key].dtype) == str(value.dtype), key
            np.testing.assert_array_equal(as_numpy(loaded[key]), as_numpy(value))
