"""safeckpt.torch is a drop-in for safetensors.torch: same names, signatures, bytes and results."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed")
st_torch = pytest.importorskip("safetensors.torch", reason="the safetensors oracle is not installed")

import safeckpt  # noqa: E402
from safeckpt import errors  # noqa: E402
from safeckpt import torch as sct  # noqa: E402

API = ["save", "save_file", "load", "load_file", "save_model", "load_model"]


class TiedModel(torch.nn.Module):
    """An embedding tied to the output head, as in most language models."""

    def __init__(self, vocab=50, dim=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.proj = torch.nn.Linear(dim, dim).to(torch.bfloat16)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("steps", torch.tensor(3))


@pytest.mark.parametrize("name", API)
def test_same_signatures(name):
    ours, theirs = inspect.signature(getattr(sct, name)), inspect.signature(getattr(st_torch, name))
    assert list(ours.parameters) == list(theirs.parameters)
    for param in theirs.parameters.values():
        assert ours.parameters[param.name].kind == param.kind
        assert ours.parameters[param.name].default == param.default


def test_save_model_bytes_identical(tmp_path):
    torch.manual_seed(0)
    model = TiedModel()
    sct.save_model(model, tmp_path / "ours.safetensors")
    st_torch.save_model(model, tmp_path / "theirs.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    with safeckpt.safe_open(tmp_path / "ours.safetensors") as f:
        assert f.metadata() == {"head.weight": "embed.weight"}
        assert "head.weight" not in f.keys()


def test_load_model_restores_tied_weights(tmp_path):
    torch.manual_seed(0)
    saved = TiedModel()
    sct.save_model(saved, tmp_path / "m.safetensors")
    fresh = TiedModel()
    result = sct.load_model(fresh, tmp_path / "m.safetensors")
    assert result == st_torch.load_model(TiedModel(), tmp_path / "m.safetensors")
    assert result == (set(), [])
    for name, tensor in saved.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor)
    assert fresh.head.weight is fresh.embed.weight


def _results_both(model_factory, path, strict):
    outcomes = []
    for module in (sct, st_torch):
        try:
            outcomes.append(("ok", module.load_model(model_factory(), path, strict=strict)))
        except RuntimeError as exc:
            outcomes.append(("error", str(exc)))
    return outcomes


@pytest.mark.parametrize("strict", [True, False])
def test_missing_and_unexpected_like_theirs(tmp_path, strict):
    torch.manual_seed(0)
    state = TiedModel().state_dict()
    del state["norm.bias"]
    state["extra.weight"] = torch.ones(2)
    state = {k: v.clone() for k, v in state.items() if k != "head.weight"}
    st_torch.save_file(state, tmp_path / "partial.safetensors")
    ours, theirs = _results_both(TiedModel, tmp_path / "partial.safetensors", strict)
    assert ours == theirs
    if not strict:
        missing, unexpected = ours[1]
        assert missing == {"norm.bias"} and unexpected == ["extra.weight"]


def test_load_model_of_file_with_both_tied_names(tmp_path):
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in TiedModel().state_dict().items()}  # head.weight saved separately
    st_torch.save_file(state, tmp_path / "both.safetensors")
    ours, theirs = _results_both(TiedModel, tmp_path / "both.safetensors", strict=False)
    assert ours == theirs


def test_shared_tensors_refused_like_theirs(tmp_path):
    weight = torch.ones(4, 4)
    tensors = {"a": weight, "b": weight}
    with pytest.raises(RuntimeError):
        st_torch.save_file(tensors, tmp_path / "theirs.safetensors")
    with pytest.raises(errors.SharedTensorsError, match="save_model"):
        sct.save_file(tensors, tmp_path / "ours.safetensors")
    with pytest.raises(RuntimeError):  # the same exception family as theirs
        sct.save(tensors)
    # disjoint views of one storage are not shared bytes
    base = torch.arange(8.0)
    sct.save_file({"lo": base[:4], "hi": base[4:]}, tmp_path / "halves.safetensors")
    assert st_torch.save_file({"lo": base[:4], "hi": base[4:]}, tmp_path / "theirs_halves.safetensors") is None
    assert (tmp_path / "halves.safetensors").read_bytes() == (tmp_path / "theirs_halves.safetensors").read_bytes()


def test_non_tensor_values_refused_as_value_errors():
    with pytest.raises(ValueError, match="torch.Tensor"):
        sct.save({"a": np.zeros(2)})
    with pytest.raises(ValueError, match="dict"):
        sct.save([torch.zeros(2)])


def test_sparse_refused():
    sparse = torch.zeros(3, 3).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        sct.save({"s": sparse})


def test_non_contiguous_written_in_logical_order():
    # safetensors refuses these; we write them correctly.
    views = {"t": torch.arange(24.0).reshape(4, 6).t(), "strided": torch.arange(24.0).reshape(4, 6)[:, ::2],
             "expanded": torch.arange(3.0).expand(4, 3), "channels_last": torch.randn(2, 3, 4, 5).to(
                 memory_format=torch.channels_last)}
    loaded = sct.load(sct.save(views))
    for name, view in views.items():
        assert not view.is_contiguous()
        assert torch.equal(loaded[name], view.contiguous())


def test_requires_grad_and_conj_and_neg_views():
    param = torch.nn.Parameter(torch.randn(3, 3))
    complex_view = torch.randn(4, dtype=torch.complex64).conj()
    neg_view = torch.randn(4, dtype=torch.complex64)._neg_view()
    loaded = sct.load(sct.save({"p": param, "c": complex_view, "n": neg_view}))
    assert torch.equal(loaded["p"], param.detach())
    assert torch.equal(loaded["c"], complex_view.resolve_conj())
    assert torch.equal(loaded["n"], neg_view.resolve_neg())


def test_load_file_zero_copy_and_private(tmp_path):
    path = tmp_path / "m.safetensors"
    sct.save_file({"w": torch.arange(16.0).reshape(4, 4), "b": torch.ones(4, dtype=torch.bfloat16)}, path)
    before = path.read_bytes()
    loaded = sct.load_file(path)
    loaded["w"].add_(1)
    loaded["b"].mul_(3)
    assert path.read_bytes() == before
    again = sct.load_file(path)
    assert torch.equal(again["w"], torch.arange(16.0).reshape(4, 4))
    assert again["b"].dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_their_files_and_ours_load_equal(tmp_path, backend):
    torch.manual_seed(1)
    tensors = {"w": torch.randn(5, 7), "h": torch.randn(3, dtype=torch.float16),
               "bf": torch.randn(2, 2, dtype=torch.bfloat16), "i": torch.arange(5), "s": torch.tensor(1.5),
               "f8": torch.randn(4).to(torch.float8_e5m2), "bool": torch.tensor([True, False])}
    st_torch.save_file(tensors, tmp_path / "theirs.safetensors")
    sct.save_file(tensors, tmp_path / "ours.safetensors")
    for name in ("theirs", "ours"):
        loaded = sct.load_file(tmp_path / f"{name}.safetensors", backend=backend)
        reference = st_torch.load_file(tmp_path / f"{name}.safetensors")
        assert loaded.keys() == reference.keys()
        for key in tensors:
            assert loaded[key].dtype == reference[key].dtype
            assert torch.equal(loaded[key].view(-1).view(torch.uint8), reference[key].view(-1).view(torch.uint8))


def test_safe_open_torch_slices(tmp_path):
    weight = torch.arange(4096 * 64, dtype=torch.float32).reshape(4096, 64)
    sct.save_file({"w": weight}, tmp_path / "w.safetensors")
    with safeckpt.safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        assert torch.equal(f.get_slice("w")[100:103, ::-8], weight[100:103].flip(1)[:, ::8])
        assert torch.equal(f.get_slice("w")[-1], weight[-1])
        assert torch.equal(f.get_tensor("w"), weight)
    with st_torch.safe_open(tmp_path / "w.safetensors", framework="pt") as theirs, \
            safeckpt.safe_open(tmp_path / "w.safetensors", framework="pt") as ours:
        for index in [(slice(1, 5), slice(None, None, 2)), (slice(None), 3), 7, (Ellipsis, slice(0, 2))]:
            assert torch.equal(ours.get_slice("w")[index], theirs.get_slice("w")[index])


def test_bad_file_errors_subclass_value_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ValueError) as info:
        sct.load_file(path)
    assert isinstance(info.value, errors.HeaderError) and str(path) in str(info.value)


# --- safetensors.torch's helpers: same names, signatures and results -------------

HELPERS = ["storage_ptr", "storage_size", "_find_shared_tensors", "_remove_duplicate_names", "_is_complete",
           "_end_ptr", "_flatten_as_ptr"]


@pytest.mark.parametrize("name", HELPERS)
def test_helpers_have_their_signatures(name):
    ours, theirs = inspect.signature(getattr(sct, name)), inspect.signature(getattr(st_torch, name))
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.parameters.values()]


def _shrunk(full: torch.Tensor, elements: int) -> torch.Tensor:
    """A tensor whose storage starts where `full`'s does but holds only `elements` values."""
    small = torch.empty([], dtype=full.dtype)
    small.set_(source=full.untyped_storage()[: elements * full.element_size()])
    return small


