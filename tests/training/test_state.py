"""State trees: split into tensors + a JSON document, saved, read back, joined — exactly."""

from __future__ import annotations

import json
import math
from collections import OrderedDict, namedtuple

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
torch = pytest.importorskip("torch")
stock_load_file = pytest.importorskip("safetensors.torch").load_file

import safeckpt
from safeckpt.errors import SafeckptError, StateFormatError, UnsupportedStateError
from safeckpt.format.dtypes import DTYPES
from safeckpt.frameworks.torch import tables as torch_tables
from safeckpt.training import SCHEMA_VERSION, join_state, snapshot, split_state

from tests.training.trees import assert_same, through_files

CUDA = torch.cuda.is_available()


# --- every leaf type --------------------------------------------------------------

def torch_tensors() -> dict:
    """One tensor of every torch dtype safetensors has."""
    out = {}
    for name, (dtype, _) in torch_tables()[0].items():
        values = torch.arange(-3, 3, dtype=torch.float32).reshape(2, 3)
        out[name] = (values % 2 == 0) if dtype == torch.bool else values.to(dtype)
    if hasattr(torch, "float4_e2m1fn_x2"):
        out["F4"] = torch.arange(4, dtype=torch.uint8).reshape(2, 2).mul(37).view(torch.float4_e2m1fn_x2)
    out["grad"] = torch.linspace(0, 1, 5).requires_grad_(True)
    out["param"] = torch.nn.Parameter(torch.ones(2, 2))
    out["frozen"] = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    out["scalar"] = torch.tensor(7.5)
    out["empty"] = torch.zeros(0, 4)
    out["transposed"] = torch.arange(12.0).reshape(3, 4).t()
    return out


def numpy_arrays() -> dict:
    """One array of every numpy-representable safetensors dtype, and the awkward layouts."""
    out = {}
    for name, dtype in DTYPES.items():
        if dtype.numpy is not None:
            out[name] = np.arange(-2, 2, dtype=np.float32).reshape(2, 2).astype(dtype.numpy)
    out["zero_d"] = np.array(3.25, dtype=np.float64)
    out["empty"] = np.zeros((0, 3), np.int16)
    out["fortran"] = np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3))
    out["strided"] = np.arange(20, dtype=np.float32)[::3]
    out["big_endian"] = np.arange(4, dtype=">f4")
    return out


def every_leaf() -> dict:
    """A nested tree holding every kind of leaf and key a state may have."""
    return {
        "torch": torch_tensors(),
        "numpy": numpy_arrays(),
        "jax": {"f32": jnp.arange(4, dtype=jnp.float32), "bf16": jnp.ones((2, 2), jnp.bfloat16),
                "i32": jnp.array(-5, jnp.int32), "bool": jnp.array([True, False])},
        "numpy_scalars": [np.float32(1.5), np.int64(-3), np.bool_(True), ml_dtypes.bfloat16(2.5),
                          np.complex64(1 + 2j), np.uint8(255), np.float64("nan"), np.float16(-0.0)],
        "ints": [0, -1, 2 ** 63 - 1, -(2 ** 63), 2 ** 63, -(2 ** 64) - 1, 2 ** 200, 10 ** 5000],
        "floats": (0.1, -0.0, 0.0, math.nan, math.inf, -math.inf, 5e-324, 1.7976931348623157e308),
        "bools": [True, False], "none": None,
        "strings": ["", "ünïcødé ✓", "__tensor__", "a/b~c"],
        "bytes": [b"", b"\x00\xff pickle? no"],
        "int_keys": {0: "zero", 1: {2: "nested int keys"}, -7: None},
        "mixed_keys": {0: torch.ones(1), "0": torch.zeros(1), 1.5: "float key", None: "none key",
                       b"k": "bytes key", 10 ** 30: "big key"},
        "bool_keys": {True: "t", False: "f"},
        "tag_keys": {"__tensor__": "not a tensor", "__dict__": [1]},
        "awkward names": {"a/b": np.ones(1), "a~1b": np.zeros(1), "a.b": np.full(1, 2.0), "__metadata__": np.ones(2)},
        "empties": [{}, [], (), {"e": {}}],
        "tuple_of_tuples": ((1, (2, (3,))), ()),
    }


