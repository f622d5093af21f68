"""Raw .bin dumps read against a template: real dumps of a torch model, hostile templates."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from safeckpt.errors import SafeckptError, SourceError, TensorNotFoundError  # noqa: E402
from safeckpt.sources.raw import RawSource, load_template  # noqa: E402

from tests.files import tensor_bytes  # noqa: E402

TORCH_TO_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
               torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}


def model_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["0.weight"] = state["0.weight"].to(torch.bfloat16)
    state["2.bias"] = state["2.bias"].to(torch.float16)
    state["steps"] = torch.tensor(12, dtype=torch.int64)
    state["mask"] = torch.tensor([True, False, True])
    state["empty"] = torch.zeros(0, 3)
    return state


def assert_equal(got: np.ndarray, t) -> None:
    assert not got.flags.writeable
    assert got.shape == tuple(t.shape)
    if t.dtype == torch.bfloat16:
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got.view(np.int16), t.view(torch.int16).numpy())
    else:
        np.testing.assert_array_equal(got, t.numpy())


def test_torch_dump_with_a_json_template(tmp_path):
    state = model_state()
    dump = tmp_path / "model.bin"
    dump.write_bytes(b"".join(tensor_bytes(t) for t in state.values()))
    template = tmp_path / "template.json"
    template.write_text(json.dumps({"tensors": [
        {"name": k, "dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape)} for k, t in state.items()]}))
    with RawSource(dump, template) as src:
        assert src.keys() == list(state)
        assert src.format == "raw" and "template.json" in src.describe()
        for name, t in state.items():
            assert src[name] == (TORCH_TO_ST[t.dtype], tuple(t.shape), t.numel() * t.element_size())
            assert_equal(src.read(name), t)
        assert not src.read("1.weight").flags.owndata  # a view of the mapped file


def test_torch_dump_with_a_safetensors_template(tmp_path):
    state = model_state()
    template = tmp_path / "model.safetensors"
    safetensors_torch.save_file(state, template)
    # the template's order is the order of its data (safetensors sorts by dtype, then name)
    header = json.loads(template.read_bytes()[8:8 + int.from_bytes(template.read_bytes()[:8], "little")])
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    dump = tmp_path / "dump.bin"
    dump.write_bytes(b"".join(tensor_bytes(state[k]) for k in order))
    with RawSource(dump, template) as src:
        assert src.keys() == order
        for name, t in state.items():
            assert_equal(src.read(name), t)


def test_simple_form_keeps_file_order_and_parsed_dicts_work(tmp_path):
    a, b = np.arange(6, dtype=np.int32).reshape(2, 3), np.linspace(0, 1, 4).astype(np.float64)
    dump = tmp_path / "d.bin"
    dump.write_bytes(b.tobytes() + a.tobytes())
    template = {"second_in_name_order": {"dtype": "F64", "shape": [4]}, "a": {"dtype": "I32", "shape": [2, 3]}}
    with RawSource(dump, template) as src:
        assert src.keys() == ["second_in_name_order", "a"]
        np.testing.assert_array_equal(src.read("a"), a)
        np.testing.assert_array_equal(src.read("second_in_name_order"), b)
        with pytest.raises(TensorNotFoundError):
            src.read("b")


def test_big_endian_with_an_offset(tmp_path):
    values = {"f": np.arange(5, dtype=np.float32) - 2.5, "c": np.array([1 + 2j, -3j], np.complex64),
              "h": np.arange(3).astype(ml_dtypes.bfloat16), "u": np.arange(4, dtype=np.uint8)}
    dump = tmp_path / "be.bin"
    def big_endian(v):
        if v.dtype == ml_dtypes.bfloat16:  # ml_dtypes types have no byte order of their own
            return v.view(np.uint16).byteswap()
        return v.astype(v.dtype.newbyteorder(">"))
    dump.write_bytes(b"HEADER" + b"".join(big_endian(v).tobytes() for v in values.values()))
    template = {"offset": 6, "byteorder": "big", "tensors": [
        {"name": "f", "dtype": "F32", "shape": [5]}, {"name": "c", "dtype": "C64", "shape": [2]},
        {"name": "h", "dtype": "BF16", "shape": [3]}, {"name": "u", "dtype": "U8", "shape": [4]}]}
    with RawSource(dump, template) as src:
        for name, v in values.items():
            got = src.read(name)
            assert got.dtype == v.dtype and not got.flags.writeable
            np.testing.assert_array_equal(got, v)


def test_packed_f4_is_unpacked(tmp_path):
    dump = tmp_path / "f4.bin"
    dump.write_bytes(bytes([0x21, 0x43]))  # values 1, 2, 3, 4 as e2m1 codes, low nibble first
    with RawSource(dump, {"q": {"dtype": "F4", "shape": [2, 2]}}) as src:
        assert src["q"].nbytes == 2
        np.testing.assert_array_equal(src.read("q").view(np.uint8), [[1, 2], [3, 4]])


@pytest.mark.parametrize("size, match", [
    (20, "describes 24 bytes .* file has 20: 4 bytes short"),
    (30, "file has 30: 6 bytes more; pass allow_trailing=True"),
])
def test_wrong_total_size(tmp_path, size, match):
    dump = tmp_path / "d.bin"
    dump.write_bytes(b"\0" * size)
    with pytest.raises(SourceError, match=match) as info:
        RawSource(dump, {"w": {"dtype": "F32", "shape": [2, 3]}})
    assert str(dump) in str(info.value)


def test_allow_trailing(tmp_path):
    dump = tmp_path / "d.bin"
    dump.write_bytes(np.ones(6, np.float32).tobytes() + b"\0" * 40)
    with RawSource(dump, {"w": {"dtype": "F32", "shape": [2, 3]}}, allow_trailing=True) as src:
        np.testing.assert_array_equal(src.read("w"), np.ones((2, 3)))
        assert any("40 bytes" in n for n in src.notes)
    with pytest.raises(SourceError, match="short"):
        RawSource(dump, {"w": {"dtype": "F32", "shape": [20]}}, allow_trailing=True)


@pytest.mark.parametrize("template, match", [
    ({"w": {"dtype": "float32", "shape": [2]}}, "unknown dtype 'float32'"),
    ({"w": {"dtype": "f32", "shape": [2]}}, "unknown dtype"),
    ({"w": {"dtype": 4, "shape": [2]}}, "unknown dtype 4"),
    ({"w": {"dtype": "F32", "shape": [-1]}}, "negative"),
    ({"w": {"dtype": "F32", "shape": [1.5]}}, "non-integer"),
    ({"w": {"dtype": "F32", "shape": [True]}}, "non-integer"),
    ({"w": {"dtype": "F32", "shape": "2"}}, "not a list"),
    ({"w": {"dtype": "F32", "shape": [2**40, 2**40]}}, "overflows"),
    ({"w": {"dtype": "F32", "shape": [1] * 65}}, "65 dimensions"),
    ({"w": {"dtype": "F4", "shape": [3]}}, "whole bytes"),
    ({"w": {"dtype": "F32"}}, "missing \\['shape'\\]"),
    ({"w": {"dtype": "F32", "shape": [2], "stride": [1]}}, "unexpected \\['stride'\\]"),
    ({"w": [2]}, "entry is a list"),
    ({"": {"dtype": "F32", "shape": [2]}}, "no name"),
    ({"tensors": [{"name": "a", "dtype": "F32", "shape": [1]}] * 2}, "twice"),
    ({"tensors": [], "offset": -1}, "offset is -1"),
    ({"tensors": [], "offset": True}, "offset is True"),
    ({"tensors": [], "byteorder": "middle"}, "byteorder is 'middle'"),
    ({"tensors": [], "endian": "big"}, "unexpected keys \\['endian'\\]"),
    ({"tensors": ["w"]}, "tensor 0 of the template is a str"),
])
def test_bad_templates(tmp_path, template, match):
    dump = tmp_path / "d.bin"
    dump.write_bytes(b"\0" * 8)
    with pytest.raises(SourceError, match=match):
        RawSource(dump, template)


@pytest.mark.parametrize("text, match", [
    (b'{"w": {"dtype": "F32", "shape": [2]}, "w": {"dtype": "F32", "shape": [2]}}', "names 'w' twice"),
    (b"[1, 2]", "is a list, not a JSON object"),
    (b"{not json", "neither a safetensors file nor valid JSON"),
    (b"\xff\xfe{}", "neither a safetensors file nor UTF-8 JSON"),
    (b"[" * 100_000, "nested too deeply|not valid JSON"),
])
def test_bad_template_files(tmp_path, text, match):
    template = tmp_path / "t.json"
    template.write_bytes(text)
    dump = tmp_path / "d.bin"
    dump.write_bytes(b"\0" * 8)
    with pytest.raises(SourceError, match=match) as info:
        RawSource(dump, template)
    assert str(template) in str(info.value)


def test_a_broken_safetensors_template_is_refused(tmp_path):
    template = tmp_path / "t.safetensors"
    template.write_bytes(len(b'{"w":1}').to_bytes(8, "little") + b'{"w":1}')
    with pytest.raises(SafeckptError):
        load_template(template)
