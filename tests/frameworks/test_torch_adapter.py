"""The torch adapter: every torch dtype round-trips bit for bit through safeckpt's generic API."""

from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed")

import safeckpt  # noqa: E402
from safeckpt import errors  # noqa: E402
from safeckpt.format.dtypes import DTYPES, dtype_for_numpy  # noqa: E402
from safeckpt.format.writer import pack_f4  # noqa: E402
from safeckpt.frameworks import torch as adapter  # noqa: E402
from tests.files import tensor_bytes  # noqa: E402
from tests.frameworks.framework_samples import SHAPES, assert_same_bytes, run_python, sample  # noqa: E402

TORCH = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
         "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
         "F32": torch.float32, "C64": torch.complex64, "F64": torch.float64, "I64": torch.int64,
         "U64": torch.uint64, "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
         "F8_E8M0": torch.float8_e8m0fnu, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
         "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F4": torch.float4_e2m1fn_x2}
# safetensors.torch cannot write F8_E8M0 or F4 (they are missing from its size table).
THEIR_DTYPES = [name for name in TORCH if name not in ("F8_E8M0", "F4")]
SLICES = {(): (), (0,): np.s_[0:0], (3, 0, 2): np.s_[1:, :, ::2], (4, 6): np.s_[1:3, 2:6]}
CARRIER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def torch_tensor(source: np.ndarray):
    """A torch tensor holding `source`'s bytes, made with torch's own API (F4 packed two per byte)."""
    name = dtype_for_numpy(source.dtype).name
    if name == "F4":
        packed = torch.from_numpy(pack_f4(source).copy()).view(TORCH[name])
        return packed.reshape(source.shape[:-1] + (source.shape[-1] // 2,))
    if name == "BOOL":
        return torch.from_numpy(source.copy())
    raw = torch.from_numpy(source.reshape(-1).view(f"<i{source.dtype.itemsize}").copy())
    return raw.view(TORCH[name]).reshape(source.shape)


def file_bytes(source: np.ndarray) -> bytes:
    """The bytes a tensor takes in a safetensors file."""
    return pack_f4(source).tobytes() if source.dtype == DTYPES["F4"].numpy else source.tobytes()


def assert_same(actual, expected: np.ndarray) -> None:
    """Same dtype, shape and bytes (so NaN payloads count); torch F4 is packed two per byte."""
    name = dtype_for_numpy(expected.dtype).name
    if isinstance(actual, torch.Tensor):
        assert actual.dtype == TORCH[name]
        shape = expected.shape[:-1] + (expected.shape[-1] // 2,) if name == "F4" else expected.shape
        assert tuple(actual.shape) == shape
        assert tensor_bytes(actual) == file_bytes(expected)
        return
    assert_same_bytes(actual, expected)


def fits(name: str, shape: tuple) -> bool:
    return name != "F4" or (len(shape) > 0 and shape[-1] % 2 == 0)


# torch holds F4 two to an element: a 0-d F4 tensor has no torch form.
ROUND_TRIPS = [(name, shape) for name in TORCH for shape in SHAPES if fits(name, shape)]


@pytest.mark.parametrize("name, shape", ROUND_TRIPS, ids=str)
def test_round_trip_bit_exact(tmp_path, name, shape):
    source = sample(name, shape)
    path = tmp_path / "t.safetensors"
    safeckpt.save_file({"t": torch_tensor(source)}, path)

    with safeckpt.safe_open(path) as f:  # the file holds the torch tensor's values
        assert_same(f.get_tensor("t"), source)
    loaded = safeckpt.load_file(path, framework="pt")["t"]
    assert_same(loaded, source)
    with safeckpt.safe_open(path, framework="torch") as f:
        assert_same(f.get_tensor("t"), source)
        part = source[SLICES[shape]]
        if fits(name, part.shape):
            assert_same(f.get_slice("t")[SLICES[shape]], part)
        else:
            with pytest.raises(errors.DTypeConversionError, match="even last dimension"):
                f.get_slice("t")[SLICES[shape]]
    assert_same(safeckpt.load(safeckpt.save({"t": torch_tensor(source)}), framework="pytorch")["t"], source)


def test_bytes_identical_to_safetensors_torch():
    st_torch = pytest.importorskip("safetensors.torch", reason="the safetensors oracle is not installed")
    tensors = {f"{name.lower()}.{i}": torch_tensor(sample(name, shape, seed=i))
               for name in THEIR_DTYPES for i, shape in enumerate(SHAPES)}
    assert safeckpt.save(tensors, metadata={"format": "pt"}) == st_torch.save(tensors, metadata={"format": "pt"})


def test_files_from_safetensors_torch_load_through_ours(tmp_path):
    st_torch = pytest.importorskip("safetensors.torch", reason="the safetensors oracle is not installed")
    sources = {name: sample(name, (3, 4)) for name in THEIR_DTYPES}
    st_torch.save_file({name: torch_tensor(a) for name, a in sources.items()}, tmp_path / "t.safetensors")
    loaded = safeckpt.load_file(tmp_path / "t.safetensors", framework="pt")
    assert loaded.keys() == sources.keys()
    for name, source in sources.items():
        assert_same(loaded[name], source)


def test_files_of_ours_load_through_safetensors_torch(tmp_path):
    st_torch = pytest.importorskip("safetensors.torch", reason="the safetensors oracle is not installed")
    sources = {name: sample(name, (3, 4)) for name in THEIR_DTYPES}
    safeckpt.save_file({name: torch_tensor(a) for name, a in sources.items()}, tmp_path / "t.safetensors")
    theirs = st_torch.load_file(tmp_path / "t.safetensors")
    for name, source in sources.items():
        assert_same(theirs[name], source)


def test_non_contiguous_tensors_are_written_in_logical_order():
    st_torch = pytest.importorskip("safetensors.torch", reason="the safetensors oracle is not installed")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "transposed": base.t(),
        "bf16_transposed": base.to(torch.bfloat16).t(),
        "fp8_strided": base.to(torch.float8_e4m3fn)[::2, 1::2],
        "expanded": torch.arange(3.0).expand(4, 3),  # stride 0
        "offset": base[1:, 2:],
        "conj": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),  # a lazy conjugate view
        "neg": torch.tensor([1 + 2j], dtype=torch.complex64).conj().imag,  # a lazy negative view
    }
    assert not tensors["transposed"].is_contiguous() and tensors["conj"].is_conj()
    with pytest.raises(ValueError, match="non contiguous"):  # safetensors.torch refuses them
        st_torch.save({"transposed": tensors["transposed"]})
    contiguous = {name: t.resolve_conj().resolve_neg().contiguous() for name, t in tensors.items()}
    assert safeckpt.save(tensors) == st_torch.save(contiguous)


def test_parameters_and_tensors_requiring_grad_save():
    layer = torch.nn.Linear(3, 2)
    loaded = safeckpt.load(safeckpt.save(dict(layer.named_parameters())), framework="pt")
    assert torch.equal(loaded["weight"], layer.weight.detach())


# --- zero-copy ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["F32", "BF16", "F8_E4M3", "U16", "BOOL", "C64"])
def test_to_numpy_shares_the_tensor_memory(name):
    tensor = torch_tensor(sample(name, (16, 8)))
    array = adapter.to_numpy(tensor)
    assert array.dtype == DTYPES[name].numpy
    assert array.ctypes.data == tensor.data_ptr()


@pytest.mark.parametrize("name", ["F32", "BF16", "F8_E5M2", "U64", "F4"])
def test_storage_loads_zero_copy(name):
    source = sample(name, (16, 16))
    storage = np.frombuffer(bytearray(file_bytes(source)), dtype=np.uint8)
    storage = storage if DTYPES[name].packed else storage.view(DTYPES[name].numpy)
    tensor = adapter.from_storage(storage, DTYPES[name], (16, 16))
    assert tensor.data_ptr() == storage.ctypes.data
    assert_same(tensor, source)


def test_loaded_tensors_are_writable_and_writes_never_reach_the_file(tmp_path):
    path = tmp_path / "t.safetensors"
    safeckpt.save_file({"w": np.zeros(8, np.float32)}, path)
    before = path.read_bytes()
    tensor = safeckpt.load_file(path, framework="pt")["w"]
    tensor += 1
    assert tensor.tolist() == [1.0] * 8
    assert path.read_bytes() == before


# --- devices and errors ---------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", None, "cpu:0"])
def test_cpu_devices(tmp_path, device):
    safeckpt.save_file({"w": np.ones(3, np.float32)}, tmp_path / "t.safetensors")
    assert safeckpt.load_file(tmp_path / "t.safetensors", framework="pt", device=device)["w"].device.type == "cpu"


@pytest.mark.parametrize("make, match", [
    (lambda: torch.eye(2).to_sparse(), "to_dense"),
    (lambda: torch.empty(2, device="meta"), "meta"),
    (lambda: torch.ones(2, dtype=torch.complex128), "no safetensors equivalent"),
])
def test_tensors_without_a_safetensors_form_are_refused(make, match):
    with pytest.raises(errors.UnsupportedTensorError, match=match):
        safeckpt.save({"x": make()})


def test_f4_slices_with_an_odd_last_dimension_are_refused_clearly(tmp_path):
    safeckpt.save_file({"f4": torch_tensor(sample("F4", (2, 4)))}, tmp_path / "t.safetensors")
    with safeckpt.safe_open(tmp_path / "t.safetensors", framework="pt") as f:
        assert_same(f.get_slice("f4")[:, 2:], sample("F4", (2, 4))[:, 2:])
        for index in (np.s_[0, 0:3], np.s_[:, 1:2], np.s_[1, 1]):
            with pytest.raises(errors.DTypeConversionError, match="even last dimension"):
                f.get_slice("f4")[index]


def test_f6_has_no_torch_form(raw_file):
    path = raw_file({"x": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}, b"\x00" * 3)
    with pytest.raises(errors.DTypeConversionError, match="framework='numpy'"):
        safeckpt.load_file(path, framework="pt")


def test_importing_safeckpt_does_not_import_torch(tmp_path):
    code = f"""
        import sys, numpy as np, safeckpt
        import safeckpt.frameworks.torch
        safeckpt.save_file({{"w": np.ones(2)}}, {str(tmp_path / "t.safetensors")!r})
        safeckpt.load_file({str(tmp_path / "t.safetensors")!r})
        assert "torch" not in sys.modules, "torch was imported"
    """
    run_python(code)