def test_every_leaf_round_trips_in_memory():
    state = every_leaf()
    assert_same(join_state(*split_state(state)), state)


def test_every_leaf_round_trips_through_files(tmp_path):
    state = every_leaf()
    assert_same(through_files(state, tmp_path), state)


def test_the_document_is_strict_json_with_readable_tensor_names():
    tensors, document = split_state(every_leaf())
    text = json.dumps(document, allow_nan=False)  # raises on a NaN or infinity left in the document
    assert "NaN" not in text and "Infinity" not in text
    assert document["schema"] == 1 < SCHEMA_VERSION  # nothing here needs schema 2
    assert {"torch/BF16", "numpy/F8_E4M3", "jax/f32", "awkward names/a~1b", "awkward names/a~01b",
            "awkward names/a.b", "mixed_keys/0", "mixed_keys/0~2", "numpy_scalars/0"} <= tensors.keys()
    assert document["tensors"]["torch/grad"] == {
        "framework": "torch", "dtype": "F32", "shape": [5], "device": "cpu", "requires_grad": True}
    assert document["tensors"]["numpy_scalars/3"]["scalar"] is True
    assert document["tree"]["floats"] == {"__tuple__": [0.1, -0.0, 0.0, {"__float__": "nan"}, {"__float__": "inf"},
                                                        {"__float__": "-inf"}, 5e-324, 1.7976931348623157e308]}
    assert document["tree"]["ints"][4] == {"__int__": str(2 ** 63)}
    assert document["tree"]["int_keys"]["__dict__"][0] == [0, "zero"]


def test_big_ints_and_int_keys_keep_their_types():
    state = {"step": 2 ** 64 + 1, "state": {0: 1, "0": 2.0}, "neg": -(2 ** 100)}
    back = join_state(*split_state(state))
    assert back == state
    assert [type(k) for k in back["state"]] == [int, str] and type(back["state"]["0"]) is float


def test_other_containers_come_back_as_their_base_types():
    Point = namedtuple("Point", "x y")

    class Config(dict):
        pass

    state = Config(b=Point(1, 2), a=[3])
    back = join_state(*split_state(state))
    assert type(back) is dict and list(back) == ["b", "a"] and back["b"] == (1, 2) and type(back["b"]) is tuple


def test_tensors_open_with_the_stock_safetensors_library(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    state = {"model": model.state_dict(), "opt": {0: {"step": torch.tensor(3.0)}},
             "bf16": torch.ones(2, dtype=torch.bfloat16), "fp8": torch.ones(2).to(torch.float8_e4m3fn),
             "np": np.arange(3, dtype=np.int64)}
    tensors, _ = split_state(state)
    safeckpt.save_file(tensors, tmp_path / "state.safetensors")
    theirs = stock_load_file(tmp_path / "state.safetensors")
    assert sorted(theirs) == sorted(["model/0.weight", "model/0.bias", "model/1.weight", "model/1.bias",
                                     "opt/0/step", "bf16", "fp8", "np"])
    assert torch.equal(theirs["model/0.weight"], model[0].weight.detach())
    assert theirs["opt/0/step"].item() == 3.0 and theirs["bf16"].dtype == torch.bfloat16
    assert theirs["fp8"].dtype == torch.float8_e4m3fn and torch.equal(theirs["np"], torch.arange(3))


# --- aliases ----------------------------------------------------------------------

def test_one_tensor_at_two_paths_is_stored_once_and_comes_back_as_one_object(tmp_path):
    shared, array = torch.randn(3, 2), np.arange(5.0)
    state = {"a": shared, "b": [shared, {"c": shared}], "x": array, "y": (array,)}
    tensors, document = split_state(state)
    assert sorted(tensors) == ["a", "x"]
    back = through_files(state, tmp_path)
    assert back["a"] is back["b"][0] is back["b"][1]["c"] and back["x"] is back["y"][0]
    assert torch.equal(back["a"], shared)


def test_tied_weights_of_a_state_dict_are_stored_once():
    embed, head = torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False)
    head.weight = embed.weight
    model = torch.nn.ModuleDict({"embed": embed, "head": head})
    state_dict = model.state_dict()
    assert state_dict["embed.weight"] is not state_dict["head.weight"]  # two objects, one storage
    tensors, document = split_state({"model": state_dict})
    assert list(tensors) == ["model/embed.weight"]
    back = join_state(tensors, document)["model"]
    assert back["embed.weight"] is back["head.weight"]


