"""Legacy torch formats: files made by torch.save(_use_new_zipfile_serialization=False)
and tar checkpoints built byte by byte after torch's own code are located exactly as
torch reads them; truncated, lying and malicious files give SourceErrors and run nothing."""

from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import struct
import tarfile
import time
import types

import ml_dtypes
import numpy as np
import pytest

from safeckpt.errors import SourceError
from safeckpt.sources.pickle_vm import PlaceholderCall, TensorRef
from safeckpt.sources.torch_legacy import (
    MAGIC_NUMBER, PROTOCOL_VERSION, LegacyLayout, is_legacy, is_legacy_tar,
    read_legacy, read_legacy_tar,
)

from tests.files import torch_save_bytes

torch = pytest.importorskip("torch")
weights_only_unpickler = pytest.importorskip("torch._weights_only_unpickler")

NUMPY_DTYPES = {
    "float32": np.float32, "float64": np.float64, "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "int32": np.int32, "int16": np.int16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_, "complex64": np.complex64,
}


# --- helpers --------------------------------------------------------------------

def legacy_bytes(obj, protocol: int = 2) -> bytes:
    return torch_save_bytes(obj, _use_new_zipfile_serialization=False, pickle_protocol=protocol)


def array_of(data, layout: LegacyLayout, ref: TensorRef) -> np.ndarray:
    """What a source would map: the storage's bytes in the file, viewed as the TensorRef says."""
    offset, nbytes = layout.storages[ref.storage.key]
    dt = np.dtype(NUMPY_DTYPES[ref.dtype.name])
    base = np.frombuffer(data, dtype=dt, count=nbytes // dt.itemsize, offset=offset)
    return np.lib.stride_tricks.as_strided(
        base[ref.storage_offset:], shape=ref.size, strides=[s * dt.itemsize for s in ref.stride])


def numpy_of(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def assert_same_array(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def assert_matches(value, expected, data, layout) -> int:
    """Walk our value beside torch's; returns the number of tensors compared."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(value, TensorRef)
        assert value.parameter == isinstance(expected, torch.nn.Parameter)
        assert_same_array(array_of(data, layout, value), numpy_of(expected))
        return 1
    if isinstance(expected, dict):
        assert isinstance(value, dict) and list(value) == list(expected)
        return sum(assert_matches(value[k], expected[k], data, layout) for k in expected)
    if isinstance(expected, (list, tuple)):
        assert type(value) is type(expected) and len(value) == len(expected)
        return sum(assert_matches(v, e, data, layout) for v, e in zip(value, expected))
    assert type(value) is type(expected) and value == expected
    return 0


def state_dict() -> dict:
    gen = torch.Generator().manual_seed(0)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    shared = torch.randn(10, generator=gen)
    return {
        "f32": torch.randn(3, 4, generator=gen),
        "f16": torch.randn(5, generator=gen).half(),
        "bf16": torch.randn(2, 3, generator=gen).bfloat16(),
        "i64": torch.arange(-3, 4),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(3, dtype=torch.complex64, generator=gen),
        "base": base,
        "view": base[1:, ::2].t(),
        "shared_a": shared[:4],
        "shared_b": shared[2:].view(2, 4),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "meta": {"epoch": 3, "lr": 0.1, "name": "run", "nested": {"steps": [1, 2, 3], "ok": True}},
    }


def pickle_of(x, protocol: int = 2) -> bytes:
    return pickle.dumps(x, protocol=protocol)


class Reduce:
    """Pickles as a call of `func(*args)`; only ever unpickled by the machine under test."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# hand-made legacy files: the five pickles and the storages, as _legacy_save writes them

class Storage:
    def __init__(self, key, array, storage_type=torch.FloatStorage, numel=None, view=None):
        self.key, self.array, self.storage_type = key, array, storage_type
        self.numel = array.size if numel is None else numel
        self.view = view

    def pid(self):
        return ("storage", self.storage_type, self.key, "cpu", self.numel, self.view)


def tensor(storage, offset, size, stride):
    return Reduce(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, False,
                  collections.OrderedDict())


def main_pickle(obj, persistent_id, protocol=2) -> bytes:
    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            return persistent_id(o)
    f = io.BytesIO()
    Pickler(f, protocol=protocol).dump(obj)
    return f.getvalue()


def legacy_file(obj, storages, keys=None, counts=None, sys_info=None, orders=None) -> bytes:
    """orders: storage key -> "<" or ">", the byte order of its count and data."""
    out = pickle_of(MAGIC_NUMBER) + pickle_of(PROTOCOL_VERSION)
    if sys_info is None:
        sys_info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 8}}
    out += pickle_of(sys_info)
    out += main_pickle(obj, lambda o: o.pid() if isinstance(o, Storage) else None)
    out += pickle_of([s.key for s in storages] if keys is None else keys)
    for s in storages:
        count = (counts or {}).get(s.key, s.array.size)
        order = (orders or {}).get(s.key, "<")
        out += struct.pack(f"{order}q", count)
        out += s.array.astype(s.array.dtype.newbyteorder(order)).tobytes()
    return out


# --- the legacy format, made by torch ---------------------------------------------

@pytest.mark.parametrize("protocol", [1, 2, 3, 4, 5])
def test_state_dict_tensors_equal_torch_load(protocol, tmp_path):
    sd = state_dict()
    data = legacy_bytes(sd, protocol)
    layout = read_legacy(data, "sd.pt")
    # torch's weights-only loader reads protocol 2 without warnings; the tensors are the same
    (tmp_path / "sd.pt").write_bytes(data if protocol == 2 else legacy_bytes(sd, 2))
    expected = torch.load(tmp_path / "sd.pt", weights_only=True)

    assert layout.kind == "torch-legacy"
    assert assert_matches(layout.value, expected, data, layout) == 13
    v = layout.value
    assert v["shared_a"].storage.key == v["shared_b"].storage.key
    assert v["view"].storage.key == v["base"].storage.key
    assert (v["view"].storage_offset, v["view"].stride) == (6, (2, 6))
    assert len(layout.storages) == 11  # 13 tensors, two pairs share
    assert layout.sys_info["protocol_version"] == PROTOCOL_VERSION
    assert all(g.allowed for g in layout.globals) and layout.findings == []
    # five pickles back to back, then the storages tile the rest of the file exactly
    assert [s.member for s in layout.pickles] == [None] * 5 and layout.pickles[0].start == 0
    assert all(a.end == b.start for a, b in zip(layout.pickles, layout.pickles[1:]))
    pos = layout.pickles[-1].end
    for offset, nbytes in sorted(layout.storages.values()):
        assert offset == pos + 8
        pos = offset + nbytes
    assert pos == len(data)


def test_whole_module_and_the_file_as_mmap(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
    path = tmp_path / "model.pt"
    with open(path, "wb") as f:
        torch.save(model, f, _use_new_zipfile_serialization=False)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        layout = read_legacy(mm, str(path))
        assert isinstance(layout.value, PlaceholderCall)
        names = {f"{g.module}.{g.name}" for g in layout.globals if not g.allowed}
        assert "torch.nn.modules.linear.Linear" in names
        refs = [x for x in _walk(layout.value) if isinstance(x, TensorRef)]
        arrays = sorted((array_of(mm, layout, r).copy() for r in refs), key=lambda a: a.ndim)
        assert_same_array(arrays[0], model[0].bias.detach().numpy())
        assert_same_array(arrays[1], model[0].weight.detach().numpy())
        del arrays, refs, layout


def _walk(x, seen=None):
    seen = set() if seen is None else seen
    if id(x) in seen:
        return
    seen.add(id(x))
    yield x
    if isinstance(x, dict):
        children = list(x.values())
    elif isinstance(x, (list, tuple)):
        children = list(x)
    elif isinstance(x, PlaceholderCall):
        children = [x.args, x.state, x.items, x.setitems]
    else:
        children = []
    for c in children:
        yield from _walk(c, seen)


def test_recognises_the_magic_number_at_every_protocol():
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert is_legacy(pickle_of(MAGIC_NUMBER, protocol) + b"more bytes")
        assert not is_legacy(pickle_of(MAGIC_NUMBER + 1, protocol))
    assert is_legacy(legacy_bytes({"a": torch.ones(1)})[:64])
    for head in [b"", b"\x80\x02", b"PK\x03\x04", pickle_of({"a": 1}), b"\x80\x02\x8a\x0a"]:
        assert not is_legacy(head)


# --- hand-made legacy files: views, lies, malice ------------------------------------

def test_storage_views_of_old_files_match_torch(tmp_path):
    root = np.arange(8, dtype=np.float32)
    whole = Storage("root", root)
    part = Storage("root", root, view=("part", 2, 5))
    data = legacy_file({"whole": tensor(whole, 0, (8,), (1,)),
                        "part": tensor(part, 1, (2, 2), (2, 1))}, [whole])
    layout = read_legacy(data, "views.pt")
    (tmp_path / "views.pt").write_bytes(data)
    expected = torch.load(tmp_path / "views.pt", weights_only=True)
    assert assert_matches(layout.value, expected, data, layout) == 2
    assert layout.storages["part"] == (layout.storages["root"][0] + 8, 20)
    assert_same_array(array_of(data, layout, layout.value["part"]), root[3:7].reshape(2, 2))


def test_first_reference_decides_a_storage_as_in_torch():
    arr = np.arange(4, dtype=np.float32)
    first, liar = Storage("k", arr), Storage("k", arr, numel=1000)
    layout = read_legacy(legacy_file([tensor(first, 0, (4,), (1,)), tensor(liar, 0, (4,), (1,))],
                                     [first]), "x.pt")
    assert layout.value[0].storage is layout.value[1].storage
    with pytest.raises(SourceError, match="runs past its storage"):
        read_legacy(legacy_file([tensor(first, 0, (4,), (1,)), tensor(liar, 0, (40,), (1,))],
                                [first]), "x.pt")


@pytest.mark.parametrize("case, message", [
    ("count lies", r"storage 'a': the file holds 5 elements, the main pickle declares 4"),
    ("numel past the end", r"storage 'a': 9 x 4 bytes .* past the end of the file"),
    ("key missing", r"storage 'b' is named by the main pickle but its bytes are not in the file"),
    ("key unknown", r"storage 'zz' is listed after the main pickle"),
    ("key twice", r"storage 'a' is listed twice"),
    ("tensor past storage", r"runs past its storage 'a' of 4 elements"),
    ("view past root", r"storage view 'v': bytes \[8, 24\) lie outside its root storage 'a'"),
    ("view key is a root", r"view key 'b' is not a new key"),
    ("storage type unknown", r"storage 'a' has type (posix|nt)\.system, not a torch storage type"),
    ("keys not a list", r"the storage key list is a dict, not a list"),
    ("bad magic", r"not torch's magic number"),
    ("bad version", r"legacy protocol version 1002 is not 1001"),
])
def test_lying_legacy_files_give_source_errors(case, message):
    a = Storage("a", np.arange(4, dtype=np.float32))
    b = Storage("b", np.arange(3, dtype=np.int64), torch.LongStorage)
    obj = {"x": tensor(a, 0, (4,), (1,)), "y": tensor(b, 0, (3,), (1,))}
    storages, keys, counts = [a, b], None, None
    if case == "count lies":
        counts = {"a": 5}
    elif case == "numel past the end":  # a's bytes come last and are short
        a.numel, storages, counts = 9, [b, a], {"a": 9}
    elif case == "key missing":
        keys = ["a"]
    elif case == "key unknown":
        keys = ["a", "b", "zz"]
    elif case == "key twice":
        keys = ["a", "a", "b"]
    elif case == "tensor past storage":
        obj["x"] = tensor(a, 1, (4,), (1,))
    elif case == "view past root":
        obj["v"] = tensor(Storage("a", a.array, view=("v", 2, 4)), 0, (4,), (1,))
    elif case == "view key is a root":
        obj["v"] = tensor(Storage("a", a.array, view=("b", 0, 1)), 0, (1,), (1,))
    elif case == "storage type unknown":
        a.storage_type = os.system
    elif case == "keys not a list":
        keys = {"a": 1}
    data = legacy_file(obj, storages, keys=keys, counts=counts)
    if case == "bad magic":
        data = pickle_of(MAGIC_NUMBER - 1) + data[len(pickle_of(MAGIC_NUMBER)):]
    elif case == "bad version":
        data = data.replace(pickle_of(PROTOCOL_VERSION), pickle_of(1002), 1)
    with pytest.raises(SourceError, match=message) as info:
        read_legacy(data, "lies.pt")
    assert info.value.path == "lies.pt"


def test_byte_order_of_old_big_endian_files():
    a = Storage("a", np.arange(5, dtype=np.float32) + 0.5)
    b = Storage("b", np.arange(3, dtype=np.int64) - 1, torch.LongStorage)
    obj = {"x": tensor(a, 1, (4,), (1,)), "y": tensor(b, 0, (3,), (1,))}
    big_machine = {"protocol_version": PROTOCOL_VERSION, "little_endian": False}

    # torch before 1.0 on a big-endian machine: counts and data in that order
    data = legacy_file(obj, [a, b], sys_info=big_machine, orders={"a": ">", "b": ">"})
    layout = read_legacy(data, "be.pt")
    assert layout.byteorder == "big"
    assert any("big-endian machine; the storages are big-endian" in f for f in layout.findings)
    offset, nbytes = layout.storages["a"]
    assert_same_array(np.frombuffer(data, ">f4", 5, offset).astype("<f4"), a.array)

    # torch since then writes little-endian everywhere, whatever sys_info says
    data = legacy_file(obj, [a, b], sys_info=big_machine)
    layout = read_legacy(data, "le.pt")
    assert layout.byteorder == "little"
    assert_same_array(array_of(data, layout, layout.value["x"]), a.array[1:])
    assert_same_array(array_of(data, layout, layout.value["y"]), b.array)

    with pytest.raises(SourceError, match="little-endian for some storages and big-endian"):
        read_legacy(legacy_file(obj, [a, b], sys_info=big_machine, orders={"b": ">"}), "mix.pt")
    with pytest.raises(SourceError, match=r"storage 'a': the file holds 360287970189639680 "):
        read_legacy(legacy_file(obj, [a, b], orders={"a": ">"}), "liar.pt")


def test_truncated_legacy_file_fails_cleanly_at_every_cut():
    data = legacy_bytes({"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.int64),
                         "cfg": {"name": "x", "lr": 0.5}})
    read_legacy(data, "ok.pt")
    for cut in range(len(data)):
        with pytest.raises(SourceError) as info:
            read_legacy(data[:cut], "cut.pt")
        assert info.value.path == "cut.pt"


def test_hostile_values_in_messages_stay_short_and_fast():
    # 24 DUP+TUPLE2 make a tuple whose repr has 16M parts; the message must not build it
    dag = b"\x80\x02)" + b"2\x86" * 24
    head = pickle_of(MAGIC_NUMBER) + pickle_of(PROTOCOL_VERSION) + pickle_of({})
    for tail in [dag + b"\x85Q.",                       # as a persistent id
                 pickle_of({}) + dag + b".",              # as the storage key list
                 pickle_of({}) + b"\x80\x02]\x8b\x00\x10\x00\x00" + b"\x11" * 4096 + b"a."]:
        # ... and a 32768-bit integer as a storage key (str() of it is refused by Python)
        start = time.perf_counter()
        with pytest.raises(SourceError) as info:
            read_legacy(head + tail, "dag.pt")
        assert time.perf_counter() - start < 10 and len(str(info.value)) < 400  # not 2**24 parts
    assert "an integer of 32765 bits" in str(info.value)


def test_errors_release_the_mmap(tmp_path):
    path = tmp_path / "cut.pt"
    data = legacy_bytes({"w": torch.ones(4)})
    path.write_bytes(data[:-3])
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with pytest.raises(SourceError, match="truncated"):
            read_legacy(mm, str(path))
        mm.close()  # BufferError if anything still held a view of it


def test_trailing_bytes_are_a_finding():
    data = legacy_bytes({"w": torch.ones(2)}) + pickle_of([1, 2])
    layout = read_legacy(data, "t.pt")
    assert any("bytes after the last storage" in f for f in layout.findings)


def test_malicious_pickles_run_nothing_and_are_reported(tmp_path):
    canary = tmp_path / "canary"
    payload = Reduce(os.system, f"touch {canary}")
    a = Storage("a", np.ones(2, dtype=np.float32))
    data = legacy_file({"w": tensor(a, 0, (2,), (1,)), "evil": payload}, [a],
                       sys_info={"hook": Reduce(exec, f"open({str(canary)!r}, 'w').close()")})
    layout = read_legacy(data, "evil.pt")
    assert not canary.exists()
    assert isinstance(layout.value["evil"], PlaceholderCall)
    assert isinstance(layout.value["w"], TensorRef)
    refused = [(g.module, g.name) for g in layout.globals if not g.allowed]
    assert refused == [("builtins", "exec"), ("posix" if os.name == "posix" else "nt", "system")]
    # each refused global lies inside the pickle that named it
    spans = {s.start: s for s in layout.pickles}
    assert all(any(s.start <= g.offset < s.end for s in spans.values()) for g in layout.globals)

    # the payload as the main pickle itself, and as a storage's type
    evil_type = Reduce(os.system, f"touch {canary}")
    for obj in [payload, tensor(Storage("a", a.array, storage_type=evil_type), 0, (2,), (1,))]:
        try:
            read_legacy(legacy_file(obj, []), "evil.pt")
        except SourceError:
            pass
        assert not canary.exists()


# --- the tar format, built after torch's _save of torch < 0.4 ----------------------

class Ref:
    """A tensor or storage in the main pickle: torch wrote str(key) as its persistent id."""

    def __init__(self, key, as_text=True):
        self.key, self.as_text = key, as_text


def tar_checkpoint(obj, storages, tensors, views=(), members=None, as_text=True,
                   tails=None) -> bytes:
    """A tar checkpoint as torch < 0.4 wrote it.

    storages: [(key, storage_type, array)]; tensors: [(key, storage_key, size, stride, offset)];
    views: [(key, root_key, offset, numel)]; tails: bytes appended to members.
    """
    st = pickle_of(len(storages))
    for key, storage_type, arr in storages:
        st += pickle_of((key, "cpu", storage_type)) + struct.pack("<q", arr.size) + arr.tobytes()
    st += pickle_of(list(views))
    te = pickle_of(len(tensors))
    for key, storage_key, size, stride, offset in tensors:
        te += pickle_of((key, storage_key, torch.FloatTensor))
        te += struct.pack("<i", len(size)) + b"\0" * 4
        te += struct.pack(f"<{len(size)}q", *size) + struct.pack(f"<{len(size)}q", *stride)
        te += struct.pack("<q", offset)
    def persistent_id(o):
        if isinstance(o, Ref):
            return str(o.key) if as_text else o.key
        return None
    main = main_pickle(obj, persistent_id)
    sys_info = pickle_of({"protocol_version": 1000, "little_endian": True,
                          "type_sizes": {"short": 2, "int": 4, "long": 8}})
    parts = {"sys_info": sys_info, "pickle": main, "tensors": te, "storages": st}
    for name, tail in (tails or {}).items():
        parts[name] += tail
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for name in members or ["sys_info", "pickle", "tensors", "storages"]:
            info = tarfile.TarInfo(name)
            info.size = len(parts[name])
            tar.addfile(info, io.BytesIO(parts[name]))
    return out.getvalue()


ROOT = np.arange(12, dtype=np.float32) * 1.5
IDS = np.array([7, -1, 3], dtype=np.int64)


def sample_tar(as_text=True, **kwargs) -> bytes:
    storages = [(1001, torch.FloatStorage, ROOT), (1002, torch.LongStorage, IDS)]
    tensors = [(2001, 1001, (3, 2), (1, 3), 1),     # a strided view of the shared storage
               (2002, 1001, (4,), (1,), 8),         # a second tensor on the same storage
               (2003, 1003, (2,), (2,), 0),         # a tensor over a storage view
               (2004, 1002, (3,), (1,), 0)]
    views = [(1003, 1001, 4, 5)]
    obj = {"w": Ref(2001), "b": Ref(2002), "v": Ref(2003), "ids": Ref(2004),
           "epoch": 4, "meta": {"name": "old", "lr": 0.01}}
    kw = dict(obj=obj, storages=storages, tensors=tensors, views=views, as_text=as_text)
    kw.update(kwargs)
    return tar_checkpoint(**kw)


EXPECTED_TAR = {
    "w": np.lib.stride_tricks.as_strided(ROOT[1:], (3, 2), (4, 12)),
    "b": ROOT[8:12], "v": ROOT[4:9][0:4:2], "ids": IDS,
}


def test_tar_checkpoint_is_located():
    data = sample_tar()
    assert is_legacy_tar(data[:4096])
    layout = read_legacy_tar(data, "old.tar")
    assert layout.kind == "torch-tar"
    for name, expected in EXPECTED_TAR.items():
        assert_same_array(array_of(data, layout, layout.value[name]), expected)
    assert (layout.value["epoch"], layout.value["meta"]) == (4, {"name": "old", "lr": 0.01})
    assert layout.value["w"].storage is layout.value["b"].storage
    assert layout.storages["1003"] == (layout.storages["1001"][0] + 16, 20)
    assert layout.sys_info["protocol_version"] == 1000
    assert {s.member for s in layout.pickles} == {"sys_info", "pickle", "tensors", "storages"}
    assert [s.start for s in layout.pickles] == sorted(s.start for s in layout.pickles)
    for span in layout.pickles:  # every span holds one whole pickle
        assert data[span.end - 1:span.end] == b"."
    assert {(g.module, g.name) for g in layout.globals} == {
        ("torch", "FloatTensor"), ("torch", "FloatStorage"), ("torch", "LongStorage")}


def test_tar_checkpoint_matches_torchs_own_legacy_loader(tmp_path):
    # torch's tar reader, run with its weights-only unpickler (which wants int ids)
    path = tmp_path / "old.tar"
    path.write_bytes(sample_tar(as_text=False))
    restricted = types.ModuleType("restricted_pickle")
    restricted.Unpickler = weights_only_unpickler.Unpickler
    restricted.load = weights_only_unpickler.load
    expected = torch.load(path, weights_only=False, pickle_module=restricted)
    data = path.read_bytes()
    layout = read_legacy_tar(data, str(path))
    assert assert_matches(layout.value, expected, data, layout) == 4
    for name, arr in EXPECTED_TAR.items():
        assert_same_array(numpy_of(expected[name]), arr)


def test_tar_recognition():
    assert not is_legacy_tar(legacy_bytes({"a": torch.ones(1)}))
    assert not is_legacy_tar(b"\0" * 1024) and not is_legacy_tar(b"")
    other = io.BytesIO()
    with tarfile.open(fileobj=other, mode="w:") as tar:
        tar.addfile(tarfile.TarInfo("readme.txt"), io.BytesIO(b""))
    assert not is_legacy_tar(other.getvalue())
    assert is_legacy_tar(sample_tar(members=["pickle", "tensors", "storages"])[:1024])


def _with_member(data: bytes, name: str, payload: bytes, kind=tarfile.REGTYPE) -> bytes:
    out = io.BytesIO(data)
    with tarfile.open(fileobj=out, mode="a:", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
        else:
            info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)
    return out.getvalue()


def _size_field(data: bytes, name: str, size: int) -> bytes:
    """Rewrite a member's header size (octal) and checksum, as a hostile writer would."""
    pos = data.index(name.encode() + b"\0")
    header = bytearray(data[pos:pos + 512])
    header[124:136] = b"%011o\0" % size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return data[:pos] + bytes(header) + data[pos + 512:]


@pytest.mark.parametrize("case, message", [
    ("duplicate member", r"tar member 'pickle' appears twice"),
    ("symlink member", r"tar member 'storages' is a symbolic link, not a regular file"),
    ("member past the end", r"tar member 'storages' claims 99999 bytes .* past the end"),
    ("no storages", r"no 'storages' member"),
    ("tensor past storage", r"runs past its storage '1001' of 12 elements"),
    ("missing storage", r"tensor 2001 names storage '1009', which is not in tar member"),
    ("missing tensor", r"persistent id 2999 names no tensor or storage"),
    ("storage count lies", r"tar member 'storages'.*truncated member|not \(key, location"),
    ("storage bytes lie", r"storage '1002': 999 x 8 bytes .* past the end of tar member"),
    ("view past root", r"storage view '1003': bytes \[40, 60\) lie outside"),
    ("hostile ndim", r"tensor 2001 has 100000 dimensions"),
    ("key not a number", r"storage key 'x1' is not an integer key"),
    ("storage type unknown", r"storage '1001' has type (posix|nt)\.system"),
    ("tensor key twice", r"tensor key 2001 is used twice"),
    ("too many members", r"more than 64 tar members"),
])
def test_hostile_tar_files_give_source_errors(case, message):
    storages = [(1001, torch.FloatStorage, ROOT), (1002, torch.LongStorage, IDS)]
    tensors = [(2001, 1001, (3, 2), (1, 3), 1)]
    kw = dict(obj={"w": Ref(2001)}, storages=storages, tensors=tensors, views=[])
    if case in ("no storages", "symlink member"):
        kw["members"] = ["sys_info", "pickle", "tensors"]
    elif case == "tensor past storage":
        kw["tensors"] = [(2001, 1001, (3, 2), (1, 3), 8)]
    elif case == "missing storage":
        kw["tensors"] = [(2001, 1009, (1,), (1,), 0)]
    elif case == "missing tensor":
        kw["obj"] = {"w": Ref(2999)}
    elif case == "view past root":
        kw["views"] = [(1003, 1001, 10, 5)]
    elif case == "key not a number":
        kw["storages"] = [("x1", torch.FloatStorage, ROOT)]
    elif case == "storage type unknown":
        kw["storages"] = [(1001, os.system, ROOT)]
    elif case == "tensor key twice":
        kw["tensors"] = tensors * 2
    data = tar_checkpoint(**kw)
    if case == "duplicate member":
        data = _with_member(data, "pickle", pickle_of({"other": 1}))
    elif case == "symlink member":
        data = _with_member(data, "storages", b"", tarfile.SYMTYPE)
    elif case == "member past the end":
        data = _size_field(data, "storages", 99999)
    elif case == "storage count lies":
        data = data.replace(pickle_of(2), pickle_of(3), 1)
    elif case == "storage bytes lie":
        record = pickle_of((1002, "cpu", torch.LongStorage))
        data = data.replace(record + struct.pack("<q", 3), record + struct.pack("<q", 999), 1)
    elif case == "hostile ndim":
        ndim = struct.pack("<i", 2) + b"\0" * 4
        data = data.replace(ndim, struct.pack("<i", 100000) + b"\0" * 4, 1)
    elif case == "too many members":
        for i in range(64):
            data = _with_member(data, f"junk{i}", b"")
    with pytest.raises(SourceError, match=message) as info:
        read_legacy_tar(data, "hostile.tar")
    assert info.value.path == "hostile.tar"


def test_truncated_tar_fails_cleanly_at_every_cut_and_releases_the_mmap(tmp_path):
    data = sample_tar()
    end = len(data.rstrip(b"\0"))
    for cut in range(end):
        with pytest.raises(SourceError):
            read_legacy_tar(data[:cut], "cut.tar")
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:end - 10])
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with pytest.raises(SourceError):
            read_legacy_tar(mm, str(path))
        mm.close()


