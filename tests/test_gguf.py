"""GGUF files read as a TensorSource: files written by the real `gguf` package (llama.cpp's
gguf-py) read back equal to its own reader and dequantizer, and hostile files made byte by byte."""

from __future__ import annotations

import json
import math
import random
import struct
import sys
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from safeckpt.errors import SafeckptError, SourceError, TensorNotFoundError
from safeckpt.sources.gguf_file import (FILE_TYPES, GGML_TYPES, MAX_KEY_BYTES, VALUE_TYPES, GgufSource, Limits,
                                        is_gguf)

RNG = np.random.default_rng(0)
WEIGHTS = RNG.standard_normal((8, 256)).astype(np.float32)  # 8 rows of 256: whole blocks of every type


@pytest.fixture(scope="module")
def gguf():
    return pytest.importorskip("gguf")


def write_gguf(gguf, path, *, arch="llama", endianess=None, tensors=(), kvs=(), file_type=None):
    """A file by gguf's GGUFWriter: `tensors` are (name, array, raw ggml type or None); `kvs` are
    (key, value, GGUFValueType, sub type or None)."""
    writer = gguf.GGUFWriter(path, arch, endianess=endianess or gguf.GGUFEndian.LITTLE)
    if file_type is not None:
        writer.add_file_type(file_type)
    for key, value, vtype, sub_type in kvs:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for name, array, raw_dtype in tensors:
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def k_quant_blocks(gguf, qtype, rows: int) -> np.ndarray:
    """Rows of K-quant blocks (gguf-py can decode them, not make them): random bytes with finite
    f16 scales, so that every decoded value is a number."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = RNG.integers(0, 256, (rows, WEIGHTS.shape[1] // block_size, type_size), dtype=np.uint8)
    # where each block keeps its f16 scales (ggml-common.h): d and dmin first for Q4_K, d last for Q6_K
    scales = {gguf.GGMLQuantizationType.Q4_K: slice(0, 4), gguf.GGMLQuantizationType.Q6_K: slice(208, 210)}
    span = scales[qtype]
    count = (span.stop - span.start) // 2
    blocks[..., span] = np.full((*blocks.shape[:-1], count), 0.01, np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.fixture(scope="module")
def model(gguf, tmp_path_factory):
    """A small model: every plain ggml type, Q4_0 and Q8_0 (quantized by gguf), Q4_K and Q6_K blocks."""
    Q = gguf.GGMLQuantizationType
    tensors = [
        ("token_embd.weight", WEIGHTS, None),
        ("blk.0.attn_norm.weight", WEIGHTS[0, :16].astype(np.float16), None),
        ("blk.0.bf16", gguf.quants.quantize(WEIGHTS[:2], Q.BF16), Q.BF16),
        ("blk.0.f64", WEIGHTS[:3, :5].astype(np.float64), None),
        ("blk.0.i8", np.arange(-4, 4, dtype=np.int8).reshape(2, 2, 2), None),
        ("blk.0.i16", np.arange(6, dtype=np.int16).reshape(2, 3), None),
        ("blk.0.i32", np.arange(2 * 3 * 4 * 5, dtype=np.int32).reshape(2, 3, 4, 5), None),
        ("blk.0.i64", np.arange(3, dtype=np.int64), None),
        ("blk.0.attn_q.weight", gguf.quants.quantize(WEIGHTS, Q.Q4_0), Q.Q4_0),
        ("blk.0.attn_k.weight", gguf.quants.quantize(WEIGHTS[:4], Q.Q8_0), Q.Q8_0),
        ("blk.0.ffn_up.weight", k_quant_blocks(gguf, Q.Q4_K, 8), Q.Q4_K),
        ("blk.0.ffn_down.weight", k_quant_blocks(gguf, Q.Q6_K, 2), Q.Q6_K),
    ]
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    return write_gguf(gguf, path, tensors=tensors, file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M)


def every_value_type(gguf) -> list:
    T = gguf.GGUFValueType
    return [
        ("t.uint8", 200, T.UINT8, None), ("t.int8", -100, T.INT8, None),
        ("t.uint16", 60000, T.UINT16, None), ("t.int16", -30000, T.INT16, None),
        ("t.uint32", 4_000_000_000, T.UINT32, None), ("t.int32", -2_000_000_000, T.INT32, None),
        ("t.float32", 0.1, T.FLOAT32, None), ("t.bool", True, T.BOOL, None), ("t.false", False, T.BOOL, None),
        ("t.string", "naïve 🦙 text", T.STRING, None), ("t.empty_string", "", T.STRING, None),
        ("t.uint64", 2**64 - 1, T.UINT64, None), ("t.int64", -2**63, T.INT64, None),
        ("t.float64", 1e300, T.FLOAT64, None),
        ("t.tokens", ["<s>", "</s>", "▁the", "\n", ""], T.ARRAY, None),
        ("t.scores", [0.0, -1.5, 2.25], T.ARRAY, None),
        ("t.types", [1, 2, 3], T.ARRAY, T.INT32),
        ("t.u64s", [0, 2**64 - 1], T.ARRAY, T.UINT64),
        ("t.u8s", [0, 255], T.ARRAY, T.UINT8),
        ("t.bools", [True, False, True], T.ARRAY, T.BOOL),
        ("t.f64s", [0.5, -0.25], T.ARRAY, T.FLOAT64),
        ("t.nested", [[1, 2], [3], [4, 5, 6]], T.ARRAY, None),
        ("t.nested_strings", [["a", "b"], ["c"]], T.ARRAY, None),
        ("t.deeper", [[[1], [2, 3]], [[4]]], T.ARRAY, None),
        ("t.nan", float("nan"), T.FLOAT32, None),
    ]


# --- the tables against gguf's own ------------------------------------------------------

def test_ggml_types_match_gguf(gguf):
    theirs = {int(t): (t.name, sizes) for t, sizes in gguf.GGML_QUANT_SIZES.items()}
    assert set(theirs) <= set(GGML_TYPES), "gguf knows a ggml type we do not"
    for type_id, (name, sizes) in theirs.items():
        ours = GGML_TYPES[type_id]
        assert (ours.name, (ours.block_size, ours.type_size)) == (name, sizes)


def test_file_types_and_value_types_match_gguf(gguf):
    names = {int(t): t.name.replace("MOSTLY_", "").replace("ALL_", "") for t in gguf.LlamaFileType
             if t != gguf.LlamaFileType.GUESSED}
    assert {k: FILE_TYPES[k] for k in names} == names  # older gguf versions name fewer
    assert {k: v.name for k, v in VALUE_TYPES.items()} == {int(t): t.name.lower() for t in gguf.GGUFValueType}


# --- reading what gguf writes ---------------------------------------------------------------

def test_tensors_equal_ggufs_own_reader(gguf, model):
    reader = gguf.GGUFReader(model)
    with GgufSource(model) as src:
        assert src.keys() == [t.name for t in reader.tensors]
        for t in reader.tensors:
            got = src.read_checked(t.name)
            assert not got.flags.writeable
            assert got.shape == tuple(int(d) for d in reversed(t.shape.tolist())) or src.quantization(t.name)
            np.testing.assert_array_equal(got.view(np.uint8), np.asarray(t.data).view(np.uint8))
            assert src[t.name].nbytes == t.n_bytes


def test_plain_tensors_are_their_safetensors_dtypes(model):
    with GgufSource(model) as src:
        assert src["token_embd.weight"] == ("F32", (8, 256), 8 * 256 * 4)
        np.testing.assert_array_equal(src.read("token_embd.weight"), WEIGHTS)
        np.testing.assert_array_equal(src.read("blk.0.attn_norm.weight"), WEIGHTS[0, :16].astype(np.float16))
        bf16 = src.read("blk.0.bf16")
        assert bf16.dtype == ml_dtypes.bfloat16 and bf16.shape == (2, 256)
        np.testing.assert_allclose(bf16.astype(np.float32), WEIGHTS[:2], rtol=1e-2)
        assert src["blk.0.f64"].dtype == "F64"
        assert src.read("blk.0.i32").shape == (2, 3, 4, 5)  # ggml's dims reversed: numpy order
        np.testing.assert_array_equal(src.read("blk.0.i8"), np.arange(-4, 4, dtype=np.int8).reshape(2, 2, 2))
        assert src.quantization("token_embd.weight") is None


def test_quantized_tensors_are_raw_blocks_with_their_description(gguf, model):
    with GgufSource(model) as src:
        assert src["blk.0.attn_q.weight"] == ("U8", (8, 144), 8 * 8 * 18)
        assert src.quantization("blk.0.attn_q.weight") == {"ggml_type": "Q4_0", "shape": [8, 256],
                                                           "bits_per_weight": 4.5}
        assert src.quantization("blk.0.attn_k.weight")["bits_per_weight"] == 8.5
        assert src.quantization("blk.0.ffn_down.weight") == {"ggml_type": "Q6_K", "shape": [2, 256],
                                                             "bits_per_weight": 6.5625}
        assert src.tree["quantized"]["blk.0.ffn_up.weight"]["ggml_type"] == "Q4_K"
        np.testing.assert_array_equal(src.read("blk.0.attn_q.weight"),
                                      gguf.quants.quantize(WEIGHTS, gguf.GGMLQuantizationType.Q4_0))
        assert any("quantized tensors (4, Q4_0, Q4_K, Q6_K, Q8_0)" in n and "dequantize=True" in n
                   for n in src.notes)
        assert src.file_span("blk.0.attn_q.weight").nbytes == 8 * 8 * 18


def test_dequantize_equals_ggufs_dequantize(gguf, model):
    Q = gguf.GGMLQuantizationType
    with GgufSource(model) as raw, GgufSource(model, dequantize=True) as src:
        for name, qtype in [("blk.0.attn_q.weight", Q.Q4_0), ("blk.0.attn_k.weight", Q.Q8_0),
                            ("blk.0.ffn_up.weight", Q.Q4_K), ("blk.0.ffn_down.weight", Q.Q6_K)]:
            values = src.read_checked(name)
            assert values.dtype == np.float32 and src[name].dtype == "F32"
            assert values.shape == tuple(src.quantization(name)["shape"])
            np.testing.assert_array_equal(values, gguf.quants.dequantize(raw.read(name), qtype))
            assert np.isfinite(values).all()
            assert src.file_span(name) is None  # the values are not the file's bytes
        np.testing.assert_allclose(src.read("blk.0.attn_k.weight"), WEIGHTS[:4], atol=0.05)
        assert src["blk.0.bf16"].dtype == "BF16"  # plain types stay as they are
        assert not any("raw blocks" in n for n in src.notes)


def test_dequantize_without_gguf_says_what_to_install(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now fails
    with pytest.raises(SourceError, match=r"safeckpt\[gguf\]"):
        GgufSource(model, dequantize=True)
    with GgufSource(model) as src:  # raw blocks need no gguf
        assert src.read("blk.0.attn_q.weight").dtype == np.uint8


def test_f32_reads_are_zero_copy_views_of_the_mapped_file(model):
    with GgufSource(model) as src:
        first, second = src.read("token_embd.weight"), src.read("token_embd.weight")
        assert np.shares_memory(first, second)
        assert not first.flags.owndata
        span = src.file_span("token_embd.weight")
        with open(model, "rb") as f:
            f.seek(span.offset)
            assert f.read(span.nbytes) == first.tobytes()


def test_metadata_of_every_type_equals_ggufs_reader(gguf, tmp_path):
    kvs = every_value_type(gguf)
    path = write_gguf(gguf, tmp_path / "kv.gguf", kvs=kvs, tensors=[("w", WEIGHTS[:1, :4], None)])
    reader = gguf.GGUFReader(path)
    with GgufSource(path) as src:
        meta = src.tree["metadata"]
        json.dumps(src.tree, allow_nan=False)  # JSON-able as it stands
        assert list(meta) == [k for k in reader.fields if not k.startswith("GGUF.")]
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or len(field.types) > 2 or key == "t.nan":
                continue  # gguf's contents() does not read nested arrays
            expected = field.contents()
            if isinstance(expected, list):
                assert meta[key] == [x.item() if hasattr(x, "item") else x for x in expected], key
            else:
                assert meta[key] == (expected.item() if hasattr(expected, "item") else expected), key
        assert meta["t.nested"] == [[1, 2], [3], [4, 5, 6]]
        assert meta["t.nested_strings"] == [["a", "b"], ["c"]]
        assert meta["t.deeper"] == [[[1], [2, 3]], [[4]]]
        assert meta["t.float32"] == float(np.float32(0.1))
        assert meta["t.nan"] == {"__float__": "nan"}
        assert meta["t.bools"] == [True, False, True] and meta["t.false"] is False
        assert src.metadata["general.architecture"] == "llama"
        assert src.metadata["t.bool"] == "true" and src.metadata["t.uint64"] == str(2**64 - 1)
        assert "t.tokens" not in src.metadata  # arrays stay in the tree
        assert src.tree["gguf"] == {"version": 3, "byteorder": "little", "alignment": 32, "tensor_count": 1,
                                    "kv_count": len(kvs) + 1}


def test_describe(gguf, model, tmp_path):
    with GgufSource(model) as src:
        assert src.describe() == "GGUF v3 file (llama), 12 tensors, Q4_K_M"
        assert src.format == "gguf"
    Q = gguf.GGMLQuantizationType
    path = write_gguf(gguf, tmp_path / "q8.gguf", arch="qwen2",
                      tensors=[("a", gguf.quants.quantize(WEIGHTS, Q.Q8_0), Q.Q8_0), ("b", WEIGHTS[0], None)])
    with GgufSource(path) as src:
        assert src.describe() == "GGUF v3 file (qwen2), 2 tensors, mostly Q8_0"


def test_big_endian_files_are_read(gguf, tmp_path):
    Q = gguf.GGMLQuantizationType
    path = write_gguf(gguf, tmp_path / "be.gguf", endianess=gguf.GGUFEndian.BIG, kvs=every_value_type(gguf)[:14],
                      tensors=[("w", WEIGHTS[:2], None), ("h", WEIGHTS[:2].astype(np.float16), None),
                               ("q", gguf.quants.quantize(WEIGHTS[:2], Q.Q8_0), Q.Q8_0)])
    head = path.read_bytes()[:8]
    assert head[4:8] == b"\x00\x00\x00\x03" and is_gguf(head)
    with GgufSource(path) as src:
        assert src.describe().endswith("big-endian")
        np.testing.assert_array_equal(src.read_checked("w"), WEIGHTS[:2])
        np.testing.assert_array_equal(src.read_checked("h"), WEIGHTS[:2].astype(np.float16))
        assert src.file_span("w") is None  # swapped copies, not the file's bytes
        assert src.tree["metadata"]["t.uint32"] == 4_000_000_000 and src.tree["metadata"]["t.int64"] == -2**63
    with GgufSource(path, dequantize=True) as src:
        assert src["q"].dtype == "U8"
        assert any("big-endian" in n for n in src.notes)


def test_version_2_custom_alignment_and_empty_files(gguf, tmp_path):
    data = bytearray(write_gguf(gguf, tmp_path / "v3.gguf", tensors=[("w", WEIGHTS[:1, :3], None)]).read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 and v3 lay out the same bytes
    (tmp_path / "v2.gguf").write_bytes(bytes(data))
    with GgufSource(tmp_path / "v2.gguf") as src:
        assert src.describe().startswith("GGUF v2 file")
        np.testing.assert_array_equal(src.read("w"), WEIGHTS[:1, :3])

    writer = gguf.GGUFWriter(tmp_path / "a64.gguf", "llama")
    writer.add_custom_alignment(64)
    writer.add_tensor("a", WEIGHTS[0, :3])
    writer.add_tensor("b", WEIGHTS[1])
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with GgufSource(tmp_path / "a64.gguf") as src:
        assert src.alignment == 64 and src.file_span("b").offset % 64 == 0
        np.testing.assert_array_equal(src.read("b"), WEIGHTS[1])

    with GgufSource(write_gguf(gguf, tmp_path / "vocab.gguf", kvs=every_value_type(gguf)[14:15])) as src:
        assert len(src) == 0 and src.describe() == "GGUF v3 file (llama), 0 tensors"


def test_is_gguf():
    assert is_gguf(b"GGUF" + struct.pack("<I", 3) + bytes(16))
    assert is_gguf(b"GGUF" + struct.pack(">I", 2))
    assert is_gguf(b"GGUF" + struct.pack("<I", 1))  # recognised, then refused with a reason
    assert not is_gguf(b"GGUF" + struct.pack("<I", 4))
    assert not is_gguf(b"GGUF\x03")
    assert not is_gguf(b"GGML" + struct.pack("<I", 3))


def test_unknown_names_and_closed_sources(model):
    src = GgufSource(model)
    with pytest.raises(TensorNotFoundError):
        src.read("nope")
    with pytest.raises(TensorNotFoundError):
        src.quantization("nope")
    src.release("token_embd.weight")
    src.close()
    with pytest.raises(SourceError, match="closed"):
        src.read("token_embd.weight")


# --- hostile files, byte by byte ----------------------------------------------------------

def text(value) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("<Q", len(raw)) + raw


def kv(key, type_id: int, payload: bytes) -> bytes:
    return text(key) + struct.pack("<I", type_id) + payload


def info(name, dims, type_id: int = 0, offset: int = 0) -> bytes:
    return text(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + \
        struct.pack("<IQ", type_id, offset)


def gguf_file(kvs=(), infos=(), data=b"", *, version=3, tensor_count=None, kv_count=None, alignment=32) -> bytes:
    """GGUF bytes as laid out by hand: header, KVs, tensor infos, padding, data."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if tensor_count is None else tensor_count,
                                 len(kvs) if kv_count is None else kv_count)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + bytes(-len(body) % alignment) + data


