"""PyTorch checkpoints made by the real torch.save, read back by open_source without torch."""

from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import safeckpt  # noqa: E402
from safeckpt import errors  # noqa: E402
from safeckpt.sources import open_source  # noqa: E402

SAVE_KINDS = {
    "zip": {},
    "legacy": {"_use_new_zipfile_serialization": False},
}


def torch_values(t):
    """A torch tensor as numpy, bf16/fp8 through same-width integer views."""
    from safeckpt.frameworks import torch as torch_adapter
    return torch_adapter.to_numpy(t.detach().contiguous())


def assert_same(array, tensor, name=""):
    expected = torch_values(tensor)
    assert array.shape == expected.shape, name
    assert array.dtype == expected.dtype, name
    assert array.tobytes() == expected.tobytes(), name


def all_dtypes_state():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    state = {
        "f32": base.clone(), "f64": base.double(), "f16": base.half(), "bf16": base.bfloat16(),
        "i64": torch.arange(7), "i32": torch.arange(7, dtype=torch.int32),
        "i16": torch.arange(7, dtype=torch.int16), "i8": torch.arange(-3, 4, dtype=torch.int8),
        "u8": torch.arange(7, dtype=torch.uint8), "bool": base > 0,
        "c64": torch.complex(base, -base), "u16": torch.arange(5).to(torch.uint16),
        "u32": torch.arange(5).to(torch.uint32), "u64": torch.arange(5).to(torch.uint64),
        "f8e4m3": base.to(torch.float8_e4m3fn), "f8e5m2": base.to(torch.float8_e5m2),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3),
    }
    return state


@pytest.mark.parametrize("kind", SAVE_KINDS)
def test_every_dtype_matches_torch_load(tmp_path, kind):
    state = all_dtypes_state()
    if kind == "legacy":  # the legacy format has no storage class for these
        for name in ("u16", "u32", "u64", "f8e4m3", "f8e5m2"):
            state.pop(name)
    path = tmp_path / "m.pt"
    torch.save(state, path, **SAVE_KINDS[kind])
    loaded = torch.load(path, weights_only=True)
    with open_source(path) as src:
        assert src.format == {"zip": "torch-zip", "legacy": "torch-legacy"}[kind]
        assert sorted(src.keys()) == sorted(loaded)
        for name, tensor in loaded.items():
            assert_same(src.read(name), tensor, name)
            assert src[name].shape == tuple(tensor.shape)
            assert src[name].nbytes == tensor.numel() * tensor.element_size()


@pytest.mark.parametrize("kind", SAVE_KINDS)
def test_views_and_shared_storages(tmp_path, kind):
    big = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {"big": big, "rows": big[2:4], "cols": big[:, ::3], "t": big.t(), "elem": big[5, 7],
             "tied_a": big, "flat": big.view(-1)[13:29]}
    path = tmp_path / "v.pt"
    torch.save(state, path, **SAVE_KINDS[kind])
    loaded = torch.load(path, weights_only=True)
    with open_source(path) as src:
        for name, tensor in loaded.items():
            assert_same(src.read(name), tensor, name)
        # the views share the one storage: no copies
        assert np.shares_memory(src.read("rows"), src.read("big"))
        assert src.aliases == {"tied_a": "big"}
        assert not src.read("big").flags.writeable


def test_parameters_modules_and_optimizer_state(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 7,
                  "params": list(model.parameters()), "note": "hello", "lr": 1e-3}
    path = tmp_path / "c.pt"
    torch.save(checkpoint, path)
    loaded = torch.load(path, weights_only=True)
    with open_source(path) as src:
        assert_same(src.read("model.0.weight"), loaded["model"]["0.weight"])
        assert_same(src.read("optimizer.state.0.exp_avg"), loaded["optimizer"]["state"][0]["exp_avg"])
        assert_same(src.read("optimizer.state.0.step"), loaded["optimizer"]["state"][0]["step"])
        assert_same(src.read("params.2"), loaded["params"][2])
        assert src.tree["epoch"] == 7 and src.tree["note"] == "hello"
        groups = src.tree["optimizer"]["param_groups"]
        assert groups[0]["betas"] == [0.8, 0.9] and groups[0]["params"] == [0, 1, 2, 3]
        assert src.tree["model"]["0.weight"] == {"__tensor__": "model.0.weight"}
        json.dumps(src.tree)  # JSON-able
        # Parameters share storage with the state dict tensors
        assert src.aliases["params.0"] == "model.0.weight"


