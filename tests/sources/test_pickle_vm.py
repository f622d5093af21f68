"""The restricted pickle machine: benign pickles read as the stdlib writes them,
torch files give tensor records, malicious pickles run nothing, limits hold."""

from __future__ import annotations

import ast
import collections
import copyreg
import io
import math
import pickle
import pickletools
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from safeckpt.errors import SafeckptError
from safeckpt.sources.pickle_vm import (
    ALLOWLIST, OPCODE_TABLE, HugeInt, Limits, PickleError, Placeholder, PlaceholderCall, StorageRef,
    TensorRef,
    TorchDType, load, load_all,
)

from tests.files import torch_save_bytes

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


def test_every_opcode_has_a_handler_and_the_allowlist_covers_the_spec():
    assert {op.name for op in pickletools.opcodes} == {name for name, _ in OPCODE_TABLE.values()}
    assert {ord(op.code) for op in pickletools.opcodes} == set(OPCODE_TABLE)
    for name in ["torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter_with_state",
                 "torch.BFloat16Storage", "torch.storage.UntypedStorage", "torch.float32",
                 "collections.OrderedDict", "numpy._core.multiarray._reconstruct",
                 "numpy.core.multiarray.scalar", "numpy.dtype", "_codecs.encode", "builtins.slice",
                 "argparse.Namespace", "pathlib.PosixPath", "omegaconf.dictconfig.DictConfig"]:
        assert name in ALLOWLIST
    assert not any(k.startswith(("os.", "posix.", "subprocess.", "pickle.", "marshal."))
                   for k in ALLOWLIST)


# --- equivalence on benign data --------------------------------------------

