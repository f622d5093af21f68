"""The container types training frameworks put in checkpoints come back as themselves; classes by name only."""

from __future__ import annotations

import argparse
import json
import warnings
from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch")

from safeckpt.errors import StateFormatError
from safeckpt.training import join_state, snapshot, split_state
from safeckpt.training.state import KEPT_TYPES

from tests.training.trees import assert_same, through_files


def lightning_hparams():
    data = pytest.importorskip("lightning.fabric.utilities.data")
    return data.AttributeDict(lr=0.1, betas=(0.9, 0.99), layers=[2, 3])


def test_a_state_dict_keeps_its_type_and_torch_metadata(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    state = {"state_dict": model.state_dict()}
    assert state["state_dict"]._metadata  # torch's module versions, read by load_state_dict
    for back in (through_files(state, tmp_path), snapshot(state)):
        assert type(back["state_dict"]) is OrderedDict
        assert back["state_dict"]._metadata == state["state_dict"]._metadata
        assert_same(back, state)
    tensors, document = split_state(state)
    assert "state_dict/0.weight" in tensors  # tensors keep the names of their path
    assert document["schema"] == 2


def test_namespace_attribute_dict_and_torch_size_come_back_as_themselves(tmp_path):
    hparams = lightning_hparams()
    state = {"hyper_parameters": argparse.Namespace(lr=0.1, name="run", sizes=[1, 2]),
             "hparams": hparams, "shape": torch.Size([2, 3]), "w": torch.ones(2)}
    for back in (through_files(state, tmp_path), snapshot(state)):
        assert type(back["hyper_parameters"]) is argparse.Namespace
        assert vars(back["hyper_parameters"]) == vars(state["hyper_parameters"])
        assert type(back["hparams"]) is type(hparams) and back["hparams"] == hparams
        assert back["hparams"]["betas"] == (0.9, 0.99) and type(back["hparams"]["betas"]) is tuple
        assert type(back["shape"]) is torch.Size and back["shape"] == torch.Size([2, 3])


def test_omegaconf_configs_keep_interpolations_unresolved(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    config = omegaconf.OmegaConf.create({"lr": 0.1, "model": {"width": 4, "doubled": "${model.width}"},
                                         "layers": [1, 2], "todo": "???"})
    state = {"config": config, "list": omegaconf.OmegaConf.create([1, {"a": 2}])}
    back = through_files(state, tmp_path)
    assert type(back["config"]) is omegaconf.DictConfig and type(back["list"]) is omegaconf.ListConfig
    assert omegaconf.OmegaConf.to_container(back["config"], resolve=False) == \
        omegaconf.OmegaConf.to_container(config, resolve=False)
    assert back["config"].model.doubled == 4  # still an interpolation, resolved on access
    assert omegaconf.OmegaConf.is_missing(back["config"], "todo")
    assert list(back["list"]) == [1, {"a": 2}]


def test_classes_are_stored_by_name_and_only_known_ones_come_back_as_classes(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")

    class Local:
        pass

    state = {"hparams_type": omegaconf.DictConfig, "plain": dict, "namespace": argparse.Namespace,
             "other": Local}
    tensors, document = split_state(state)
    assert document["tree"]["other"] == {"__type__": f"{Local.__module__}.{Local.__qualname__}"}
    with pytest.warns(UserWarning, match="comes back as its name"):
        back = join_state(tensors, json.loads(json.dumps(document)))
    assert back["hparams_type"] is omegaconf.DictConfig and back["plain"] is dict
    assert back["namespace"] is argparse.Namespace
    assert back["other"] == f"{Local.__module__}.{Local.__qualname__}"


def test_a_class_named_in_a_file_is_never_imported(tmp_path):
    canary = tmp_path / "imported"
    document = {"schema": 2, "tensors": {}, "tree": {"t": {"__type__": "os.system"},
                                                     "o": {"__object__": ["os.system", {"x": f"touch {canary}"}]}}}
    with pytest.raises(StateFormatError, match="not \\[kind, parts\\] of a kind this safeckpt keeps"):
        join_state({}, document)
    del document["tree"]["o"]
    with pytest.warns(UserWarning):
        assert join_state({}, document) == {"t": "os.system"}
    assert not canary.exists()


def test_plain_states_keep_schema_1_and_old_documents_keep_their_keys():
    tensors, document = split_state({"step": 3, "w": torch.ones(1), "d": {"k": (1, 2)}})
    assert document["schema"] == 1  # nothing needed the new tags: older readers still read it
    old = {"schema": 1, "tensors": {}, "tree": {"__object__": ["argparse.Namespace", {}]}}
    assert join_state({}, old) == {"__object__": ["argparse.Namespace", {}]}  # an ordinary key in schema 1


@pytest.mark.parametrize("body", [
    "argparse.Namespace", ["argparse.Namespace"], ["argparse.Namespace", [1, 2]],
    ["argparse.Namespace", {"__dict__": [[1, 2]]}], ["torch.Size", {"a": 1}], ["torch.Size", ["x"]],
    ["collections.OrderedDict", {"a": 1}, {"__tensor__": "missing"}], ["nope", {}],
])
def test_malformed_objects_are_state_format_errors(body):
    with pytest.raises(StateFormatError):
        join_state({}, {"schema": 2, "tensors": {}, "tree": {"x": {"__object__": body}}})


def test_every_kept_type_is_named_by_its_module():
    for kind, kept in KEPT_TYPES.items():
        assert kind.split(".")[0] == kept.module and kind.endswith("." + kept.qualname)


def test_no_warning_for_plain_round_trips(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        through_files({"a": OrderedDict(x=1), "n": argparse.Namespace(y=2)}, tmp_path)