F32x8 = np.arange(8, dtype=np.float32).tobytes()  # 32 bytes: one aligned tensor of 8 values

HOSTILE = {
    "not GGUF": (b"GGML" + bytes(20), "not a GGUF file"),
    "short header": (b"GGUF\x03\x00\x00\x00", "shorter than GGUF's 24-byte header"),
    "version 1": (gguf_file(version=1), "version 1"),
    "version 7": (gguf_file(version=7), "version 7"),
    "2**60 KVs": (gguf_file(kv_count=2**60), "more than"),
    "2**60 tensors": (gguf_file(tensor_count=2**60), "more than"),
    "KVs the file cannot hold": (gguf_file(kv_count=1000), "at least 13000 bytes"),
    "huge key length": (gguf_file([struct.pack("<Q", 2**63) + b"k"]), "more than the 65535 a key"),
    "key longer than the file": (gguf_file([struct.pack("<Q", 5000) + b"k" * 20]), "needs 5000 bytes"),
    "bad UTF-8 key": (gguf_file([kv(b"gen\xffx", 4, bytes(4))]), "not UTF-8"),
    "unknown KV type": (gguf_file([kv("a", 13, bytes(4))]), "value type 13"),
    "unknown array item type": (gguf_file([kv("a", 9, struct.pack("<IQ", 77, 1))]), "item type 77"),
    "huge array": (gguf_file([kv("a", 9, struct.pack("<IQ", 4, 2**62))]), "needs at least"),
    "huge string in an array": (gguf_file([kv("a", 9, struct.pack("<IQQ", 8, 1, 2**62))]), "needs"),
    "arrays nested too deep": (gguf_file([kv("a", 9, struct.pack("<IQ", 9, 1) * 40 + struct.pack("<IQ", 4, 0))]),
                               "nested more than"),
    "bool of 2": (gguf_file([kv("a", 7, b"\x02")]), "not 0 or 1"),
    "duplicate key": (gguf_file([kv("a", 0, b"\x01"), kv("a", 0, b"\x02")]), "given twice"),
    "alignment not a power of two": (gguf_file([kv("general.alignment", 4, struct.pack("<I", 48))]),
                                     "power of two"),
    "alignment zero": (gguf_file([kv("general.alignment", 4, struct.pack("<I", 0))]), "power of two"),
    "alignment a string": (gguf_file([kv("general.alignment", 8, text("32"))]), "power of two"),
    "truncated tensor info": (gguf_file(infos=[info("w", [8])[:-3]], alignment=1), "offset: needs 8 bytes"),
    "five dims": (gguf_file(infos=[info("w", [1, 1, 1, 1, 1])], data=F32x8), "at most 4"),
    "dims overflow": (gguf_file(infos=[info("w", [2**32, 2**32])], data=F32x8), "more than a 64-bit size"),
    "dim past int64": (gguf_file(infos=[info("w", [2**63])], data=F32x8), "signed 64-bit"),
    "misaligned offset": (gguf_file(infos=[info("w", [1], offset=4)], data=F32x8), "not a multiple of"),
    "offset past the end": (gguf_file(infos=[info("w", [8], offset=64)], data=F32x8), "past the end"),
    "data past the end": (gguf_file(infos=[info("w", [9])], data=F32x8), "past the end"),
    "unknown ggml type": (gguf_file(infos=[info("w", [8], 99)], data=F32x8), "ggml type 99"),
    "removed ggml type": (gguf_file(infos=[info("w", [32], 36)], data=bytes(32)), "IQ4_NL_4_4"),
    "rows of partial blocks": (gguf_file(infos=[info("w", [16], 2)], data=F32x8), "not whole Q4_0 blocks"),
    "duplicate tensor name": (gguf_file(infos=[info("w", [4]), info("w", [4], offset=32)], data=F32x8 * 2),
                              "two tensor infos"),
    "overlapping tensors": (gguf_file(infos=[info("a", [8]), info("b", [4], offset=0)], data=F32x8),
                            "overlap those of tensor 'a'"),
    "bad UTF-8 tensor name": (gguf_file(infos=[info(b"\xc3(", [8])], data=F32x8), "not UTF-8"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_files_are_refused_with_a_reason(tmp_path, case):
    data, message = HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    with pytest.raises(SourceError, match=message) as caught:
        GgufSource(path)
    assert str(path) in str(caught.value)


def test_a_wellformed_hand_made_file_reads(tmp_path):
    # the builder above makes valid files: the hostile cases fail for their one reason
    data = gguf_file([kv("general.architecture", 8, text("test")), kv("a", 9, struct.pack("<IQ", 9, 1) * 3
                                                                       + struct.pack("<IQ", 4, 1) + bytes(4))],
                     [info("w", [2, 4]), info("e", [0, 3], offset=32)], F32x8)
    path = tmp_path / "hand.gguf"
    path.write_bytes(data)
    with GgufSource(path) as src:
        assert src["w"] == ("F32", (4, 2), 32) and src["e"] == ("F32", (3, 0), 0)
        np.testing.assert_array_equal(src.read("w"), np.arange(8, dtype=np.float32).reshape(4, 2))
        assert src.read("e").shape == (3, 0)
        assert src.tree["metadata"]["a"] == [[[[0]]]]
        assert src.describe() == "GGUF v3 file (test), 2 tensors, mostly F32"


def test_retired_types_are_read_raw_with_a_note(tmp_path):
    path = tmp_path / "arm.gguf"
    path.write_bytes(gguf_file(infos=[info("w", [64, 2], 31)], data=bytes(range(72))))
    with GgufSource(path) as src:
        assert src["w"] == ("U8", (2, 36), 72)
        assert src.quantization("w")["ggml_type"] == "Q4_0_4_4"
        assert any("Q4_0_4_4" in n and "no longer read by llama.cpp" in n for n in src.notes)


def test_layout_llama_cpp_would_refuse_is_noted(tmp_path):
    path = tmp_path / "swapped.gguf"
    path.write_bytes(gguf_file(infos=[info("a", [8], offset=32), info("b", [8], offset=0)], data=F32x8 * 2))
    with GgufSource(path) as src:
        assert any("llama.cpp would refuse" in n for n in src.notes)
        np.testing.assert_array_equal(src.read("b"), np.arange(8, dtype=np.float32))


def test_strings_that_are_not_utf8_are_kept_as_hex(tmp_path):
    path = tmp_path / "bytes.gguf"
    path.write_bytes(gguf_file([kv("tok", 9, struct.pack("<IQ", 8, 2) + text(b"\xe4\xb8") + text("ok"))]))
    with GgufSource(path) as src:
        assert src.tree["metadata"]["tok"] == [{"__bytes__": 2, "hex": "e4b8"}, "ok"]
        assert any("not UTF-8" in n for n in src.notes)


def test_limits_bound_memory_and_say_how_to_lift_them(gguf, tmp_path):
    tokens = [f"t{i}" for i in range(1000)]
    path = write_gguf(gguf, tmp_path / "vocab.gguf", kvs=[("tokenizer.ggml.tokens", tokens, gguf.GGUFValueType.ARRAY,
                                                           None)])
    with pytest.raises(SourceError, match=r"limits=Limits\(max_metadata_values"):
        GgufSource(path, limits=Limits(max_metadata_values=500))
    with pytest.raises(SourceError, match=r"limits=Limits\(max_string_bytes"):
        GgufSource(path, limits=Limits(max_string_bytes=1000))
    with GgufSource(path, limits=Limits(max_metadata_values=2000)) as src:
        assert src.tree["metadata"]["tokenizer.ggml.tokens"] == tokens
    assert MAX_KEY_BYTES == 65535


# --- truncation and fuzzing: a source or a SafeckptError, nothing else ------------------------

def open_and_read_everything(path) -> None:
    for dequantize in (False, True):
        try:
            with GgufSource(path, dequantize=dequantize) as src:
                json.dumps(src.tree)
                src.describe()
                for name in src:
                    src.read_checked(name)
                    src.quantization(name)
        except SafeckptError:
            pass


@pytest.fixture(scope="module")
def small(gguf, tmp_path_factory):
    """A small file that is mostly header: KVs of every type, tiny tensors of several types."""
    Q = gguf.GGMLQuantizationType
    path = tmp_path_factory.mktemp("small") / "small.gguf"
    return write_gguf(gguf, path, kvs=every_value_type(gguf), file_type=7, tensors=[
        ("a", WEIGHTS[0, :3], None), ("b", np.arange(4, dtype=np.int16).reshape(2, 2), None),
        ("q", gguf.quants.quantize(WEIGHTS[:1, :32], Q.Q8_0), Q.Q8_0),
        ("k", k_quant_blocks(gguf, Q.Q6_K, 1)[:, :210], Q.Q6_K)])


def test_every_truncation_is_refused(small, tmp_path):
    data = small.read_bytes()
    with GgufSource(small) as src:
        end = max(span.offset + span.nbytes for span in map(src.file_span, src.keys()))
    path = tmp_path / "cut.gguf"
    for cut in range(1, end):
        path.write_bytes(data[:cut])
        with pytest.raises(SourceError):
            GgufSource(path)


def test_mutated_files_fail_cleanly(small, tmp_path):
    seed = small.read_bytes()
    rng = random.Random(0)
    path = tmp_path / "fuzzed.gguf"
    interesting = [0, 1, 0x7F, 0x80, 0xFF, 9, 8, 31, 32]
    for _ in range(300):
        data = bytearray(seed)
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(data))
            if rng.random() < 0.5:
                data[i] ^= 1 << rng.randrange(8)
            else:
                data[i] = rng.choice(interesting)
        path.write_bytes(bytes(data))
        tracemalloc.start()
        try:
            open_and_read_everything(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 << 20, f"{peak} bytes allocated for a {len(data)}-byte file"


def test_bits_per_weight_of_the_table():
    assert math.isclose(GGML_TYPES[12].bits_per_weight, 4.5) and GGML_TYPES[0].bits_per_weight == 32


# --- through the rest of safeckpt: found by content, scanned, converted ------------------------

def test_open_source_scan_and_convert_find_gguf_by_content(model, tmp_path):
    import shutil

    import safeckpt
    from safeckpt.sources.gguf_file import GgufSource

    renamed = tmp_path / "weights.bin"  # the name says nothing: the magic bytes do
    shutil.copyfile(model, renamed)
    with safeckpt.open_source(renamed) as source:
        assert isinstance(source, GgufSource)
        plain = source.read("token_embd.weight").copy()
    assert safeckpt.scan(renamed).verdict == "safe"
    out = tmp_path / "out.safetensors"
    safeckpt.convert(renamed, out)
    from safeckpt.numpy import load_file
    converted = load_file(out)
    assert np.array_equal(converted["token_embd.weight"], plain)
    assert converted["blk.0.attn_q.weight"].dtype == np.uint8  # quantized blocks kept raw by default