def test_views_of_different_parts_are_stored_separately():
    base = torch.arange(12.0).reshape(3, 4)
    state = {"whole": base, "row": base[1], "col": base[:, 2], "conj": torch.ones(2, dtype=torch.complex64).conj()}
    tensors, document = split_state(state)
    assert len(tensors) == 4
    back = join_state(tensors, document)
    assert torch.equal(back["row"], base[1]) and torch.equal(back["col"], base[:, 2])
    assert torch.equal(back["conj"], torch.ones(2, dtype=torch.complex64))


# --- snapshot ---------------------------------------------------------------------

def test_a_snapshot_does_not_see_training_continue():
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(4)).sum().backward()
    optimizer.step()
    array, jax_array = np.arange(4.0), jnp.ones(3)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "np": array, "jax": jax_array,
             "steps": [1]}
    before = join_state(*split_state(snapshot(state)))  # what the snapshot held, stored
    frozen = snapshot(state)
    for _ in range(3):  # train on: every tensor above changes in place
        optimizer.zero_grad()
        model(torch.ones(4)).sum().backward()
        optimizer.step()
    array += 1
    state["steps"].append(2)
    assert not torch.equal(model.weight.detach(), before["model"]["weight"])
    assert_same(join_state(*split_state(frozen)), before)
    assert frozen["jax"] is jax_array and frozen["steps"] == [1]


def test_a_snapshot_keeps_aliases_grad_flags_and_parameters():
    shared = torch.ones(3)
    state = {"a": shared, "b": shared, "p": torch.nn.Parameter(torch.zeros(2)), "g": torch.ones(2).requires_grad_()}
    frozen = snapshot(state)
    assert frozen["a"] is frozen["b"] and frozen["a"] is not shared
    assert isinstance(frozen["p"], torch.nn.Parameter) and frozen["g"].requires_grad and frozen["g"].is_leaf
    shared.add_(1)
    assert torch.equal(frozen["a"], torch.ones(3))
    assert split_state(frozen)[1] == split_state(state)[1]


def test_a_snapshot_refuses_at_once_what_split_would_refuse():
    with pytest.raises(UnsupportedStateError, match=r"state\['x'\]\[1\]: .*complex128"):
        snapshot({"x": [1, torch.zeros(2, dtype=torch.complex128)]})
    with pytest.raises(UnsupportedStateError, match=r"state\['f'\]: cannot store .*function"):
        snapshot({"f": lambda: 0})


# --- refusals ---------------------------------------------------------------------

class Opaque:
    pass


@pytest.mark.parametrize("leaf, fix", [
    (lambda lr: lr, "code is never stored"),
    (print, "code is never stored"),
    (Opaque(), "convert it to a tensor"),
    ({1, 2}, "sorted list"),
    (1 + 2j, "numpy scalar"),
    (bytearray(b"x"), "convert it to bytes"),
    (np.array([object()], dtype=object), "no safetensors equivalent"),
    (np.datetime64("2020-01-01"), "no safetensors equivalent"),
    (np.ma.masked_array([1.0, 2.0], mask=[0, 1]), "mask"),
    (torch.zeros(2, dtype=torch.complex128), "complex128"),
    (torch.eye(2).to_sparse(), "to_dense"),
    (np.zeros(3, ml_dtypes.float4_e2m1fn), "even"),
])
def test_unsupported_leaves_are_refused_with_their_path(leaf, fix):
    state = {"optimizer": {"param_groups": [{"lr": 0.1, "foo": leaf}]}}
    for make in (split_state, snapshot):
        with pytest.raises(UnsupportedStateError) as caught:
            make(state)
        message = str(caught.value)
        assert message.startswith("state['optimizer']['param_groups'][0]['foo']: "), message
        assert fix in message
        assert isinstance(caught.value, SafeckptError)