def same(a, b) -> bool:
    """Deep equality that treats nan as equal to nan and checks numpy dtypes and types."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, np.generic) or isinstance(b, np.generic):
        return type(a) is type(b) and a.dtype == b.dtype and (a == b or (a != a and b != b))
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a.keys()) == list(b.keys()) and all(same(a[k], b[k]) for k in a)
    return a == b


BENIGN = [
    None, True, False, 0, 1, -1, 255, 256, 65535, 65536, -2**31, 2**31 - 1, 2**31, 2**63,
    -2**64 - 7, 2**1000, -(3**700), 0.0, -0.0, 1.5, 1e308, float("inf"), float("-inf"),
    float("nan"), "", "ascii", "naïve ☃ 漢字 \U0001F600", "line\nbreak\\ \x00", b"", b"\x00\xff" * 10,
    bytes(range(256)) * 3, bytearray(b"abc"), bytearray(), 1 + 2j, complex(float("inf"), -0.5),
    slice(1, None, -2), slice(None), (), (1,), (1, 2), (1, 2, 3), tuple(range(10)),
    [], [1, [2, [3, [4]]]], {}, {"a": 1, 2: "b", (1, 2): [None]}, {1, 2, 3}, set(),
    frozenset(), frozenset({"x", 1}), collections.OrderedDict([("b", 1), ("a", [2])]),
    {"nested": {"deep": [({"x": (1.5, b"b")},), {4, 5}], "od": collections.OrderedDict()}},
    list(range(3000)), {str(i): i for i in range(1500)},
    np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((0, 3), dtype=np.int64),
    np.array([1, 2, 3], dtype=">i4"), np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    np.array([True, False]), np.array([1 + 2j], dtype=np.complex64),
    np.array([np.nan, 1], dtype=np.float16), np.array(7, dtype=np.uint16),
    np.array(["ab", "c"]), np.float64(2.5), np.int8(-3), np.bool_(True), np.complex128(1j),
    np.uint64(2**64 - 1), np.float32("nan"),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_benign_values_equal_stdlib_pickle(protocol):
    for value in BENIGN:
        data = pickle.dumps(value, protocol=protocol)
        result = load(data)
        assert same(result.value, value), (protocol, value)
        assert result.end == len(data)
        assert all(g.allowed for g in result.globals), result.globals


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_shared_references_stay_shared(protocol):
    inner = [1, 2]
    value = {"a": inner, "b": inner, "arr": [np.ones(2)] * 2}
    out = load(pickle.dumps(value, protocol=protocol)).value
    assert out["a"] is out["b"]
    assert out["arr"][0] is out["arr"][1] and isinstance(out["arr"][0], np.ndarray)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plain_data_classes_become_plain_data(protocol):
    import argparse
    import pathlib
    value = {"ns": argparse.Namespace(lr=0.1, name="x"),
             "path": pathlib.PurePosixPath("/tmp/a/b.txt"),
             "win": pathlib.PureWindowsPath("C:/x/y")}
    result = load(pickle.dumps(value, protocol=protocol))
    assert result.value["ns"] == {"lr": 0.1, "name": "x"}
    assert result.value["path"] == "/tmp/a/b.txt"
    assert result.value["win"] == "C:\\x\\y"


def test_pickles_after_stop_are_found_by_end():
    parts = [pickle.dumps(v, protocol=p) for p, v in enumerate([1, "two", [3], {4: 5}, None, b"6"])]
    results = load_all(b"".join(parts))
    assert [r.value for r in results] == [1, "two", [3], {4: 5}, None, b"6"]


# --- torch ---------------------------------------------------------------------

torch = pytest.importorskip("torch")


def torch_pickle(obj, new_zip=True):
    data = torch_save_bytes(obj, _use_new_zipfile_serialization=new_zip)
    if not new_zip:
        return data
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        return z.read(name)


def check_ref(ref, tensor, dtype_name):
    assert isinstance(ref, TensorRef)
    assert ref.size == tuple(tensor.shape) and ref.stride == tuple(tensor.stride())
    assert ref.storage_offset == tensor.storage_offset()
    assert isinstance(ref.storage, StorageRef)
    assert ref.dtype == ref.storage.dtype and ref.dtype.name == dtype_name
    assert ref.storage.numel * ref.dtype.itemsize == tensor.untyped_storage().nbytes()


def test_torch_state_dict():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    sd = model.state_dict()
    result = load(torch_pickle(sd))
    assert all(g.allowed for g in result.globals), [g for g in result.globals if not g.allowed]
    assert list(result.value) == list(sd)
    for name, t in sd.items():
        check_ref(result.value[name], t, str(t.dtype).removeprefix("torch."))
    keys = {r.storage.key for r in result.value.values()}
    assert len(keys) == len(sd)


def test_torch_parameter_bf16_views_and_shared_storage():
    base = torch.arange(20, dtype=torch.float32)
    obj = {"p": torch.nn.Parameter(torch.ones(2, 3)), "bf": torch.ones(5, dtype=torch.bfloat16),
           "view": base[3:].view(1, 17)[:, ::2], "a": base, "b": base[5:9], "bool": torch.tensor([True]),
           "i64": torch.tensor([1, 2], dtype=torch.int64), "meta": {"epoch": 3, "lr": [0.1]}}
    result = load(torch_pickle(obj))
    v = result.value
    assert v["p"].parameter and v["p"].requires_grad
    check_ref(v["p"], obj["p"].data, "float32")
    check_ref(v["bf"], obj["bf"], "bfloat16")
    check_ref(v["view"], obj["view"], "float32")
    assert v["view"].storage_offset == 3 and v["view"].stride == (17, 2)
    assert v["a"].storage.key == v["b"].storage.key == v["view"].storage.key
    check_ref(v["bool"], obj["bool"], "bool")
    assert v["i64"].dtype == TorchDType("int64", 8)
    assert v["meta"] == {"epoch": 3, "lr": [0.1]}


def test_torch_legacy_format_sequence_of_pickles():
    sd = {"w": torch.ones(2, 2), "b": torch.zeros(3, dtype=torch.float16)}
    data = torch_pickle(sd, new_zip=False)
    results = []
    pos = 0
    for _ in range(4):  # magic, protocol, sys_info, main pickle, storage keys
        r = load(data, start=pos)
        results.append(r)
        pos = r.end
    main = results[3].value
    assert results[0].value == 0x1950A86A20F9469CFC6C
    assert main["w"].size == (2, 2) and main["b"].dtype.name == "float16"
    keys = load(data, start=pos).value
    assert sorted(keys) == sorted({main["w"].storage.key, main["b"].storage.key})


def test_custom_persistent_load_is_used():
    seen = []
    result = load(torch_pickle({"x": torch.ones(2)}), persistent_load=lambda pid: seen.append(pid) or "S")
    assert result.value["x"].storage == "S" and seen[0][0] == "storage"


# --- malicious pickles: nothing runs, everything is reported -------------------

import builtins  # noqa: E402
import importlib  # noqa: E402
import marshal  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import subprocess  # noqa: E402

GLOBAL_OPS = {ord("c"), ord("i"), 0x93, 0x82, 0x83, 0x84}  # GLOBAL INST STACK_GLOBAL EXT1/2/4


class Reduce:
    """Pickles as `func(*args)`: how attackers build payloads with pickle.dumps."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self):  # pickle insists that a reduce function be callable
        raise AssertionError("never called")


