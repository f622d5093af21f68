"""What every TensorSource answers: where a tensor's bytes lie, which files it reads, checked reads."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

st_save_file = pytest.importorskip("safetensors.numpy").save_file  # files made by the real library

import safeckpt
from safeckpt import errors
from safeckpt.format.header import HeaderEntry
from safeckpt.sources import open_source
from safeckpt.sources.base import FileSpan, TensorInfo, TensorSource


def sharded_model(tmp_path):
    """Two safetensors shards written by the real library, and their index."""
    st_save_file({"a": np.arange(3, dtype=np.float32), "c": np.ones((2, 2), np.float16)},
                 str(tmp_path / "model-00001-of-00002.safetensors"))
    st_save_file({"b": np.array([5, -6], np.int8)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {"total_size": 22}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
        "c": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path / "model.safetensors.index.json"


def bytes_at(span: FileSpan) -> bytes:
    with open(span.path, "rb") as f:
        f.seek(span.offset)
        return f.read(span.nbytes)


def test_file_span_of_a_safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    st_save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.int64)}, str(path))
    with open_source(path) as source:
        assert source.files() == [str(path)]
        for name in source:
            span = source.file_span(name)
            assert span.path == str(path) and span.nbytes == source[name].nbytes
            assert bytes_at(span) == source.read(name).tobytes()


def test_a_sharded_source_names_each_shards_file(tmp_path):
    index = sharded_model(tmp_path)
    with open_source(index) as source:
        assert source.files() == [str(tmp_path / "model-00001-of-00002.safetensors"),
                                  str(tmp_path / "model-00002-of-00002.safetensors")]
        for name, shard in (("a", "model-00001-of-00002.safetensors"), ("b", "model-00002-of-00002.safetensors"),
                            ("c", "model-00001-of-00002.safetensors")):
            span = source.file_span(name)
            assert span.path == str(tmp_path / shard)
            assert bytes_at(span) == source.read(name).tobytes()
        with pytest.raises(errors.TensorNotFoundError):
            source.file_span("missing")


def test_a_sharded_source_converts_from_its_shards(tmp_path):
    index = sharded_model(tmp_path)
    safeckpt.convert(index, tmp_path / "whole.safetensors")
    got = safeckpt.load_file(tmp_path / "whole.safetensors")
    np.testing.assert_array_equal(got["a"], np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(got["b"], np.array([5, -6], np.int8))
    np.testing.assert_array_equal(got["c"], np.ones((2, 2), np.float16))


class Listed(TensorSource):
    """A source whose listing and values are given: to check what `read_checked` accepts."""

    format = "test"

    def __init__(self, infos: dict, values: dict) -> None:
        super().__init__("listed.bin")
        self._infos, self.values = infos, values

    @property
    def infos(self) -> dict:
        return self._infos

    def read(self, name: str):
        return self.values[name]


def test_read_checked_gives_what_the_listing_says():
    source = Listed({"w": TensorInfo("F32", (2,), 8), "big": TensorInfo("F32", (2,), 8),
                     "f6": TensorInfo("F6_E2M3", (4,), 3)},
                    {"w": np.ones(2, np.float32), "big": np.ones(2, ">f4"), "f6": np.zeros(3, np.uint8)})
    assert source.read_checked("w").tolist() == [1.0, 1.0]
    assert source.read_checked("big").dtype == np.dtype(">f4")  # byte order is the reader's to fix
    assert source.read_checked("f6").nbytes == 3  # packed bytes: no numpy dtype to compare


@pytest.mark.parametrize("value, got", [
    (np.ones(3, np.float32), "float32[3]"),
    (np.ones(2, np.float64), "float64[2]"),
    ([1.0, 1.0], "list"),
])
def test_read_checked_refuses_what_the_listing_does_not_say(value, got):
    source = Listed({"w": TensorInfo("F32", (2,), 8)}, {"w": value})
    with pytest.raises(errors.SourceError, match="the source listed F32\\[2\\] but gave " + re.escape(got)) as caught:
        source.read_checked("w")
    assert caught.value.path == "listed.bin" and caught.value.tensor == "w"


def test_one_name_for_each_tensor_record():
    assert safeckpt.TensorInfo is TensorInfo  # what a source lists: dtype, shape, nbytes
    assert safeckpt.HeaderEntry is HeaderEntry  # what a safetensors header says: dtype, shape, data_offsets
    assert HeaderEntry._fields == ("dtype", "shape", "data_offsets")
    assert TensorInfo._fields == ("dtype", "shape", "nbytes")
