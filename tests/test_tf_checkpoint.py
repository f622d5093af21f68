"""TensorFlow checkpoints read without TensorFlow: every tensor against TensorFlow's own reader.

The checkpoints come from scripts/make_tf_fixtures.py: the copy committed in
tests/fixtures/tf/ (so that these tests run without TensorFlow), and, when TensorFlow is
installed, a fresh set written by it in a subprocess (TensorFlow is never imported into
the test process: it is slow to import and crashes a process that imported jax first).
Next to each checkpoint lies TensorFlow's answer for every key (``*.oracle.json``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from safeckpt import errors
from safeckpt.format.dtypes import DTYPES
from safeckpt.sources import protobuf_wire as pw
from safeckpt.sources import tf_table
from safeckpt.sources.tf_checkpoint import (
    ENTRY_SCHEMA,
    TfCheckpointSource,
    latest_from_state,
    name_from_graph,
    slice_key,
    tf_checkpoint_prefix,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "tests", "fixtures", "tf")
SCRIPT = os.path.join(ROOT, "scripts", "make_tf_fixtures.py")
PREFIXES = ["keras/ckpt-1", "manager/ckpt-2", "module/ckpt", "sharded/ckpt", "saved_model/variables/variables",
            "sliced/model", "dtypes/all", "dtypes/slices"]
TF_TO_NUMPY = {"float32": "<f4", "float64": "<f8", "int32": "<i4", "uint8": "u1", "int16": "<i2", "int8": "i1",
               "complex64": "<c8", "int64": "<i8", "bool": "?", "uint16": "<u2", "float16": "<f2",
               "uint32": "<u4", "uint64": "<u8"}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> str:
    """The fixtures written by the installed TensorFlow (in one subprocess), or a skip."""
    try:
        installed = importlib.util.find_spec("tensorflow") is not None
    except ImportError:  # a finder that hides it (scripts/without_frameworks)
        installed = False
    if not installed:
        pytest.skip("tensorflow is not installed")
    out = str(tmp_path_factory.mktemp("tf"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, SCRIPT, out], capture_output=True, text=True, env=env, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(params=["committed", "generated"])
def fixtures(request) -> str:
    return COMMITTED if request.param == "committed" else request.getfixturevalue("generated")


def oracle(prefix: str) -> dict:
    with open(prefix + ".oracle.json") as f:
        return json.load(f)


def copy_of(fixtures: str, tmp_path, what: str) -> str:
    """A private copy of one fixture checkpoint (a directory), to damage."""
    shutil.copytree(os.path.join(fixtures, what), tmp_path / what)
    return str(tmp_path / what)


# --- every tensor equals what TensorFlow reads ----------------------------------------------

@pytest.mark.parametrize("name", PREFIXES)
def test_every_key_matches_tensorflow(fixtures, name):
    prefix = os.path.join(fixtures, name)
    expected = oracle(prefix)
    with TfCheckpointSource(prefix, raw_names=True) as src:
        listed = set(src) | set(src.tree["values"])
        assert listed == set(expected)
        for key, want in expected.items():
            if "strings" in want:  # strings are data in the tree, never tensors
                assert key not in src
                value = src.tree["values"][key]
                if key != "_CHECKPOINTABLE_OBJECT_GRAPH":
                    flat = np.array(value, dtype=object).reshape(-1).tolist() if want["shape"] else [value]
                    got = [v.encode() if isinstance(v, str) else None for v in flat]
                    for g, w in zip(got, want["strings"]):
                        assert g is None or g.hex() == w
                continue
            if want["dtype"] == "complex128":  # safetensors has no complex128: described in the tree
                assert src.tree["values"][key] == {"__array__": "complex128", "shape": want["shape"]}
                continue
            if "error" in want:  # saved only in part: TensorFlow cannot read it, we describe it
                assert key not in src and src.tree["values"][key]["shape"] == want["shape"]
                continue
            array = src.read_checked(key)
            assert list(array.shape) == want["shape"]
            assert array.tobytes().hex() == want["hex"], key
            if want["dtype"] in TF_TO_NUMPY:
                assert array.dtype == np.dtype(TF_TO_NUMPY[want["dtype"]])
            assert not array.flags.writeable


def test_readable_names_and_groups(fixtures):
    with TfCheckpointSource(os.path.join(fixtures, "manager")) as src:
        assert src.groups["tiny.hidden.kernel"] == "weights"
        assert src["tiny.hidden.kernel"].shape == (3, 4)
        assert src.groups["optimizer.adam.tiny_hidden_kernel_momentum"] == "optimizer"
        assert src.groups["checkpoint.save_counter"] == "checkpoint"
        assert src.read("checkpoint.save_counter") == 2
        assert {name for name, group in src.groups.items() if group == "weights"} == {
            "tiny.hidden.kernel", "tiny.hidden.bias", "tiny.head.kernel", "tiny.head.bias"}
        assert all(name.startswith("optimizer.") for name, g in src.groups.items() if g == "optimizer")
        assert src.keys_of["tiny.hidden.kernel"] == "optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"
        raw = oracle(os.path.join(fixtures, "manager", "ckpt-2"))[src.keys_of["tiny.head.bias"]]
        assert src.read("tiny.head.bias").tobytes().hex() == raw["hex"]
        assert src.tree["values"]["checkpoint.object_graph"] == {"__object_graph__": "35 objects"}
        assert "10 optimizer, 4 weights, 1 checkpoint" in src.describe()


def test_object_paths_when_variable_names_repeat(fixtures):
    with TfCheckpointSource(os.path.join(fixtures, "module", "ckpt")) as src:  # both variables are "Variable"
        tensors = {n: g for n, g in src.groups.items() if n in src}  # (groups also holds the tree's values)
        assert tensors == {"model.w": "weights", "model.b": "weights", "step": "weights",
                              "optimizer.model.w.m": "optimizer", "optimizer.model.w.v": "optimizer",
                              "optimizer.model.b.m": "optimizer", "optimizer.model.b.v": "optimizer",
                              "optimizer.beta1_power": "optimizer", "optimizer.beta2_power": "optimizer"}
        assert src.keys_of["optimizer.model.w.v"] == "model/w/.OPTIMIZER_SLOT/optimizer/v/.ATTRIBUTES/VARIABLE_VALUE"
        assert src.read("step") == 7


def node(children=(), attributes=(), slots=()):
    return {"children": [{"node_id": n, "local_name": name} for n, name in children],
            "attributes": [{"name": a, "full_name": f, "checkpoint_key": k} for a, f, k in attributes],
            "slot_variables": [{"original_variable_node_id": o, "slot_name": name, "slot_variable_node_id": v}
                               for o, name, v in slots]}


def test_names_from_an_object_graph():
    value = "VARIABLE_VALUE"
    graph = {"nodes": [
        node([(1, "net"), (2, "opt"), (3, "save_counter")]),
        node([(4, "dense")], [("OBJECT_CONFIG_JSON", "net", "net/.ATTRIBUTES/OBJECT_CONFIG_JSON")]),
        node([(5, "_iterations"), (4, "_trainable_variables")]),
        node(attributes=[(value, "save_counter", "save_counter/.ATTRIBUTES/VARIABLE_VALUE")]),
        node(attributes=[(value, "net/dense/kernel", "net/dense/.ATTRIBUTES/VARIABLE_VALUE")]),
        node(attributes=[(value, "adam/iteration", "opt/_iterations/.ATTRIBUTES/VARIABLE_VALUE")]),
    ]}
    assert name_from_graph(graph) == {
        "net/.ATTRIBUTES/OBJECT_CONFIG_JSON": ("net.OBJECT_CONFIG_JSON", "weights"),
        "save_counter/.ATTRIBUTES/VARIABLE_VALUE": ("checkpoint.save_counter", "checkpoint"),
        "net/dense/.ATTRIBUTES/VARIABLE_VALUE": ("net.dense.kernel", "weights"),
        "opt/_iterations/.ATTRIBUTES/VARIABLE_VALUE": ("optimizer.adam.iteration", "optimizer")}
    graph["nodes"][5]["attributes"][0]["full_name"] = "net/dense/kernel"  # names repeat: object paths
    assert name_from_graph(graph) == {
        "net/.ATTRIBUTES/OBJECT_CONFIG_JSON": ("net.OBJECT_CONFIG_JSON", "weights"),
        "save_counter/.ATTRIBUTES/VARIABLE_VALUE": ("checkpoint.save_counter", "checkpoint"),
        "net/dense/.ATTRIBUTES/VARIABLE_VALUE": ("net.dense", "weights"),
        "opt/_iterations/.ATTRIBUTES/VARIABLE_VALUE": ("optimizer.opt._iterations", "optimizer")}
    graph["nodes"][1]["children"].append({"node_id": 99, "local_name": "dangling"})  # ignored, no error
    assert len(name_from_graph(graph)) == 4


def test_tensors_are_views_of_the_mapped_file(fixtures):
    with TfCheckpointSource(os.path.join(fixtures, "dtypes", "all")) as src:
        array = src.read("double")
        assert not array.flags.owndata and not array.flags.writeable
        src.release("double")
        assert array.sum() == src.read("double").sum()


def test_saved_model_and_tf1_names(fixtures):
    with TfCheckpointSource(os.path.join(fixtures, "saved_model")) as src:
        assert sorted(src) == ["bias", "weight"]
        np.testing.assert_array_equal(src.read("weight"), np.arange(6, dtype=np.float32).reshape(2, 3))
    with TfCheckpointSource(os.path.join(fixtures, "sliced", "model")) as src:  # no object graph: keys, / as .
        assert sorted(src) == ["cols", "layer.part", "plain"]
        assert src.keys_of["layer.part"] == "layer/part"


def test_partitioned_variables_are_reassembled(fixtures):
    prefix = os.path.join(fixtures, "sliced", "model")
    with TfCheckpointSource(prefix) as src:
        for name, key in (("layer.part", "layer/part"), ("cols", "cols")):
            want = oracle(prefix)[key]
            assert src.read(name).tobytes().hex() == want["hex"]
            assert list(src[name].shape) == want["shape"]


def test_slice_keys_are_tensorflows():
    keys = set()
    for name in ("sliced/model", "dtypes/slices"):
        with open(os.path.join(COMMITTED, name + ".index"), "rb") as f:
            keys |= {key for key, _ in tf_table.read_table(f.read(), name) if key.startswith(b"\0")}
    assert keys == {slice_key(b"layer/part", (0, 0), (3, 3)), slice_key(b"layer/part", (3, 0), (2, 3)),
                    slice_key(b"layer/part", (5, 0), (2, 3)), slice_key(b"cols", (0, 0), (2, 3)),
                    slice_key(b"cols", (0, 3), (2, 2)), slice_key(b"wide", (0, 0), (-1, 150)),
                    slice_key(b"wide", (0, 150), (-1, 150)), slice_key(b"big", (100, 0), (2, -1))}


def test_shards(fixtures, tmp_path):
    with TfCheckpointSource(os.path.join(fixtures, "sharded", "ckpt")) as src:
        assert src.files() == [os.path.join(fixtures, "sharded", name) for name in (
            "ckpt.index", "ckpt.data-00000-of-00003", "ckpt.data-00001-of-00003", "ckpt.data-00002-of-00003")]
        np.testing.assert_array_equal(src.read("model.b"), np.arange(30) / 7)  # two slices in two shards
    directory = copy_of(fixtures, tmp_path, "sharded")
    os.remove(os.path.join(directory, "ckpt.data-00002-of-00003"))
    with pytest.raises(errors.SourceError, match="ckpt.data-00002-of-00003 it is stored in is missing"):
        TfCheckpointSource(os.path.join(directory, "ckpt"))


def test_partial_slices_are_described_not_guessed():
    with TfCheckpointSource(os.path.join(COMMITTED, "dtypes", "slices")) as src:
        assert list(src) == ["wide"]
        np.testing.assert_array_equal(src.read("wide"), np.arange(600, dtype=np.int16).reshape(2, 300))
        assert src.tree["values"]["big"]["slices"] == [[[100, 0], [2, 3]]]
        assert any("do not cover" in note for note in src.notes)


def test_every_dtype(fixtures):
    with TfCheckpointSource(os.path.join(fixtures, "dtypes", "all")) as src:
        assert {src[n].dtype for n in src} >= {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32",
                                              "U16", "U8", "BOOL", "C64"}
        assert src.read("bfloat16").dtype == DTYPES["BF16"].numpy
        assert src.tree["values"]["text"] == [["hello", "wörld", ""], ["a", "b", "c" * 200]]
        assert src.tree["values"]["bytes"][0]["__bytes__"] == 12 and src.tree["values"]["bytes"][1] == "ok"
        assert src.read("empty").shape == (0, 4)


# --- the paths a user gives --------------------------------------------------------------------

def test_paths(fixtures):
    keras = os.path.join(fixtures, "keras", "ckpt-1")
    for path in (keras, keras + ".index", keras + ".data-00000-of-00001"):
        assert tf_checkpoint_prefix(path) == keras
    assert tf_checkpoint_prefix(os.path.join(fixtures, "manager")) == os.path.join(fixtures, "manager", "ckpt-2")
    assert tf_checkpoint_prefix(os.path.join(fixtures, "saved_model")) == \
        os.path.join(fixtures, "saved_model", "variables", "variables")
    with TfCheckpointSource(os.path.join(fixtures, "manager")) as src:
        assert src.files() == [os.path.join(fixtures, "manager", "ckpt-2.index"),
                               os.path.join(fixtures, "manager", "ckpt-2.data-00000-of-00001")]


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.index").write_bytes(b"\0" * 100)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}      ")
    for path in (tmp_path / "x.index", tmp_path / "x", tmp_path / "model.safetensors", tmp_path, tmp_path / "nope"):
        assert tf_checkpoint_prefix(path) is None
    with pytest.raises(errors.SourceError, match="not a TensorFlow checkpoint index"):
        TfCheckpointSource(tmp_path / "x")


def test_state_file(tmp_path):
    shutil.copy(os.path.join(COMMITTED, "keras", "ckpt-1.index"), tmp_path / "ckpt-1.index")
    state = tmp_path / "checkpoint"
    state.write_text('model_checkpoint_path: "/elsewhere/old/ckpt-1"\nall_model_checkpoint_timestamps: 1.5e9\n')
    assert latest_from_state(str(tmp_path)) == os.path.join(str(tmp_path), "ckpt-1")  # moved: its name, here
    state.write_text('model_checkpoint_path: "../../etc/ckpt-9"\n')
    with pytest.raises(errors.SourceError, match="outside the directory"):
        latest_from_state(str(tmp_path))
    state.write_text("model_checkpoint_path ckpt-1\n")
    with pytest.raises(errors.SourceError, match="line 1"):
        latest_from_state(str(tmp_path))
    state.write_text('model_checkpoint_path: "ck\\160t-1"\n')  # an octal escape: "p"
    assert latest_from_state(str(tmp_path)) == os.path.join(str(tmp_path), "ckpt-1")
    state.write_text("")
    with pytest.raises(errors.SourceError, match="names no model_checkpoint_path"):
        latest_from_state(str(tmp_path))


# --- damaged files ---------------------------------------------------------------------------------

def stored_entry(prefix: str, key: bytes) -> dict:
    """The index entry of `key`, as the wire reader decodes it."""
    with open(prefix + ".index", "rb") as f:
        value = dict(tf_table.read_table(f.read(), prefix))[key]
    return pw.decode_message(value, ENTRY_SCHEMA, pw.WireContext(prefix, "entry"))


def flip_data_byte(prefix: str, at: int) -> None:
    path = prefix + ".data-00000-of-00001"
    data = bytearray(Path(path).read_bytes())
    data[at] ^= 0x10
    Path(path).write_bytes(bytes(data))


def test_damaged_tensor_names_the_tensor(tmp_path):
    prefix = os.path.join(copy_of(COMMITTED, tmp_path, "dtypes"), "all")
    flip_data_byte(prefix, stored_entry(prefix, b"float")["offset"] + 5)
    with TfCheckpointSource(prefix) as src:
        src.read("double")
        with pytest.raises(errors.SourceError, match="tensor 'float': CRC32C mismatch, the data file is damaged"):
            src.read("float")


def test_damaged_string_tensor(tmp_path):
    prefix = os.path.join(copy_of(COMMITTED, tmp_path, "keras"), "ckpt-1")
    graph = stored_entry(prefix, b"_CHECKPOINTABLE_OBJECT_GRAPH")
    flip_data_byte(prefix, graph["offset"] + graph["size"] - 3)
    with pytest.raises(errors.SourceError, match="_CHECKPOINTABLE_OBJECT_GRAPH.*CRC32C mismatch"):
        TfCheckpointSource(prefix)


def test_truncated_and_missing_files(tmp_path):
    directory = copy_of(COMMITTED, tmp_path, "keras")
    prefix = os.path.join(directory, "ckpt-1")
    data_path, index_path = prefix + ".data-00000-of-00001", prefix + ".index"
    original = Path(data_path).read_bytes()
    Path(data_path).write_bytes(original[:-100])
    with pytest.raises(errors.SourceError, match="run past the end of ckpt-1.data-00000-of-00001"):
        TfCheckpointSource(prefix)
    os.remove(data_path)
    with pytest.raises(errors.SourceError, match="the data file ckpt-1.data-00000-of-00001 it is stored in is missing"):
        TfCheckpointSource(prefix)
    Path(data_path).write_bytes(original)
    index = Path(index_path).read_bytes()
    for cut in (1, 8, 47, 48, 100, len(index) - 1):
        Path(index_path).write_bytes(index[:cut])
        with pytest.raises(errors.SourceError):
            TfCheckpointSource(index_path)
        assert tf_checkpoint_prefix(index_path) is None


# --- hand-made tables: every check of the index ------------------------------------------------------

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def block(entries: list[tuple[bytes, bytes]], *, shared: bool = True, restarts: Optional[list[int]] = None) -> bytes:
    out, previous, starts = bytearray(), b"", []
    for key, value in entries:
        common = 0
        if shared and starts:
            while common < min(len(key), len(previous)) and key[common] == previous[common]:
                common += 1
        if common == 0:
            starts.append(len(out))
        out += varint(common) + varint(len(key) - common) + varint(len(value)) + key[common:] + value
        previous = key
    restarts = starts if restarts is None else restarts
    restarts = restarts or [0]
    return bytes(out) + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


def with_trailer(contents: bytes, kind: int = 0) -> bytes:
    return contents + bytes([kind]) + struct.pack("<I", tf_table.masked_crc32c(contents + bytes([kind])))


def table(entries: list[tuple[bytes, bytes]], *, data_block: Optional[bytes] = None, kind: int = 0) -> bytes:
    data = with_trailer(data_block if data_block is not None else block(entries), kind)
    meta = with_trailer(block([]))
    index = with_trailer(block([(b"\xff", varint(0) + varint(len(data) - 5))]))
    handles = varint(len(data)) + varint(len(meta) - 5) + varint(len(data) + len(meta)) + varint(len(index) - 5)
    return data + meta + index + handles.ljust(40, b"\0") + struct.pack("<Q", tf_table.MAGIC)


def proto(*fields: tuple[int, int, object]) -> bytes:
    out = bytearray()
    for number, wire, value in fields:
        out += varint(number << 3 | wire)
        if wire == 0:
            out += varint(value & ((1 << 64) - 1))
        elif wire == 2:
            out += varint(len(value)) + value
        elif wire == 5:
            out += struct.pack("<I", value)
    return bytes(out)


HEADER = proto((1, 0, 1))


def entry(dtype=1, dims=(2,), shard=0, offset=0, size=8, crc=0) -> bytes:
    shape = b"".join(proto((2, 2, proto((1, 0, d)))) for d in dims)
    return proto((1, 0, dtype), (2, 2, shape), (3, 0, shard), (4, 0, offset), (5, 0, size), (6, 5, crc))


def write_bundle(tmp_path, entries, data=b"\0" * 8, **kwargs) -> str:
    prefix = str(tmp_path / "b")
    Path(prefix + ".index").write_bytes(table([(b"", HEADER)] + entries, **kwargs))
    Path(prefix + ".data-00000-of-00001").write_bytes(data)
    return prefix


def test_handmade_bundle_reads(tmp_path):
    data = np.float32([1.5, -2]).tobytes()
    prefix = write_bundle(tmp_path, [(b"w", entry(crc=tf_table.masked_crc32c(data)))], data)
    with TfCheckpointSource(prefix) as src:
        np.testing.assert_array_equal(src.read("w"), [1.5, -2])


@pytest.mark.parametrize("value, message", [
    (entry(dtype=99), "unknown TensorFlow DataType 99"),
    (entry(dims=(-1,)), "is not a known shape"),
    (entry(dims=(1 << 40, 1 << 40)), "needs 4835703278458516698824704 bytes but the entry holds 8"),
    (entry(dims=(1 << 63,)), "is not a known shape"),
    (entry(dims=(1 << 30, 1 << 30), size=1 << 62), "run past the end"),
    (entry(shard=3), "shard 3 is outside the bundle's 1 shards"),
    (entry(offset=4), "run past the end"),
    (entry(offset=-4), "negative offset"),
    (entry(size=12), "needs 8 bytes but the entry holds 12"),
    (entry() + b"\x0b", "wire type 3"),
    (entry() + b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", "does not fit in 64 bits"),
    (entry() + b"\x12\x10", "16 bytes are declared but 0 remain"),
])
def test_bad_entries(tmp_path, value, message):
    prefix = write_bundle(tmp_path, [(b"w", value)])
    with pytest.raises(errors.SourceError, match=message):
        TfCheckpointSource(prefix)


def test_bad_tables(tmp_path):
    good = [(b"", HEADER), (b"abc", entry()), (b"abd", entry())]
    cases = {
        "Snappy-compressed": table(good, kind=1),
        "compression type 7": table(good, kind=7),
        "shares 9 bytes": table(good, data_block=b"\x09\x01\x00x" + struct.pack("<II", 0, 1)),
        "restart points": table(good, data_block=block(good, restarts=[0, 4000])),
        "declares 1000 restart": table(good, data_block=block(good)[:-4] + struct.pack("<I", 1000)),
        "runs past the entries' end": table(good, data_block=b"\x00\x01\x30x" + struct.pack("<II", 0, 1)),
        "not after the previous key": table([(b"", HEADER), (b"b", entry()), (b"a", entry())]),
        "no bundle header": table([(b"a", entry())]),
    }
    for message, raw in cases.items():
        Path(tmp_path / "b.index").write_bytes(raw)
        Path(tmp_path / "b.data-00000-of-00001").write_bytes(b"\0" * 8)
        with pytest.raises(errors.SourceError, match=message):
            TfCheckpointSource(str(tmp_path / "b"))
    raw = bytearray(table(good))
    raw[3] ^= 0x40  # inside the data block: its CRC no longer matches
    Path(tmp_path / "b.index").write_bytes(bytes(raw))
    with pytest.raises(errors.SourceError, match="CRC32C mismatch.*the index file is damaged"):
        TfCheckpointSource(str(tmp_path / "b"))
    footer = bytearray(table(good))
    footer[-48:-40] = varint(1 << 40) + varint(10) + b"\0\0"  # the metaindex handle is not used; the index's:
    footer[-48:-8] = (varint(0) + varint(0) + varint(1 << 40) + varint(100)).ljust(40, b"\0")
    Path(tmp_path / "b.index").write_bytes(bytes(footer))
    with pytest.raises(errors.SourceError, match="lies outside the table"):
        TfCheckpointSource(str(tmp_path / "b"))


def test_entries_may_not_share_bytes(tmp_path):
    # a partitioned tensor of 1000 slices that all point at the same 8 bytes: refused, not allocated
    dims = proto((2, 2, proto((1, 0, 2000))))
    whole = proto((1, 0, 1), (2, 2, dims), *[(7, 2, proto((1, 2, proto((1, 0, 2 * i), (2, 0, 2)))))
                                            for i in range(1000)])
    slices = [(slice_key(b"w", (2 * i,), (2,)), entry()) for i in range(1000)]
    prefix = write_bundle(tmp_path, sorted(slices) + [(b"w", whole)])
    with pytest.raises(errors.SourceError, match="claim more bytes of b.data-00000-of-00001 than its 8"):
        TfCheckpointSource(prefix)


def test_header_checks(tmp_path):
    for header, message in ((proto((1, 0, 0)), "declares 0 data shards"),
                            (proto((1, 0, 1), (3, 2, proto((2, 0, 5)))), "newer TensorFlow"),
                            (proto((1, 0, 1), (2, 0, 7)), "endianness 7")):
        Path(tmp_path / "b.index").write_bytes(table([(b"", header)]))
        with pytest.raises(errors.SourceError, match=message):
            TfCheckpointSource(str(tmp_path / "b"))


def test_big_endian_bundle(tmp_path):
    data = np.float32([1.5, -2]).astype(">f4").tobytes()
    prefix = str(tmp_path / "b")
    Path(prefix + ".index").write_bytes(table([(b"", proto((1, 0, 1), (2, 0, 1))),
                                               (b"w", entry(crc=tf_table.masked_crc32c(data)))]))
    Path(prefix + ".data-00000-of-00001").write_bytes(data)
    with TfCheckpointSource(prefix) as src:
        array = src.read("w")
        assert array.dtype == np.dtype("<f4")
        np.testing.assert_array_equal(array, [1.5, -2])


def test_fuzzed_indexes_raise_only_safeckpt_errors(tmp_path):
    directory = copy_of(COMMITTED, tmp_path, "sliced")
    index_path = os.path.join(directory, "model.index")
    original = Path(index_path).read_bytes()
    rng = random.Random(1234)
    for _ in range(400):
        raw = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            how = rng.random()
            at = rng.randrange(len(raw))
            if how < 0.6:
                raw[at] = rng.randrange(256)
            elif how < 0.8:
                del raw[at:at + rng.randint(1, 8)]
            else:
                raw[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        # re-seal the blocks' CRCs half the time, so that the parsing behind them is reached
        if rng.random() < 0.5:
            raw = reseal(bytes(raw))
        Path(index_path).write_bytes(bytes(raw))
        try:
            with TfCheckpointSource(index_path) as src:
                for name in src:
                    src.read(name)
        except errors.SafeckptError:
            pass


def reseal(raw: bytes) -> bytearray:
    """The table with every block's CRC made right again (where its handles still parse)."""
    out = bytearray(raw)
    try:
        _, index = tf_table.read_footer(raw, "x")
        handles = [index]
        contents = raw[index.offset:index.offset + index.size]
        for _, value in tf_table.block_entries(memoryview(contents), "x", "x"):
            handles.append(tf_table.decode_handle(value, "x", "x"))
    except (errors.SafeckptError, IndexError, ValueError):
        return out
    for h in handles:
        end = h.offset + h.size
        if end + 5 <= len(out):
            out[end + 1:end + 5] = struct.pack("<I", tf_table.masked_crc32c(bytes(out[h.offset:end + 1])))
    return out