def glob(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def ustr(text):
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def short(text):  # SHORT_BINUNICODE, for STACK_GLOBAL names
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def code_for(canary):
    return f"open({str(canary)!r}, 'w').close()"


def reduce_patterns(canary):
    """Payloads pickle.dumps can write, at every protocol."""
    cmd = f"touch {canary}"
    code = code_for(canary)
    inner = pickle.dumps(Reduce(os.system, cmd), protocol=2)
    return {
        "os.system": Reduce(os.system, cmd),
        "builtins.exec": Reduce(builtins.exec, code),
        "builtins.eval": Reduce(builtins.eval, code),
        "subprocess.Popen": Reduce(subprocess.Popen, ["touch", str(canary)]),
        "runpy._run_code": Reduce(runpy._run_code, code, {}),
        "getattr chain": Reduce(Reduce(builtins.getattr, Reduce(builtins.__import__, "os"), "system"), cmd),
        "importlib.import_module": Reduce(Reduce(builtins.getattr, Reduce(importlib.import_module, "os"),
                                                 "system"), cmd),
        "nested pickle.loads": Reduce(pickle.loads, inner),
        "nested torch _load_from_bytes": Reduce(torch.storage._load_from_bytes, inner),
        "marshal code": Reduce(marshal.loads, marshal.dumps(compile(code, "x", "exec"))),
        "in a state dict": {"weight": torch.ones(2), "evil": Reduce(os.system, cmd)},
    }


def crafted_patterns(canary):
    """Payloads hand-assembled from opcodes, where pickle.dumps will not write them."""
    cmd = f"touch {canary}"
    code = code_for(canary)
    mcode = marshal.dumps(compile(code, "x", "exec"))
    func = (b"\x80\x02" + glob("types", "FunctionType") + glob("marshal", "loads")
            + b"B" + struct.pack("<I", len(mcode)) + mcode + b"\x85R}\x86R)R.")
    return {
        "posix.system GLOBAL": b"\x80\x02" + glob("posix", "system") + ustr(cmd) + b"\x85R.",
        "nt.system GLOBAL": b"\x80\x02" + glob("nt", "system") + ustr(cmd) + b"\x85R.",
        "INST": b"(" + b"V" + cmd.encode() + b"\n" + b"ios\nsystem\n.",
        "OBJ": b"(" + glob("os", "system") + b"V" + cmd.encode() + b"\no.",
        "NEWOBJ": b"\x80\x02" + glob("os", "system") + ustr(cmd) + b"\x85\x81.",
        "NEWOBJ_EX": b"\x80\x04" + short("os") + short("system") + b"\x93" + short(cmd)
                     + b"\x85}\x92.",
        "BUILD __setstate__": b"\x80\x02" + glob("__main__", "Victim") + b")\x81}" + ustr("__setstate__")
                              + glob("os", "system") + b"sb" + ustr(cmd) + b"b.",
        "STACK_GLOBAL dotted": b"\x80\x04" + short("pathlib") + short("os.system") + b"\x93"
                               + short(cmd) + b"\x85R.",
        "STACK_GLOBAL os.path": b"\x80\x04" + short("os.path") + short("os.system") + b"\x93"
                                + short(cmd) + b"\x85R.",
        "types.FunctionType marshal": func,
        "types.CodeType": b"\x80\x02" + glob("types", "CodeType") + b")R.",
        "exec in protocol 0 text": b"c__builtin__\nexec\n(V" + code.encode() + b"\ntR.",
        "EXT1 hand made": b"\x80\x02\x82\x05" + ustr(cmd) + b"\x85R.",
        "EXT4 hand made": b"\x80\x02\x84\x01\x02\x03\x04" + ustr(cmd) + b"\x85R.",
        "torch.load via PERSID trick": b"\x80\x02" + glob("torch", "load") + b"Pfoo\n\x85R.",
    }


def iter_nodes(value):
    """Every object reachable from value, by identity, without recursion."""
    seen, todo = set(), [value]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        if isinstance(x, dict):
            todo.extend(x.keys())
            todo.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            todo.extend(x)
        elif isinstance(x, PlaceholderCall):
            todo.extend([x.func, *x.args, *x.kwargs.values(), *x.state, *x.items])
            for k, v in x.setitems:
                todo.extend([k, v])


def assert_inert(data, canary):
    result = load(data)
    assert not canary.exists()
    denied = [g for g in result.globals if not g.allowed]
    assert denied, "a dangerous global went unreported"
    for g in result.globals:
        assert data[g.offset] in GLOBAL_OPS, g
    assert any(isinstance(x, (Placeholder, PlaceholderCall)) for x in iter_nodes(result.value))
    assert not canary.exists()
    return result


def test_malicious_reduce_patterns_every_protocol(tmp_path):
    canary = tmp_path / "canary"
    count = 0
    for name, payload in reduce_patterns(canary).items():
        for protocol in PROTOCOLS:
            assert_inert(pickle.dumps(payload, protocol=protocol), canary)
            count += 1
    assert count >= 11 * 6


@pytest.mark.parametrize("name", list(crafted_patterns("x")))
def test_malicious_crafted_patterns(tmp_path, name):
    canary = tmp_path / "canary"
    data = crafted_patterns(canary)[name]
    result = assert_inert(data, canary)
    if name.startswith("STACK_GLOBAL"):
        assert any(g.name == "os.system" for g in result.globals)
    if name.startswith("EXT"):
        assert result.findings and result.globals[0].module == "copyreg.extension"


def test_ext_codes_registered_with_copyreg_stay_unresolved(tmp_path):
    canary = tmp_path / "canary"
    codes = [(240, 0x82), (0x1234, 0x83), (0x123456, 0x84)]
    for code, opcode in codes:
        copyreg.add_extension("posix", "system", code)
        try:
            data = pickle.dumps(Reduce(os.system, f"touch {canary}"), protocol=2)
        finally:
            copyreg.remove_extension("posix", "system", code)
        assert opcode in data
        result = assert_inert(data, canary)
        assert result.globals == [g for g in result.globals if g.module == "copyreg.extension"]
        assert "extension code" in result.findings[0]


def test_malicious_pattern_count():
    assert len(reduce_patterns("x")) + len(crafted_patterns("x")) + 1 >= 12



# --- limits: only PickleError comes out, quickly ---------------------------------

def raises_at(data, opcode, offset, limits=Limits(), match=None):
    with pytest.raises(PickleError, match=match) as info:
        load(data, limits=limits)
    message = str(info.value)
    assert message.startswith(f"{opcode} at offset {offset}:"), message
    assert isinstance(info.value, SafeckptError) and isinstance(info.value, ValueError)
    return message


def test_binbytes8_claiming_more_than_the_data():
    data = b"\x80\x04\x8e" + struct.pack("<Q", 2**60)
    assert len(data) == 11
    raises_at(data, "BINBYTES8", 2, match="truncated")
    raises_at(b"\x80\x05\x96" + struct.pack("<Q", 2**63) + b"xx.", "BYTEARRAY8", 2)
    raises_at(b"\x8b\xff\xff\xff\x7fxx.", "LONG4", 0, match="truncated")
    raises_at(b"\x8b\xff\xff\xff\xffxx.", "LONG4", 0, match="negative byte count")
    raises_at(b"\x8b\x05\x00\x00\x00xx.", "LONG4", 0, match="truncated")
    raises_at(b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"N.", "FRAME", 2)
    raises_at(b"X\xff\xff\xff\xff.", "BINUNICODE", 0, match="truncated")


def test_deep_nesting_is_read_on_and_kept_inert():
    # CPython builds containers of any depth and MARKs of any depth: so does the machine,
    # wrapping what nests past max_nesting so that no later walk or hash can recurse on it
    n = 100_000
    cases = [b"(" * n + b"N.", b"]" * n + b"a" * (n - 1) + b".", b"N" + b"\x85" * n + b".",
             b"}" + b"N}" * 2000 + b"s" * 2000 + b"."]
    for data in cases:
        expected = pickle.loads(data)
        result = load(data)
        assert type(result.value) is type(expected)
        if len(data) > n:
            assert any("nest deeper than 900" in f for f in result.findings) or result.value is None
    deep = load(b"]" * n + b"a" * (n - 1) + b".").value
    depth = 0
    while isinstance(deep, list) and deep:
        deep, depth = deep[0], depth + 1
    assert depth < 1000 and isinstance(deep, PlaceholderCall)


def test_memo_stack_opcode_line_and_byte_limits():
    raises_at(b"N" + b"\x94" * 2000 + b".", "MEMOIZE", 1001, Limits(max_memo=1000), "max_memo")
    raises_at(b"N" + b"q\x01" * 5 + b"r\x02\x00\x00\x00.", "LONG_BINPUT", 11, Limits(max_memo=1))
    raises_at(b"N" * 200 + b".", "NONE", 100, Limits(max_stack=100), "max_stack")
    raises_at(b"N" * 50 + b"(" + b"N" * 60, "NONE", 100, Limits(max_stack=100), "max_stack")  # a MARK counts
    raises_at(b"N0" * 200 + b"N.", "NONE", 100, Limits(max_opcodes=100), "max_opcodes")
    raises_at(b"I" + b"1" * 200 + b"\n.", "INT", 0, Limits(max_line=100), "max_line")
    raises_at(b"X\x14\x00\x00\x00" + b"a" * 20 + b".", "BINUNICODE", 0, Limits(max_total_bytes=10),
              "max_total_bytes")
    # an integer past max_long_bytes is kept inert, not refused: CPython reads it
    assert load(b"\x8b\x09\x00\x00\x00" + b"\x01" * 9 + b".", limits=Limits(max_long_bytes=8)).value \
        == HugeInt(9)
    assert load(b"\x8a\x09" + b"\x01" * 9 + b".", limits=Limits(max_long_bytes=8)).value == HugeInt(9)


def test_malformed_pickles_name_the_opcode_and_offset():
    raises_at(b"N", "end of data", 1, match="without STOP")
    raises_at(b"", "end of data", 0)
    raises_at(b"NNl.", "LIST", 2, match="mark stack underflow")
    raises_at(b"0.", "POP", 0, match="underflow")
    raises_at(b".", "STOP", 0, match="underflow")
    raises_at(b"N\x94Nh\x05.", "BINGET", 3, match="never stored")
    raises_at(b"N\xff.", "byte 0xff", 1, match="not a pickle opcode")
    raises_at(b"\x80\x05\x97.", "NEXT_BUFFER", 2, match="out-of-band")
    raises_at(b"\x80\x06N.", "PROTO", 0, match="protocol 6")
    raises_at(b"I12x\n.", "INT", 0, match="invalid literal")
    raises_at(b"N\x85)\x81.", "NEWOBJ", 3, match="not callable")
    raises_at(b"S'abc\n.", "STRING", 0, match="not quoted")


def test_every_truncation_of_a_benign_pickle_is_a_pickle_error():
    for protocol in PROTOCOLS:
        data = pickle.dumps({"a": [1, 2.5, "x" * 300, b"y"], "n": np.arange(3)}, protocol=protocol)
        for cut in range(len(data)):
            with pytest.raises(PickleError):
                load(data[:cut])


def test_shared_structures_grow_without_copies():
    # 2**800 leaves as a tree, 800 nodes as a DAG: the machine never walks it
    data = b"N" + b"2\x86" * 800 + b"."
    value = load(data).value
    assert value[0] is value[1]
    deeper = load(b"N" + b"2\x86" * 1000 + b".")  # read on, the deepest part kept inert
    assert any("nest deeper" in f for f in deeper.findings)
    # a list appended into itself: a cycle, no growth
    cyc = load(b"]2a.").value
    assert cyc[0] is cyc


def test_pending_numpy_array_is_replaced_in_the_memo():
    arr = np.arange(4.0)
    for protocol in PROTOCOLS:
        value = load(pickle.dumps([arr, arr, {"x": arr}], protocol=protocol)).value
        assert value[0] is value[1] is value[2]["x"]
        assert same(value[0], arr)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_object_arrays_are_not_built(protocol, tmp_path):
    canary = tmp_path / "canary"
    value = {"w": np.ones(2), "obj": np.array([1, "a", Reduce(os.system, f"touch {canary}")], dtype=object)}
    result = load(pickle.dumps(value, protocol=protocol))
    assert same(result.value["w"], value["w"])
    obj = result.value["obj"]
    assert isinstance(obj, PlaceholderCall) and obj.func.qualname == "numpy.ndarray"
    assert any("numpy.dtype" in f and "was not built" in f for f in result.findings)
    assert [g.name for g in result.globals if not g.allowed] == ["system"]
    assert not canary.exists()
    scalar = load(b"\x80\x02" + glob("numpy.core.multiarray", "scalar") + glob("numpy", "dtype")
                  + ustr("O8") + b"\x89\x88\x87R}b" + b"N\x86R.")  # a scalar of an object dtype
    assert isinstance(scalar.value, PlaceholderCall) and scalar.value.func.qualname == "numpy.scalar"
    assert len(scalar.findings) == 2


BENIGN_PICKLES = [pickle.dumps(v, protocol=p) for p in PROTOCOLS
                  for v in ({"a": [1, (2, 3)], "b": {1.5, 2}}, np.arange(6, dtype=np.int16),
                            [b"x" * 40, "y" * 40, 2**70, None, True], collections.OrderedDict(a=1))]


def _load_or_pickle_error(data):
    try:
        load(data, limits=Limits(max_opcodes=100_000))
    except PickleError:
        pass


@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    _load_or_pickle_error(data)
    _load_or_pickle_error(b"\x80\x04" + data)


@settings(max_examples=400, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(BENIGN_PICKLES), st.lists(
    st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0, 10_000),
              st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_mutated_benign_pickles(data, edits):
    buf = bytearray(data)
    for kind, where, byte in edits:
        i = where % (len(buf) + 1)
        if kind == "insert":
            buf.insert(i, byte)
        elif i < len(buf):
            if kind == "set":
                buf[i] = byte
            else:
                del buf[i]
    _load_or_pickle_error(bytes(buf))


# --- the machine reads what CPython reads -----------------------------------------

class _Inert:
    """What CPython's unpickler gets for every global here: accepts any call, item or state."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def extend(self, items):
        pass

    def add(self, item):
        pass


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _Inert


def _cpython(data: bytes, reader: str):
    """(ok, where the file is left) for CPython's C unpickler on `data`."""
    f = io.BytesIO(data)  # no peek(): the "file" reader
    try:
        if reader == "bytes":
            _InertUnpickler(io.BufferedReader(io.BytesIO(data), buffer_size=len(data) + 1)).load()
        else:
            _InertUnpickler(f).load()
    except Exception:  # noqa: BLE001 - whatever CPython refuses
        return False, None
    return True, f.tell()


# Opcode snippets that put CPython and a strict reader at odds: text numbers in every form
# C accepts, empty and odd containers, items on non-containers, frames of every shape.
_SNIPPETS = [
    b"N", b"I\x00z\n", b"I0x1f\n", b"I010\n", b"I 1\n", b"I1\x00zz\n", b"I01\n", b"I-0\n", b"I1_000\n", b"I0o17\n",
    b"I99999999999999999999\n", b"L0x1fL\n", b"L7\n", b"F1.5\n", b"F1\x00x\n", b"Finf\n", b"(", b")",
    b"]", b"}", b"\x8f", b"t", b"l", b"d", b"a", b"e", b"s", b"u", b"\x90", b"\x91", b"0", b"1", b"2",
    b"\x85", b"\x86", b"\x87", b"\x94", b"h\x00", b"q\x00", b"p0\n", b"g0\n", b"p 1\n", b"g1\x00x\n",
    b"\x8c\x01a", b"X\x01\x00\x00\x00b", b"B\x01\x00\x00\x00c", b"C\x01d", b"\x96\x01" + bytes(7) + b"e",
    b"U\x01f", b"S'g'\n", b"Vh\n", b"J\x01\x00\x00\x00", b"K\x05", b"M\x05\x00", b"\x88", b"\x89",
    b"\x8a\x01\x05", b"\x8b\x01\x00\x00\x00\x05", b"G" + bytes(8), b"\x98", b"cmod\nname\n",
    b"\x8c\x03mod\x8c\x04name\x93", b"R", b"b", b"\x81", b"\x92", b"o", b"(imod\nname\n", b"\x80\x02",
    b"\x80\x04", b"\x95\x05" + bytes(7), b"\x95\x02" + bytes(7), b"\x95\x0c" + bytes(7), b".",
]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_SNIPPETS), min_size=1, max_size=24), st.sampled_from(["bytes", "file"]))
def test_the_machine_reads_on_wherever_cpython_does(snippets, reader):
    data = b"".join(snippets) + b"."
    ok, end = _cpython(data, reader)
    if not ok:
        return  # CPython refuses it: the machine may refuse or read on (a superset)
    try:
        result = load(data, reader=reader, strict=False, persistent_ids=False)
    except PickleError as exc:
        raise AssertionError(f"CPython reads {data!r} ({reader}) but the machine stops: {exc}") from None
    if reader == "file":
        assert result.end == end, (data, result.end, end)