def test_tied_module_weights(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    path = tmp_path / "tied.bin"
    torch.save(Tied().state_dict(), path)
    with open_source(path) as src:
        assert src.aliases == {"head.weight": "embed.weight"}
        assert src.total_bytes == 10 * 4 * 4


def test_big_endian_zip(tmp_path):
    path = tmp_path / "be.pt"
    t = torch.arange(6, dtype=torch.float32)
    torch.save({"t": t}, path)
    # rewrite the archive as a big-endian one: byteorder "big" and the record byteswapped
    import zipfile
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    prefix = next(iter(members)).split("/")[0]
    members[f"{prefix}/byteorder"] = b"big"
    members[f"{prefix}/data/0"] = np.arange(6, dtype=">f4").tobytes()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    with open_source(path) as src:
        np.testing.assert_array_equal(src.read("t"), np.arange(6, dtype=np.float32))


def test_plain_pickle_of_numpy_arrays(tmp_path):
    path = tmp_path / "arrays.pkl"
    data = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "meta": {"step": 3},
            "list": [np.ones(2, np.int16)]}
    path.write_bytes(pickle.dumps(data, protocol=4))
    with open_source(path) as src:
        assert src.format == "pickle"
        np.testing.assert_array_equal(src.read("w"), data["w"])
        np.testing.assert_array_equal(src.read("list.0"), data["list"][0])
        assert src.tree["meta"] == {"step": 3}


def test_paddle_pdparams(tmp_path):
    paddle = pytest.importorskip("paddle")
    layer = paddle.nn.Linear(3, 2)
    path = str(tmp_path / "model.pdparams")
    paddle.save(layer.state_dict(), path)
    with open_source(path) as src:
        assert sorted(src.keys()) == ["bias", "weight"]
        np.testing.assert_array_equal(src.read("weight"), layer.weight.numpy())
        assert src.tree["StructuredToParameterName@@"] == {"weight": layer.weight.name,
                                                           "bias": layer.bias.name}


def test_unknown_classes_stay_inert_and_tensors_still_come_out(tmp_path):
    sys.modules[__name__].Custom = Custom  # picklable by reference
    path = tmp_path / "custom.pt"
    torch.save({"w": torch.ones(2), "cfg": Custom(3)}, path)
    with open_source(path) as src:
        np.testing.assert_array_equal(src.read("w"), np.ones(2, np.float32))
        cfg = src.tree["cfg"]
        assert cfg["__object__"].endswith("Custom")
        assert any(not g.allowed for g in src.globals)


class Custom:
    def __init__(self, n):
        self.n = n