def test_tar_extra_members_and_leftovers_are_findings():
    data = _with_member(sample_tar(), "../../etc/cron.d/job", b"* * * * * touch /tmp/x\n")
    layout = read_legacy_tar(data, "x.tar")
    assert any("../../etc/cron.d/job" in f and "ignored" in f for f in layout.findings)
    assert_same_array(array_of(data, layout, layout.value["ids"]), IDS)
    leftover = sample_tar(tails={"storages": b"\x80\x02junk", "pickle": b"."})
    findings = read_legacy_tar(leftover, "x.tar").findings
    assert any("'storages': 6 bytes after its last record" in f for f in findings)
    assert any("'pickle': 1 bytes after its last record" in f for f in findings)


def test_malicious_tar_pickle_runs_nothing(tmp_path):
    canary = tmp_path / "canary"
    obj = {"w": Ref(2001), "evil": Reduce(os.system, f"touch {canary}")}
    data = tar_checkpoint(obj, [(1001, torch.FloatStorage, ROOT)], [(2001, 1001, (2,), (1,), 0)])
    layout = read_legacy_tar(data, "evil.tar")
    assert not canary.exists()
    assert isinstance(layout.value["evil"], PlaceholderCall)
    system = [g for g in layout.globals if g.name == "system"]
    assert len(system) == 1 and not system[0].allowed
    main = next(s for s in layout.pickles if s.member == "pickle")
    assert main.start <= system[0].offset < main.end
    assert data[system[0].offset:system[0].offset + 1] in (b"c", b"\x93")  # GLOBAL/STACK_GLOBAL