def test_numbers_in_text_as_cpython_reads_them():
    for text in (b"0x1f", b"010", b" 1", b"+1", b"1\x00junk", b"00", b"01", b"-0", b"1_000", b"0o17",
                 b"0b11", b"99999999999999999999", b"0", b"7"):
        data = b"I" + text + b"\n."
        assert load(data).value == pickle.loads(data) and type(load(data).value) is type(pickle.loads(data))
    assert load(b"L0x1fL\n.").value == 31
    assert load(b"F1.5\x00zz\n.").value == 1.5
    for bad in (b"I0x\n.", b"I08\n.", b"I1 2\n.", b"L\n.", b"I\n."):
        with pytest.raises(PickleError):
            load(bad)
        with pytest.raises(Exception):  # noqa: B017 - CPython refuses these too
            pickle.loads(bad)


def test_frames_read_as_the_file_reader_reads_them():
    hidden = pickle.dumps("hidden", protocol=2)
    decoy = pickle.dumps("decoy", protocol=2)
    # STOP inside a frame: pickle.loads stops there; a file reader has read the whole
    # frame, so the next pickle.load starts after it
    body = b"\x8c\x03one." + decoy
    data = b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body + hidden
    f = io.BytesIO(data)
    assert pickle.load(f) == "one" and pickle.load(f) == "hidden"
    first = load(data, reader="file", strict=False)
    assert first.end == len(data) - len(hidden) and first.anomalies
    assert load(data, reader="bytes", strict=False).end == 2 + 9 + 6
    with pytest.raises(PickleError, match="frames disagree"):
        load(data)
    # an argument that runs past the frame's end is read from after it by a file reader
    data = b"\x80\x04\x95\x03" + bytes(7) + b"J\x01\x02" + b"\x05\x00\x00\x00."
    f = io.BytesIO(data)
    assert pickle.load(f) == 5
    assert load(data, reader="file", strict=False).value == 5
    with pytest.raises(PickleError):  # read on from the frame, the bytes make no pickle
        load(data, reader="bytes", strict=False)
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(data)


