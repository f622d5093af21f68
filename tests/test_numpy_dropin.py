"""safeckpt.numpy is a drop-in for safetensors.numpy: same names, signatures, bytes; zero-copy loads."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

st_numpy = pytest.importorskip("safetensors.numpy", reason="the safetensors oracle is not installed")

from safeckpt import numpy as scn  # noqa: E402


@pytest.mark.parametrize("name", ["save", "save_file", "load", "load_file"])
def test_same_signatures(name):
    ours, theirs = inspect.signature(getattr(scn, name)), inspect.signature(getattr(st_numpy, name))
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.parameters.values()]


def test_round_trip_against_theirs(tmp_path, model_like):
    scn.save_file(model_like, tmp_path / "ours.safetensors", metadata={"a": "b"})
    st_numpy.save_file(model_like, tmp_path / "theirs.safetensors", metadata={"a": "b"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    ours = scn.load_file(tmp_path / "theirs.safetensors")
    theirs = st_numpy.load_file(tmp_path / "ours.safetensors")
    assert list(ours) == list(theirs)
    for name in model_like:
        assert ours[name].dtype == theirs[name].dtype
        np.testing.assert_array_equal(ours[name], theirs[name])
    assert scn.save(model_like) == st_numpy.save(model_like)
    for name, array in scn.load(st_numpy.save(model_like)).items():
        np.testing.assert_array_equal(array, model_like[name])


def test_load_file_is_zero_copy(tmp_path):
    scn.save_file({"w": np.ones((256, 256), np.float32)}, tmp_path / "w.safetensors")
    loaded = scn.load_file(tmp_path / "w.safetensors")["w"]
    assert not loaded.flags.owndata and loaded.flags.writeable


def test_non_contiguous_arrays_keep_their_values():
    # theirs writes the memory behind the array's pointer, so a transpose comes back scrambled
    transposed = np.arange(6, dtype=np.float32).reshape(2, 3).T
    assert not np.array_equal(st_numpy.load(st_numpy.save({"t": transposed}))["t"], transposed)
    np.testing.assert_array_equal(scn.load(scn.save({"t": transposed}))["t"], transposed)
    assert scn.save({"t": transposed}) == st_numpy.save({"t": np.ascontiguousarray(transposed)})


def test_loads_the_dtypes_theirs_cannot_give_numpy(tmp_path):
    import ml_dtypes
    arrays = {"bf16": np.ones(3, ml_dtypes.bfloat16), "f8": np.zeros(2, ml_dtypes.float8_e5m2)}
    data = st_numpy.save(arrays)
    with pytest.raises(KeyError):
        st_numpy.load(data)
    for name, array in scn.load(data).items():
        assert array.dtype == arrays[name].dtype
        np.testing.assert_array_equal(array, arrays[name])