# --- the wire format and the CRC -----------------------------------------------------------------------

def test_protobuf_wire():
    ctx = pw.WireContext("f", "m")
    assert [(n, w) for n, w, _ in pw.iter_fields(b"\x08\x96\x01\x12\x02hi\x1d\0\0\x80\x3f")] == \
        [(1, 0), (2, 2), (3, 5)]
    schema = {1: pw.Field("xs", "int64", True), 2: pw.Field("fs", "float", True), 3: pw.Field("s", "sint64"),
              4: pw.Field("name", "string"), 5: pw.Field("b", "bool")}
    packed = proto((1, 2, varint(1) + varint((1 << 64) - 1)), (2, 2, struct.pack("<2f", 1.5, -2)),
                   (3, 0, 3), (4, 2, "é".encode()), (1, 0, 7), (5, 0, 1))
    assert pw.decode_message(packed, schema, ctx) == {"xs": [1, -1, 7], "fs": [1.5, -2.0], "s": -2, "name": "é",
                                                     "b": True}
    np.testing.assert_array_equal(pw.packed_fixed(struct.pack("<2f", 1, 2), "float", ctx), [1, 2])
    for bad, message in ((b"\x0b", "wire type 3"), (b"\x0e", "wire type 6"), (b"\x00", "field number 0"),
                         (b"\x08" + b"\xff" * 10 + b"\x01", "does not fit in 64 bits"), (b"\x08\x80", "runs past"),
                         (b"\x09\0\0", "runs past the end"), (proto((4, 2, b"\xff")), "not UTF-8"),
                         (proto((4, 0, 1)), "wire type 0")):
        with pytest.raises(errors.SourceError, match=message):
            pw.decode_message(bad, schema, ctx)
    deep = b""
    for _ in range(pw.MAX_DEPTH + 2):
        deep = proto((1, 2, deep))
    nested = {}
    nested[1] = pw.Field("x", "message", schema=nested)
    with pytest.raises(errors.SourceError, match="nested more than"):
        pw.decode_message(deep, nested, ctx)