def test_refusals_are_inert_when_scanning_and_errors_when_reading():
    data = b"\x80\x02ccollections\nOrderedDict\nK\x05\x85RN."
    with pytest.raises(PickleError, match="OrderedDict|list or tuple"):
        load(data)
    result = load(data, strict=False)
    assert result.value is None and result.refusals and "collections.OrderedDict" in result.refusals[0]


def test_python2_strings_and_names():
    assert load(b"S'abc'\n.").value == "abc"
    assert load(b"S'a\\xff\\n'\n.").value == b"a\xff\n"
    assert load(b"U\x03abc.").value == "abc"
    assert load(b"T\x03\x00\x00\x00abc.").value == "abc"
    assert load(b"(I01\nI00\nI-7\nL12345678901234567890L\nt.").value == (
        True, False, -7, 12345678901234567890)
    assert load(b"c__builtin__\nlong\n(I5\ntR.").value == 5
    assert load(b"F1.5\n.").value == 1.5


def test_lightning_attribute_dict_becomes_a_dict_that_knows_what_it_was():
    from safeckpt.sources.pickle_records import KeptDict

    for module in ("pytorch_lightning.utilities.parsing", "lightning.fabric.utilities.data"):
        data = (b"\x80\x02" + glob(module, "AttributeDict") + b")\x81}b(" + ustr("lr") + b"G?\xb9\x99"
                b"\x99\x99\x99\x99\x9a" + ustr("name") + ustr("net") + b"u.")
        result = load(data)
        assert result.value == {"lr": 0.1, "name": "net"} and type(result.value) is KeptDict
        assert result.value.kind == "lightning.AttributeDict"
        assert all(g.allowed for g in result.globals)


