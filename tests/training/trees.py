"""State trees compared exactly, and the round trip a checkpoint makes them take.

    >>> assert_same(through_files(training_state(model, optimizer), tmp_path), training_state(model, optimizer))
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Mapping

import numpy as np

import safeckpt
from safeckpt.training import join_state, split_state
from safeckpt.training.state import kept_kind

from tests.files import tensor_bytes


def _instance_of(value, module: str, name: str) -> bool:
    """isinstance(value, module.name) without importing `module`: a value of its type means it is loaded."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(value, getattr(loaded, name))


def assert_same(actual, expected, where: str = "state") -> None:
    """Equal values of the same types: containers, key types and order, dtypes, devices, bits."""
    if isinstance(expected, Mapping) and not _instance_of(expected, "omegaconf", "DictConfig"):
        # the container types a state keeps come back as themselves, other mappings as dicts
        assert type(actual) is (type(expected) if kept_kind(expected) else dict), where
        assert getattr(actual, "_metadata", None) == getattr(expected, "_metadata", None), where
        assert [(type(k), k) for k in actual] == [(type(k), k) for k in expected], where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is (tuple if isinstance(expected, tuple) else list), where
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{index}]")
    elif _instance_of(expected, "torch", "Tensor"):
        assert type(actual) is type(expected), where
        assert (actual.dtype, actual.shape, actual.device) == (expected.dtype, expected.shape, expected.device), where
        assert actual.requires_grad == expected.requires_grad, where
        assert tensor_bytes(actual) == tensor_bytes(expected), where
    elif isinstance(expected, (np.ndarray, np.generic)):
        assert type(actual) is type(expected), where
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), where
        assert np.asarray(actual).tobytes() == np.asarray(expected).tobytes(), where
    elif _instance_of(expected, "jax", "Array"):
        assert _instance_of(actual, "jax", "Array"), where
        assert (actual.dtype, actual.shape, actual.devices()) == (expected.dtype, expected.shape, expected.devices())
        assert np.asarray(actual).tobytes() == np.asarray(expected).tobytes(), where
    elif isinstance(expected, float):
        assert type(actual) is float, where
        assert (math.isnan(actual) and math.isnan(expected)) or \
            struct.pack("<d", actual) == struct.pack("<d", expected), where
    else:
        assert type(actual) is type(expected) and actual == expected, where


def through_files(state, tmp_path):
    """split -> safeckpt.save_file + json -> load_file + json -> join, as a checkpoint does."""
    tensors, document = split_state(state)
    safeckpt.save_file(tensors, tmp_path / "state.safetensors")
    (tmp_path / "state.json").write_text(json.dumps(document, allow_nan=False))
    loaded = safeckpt.load_file(tmp_path / "state.safetensors")
    return join_state(loaded, json.loads((tmp_path / "state.json").read_text()))