def test_crc32c_fallback_agrees():
    data = bytes(range(256)) * 5
    assert tf_table._crc32c_python(0, b"123456789") == 0xE3069283
    assert tf_table._crc32c_python(0, data) == tf_table.crc32c(data) == tf_table.crc32c(memoryview(data))
    assert tf_table.crc32c(data[100:], tf_table.crc32c(data[:100])) == tf_table.crc32c(data)


# --- through the rest of safeckpt: found by content, inspected, scanned, converted ------------

def test_open_source_inspect_scan_and_convert_read_tensorflow_checkpoints(tmp_path):
    import safeckpt
    from safeckpt.ops.inspect import describe

    manager = os.path.join(COMMITTED, "manager")
    for named in (manager, os.path.join(manager, "ckpt-2"), os.path.join(manager, "ckpt-2.index"),
                  os.path.join(manager, "ckpt-2.data-00000-of-00001")):
        with safeckpt.open_source(named) as source:
            assert isinstance(source, TfCheckpointSource) and source.path.endswith("ckpt-2"), named
            expected = {name: np.array(source.read(name)) for name in source.keys()}
    report = describe(manager)
    assert report["scan"]["verdict"] == "safe" and report["file_size"] == sum(
        os.path.getsize(os.path.join(manager, name)) for name in ("ckpt-2.index", "ckpt-2.data-00000-of-00001"))
    assert safeckpt.scan(manager).verdict == "safe"
    out = tmp_path / "out.safetensors"
    safeckpt.convert(os.path.join(manager, "ckpt-2"), out)
    from safeckpt.numpy import load_file
    converted = load_file(out)
    assert sorted(converted) == sorted(expected)
    assert all(np.array_equal(converted[name], expected[name]) for name in expected)
    # a SavedModel's variables are data; its graph is a program that loading it runs
    saved_model = os.path.join(COMMITTED, "saved_model")
    with safeckpt.open_source(saved_model) as source:
        assert len(source) > 0
    report = safeckpt.scan(saved_model)
    assert report.verdict == "suspicious" and [f.kind for f in report.findings if f.severity == "suspicious"] == \
        ["saved-model-graph"]