def test_omegaconf_containers_become_plain_data():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"a": 1, "b": {"c": [1, "x", None], "d": 2.5}, "e": "${a}"})
    for protocol in PROTOCOLS:
        result = load(pickle.dumps({"cfg": cfg, "l": omegaconf.OmegaConf.create([1])}, protocol=protocol))
        assert result.value == {"cfg": {"a": 1, "b": {"c": [1, "x", None], "d": 2.5}, "e": "${a}"},
                                "l": [1]}
        assert all(g.allowed for g in result.globals)


def test_torch_newer_dtypes_optimizer_state_and_whole_modules():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    obj = {"opt": opt.state_dict(), "model": model, "f8": torch.zeros(3, dtype=torch.float8_e4m3fn),
           "c64": torch.zeros(2, dtype=torch.complex64), "u16": torch.zeros(2, dtype=torch.uint16)}
    result = load(torch_pickle(obj))
    v = result.value
    assert v["f8"].dtype == TorchDType("float8_e4m3fn", 1) and v["f8"].storage.numel == 3
    assert v["c64"].dtype.name == "complex64" and v["u16"].dtype.name == "uint16"
    assert v["opt"]["param_groups"][0]["lr"] == 0.001
    assert v["opt"]["state"][0]["exp_avg"].size == (2, 2)
    assert isinstance(v["model"], PlaceholderCall)  # a pickled Module is a user class: inert
    denied = {f"{g.module}.{g.name}" for g in result.globals if not g.allowed}
    assert denied == {"torch.nn.modules.linear.Linear"}