def _tensors():
    base = torch.arange(16.0)
    return {"full": base, "head": base[:4], "tail": base[12:], "every4": base[::4], "grid": base.view(4, 4),
            "scalar": torch.tensor(2.0), "empty": torch.zeros(0), "meta": torch.zeros(2, 2, device="meta"),
            "half": torch.zeros(4, dtype=torch.float16), "shrunk": _shrunk(base, 4),
            "f4": torch.zeros(2, 2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}


@pytest.mark.parametrize("name", list(_tensors()))
def test_storage_helpers_equal_theirs(name):
    tensor = _tensors()[name]
    for helper in ("storage_ptr", "storage_size", "_is_complete", "_end_ptr"):
        assert getattr(sct, helper)(tensor) == getattr(st_torch, helper)(tensor), helper


def test_end_ptr_of_views_theirs_cannot_flatten():
    base = torch.zeros(3, 4)
    for view in (base.t(), torch.zeros(4).expand(3, 4)):
        with pytest.raises(RuntimeError):
            st_torch._end_ptr(view)
        last = view[-1, -1] if view.dim() == 2 else view[-1]
        assert sct._end_ptr(view) == last.data_ptr() + view.element_size()


def _state_dicts():
    full = torch.arange(16.0)
    tied, copied = TiedModel(), TiedModel()
    copied.head.weight = torch.nn.Parameter(copied.embed.weight.detach().clone())
    meta, ones = torch.zeros(2, 2, device="meta"), torch.ones(2)
    return {
        "tied model": tied.state_dict(),
        "untied model": copied.state_dict(),
        "views": {"B": full[:2], "C": full[2:], "D": full[:1]},
        "overlap": {"B": full[:2], "C": full[1:]},
        "order": {"z": torch.zeros(2), "y": full[4:], "a": torch.zeros(2), "x": full[:4], "w": full},
        "same object": {"A": full, "B": full[:4], "C": full},
        "two ties": {"z": full, "z_tied": full, "a": ones, "a_tied": ones},
        "meta and empty": {"m": meta, "m2": meta[:1], "e": torch.zeros(0), "f": torch.zeros(0)},
        "same start, other size": {"m": full, "n": _shrunk(full, 4)},
    }


@pytest.mark.parametrize("case", list(_state_dicts()))
def test_find_shared_tensors_same_groups_in_the_same_order(case):
    state = _state_dicts()[case]
    assert sct._find_shared_tensors(state) == st_torch._find_shared_tensors(state)


@pytest.mark.parametrize("case", list(_state_dicts()))
@pytest.mark.parametrize("names", [{}, {"preferred_names": ["head.weight", "C"]},
                                   {"discard_names": ["embed.weight", "A"]}])
def test_remove_duplicate_names_equal_theirs(case, names):
    state = _state_dicts()[case]
    try:
        theirs = st_torch._remove_duplicate_names(state, **names)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            sct._remove_duplicate_names(state, **names)
        return
    ours = sct._remove_duplicate_names(state, **names)
    assert type(ours) is type(theirs) and ours.default_factory is list
    assert list(ours.items()) == list(theirs.items())


def test_overlaps_are_grouped_through_the_widest_tensor():
    # theirs compares each range with the previous one only, so "c" (inside "A" but past "b")
    # gets a group of its own and save_model refuses the state dict; we group all three.
    full = torch.arange(9.0)
    state = {"A": full, "b": full[1:2], "c": full[3:4]}
    assert st_torch._find_shared_tensors(state) == [{"A", "b"}, {"c"}]
    assert sct._find_shared_tensors(state) == [{"A", "b", "c"}]
    assert sct._remove_duplicate_names(state) == {"A": ["b", "c"]}


def test_a_lone_partial_view_is_not_refused():
    # theirs refuses (it might store more than needed); we write exactly the view's bytes.
    state = {"B": torch.zeros(3, 3)[:1]}
    with pytest.raises(RuntimeError):
        st_torch._remove_duplicate_names(state)
    assert sct._remove_duplicate_names(state) == {}


def _flattenable():
    return {"f32": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
            "bf16": torch.ones(5, dtype=torch.bfloat16), "f8": torch.zeros(2, dtype=torch.float8_e4m3fn),
            "bool": torch.tensor([True, False]), "i64": torch.tensor(7), "empty": torch.zeros(0, 2, dtype=torch.int16),
            "f4": torch.arange(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}


def test_flatten_as_ptr_gives_their_specs_and_bytes():
    tensors = _flattenable()
    ours_alive, theirs_alive = [], []
    ours, theirs = sct._flatten_as_ptr(tensors, ours_alive), st_torch._flatten_as_ptr(tensors, theirs_alive)
    assert list(ours) == list(theirs)
    for name in theirs:
        assert (ours[name].dtype, ours[name].shape, ours[name].data_len) == \
            (theirs[name].dtype, theirs[name].shape, theirs[name].data_len)
    assert ours_alive
    assert safeckpt.serialize(ours, metadata={"a": "b"}) == st_torch.save(tensors, metadata={"a": "b"})


def test_flatten_as_ptr_copies_what_is_not_contiguous():
    view = torch.arange(12.0).reshape(3, 4).t()
    with pytest.raises(ValueError, match="non contiguous"):
        st_torch._flatten_as_ptr({"t": view}, [])
    alive = []
    assert sct.load(sct.serialize(sct._flatten_as_ptr({"t": view}, alive)))["t"].equal(view)


def test_flatten_gives_the_dicts_safetensors_0_7_took():
    tensors = _flattenable()
    flat = sct._flatten(tensors)
    assert flat["bf16"]["dtype"] == "bfloat16" and flat["f32"]["shape"] == torch.Size([3, 4])
    assert isinstance(flat["f32"]["data"], bytes)
    assert sct.serialize(flat) == st_torch.save(tensors)
    with pytest.raises(RuntimeError):
        sct._flatten({"a": tensors["f32"], "b": tensors["f32"]})


def test_module_holds_their_reexports():
    for name in ("safe_open", "serialize", "serialize_file", "deserialize", "TensorSpec"):
        assert getattr(sct, name) is getattr(safeckpt, name)


def test_save_model_writes_non_contiguous_weights_without_force_contiguous(tmp_path):
    model = torch.nn.Linear(4, 3)
    model.weight = torch.nn.Parameter(torch.arange(12.0).reshape(4, 3).t())
    with pytest.raises(ValueError, match="force_contiguous=True"):
        st_torch.save_model(model, tmp_path / "theirs.safetensors", force_contiguous=False)
    sct.save_model(model, tmp_path / "ours.safetensors", force_contiguous=False)
    fresh = torch.nn.Linear(4, 3)
    assert sct.load_model(fresh, tmp_path / "ours.safetensors") == (set(), [])
    assert torch.equal(fresh.weight, model.weight)
