"""Writing: logical order for any strides, bounded memory, atomic replacement, clear refusals."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import safeckpt
from safeckpt import errors
from safeckpt.format import writer
from safeckpt.sinks.safetensors import write_file


def layouts():
    base = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    return {
        "transposed": base.T,
        "fortran": np.asfortranarray(base),
        "strided": base[:, ::2, 1::2],
        "negative": base[::-1, :, ::-1],
        "broadcast": np.broadcast_to(np.arange(4, dtype=np.int64), (3, 4)),
        "big_endian": base.astype(">f4"),
        "big_endian_transposed": base.astype(">i8").T,
        "bf16_transposed": base.astype(ml_dtypes.bfloat16).transpose(1, 0, 2),
        "zero_strides_scalar": np.float64(2.5),
    }


@pytest.mark.parametrize("name", list(layouts()))
def test_any_layout_written_in_logical_order(tmp_path, name):
    array = layouts()[name]
    path = tmp_path / "x.safetensors"
    safeckpt.save_file({name: array}, path)
    back = safeckpt.load_file(path)[name]
    expected = np.array(array, order="C")
    assert back.shape == expected.shape
    assert back.dtype == expected.dtype.newbyteorder("=")
    np.testing.assert_array_equal(back, expected)
    assert safeckpt.save({name: array}) == safeckpt.save({name: expected.astype(back.dtype)})


def test_huggingface_numpy_writer_scrambles_what_we_keep(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy", reason="the safetensors oracle is not installed")
    transposed = np.arange(6, dtype=np.float32).reshape(2, 3).T
    theirs = st_numpy.load(st_numpy.save({"t": transposed}))["t"]
    ours = safeckpt.load(safeckpt.save({"t": transposed}))["t"]
    np.testing.assert_array_equal(ours, transposed)
    assert not np.array_equal(theirs, transposed)  # their bytes are the raw memory, not the logical order


def test_large_noncontiguous_tensor_in_bounded_blocks(tmp_path):
    array = np.arange(3000 * 3000, dtype=np.float64).reshape(3000, 3000).T  # 72 MB
    tracemalloc.start()
    safeckpt.save_file({"t": array}, tmp_path / "t.safetensors")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2 * writer.BLOCK_BYTES + (4 << 20)
    np.testing.assert_array_equal(safeckpt.load_file(tmp_path / "t.safetensors")["t"], array)


def test_contiguous_tensors_are_written_without_a_copy(tmp_path):
    tensors = {f"w{i}": np.full((1024, 1024), i, dtype=np.float32) for i in range(32)}  # 128 MiB
    tracemalloc.start()
    safeckpt.save_file(tensors, tmp_path / "m.safetensors")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20
    assert os.path.getsize(tmp_path / "m.safetensors") > 128 << 20


def test_torch_tensors_are_written_without_a_copy(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed")
    tensors = {f"w{i}": torch.full((1024, 1024), float(i), dtype=torch.bfloat16) for i in range(32)}
    tracemalloc.start()
    safeckpt.save_file(tensors, tmp_path / "m.safetensors")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20


def test_file_mode_follows_umask(tmp_path):
    code = ("import os, numpy as np, safeckpt; os.umask(0o027); "
            f"safeckpt.save_file({{'a': np.ones(2)}}, {str(tmp_path / 'm.safetensors')!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o640


def test_failed_write_leaves_old_file_and_no_temporaries(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    safeckpt.save_file({"old": np.arange(4, dtype=np.int32)}, path)
    before = path.read_bytes()
    real_write, written = os.write, []

    def disk_full_after_first_write(fd, data):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", disk_full_after_first_write)
    with pytest.raises(OSError) as info:
        safeckpt.save_file({"new": np.zeros(1 << 20, np.float32)}, path)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_interrupted_write_leaves_old_file(tmp_path):
    path = tmp_path / "model.safetensors"
    safeckpt.save_file({"old": np.arange(4, dtype=np.int32)}, path)
    before = path.read_bytes()


    def explode():
        raise KeyboardInterrupt

    tensors = [writer.prepare("a", np.zeros(10, np.float32)),
               writer.PreparedTensor("b", safeckpt.format.DTYPES["F32"], (1,), 4, explode)]
    with pytest.raises(KeyboardInterrupt):
        write_file(tensors, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_partial_writes_are_completed(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:1000]))
    array = np.random.default_rng(0).standard_normal(10_000)
    safeckpt.save_file({"a": array}, tmp_path / "a.safetensors")
    monkeypatch.undo()
    np.testing.assert_array_equal(safeckpt.load_file(tmp_path / "a.safetensors")["a"], array)


@pytest.mark.parametrize("tensors, error, fragment", [
    ({"a": [1, 2, 3]}, errors.UnsupportedTensorError, "list"),
    ({"a": np.zeros(2, np.complex128)}, errors.UnsupportedTensorError, "complex128"),
    ({"a": np.array(["x"])}, errors.UnsupportedTensorError, "<U1"),
    ({"a": np.array([object()])}, errors.UnsupportedTensorError, "object"),
    ({"a": np.zeros(3, ml_dtypes.float4_e2m1fn)}, errors.UnsupportedTensorError, "even"),
    ({1: np.zeros(2)}, errors.InvalidNameError, "strings"),
    ({"__metadata__": np.zeros(2)}, errors.InvalidNameError, "reserved"),
    ({"\ud800": np.zeros(2)}, errors.InvalidNameError, "UTF-8"),
], ids=["list", "complex128", "str", "object", "odd-f4", "int-name", "reserved", "surrogate"])
def test_refusals(tmp_path, tensors, error, fragment):
    path = tmp_path / "x.safetensors"
    with pytest.raises(error, match=fragment):
        safeckpt.save_file(tensors, path)
    with pytest.raises(error, match=fragment):
        safeckpt.save(tensors)
    assert not path.exists()


@pytest.mark.parametrize("metadata", [{"a": 1}, {1: "a"}, ["a"], {"a": None}])
def test_metadata_must_be_str_to_str(tmp_path, metadata):
    with pytest.raises(errors.InvalidMetadataError):
        safeckpt.save_file({"a": np.zeros(1)}, tmp_path / "x.safetensors", metadata)


def test_not_a_dict():
    with pytest.raises(errors.UnsupportedTensorError, match="dict"):
        safeckpt.save([np.zeros(1)])


def test_overwrites_existing_file_atomically(tmp_path):
    path = tmp_path / "m.safetensors"
    safeckpt.save_file({"a": np.zeros(100)}, path)
    held = safeckpt.load_file(path)["a"]  # a live map of the old file
    safeckpt.save_file({"b": np.ones(3)}, path)
    assert list(safeckpt.load_file(path)) == ["b"]
    np.testing.assert_array_equal(held, np.zeros(100))  # the old inode is still intact under the map