def test_tensor_view_past_its_storage_is_refused():
    data = bytearray(torch_pickle({"x": torch.arange(4.0)}))
    # the BINPERSID tuple ends with numel 4 as BININT1 K\x04; claim a storage of 3 elements
    i = data.index(b"K\x04t")
    data[i + 1] = 3
    with pytest.raises(PickleError, match="runs past its storage"):
        load(bytes(data))


def test_errors_keep_the_globals_seen_before_them(tmp_path):
    canary = tmp_path / "canary"
    data = b"\x80\x02" + glob("os", "system") + ustr(f"touch {canary}") + b"\x85R" + b"\xff"
    with pytest.raises(PickleError) as info:
        load(data)
    assert info.value.offset == len(data) - 1 and info.value.opcode == "byte 0xff"
    assert [(g.module, g.name, g.offset, g.allowed) for g in info.value.globals] == [
        ("os", "system", 2, False)]
    assert not canary.exists()


def test_messages_about_shared_values_stay_short():
    # DUP + TUPLE2 forty times: a 90-byte DAG whose full repr would be 2**40 items long
    import signal
    dag = b"N" + b"2\x86" * 40
    signal.alarm(20)
    try:
        with pytest.raises(PickleError, match=r"dtype spec \(\(\(") as info:
            load(b"\x80\x02cnumpy\ndtype\n" + dag + b"\x85R.")
        assert len(str(info.value)) < 400
        result = load(b"\x80\x02cos\nsystem\n" + dag + b"\x85R.")
        assert len(repr(result.value)) < 400
    finally:
        signal.alarm(0)