def test_storage_shorter_than_the_pickle_claims(tmp_path):
    import zipfile
    path = tmp_path / "short.pt"
    torch.save({"t": torch.arange(100, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    prefix = next(iter(members)).split("/")[0]
    members[f"{prefix}/data/0"] = members[f"{prefix}/data/0"][:40]  # CVE-2026-24747 style
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    with open_source(path) as src, pytest.raises(errors.SourceError, match="record holds only 40 bytes"):
        src.read("t")


def test_missing_storage_record(tmp_path):
    import zipfile
    path = tmp_path / "missing.pt"
    torch.save({"t": torch.arange(4)}, path)
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist() if "/data/" not in i.filename}
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    with open_source(path) as src, pytest.raises(errors.SourceError, match="no member"):
        src.read("t")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello world, this is text\n")
    with pytest.raises(errors.UnknownFormatError, match="notes.txt"):
        open_source(path)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(errors.UnknownFormatError, match="empty"):
        open_source(empty)


def test_safetensors_and_sharded_index(tmp_path):
    safeckpt.save_file({"a": np.ones(3, np.float32)}, tmp_path / "model-00001-of-00002.safetensors")
    safeckpt.save_file({"b": np.zeros(2, np.int8)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"metadata": {"total_size": 14}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for target in (tmp_path, tmp_path / "model.safetensors.index.json"):
        with open_source(target) as src:
            assert src.format == "sharded"
            assert src.keys() == ["a", "b"]
            np.testing.assert_array_equal(src.read("b"), np.zeros(2, np.int8))
    index["weight_map"]["c"] = "../outside.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(errors.SourceError, match="outside"):
        open_source(tmp_path)


def test_sharded_torch_bin_index(tmp_path):
    torch.save({"x": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"y": torch.zeros(3)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "x": "pytorch_model-00001-of-00002.bin", "y": "pytorch_model-00002-of-00002.bin"}}))
    with open_source(tmp_path) as src:
        assert "torch-zip" in src.describe()
        np.testing.assert_array_equal(src.read("y"), np.zeros(3, np.float32))


@pytest.mark.parametrize("protocol", range(6))
def test_plain_pickles_of_every_protocol_are_recognised(tmp_path, protocol):
    import collections
    path = tmp_path / "state.pkl"
    data = collections.OrderedDict(w=np.arange(6, dtype=np.float64).reshape(2, 3), step=4)
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    with open_source(path) as src:
        assert src.format == "pickle"
        np.testing.assert_array_equal(src.read("w"), data["w"])
        assert src.tree["step"] == 4


def test_shapes_and_devices_in_metadata(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"w": torch.ones(2, 3), "shape": torch.Size([2, 3]), "device": torch.device("cpu"),
                "cuda": torch.device("cuda", 1)}, path)
    with open_source(path) as src:
        assert src.tree["shape"] == [2, 3] and src.tree["device"] == "cpu" and src.tree["cuda"] == "cuda:1"
        assert all(g.allowed for g in src.globals)
    assert safeckpt.scan(path).verdict == "safe"


def _patched_torch_file(path, tensor, old: bytes, new: bytes, nth: int):
    """torch.save(tensor) with the nth occurrence of `old` in data.pkl (after the storage id) replaced."""
    import zipfile
    torch.save({"t": tensor}, path)
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    name = next(n for n in members if n.endswith("/data.pkl"))
    data = members[name]
    at = data.index(b"Q")  # BINPERSID: the storage; offset, size and stride follow
    for _ in range(nth):
        at = data.index(old, at + 1)
    members[name] = data[:at] + new + data[at + len(old):]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for member, content in members.items():
            z.writestr(member, content)


def test_hostile_sizes_and_strides(tmp_path):
    long_int = b"\x8a\x09" + (1 << 70).to_bytes(9, "little")
    # an unused stride of 2**70 on a dimension of size 1: harmless, read normally
    _patched_torch_file(tmp_path / "s.pt", torch.ones(1), b"K\x01\x85", long_int + b"\x85", 2)
    with open_source(tmp_path / "s.pt") as src:
        np.testing.assert_array_equal(src.read("t"), np.ones(1, np.float32))
    # a size of 0 x 2**70: out of range, skipped with a note (no numpy error escapes)
    _patched_torch_file(tmp_path / "z.pt", torch.ones(0, 1), b"K\x00K\x01\x86", b"K\x00" + long_int + b"\x86", 1)
    with open_source(tmp_path / "z.pt") as src:
        assert "t" not in src and any("out of range" in note for note in src.notes)
    report = safeckpt.convert(tmp_path / "z.pt", tmp_path / "z.safetensors")
    assert report.tensors == 0 and any("out of range" in note for note in report.notes)


def test_colliding_and_huge_names_stay_cheap(tmp_path):
    """Keys whose text collides (long tuples shortened alike) and keys megabytes long, nested."""
    import signal
    # keys all shown as "frozenset({0, 1, 2, 3, ...})": 20k tensors under one name
    arrays = {frozenset({0, 1, 2, 3, i + 10}): np.zeros(1, np.int8) for i in range(20_000)}
    deep = {"k" * 100_000: {"k" * 100_000: {f"w{i}": np.ones(1, np.int8) for i in range(100)}}}
    path = tmp_path / "names.pkl"
    path.write_bytes(pickle.dumps({"a": arrays, "deep": deep}, protocol=4))
    signal.alarm(60)
    try:
        with open_source(path) as src:
            assert len(src) == 20_100
            assert max(len(name) for name in src.keys()) <= 1024 + 10
            assert len(set(src.keys())) == len(src) and len(src.notes) <= 101
    finally:
        signal.alarm(0)