def test_bad_keys_cycles_and_runaway_depth_are_refused():
    with pytest.raises(UnsupportedStateError, match=r"state\['d'\]: cannot store a dict key of <class 'tuple'>"):
        split_state({"d": {(1, 2): 3}})
    with pytest.raises(UnsupportedStateError, match="numpy keys"):
        split_state({np.int64(1): 3})
    loop: list = [1]
    loop.append({"again": loop})
    with pytest.raises(UnsupportedStateError, match=r"state\[1\]\['again'\]: contains itself"):
        split_state(loop)
    deep: list = []
    for _ in range(500):
        deep = [deep]
    with pytest.raises(UnsupportedStateError, match="nested more than 200 levels"):
        snapshot(deep)


# --- documents that do not fit ----------------------------------------------------

def test_documents_from_elsewhere_get_clear_errors():
    tensors, document = split_state({"w": np.ones(3, np.float32), "n": 1})
    with pytest.raises(StateFormatError, match="newer than this safeckpt reads.*upgrade"):
        join_state(tensors, {**document, "schema": SCHEMA_VERSION + 1})
    with pytest.raises(StateFormatError, match="no valid 'schema'"):
        join_state(tensors, {"tree": {}, "tensors": {}})
    with pytest.raises(StateFormatError, match=r"state\['w'\]: tensor 'w' is missing from the tensors"):
        join_state({}, document)
    with pytest.raises(StateFormatError, match="is F64 \\[3\\] but the document says F32 \\[3\\]"):
        join_state({"w": np.ones(3)}, document)
    for tree, problem in [({"__float__": "huge"}, "not a scalar"), ({"__int__": "12x"}, "not an integer"),
                          ({"__tensor__": "w", "x": 1}, "mixes a tag"), ({"__tensor__": "nope"}, "has no record"),
                          ({"__bytes__": "***"}, "not base64"), ({"__dict__": [[1]]}, "not a \\[key, value\\] pair")]:
        with pytest.raises(StateFormatError, match=problem):
            join_state(tensors, {**document, "tree": {"k": tree}})


def test_tensors_come_back_on_the_cpu_when_their_device_is_absent():
    tensors, document = split_state({"t": torch.ones(2), "j": jnp.ones(2)})
    document["tensors"]["t"]["device"] = "cuda:7"
    document["tensors"]["j"]["device"] = "tpu:3"
    back = join_state(tensors, document)
    if not (CUDA and torch.cuda.device_count() > 7):
        assert back["t"].device.type == "cpu"
    assert back["j"].devices() == {jax.devices("cpu")[0]}


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_tensors_keep_their_device_through_a_snapshot_and_files(tmp_path):
    on_gpu = torch.arange(6.0, device="cuda").reshape(2, 3)
    state = {"w": on_gpu, "same": on_gpu, "step": torch.tensor(4, device="cuda")}
    frozen = snapshot(state)
    assert frozen["w"].device.type == "cpu" and frozen["w"] is frozen["same"]
    on_gpu.add_(1)
    tensors, document = split_state(frozen)
    assert document["tensors"]["w"]["device"] == "cuda:0"
    back = join_state(safeckpt.load_file(_saved(tensors, tmp_path)), json.loads(json.dumps(document)))
    assert back["w"].device == torch.device("cuda:0") and back["w"] is back["same"]
    assert torch.equal(back["w"].cpu(), torch.arange(6.0).reshape(2, 3))


def _saved(tensors, tmp_path):
    safeckpt.save_file(tensors, tmp_path / "s.safetensors")
    return tmp_path / "s.safetensors"


# --- any tree of plain values -----------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.binary())
keys = st.one_of(st.text(), st.integers(), st.sampled_from(["__tensor__", "__dict__", "__int__"]))
trees = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner), st.dictionaries(keys, inner, max_size=4)), max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(trees)
def test_any_tree_of_plain_values_round_trips_through_json(tree):
    tensors, document = split_state(tree)
    assert tensors == {}
    assert_same(join_state({}, json.loads(json.dumps(document, allow_nan=False))), tree)