# --- opcode families: one handler each, arguments read as pickletools describes them ----------

@pytest.mark.parametrize("data", [
    b"]\x94h\x00\x86.",  # MEMOIZE, BINGET
    b"]q\x07j\x07\x00\x00\x00\x86.",  # BINPUT, LONG_BINGET
    b"]r\x07\x00\x01\x00g65543\n\x86.",  # LONG_BINPUT, GET
    b"]p7\nh\x07\x86.",  # PUT, BINGET
])
def test_every_memo_opcode_shares_what_it_stored(data):
    value = load(data).value
    assert value == pickle.loads(data) == ([], []) and value[0] is value[1]


@pytest.mark.parametrize("data", [
    b"K\xff.", b"M\xff\xff.", b"J\xff\xff\xff\xff.", b"I-1\n.", b"L-1L\n.", b"\x8a\x01\xff.",
    b"\x8b\x02\x00\x00\x00\x00\x80.", b"G\xbf\xf8\x00\x00\x00\x00\x00\x00.", b"F-1.5\n.",
    b"C\x01\xff.", b"B\x01\x00\x00\x00\xff.",
    b"\x8e\x01" + bytes(7) + b"\xff.", b"\x96\x01" + bytes(7) + b"\xff.", b"\x8c\x02\xc3\xa9.",
    b"X\x02\x00\x00\x00\xc3\xa9.", b"\x8d\x02" + bytes(7) + b"\xc3\xa9.",
])
def test_every_value_opcode_reads_as_cpython_does(data):
    value, expected = load(data).value, pickle.loads(data)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("body, kind", [
    (b"G)R", "REDUCE"), (b"G)\x81", "NEWOBJ"), (b"G)}\x92", "NEWOBJ_EX"), (b"(Go", "OBJ")])
def test_every_call_opcode_calls_nothing_and_says_which_it_was(body, kind):
    def pickled(module: bytes, name: bytes) -> bytes:
        named = b"\x8c" + bytes([len(module)]) + module + b"\x8c" + bytes([len(name)]) + name + b"\x93"
        return b"\x80\x04" + body.replace(b"G", named) + b"."
    value = load(pickled(b"os", b"getcwd")).value
    assert isinstance(value, PlaceholderCall) and value.kind == kind
    assert value.func.qualname == "os.getcwd" and value.args == ()
    assert load(pickled(b"collections", b"OrderedDict")).value == collections.OrderedDict()


@pytest.mark.parametrize("op", [op for op in pickletools.opcodes
                                if op.arg is not None and op.arg.n != pickletools.UP_TO_NEWLINE])
def test_every_fixed_width_argument_cut_short_names_its_opcode(op):
    width = op.arg.n if op.arg.n > 0 else {-2: 1, -3: 4, -4: 4, -5: 8}[op.arg.n]
    for cut in range(width):
        raises_at(b"N" + op.code.encode("latin-1") + b"\x00" * cut, op.name, 1, match="truncated data")


def _imports(module) -> set:
    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    return ({node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            | {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names})


def test_the_allowlist_and_its_records_sit_below_the_machine():
    import safeckpt.sources.pickle_allowlist as allowlist
    import safeckpt.sources.pickle_records as records
    import safeckpt.sources.pickle_vm as machine

    assert not any(name.endswith(("pickle_vm", "pickle_allowlist")) for name in _imports(records))
    assert not any(name.endswith("pickle_vm") for name in _imports(allowlist))
    # what other modules import from the machine is the same object
    assert machine.ALLOWLIST is allowlist.ALLOWLIST and machine.TensorRef is records.TensorRef
