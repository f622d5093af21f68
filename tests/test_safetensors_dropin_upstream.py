"""The drop-in claim, tested as users make it: code written for `safetensors` run against safeckpt.

Each test below is written the way safetensors' own Python tests and their users
call the library (`from safetensors import ...`, `from safetensors.torch import ...`)
and runs twice: once on the real package, once with ``sys.modules`` aliasing
`safetensors` -> `safeckpt`, `safetensors.torch` -> `safeckpt.torch`,
`safetensors.numpy` -> `safeckpt.numpy`. A test passes on the real package first,
so it states safetensors' behaviour; where we deliberately differ, the test
branches on `impl` and says why.
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed")
pytest.importorskip("safetensors.torch", reason="the safetensors oracle is not installed")

ALIASES = {"safetensors": "safeckpt", "safetensors.torch": "safeckpt.torch", "safetensors.numpy": "safeckpt.numpy"}


@pytest.fixture(params=["safetensors", "safeckpt"])
def impl(request, monkeypatch, tmp_path):
    """The package `import safetensors` gives inside the test; the working directory is a temp dir."""
    if request.param == "safeckpt":
        import importlib
        for alias, target in ALIASES.items():
            monkeypatch.setitem(sys.modules, alias, importlib.import_module(target))
    import safetensors
    import safetensors.numpy
    import safetensors.torch
    assert safetensors.__name__ == request.param  # the alias is in force, or the real package is
    assert safetensors.torch.__name__ == f"{request.param}.torch"
    monkeypatch.chdir(tmp_path)
    return request.param


class OnesModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.a.weight = torch.nn.Parameter(torch.ones((4, 4)))
        self.a.bias = torch.nn.Parameter(torch.ones((4,)))
        self.b = self.a


class SharedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(10, 10)
        self.b = self.a


class SeparateModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(10, 10)
        self.b = torch.nn.Linear(10, 10)


I32_ZEROS = (b'@\x00\x00\x00\x00\x00\x00\x00{"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}}    '
             + bytes(16))


# --- numpy and bytes ---------------------------------------------------------------

def test_numpy_save_bytes_and_file(impl):
    from safetensors.numpy import save, save_file
    data = np.zeros((2, 2), dtype=np.int32)
    assert save({"test": data}) == I32_ZEROS
    save_file({"test": data}, "out.safetensors")
    assert open("out.safetensors", "rb").read() == I32_ZEROS
    assert save({"test": np.zeros((2, 2), dtype=">i4")}) == I32_ZEROS  # big-endian input, little-endian file


def test_numpy_order_invariance_and_alignment(impl):
    from safetensors.numpy import save
    ints, halves = np.zeros((2, 2), np.int32), np.zeros((2, 2), np.float16)
    first, second = save({"a": ints, "b": halves}), save({"b": halves, "a": ints})
    assert first == second
    assert (first[8:].index(b"\x00") + 8) % 8 == 0


def test_numpy_round_trip_and_metadata(impl):
    from safetensors import safe_open
    from safetensors.numpy import load, load_file, save, save_file
    tensors = {"a": np.zeros((2, 2)), "b": np.arange(6, dtype=np.uint8).reshape(2, 3), "c": np.asarray(False)}
    save_file(tensors, "np.safetensors", metadata={"framework": "np"})
    for loaded in (load_file("np.safetensors"), load(save(tensors))):
        assert loaded.keys() == tensors.keys()
        for name in tensors:
            np.testing.assert_array_equal(loaded[name], tensors[name])
    with safe_open("np.safetensors", framework="np") as f:
        assert f.metadata() == {"framework": "np"}


def test_raw_specs_and_threads(impl):
    from safetensors import TensorSpec, serialize, serialize_file
    from safetensors.numpy import load_file
    a = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    b = np.arange(100, dtype=np.int8)
    specs = {name: TensorSpec(dtype=array.dtype.name, shape=array.shape, data_ptr=array.ctypes.data,
                              data_len=array.nbytes) for name, array in {"a": a, "b": b}.items()}
    assert serialize(specs) == serialize(dict(reversed(list(specs.items()))))
    threads = [threading.Thread(target=serialize_file, args=(specs, f"t{i}.safetensors")) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(4):
        loaded = load_file(f"t{i}.safetensors")
        np.testing.assert_array_equal(loaded["a"], a)
        np.testing.assert_array_equal(loaded["b"], b)


def test_errors_are_safetensor_errors(impl):
    from safetensors import SafetensorError, TensorSpec, safe_open
    from safetensors.numpy import save_file
    with pytest.raises(SafetensorError):
        TensorSpec(dtype="nonsense", shape=[1], data_ptr=0, data_len=0)
    save_file({"a": np.zeros((10, 5))}, "x.safetensors")
    with safe_open("x.safetensors", framework="np") as f:
        with pytest.raises(SafetensorError):
            f.get_tensor("missing")
        with pytest.raises(SafetensorError):
            f.get_slice("a")[[0, 1]]
        with pytest.raises(SafetensorError):
            f.get_slice("a")[2:, 20]
        with pytest.raises(SafetensorError):
            f.get_slice("a")[2:, -6]
    with pytest.raises(SafetensorError):
        f.keys()  # the handle is closed
    with pytest.raises(FileNotFoundError):
        safe_open("notafile", framework="pt")


# --- torch -------------------------------------------------------------------------

def test_torch_bytes(impl):
    from safetensors.torch import load, save, save_file
    data = torch.zeros((2, 2), dtype=torch.int32)
    assert save({"test": data}) == I32_ZEROS
    save_file({"test": data}, "out.safetensors")
    assert open("out.safetensors", "rb").read() == I32_ZEROS
    bf16 = torch.ones((2, 2), dtype=torch.bfloat16)
    bf16[0, 0] = 2.25
    assert save({"test": bf16}).endswith(b"\x10@\x80?\x80?\x80?")
    odd = {"c64": torch.complex(torch.tensor([-1.0]), torch.tensor([1.0])), "bool": torch.tensor([True, False]),
           "e4m3": torch.tensor([-0.5], dtype=torch.float8_e4m3fn), "zero": torch.zeros((2, 0))}
    for name, tensor in load(save(odd)).items():
        assert tensor.dtype == odd[name].dtype
        assert torch.equal(tensor.view(torch.uint8), odd[name].view(torch.uint8))


def test_torch_paths_and_backends(impl):
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    tensors = {"a": torch.randn(3, 4), "b": torch.randint(0, 128, (2, 3), dtype=torch.uint8),
               "s": torch.tensor(7.5), "e": torch.empty((0, 5), dtype=torch.float16)}
    save_file(tensors, Path("pt.safetensors"), metadata={"foo": "bar"})
    for backend in ("mmap", "pread"):
        loaded = load_file(Path("pt.safetensors"), backend=backend)
        assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)
        with safe_open("pt.safetensors", framework="pt", device="cpu", backend=backend) as f:
            assert f.metadata() == {"foo": "bar"}
            assert f.get_slice("a").get_shape() == [3, 4] and f.get_slice("a").get_dtype() == "F32"
            assert torch.equal(f.get_slice("a")[:, 1:3], tensors["a"][:, 1:3])
            assert f.get_slice("a")[list()].shape == (0, 4)
            assert torch.equal(f.get_slice("a")[tuple()], tensors["a"])
            assert torch.equal(f.get_slice("a")[2:, -1], tensors["a"][2:, -1])
    with pytest.raises(Exception):
        safe_open("pt.safetensors", framework="pt", backend="not_a_backend")


def test_torch_refusals(impl):
    from safetensors.torch import save_file
    with pytest.raises(RuntimeError):  # shared memory
        full = torch.arange(6.0).reshape(2, 3)
        save_file({"A": full, "B": full[:1]}, "out.safetensors")
    with pytest.raises(ValueError, match="sparse"):
        save_file({"s": torch.zeros(2, 3).to_sparse()}, "out.safetensors")
    with pytest.raises(ValueError):
        save_file({"test": {"some": "thing"}}, "out.safetensors")
    with pytest.raises(ValueError):
        save_file("notadict", "out.safetensors")
    save_file({"lo": full[:1], "hi": full[1:]}, "disjoint.safetensors")  # one storage, no shared bytes


def test_torch_non_contiguous(impl):
    from safetensors.torch import load_file, save_file
    view = torch.arange(6, dtype=torch.float32).reshape((1, 2, 3))[:, :, 1]
    if impl == "safetensors":
        with pytest.raises(ValueError):
            save_file({"test": view}, "out.safetensors")
    else:  # deliberate: written in logical order instead of refused
        save_file({"test": view}, "out.safetensors")
        assert torch.equal(load_file("out.safetensors")["test"], view)


def test_torch_meta_tensors(impl):
    from safetensors.torch import save_file
    meta = {"test": torch.zeros((10, 10), device="meta")}
    # theirs: NotImplementedError (a RuntimeError); ours: a SafeckptError (a ValueError)
    error = RuntimeError if impl == "safetensors" else ValueError
    with pytest.raises(error, match="meta tensor"):
        save_file(meta, "out.safetensors")


# --- shared tensors and models -------------------------------------------------------

def test_storage_helpers(impl):
    from safetensors.torch import _end_ptr, _find_shared_tensors, _is_complete, storage_ptr, storage_size
    m = torch.randn(10)
    n = torch.empty([], dtype=m.dtype)
    n.set_(source=m.untyped_storage()[: 4 * m.element_size()])
    assert storage_ptr(n) == storage_ptr(m) and storage_size(n) == 16 and storage_size(m) == 40
    assert _find_shared_tensors({"m": m, "n": n}) == [{"m"}, {"n"}]

    grid = torch.zeros((3, 3))
    assert _is_complete(grid) and not _is_complete(grid[:1, :]) and not _is_complete(grid[::2, :])
    assert _is_complete(torch.zeros((2, 2), device="meta"))
    every4 = torch.zeros(16)[::4]
    assert _end_ptr(every4) - every4.data_ptr() == 16 * 3 + 4
    half = torch.zeros(16, dtype=torch.float16)[::4]
    assert _end_ptr(half) - half.data_ptr() == 8 * 3 + 2

    assert _find_shared_tensors({"A": grid, "B": grid[:1, :]}) == [{"A", "B"}]
    meta = torch.zeros((2, 2), device="meta")
    assert _find_shared_tensors({"C": meta, "D": meta[:1]}) == []
    four = torch.zeros((4,))
    assert _find_shared_tensors({"B": four[:2], "C": four[2:]}) == [{"B"}, {"C"}]
    assert _find_shared_tensors({"B": four[:2], "C": four[1:]}) == [{"B", "C"}]
    assert _find_shared_tensors({"B": four[:2], "C": four[2:], "D": four[:1]}) == [{"B", "D"}, {"C"}]


def test_remove_duplicate_names(impl):
    from safetensors.torch import _remove_duplicate_names
    grid = torch.zeros((3, 3))
    assert _remove_duplicate_names({"A": grid, "B": grid[:1, :]}) == {"A": ["B"]}
    assert _remove_duplicate_names({"A": grid, "B": grid[:1, :], "C": grid}) == {"A": ["B", "C"]}
    with pytest.raises(RuntimeError):  # shared, and none covers the storage
        _remove_duplicate_names({"B": grid[:2], "C": grid[1:]})
    if impl == "safetensors":
        with pytest.raises(RuntimeError):
            _remove_duplicate_names({"B": grid[:1, :]})
    else:  # deliberate: a lone partial view is written as exactly its own bytes
        assert _remove_duplicate_names({"B": grid[:1, :]}) == {}


def test_save_model_and_load_model(impl):
    from safetensors import safe_open
    from safetensors.torch import _find_shared_tensors, load_model, save_file, save_model
    model = OnesModel()
    save_model(model, "ones.safetensors")
    with safe_open("ones.safetensors", framework="pt") as f:
        assert f.metadata() == {"b.bias": "a.bias", "b.weight": "a.weight"}
    assert open("ones.safetensors", "rb").read()[192:] == b"\x00\x00\x80?" * 20
    fresh = OnesModel()
    assert load_model(fresh, "ones.safetensors") == (set(), [])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())

    state = SharedModel().state_dict()
    state.pop("a.weight")
    state.pop("a.bias")
    save_file(state, "other_names.safetensors")  # the tied weights saved under their other names
    load_model(SharedModel(), "other_names.safetensors")

    assert _find_shared_tensors(SeparateModel().state_dict()) == [{"a.weight"}, {"a.bias"}, {"b.weight"}, {"b.bias"}]
    assert _find_shared_tensors(SharedModel().state_dict()) == [{"a.weight", "b.weight"}, {"a.bias", "b.bias"}]
    save_model(SharedModel(), "shared.safetensors")
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "b.bias", "b.weight"'):
        load_model(SeparateModel(), "shared.safetensors")
    save_model(SeparateModel(), "separate.safetensors")
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "b.bias", "b.weight"'):
        load_model(SharedModel(), "separate.safetensors")
    missing, unexpected = load_model(SharedModel(), "separate.safetensors", strict=False)
    assert (missing, unexpected) == (set(), ["b.weight", "b.bias"])


def test_multithreaded_round_trips(impl):
    from safetensors.numpy import load_file as load_np
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import load_file as load_pt
    from safetensors.torch import save_file as save_pt
    arrays = {"1": np.random.randn(5, 25), "2": np.ones(500), "3": np.array(5000.0), "4": np.array(7, np.int32)}
    tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
    failures = []

    def work(index):
        try:
            for round_ in range(5):
                path = f"{index}-{round_}.safetensors"
                save_np(arrays, path)
                assert all(np.array_equal(load_np(path)[k], v) for k, v in arrays.items())
                save_pt(tensors, path)
                assert all(torch.equal(load_pt(path)[k], v) for k, v in tensors.items())
                os.remove(path)
        except BaseException as exc:  # reported below, with the thread's traceback
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
