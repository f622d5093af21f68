"""Keras files (.keras, .weights.h5, legacy .h5) read as a TensorSource, and their configs scanned.

The fixtures are made by the real Keras in one subprocess (tests/keras_fixtures.py):
tensorflow is never imported into the test process.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from safeckpt import errors
from safeckpt.ops.scan import keras_rules
from safeckpt.ops.scan.keras_rules import (
    archive_findings,
    config_findings,
    keras_findings,
)
from safeckpt.ops.scan.report import Finding
from safeckpt.sources import hdf5_reader
from safeckpt.sources.keras_file import KerasSource, is_hdf5, is_keras_zip
from safeckpt.sources.zip_archive import ZipArchive

pytest.importorskip("pyfive")
h5py = pytest.importorskip("h5py")  # only to craft hostile HDF5 files

GENERATOR = Path(__file__).with_name("keras_fixtures.py")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    if importlib.util.find_spec("keras") is None:  # found, never imported here (tensorflow)
        pytest.skip("keras is not installed")
    out = tmp_path_factory.mktemp("keras")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, str(GENERATOR), str(out)], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def expected(made: Path) -> dict:
    with np.load(made / "expected.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def layout(made: Path) -> dict:
    return json.loads((made / "expected.json").read_text())


def edited_keras(source: Path, target: Path, edit) -> Path:
    """A copy of a .keras archive whose config.json went through `edit(config) -> config`."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "config.json":
                data = json.dumps(edit(json.loads(data))).encode()
            zout.writestr(info, data)
    return target


def every_value(src: KerasSource) -> None:
    for name in src:
        src.read_checked(name)


# --- reading ------------------------------------------------------------------------

@pytest.mark.parametrize("file", ["m.keras", "m.weights.h5"])
def test_names_and_values_match_keras(made, expected, layout, file):
    with KerasSource(made / file) as src:
        layers = [n for n in src if not n.startswith("optimizer.")]
        if file.endswith(".keras"):  # the config gives the model's layer order
            assert layers == layout["m"]["names"]
        assert sorted(layers) == sorted(layout["m"]["names"])
        for name in src:
            array = src.read_checked(name)
            np.testing.assert_array_equal(array, expected[f"m.{name}"])
            assert not array.flags.writeable
        assert [n for n in src if n.startswith("optimizer.")] == \
            [f"optimizer.vars.{i}" for i in range(len(layout["m"]["optimizer"]))]
        assert src["conv.kernel"].dtype == "F32" and src["conv.kernel"].shape == (3, 3, 3, 4)
        assert src["optimizer.vars.0"].dtype == "I64"  # the iteration count


def test_keras_archive_tree_holds_config_and_metadata(made):
    with KerasSource(made / "m.keras") as src:
        assert src.format == "keras-zip"
        assert src.tree["metadata"]["keras_version"].startswith("3.")
        assert src.tree["config"]["class_name"] == "Functional"
        assert src.tree["attributes"]["/layers/conv2d/vars"] == {"name": "conv"}
        json.dumps(src.tree)
        assert "Keras .keras archive" in src.describe()


def test_stored_members_are_zero_copy_spans_of_the_file(made):
    data = (made / "m.keras").read_bytes()
    with KerasSource(made / "m.keras") as src:
        for name in src:
            span = src.file_span(name)
            assert span is not None and span.path == str(made / "m.keras")
            assert data[span.offset:span.offset + span.nbytes] == src.read(name).tobytes()


def test_a_deflated_keras_archive_is_inflated(made, expected, tmp_path):
    packed = tmp_path / "packed.keras"
    with zipfile.ZipFile(made / "m.keras") as zin, \
            zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    with KerasSource(packed) as src:
        assert src.file_span("dense.kernel") is None
        np.testing.assert_array_equal(src.read("dense.kernel"), expected["m.dense.kernel"])


@pytest.mark.parametrize("file", ["bf16.keras", "bf16.weights.h5"])
def test_bfloat16_variables(made, expected, layout, file):
    import ml_dtypes
    with KerasSource(made / file) as src:
        assert list(src) == layout["bf16"]["names"]
        for name in src:
            assert src[name].dtype == "BF16"
            array = src.read_checked(name)
            assert array.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(array.astype(np.float32), expected[f"bf16.{name}"])


@pytest.mark.parametrize("file", ["rnn.keras", "rnn.weights.h5"])
def test_variables_of_attributes(made, expected, layout, file):
    with KerasSource(made / file) as src:
        assert sorted(src) == sorted(layout["rnn"]["names"])
        for name in src:
            np.testing.assert_array_equal(src.read(name), expected[f"rnn.{name}"])
        if file.endswith(".keras"):  # layers in the model's order (a layer's parts in HDF5 order)
            layers = [name.split(".")[0] for name in src]
            assert sorted(set(layers), key=layers.index) == ["lstm", "attention", "head"]


def test_names_from_the_config_where_the_file_stores_none(made, expected, layout, tmp_path):
    # Keras before 3.10 wrote no `name` attribute: layers are matched to the config by
    # position and class (a nested Sequential's InputLayer is not saved)
    weights = tmp_path / "model.weights.h5"
    with zipfile.ZipFile(made / "m.keras") as z:
        weights.write_bytes(z.read("model.weights.h5"))
    with h5py.File(weights, "a") as f:
        groups = []
        f.visit(lambda name: groups.append(name) if name.endswith("vars") else None)
        for name in groups:
            del f[name].attrs["name"]
    older = tmp_path / "older.keras"
    with zipfile.ZipFile(made / "m.keras") as zin, zipfile.ZipFile(older, "w") as zout:
        for info in zin.infolist():
            data = weights.read_bytes() if info.filename == "model.weights.h5" else zin.read(info)
            zout.writestr(info, data)
    with KerasSource(older) as src:
        assert src.tree["attributes"].get("/layers/conv2d/vars") is None
        assert [n for n in src if not n.startswith("optimizer.")] == layout["m"]["names"]
        for name in layout["m"]["names"]:
            np.testing.assert_array_equal(src.read(name), expected[f"m.{name}"])


def test_raw_names_are_the_hdf5_paths(made, expected):
    with KerasSource(made / "m.keras", raw_names=True) as src:
        assert "layers.conv2d.vars.0" in src and "optimizer.vars.1" in src
        np.testing.assert_array_equal(src.read("layers.sequential.layers.dense.vars.0"),
                                      expected["m.block.inner_a.kernel"])


def test_without_a_config_only_certain_variable_names_are_given(made):
    # m.weights.h5 has no config: inner_b (a Dense without bias) is still certain,
    # a BatchNormalization with 3 of its 4 variables would not be
    with KerasSource(made / "m.weights.h5") as src:
        assert "block.inner_b.kernel" in src


def test_legacy_h5_model(made, expected, layout):
    with KerasSource(made / "m.h5") as src:
        assert src.format == "keras-legacy-h5"
        assert sorted(n for n in src if not n.startswith("optimizer.")) == sorted(layout["m"]["names"])
        for name in layout["m"]["names"]:
            np.testing.assert_array_equal(src.read_checked(name), expected[f"m.{name}"])
        for i, variable in enumerate(layout["m"]["optimizer"]):
            np.testing.assert_array_equal(src.read(f"optimizer.adam.{variable}"),
                                          expected[f"m.optimizer.vars.{i}"])
        assert src.tree["config"]["class_name"] == "Functional"


def test_detection_helpers(made):
    with zipfile.ZipFile(made / "m.keras") as z:
        assert is_keras_zip(z.namelist())
    assert not is_keras_zip(["config.json", "model.weights.h5"])
    assert not is_keras_zip(["archive/data.pkl", "archive/version"])
    head = (made / "m.weights.h5").read_bytes()[:4096]
    assert is_hdf5(head)
    assert not is_hdf5(b"PK\x03\x04" + bytes(4092))


def test_hdf5_after_a_user_block(tmp_path):
    path = tmp_path / "ub.h5"
    with h5py.File(path, "w", userblock_size=1024) as f:
        f.create_dataset("layers/dense/vars/0", data=np.arange(6, dtype="<f4").reshape(2, 3))
    data = path.read_bytes()
    assert is_hdf5(data[:4096]) and data[:8] != hdf5_reader.HDF5_SIGNATURE
    with KerasSource(path) as src:
        np.testing.assert_array_equal(src.read("dense.kernel"), np.arange(6).reshape(2, 3))
        span = src.file_span("dense.kernel")
        assert data[span.offset:span.offset + span.nbytes] == np.arange(6, dtype="<f4").tobytes()


# --- bounds on hostile HDF5 -------------------------------------------------------------

def test_compressed_datasets_are_read_within_a_limit(tmp_path, monkeypatch):
    path = tmp_path / "gz.weights.h5"
    values = np.arange(1000, dtype="<f4").reshape(10, 100)
    with h5py.File(path, "w") as f:
        f.create_dataset("layers/dense/vars/0", data=values, compression="gzip", chunks=(5, 50))
    with KerasSource(path) as src:
        np.testing.assert_array_equal(src.read_checked("dense.kernel"), values)
        assert src.file_span("dense.kernel") is None
        monkeypatch.setattr(hdf5_reader, "MAX_DECODED_BYTES", 1000)
        with pytest.raises(errors.SourceError, match="MAX_DECODED_BYTES"):
            src.read("dense.kernel")


def test_data_past_the_end_of_the_file(made, tmp_path):
    data = (made / "m.weights.h5").read_bytes()
    with KerasSource(made / "m.weights.h5") as src:
        span = src.file_span("dense.kernel")
    address = struct.pack("<Q", span.offset)
    assert data.count(address) == 1  # the layout message's data address
    moved = tmp_path / "moved.weights.h5"
    moved.write_bytes(data.replace(address, struct.pack("<Q", len(data) - 16)))
    with KerasSource(moved) as src:
        with pytest.raises(errors.SourceError, match="past the end") as caught:
            src.read("dense.kernel")
        assert str(moved) in str(caught.value) and "dense.kernel" in str(caught.value)


def test_huge_declared_shapes_are_refused_before_reading(tmp_path):
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:  # neither is written: HDF5 allocates nothing
        f.create_dataset("layers/dense/vars/0", shape=(1 << 40,), dtype="<f4")
        f.create_dataset("layers/dense/vars/1", shape=(1 << 40,), dtype="<f4", chunks=(1 << 20,))
    with KerasSource(path) as src:
        assert src["dense.kernel"].nbytes == 4 << 40
        with pytest.raises(errors.SourceError, match="past the end"):
            src.read("dense.kernel")
        with pytest.raises(errors.SourceError, match="MAX_DECODED_BYTES"):
            src.read("dense.bias")


def test_deep_nesting_and_many_objects_are_refused(tmp_path, monkeypatch):
    deep = tmp_path / "deep.h5"
    with h5py.File(deep, "w") as f:
        f.create_group("/".join(["g"] * (hdf5_reader.MAX_DEPTH + 2)))
    with pytest.raises(errors.SourceError, match="nest deeper"):
        KerasSource(deep)
    many = tmp_path / "many.h5"
    with h5py.File(many, "w") as f:
        for i in range(50):
            f.create_dataset(f"layers/dense_{i}/vars/0", data=np.zeros(2, "<f4"))
    monkeypatch.setattr(hdf5_reader, "MAX_OBJECTS", 40)
    with pytest.raises(errors.SourceError, match="MAX_OBJECTS"):
        KerasSource(many)


def test_a_group_linked_into_itself_is_walked_once(tmp_path):
    path = tmp_path / "loop.h5"
    with h5py.File(path, "w") as f:
        group = f.create_group("layers/dense/vars")
        group.create_dataset("0", data=np.ones(3, "<f4"))
        f["layers/dense/loop"] = f["layers"]
    with KerasSource(path) as src:
        assert list(src) == ["dense.kernel"]
        assert any("linked twice" in note for note in src.notes)


def test_datasets_that_are_not_numbers_are_left_out(tmp_path):
    path = tmp_path / "text.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("layers/dense/vars/0", data=np.ones(3, "<f4"))
        f.create_dataset("vocabulary", data=np.array([b"a", b"bc"]))
    with KerasSource(path) as src:
        assert list(src) == ["dense.kernel"]
        assert any("vocabulary" in note for note in src.notes)


def test_not_a_keras_file(tmp_path):
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("config.json", "{}")
    with pytest.raises(errors.SourceError, match="not a Keras"):
        KerasSource(other)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(errors.SourceError, match="neither a zip archive nor HDF5"):
        KerasSource(text)


def test_npz_weights_are_refused_clearly(made, tmp_path):
    npz = tmp_path / "npz.keras"
    with zipfile.ZipFile(made / "m.keras") as zin, zipfile.ZipFile(npz, "w") as zout:
        for info in zin.infolist():
            name = "model.weights.npz" if info.filename == "model.weights.h5" else info.filename
            zout.writestr(name, zin.read(info))
    with pytest.raises(errors.SourceError, match="model.weights.npz"):
        KerasSource(npz)


def _mutants(data: bytes, seed: int, count: int):
    rng = random.Random(seed)
    for cut in sorted({0, 8, 64, 96, 512, 800, 2048, len(data) // 2, len(data) - 1}):
        yield data[:cut]
    for _ in range(count):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(min(len(data), 4096) if rng.random() < 0.8 else len(data))
            mutated[at] = rng.randrange(256)
        yield bytes(mutated)


@pytest.mark.parametrize("file", ["m.weights.h5", "bf16.keras", "m.h5"])
def test_hostile_bytes_raise_only_safeckpt_errors(made, tmp_path, file):
    data = (made / file).read_bytes()
    path = tmp_path / file
    opened = 0
    for mutated in _mutants(data, seed=len(file), count=150):
        path.write_bytes(mutated)
        try:
            with KerasSource(path) as src:
                every_value(src)
                json.dumps(src.tree)
            opened += 1
        except errors.SafeckptError as exc:
            assert str(path) in str(exc)
        try:
            keras_findings(path)
        except errors.SafeckptError:
            pass
    assert opened > 0  # many flips land in unused bytes


# --- scanning the config -----------------------------------------------------------------

def test_normal_models_are_clean(made):
    for file in ("m.keras", "m.h5", "m.weights.h5", "bf16.keras", "rnn.keras"):
        assert keras_findings(made / file) == [], file


def test_lambda_layers_are_malicious(made):
    found = keras_findings(made / "lambda.keras")
    assert [(f.severity, f.kind, f.member) for f in found] == [("malicious", "keras-lambda", "config.json")]
    assert "config.layers[" in found[0].what
    assert all(isinstance(f, Finding) for f in found)


def _add_to_first_dense(entry):
    def edit(config):
        layers = config["config"]["layers"]
        dense = next(layer for layer in layers if layer["class_name"] == "Dense")
        dense["config"]["activation"] = entry
        return config
    return edit


@pytest.mark.parametrize("entry, what", [
    ({"module": "os", "class_name": "system", "config": {"command": "echo hi"}, "registered_name": None},
     "os.system"),
    ({"module": "builtins", "class_name": "function", "config": "eval", "registered_name": "function"},
     "builtins.eval"),
    ({"module": "subprocess", "class_name": "Popen", "config": {}, "registered_name": None},
     "subprocess.Popen"),
    ({"module": "functools", "class_name": "partial", "config": {}, "registered_name": None},
     "functools.partial"),
    ({"module": "keras.src.utils.file_utils", "class_name": "function", "config": "get_file",
      "registered_name": "function"}, "keras.src.utils.file_utils.get_file"),
])
def test_callables_outside_keras_are_malicious(made, tmp_path, entry, what):
    path = edited_keras(made / "bf16.keras", tmp_path / "evil.keras", _add_to_first_dense(entry))
    found = keras_findings(path)
    assert [(f.severity, f.what) for f in found] == [("malicious", what)]
    assert "activation" in found[0].why
    with KerasSource(path) as src:  # reading the weights runs nothing either
        assert len(src) == 4


def test_a_class_of_your_own_is_suspicious(made, tmp_path):
    entry = {"module": "my_project.activations", "class_name": "function", "config": "swishy",
             "registered_name": "function"}
    path = edited_keras(made / "bf16.keras", tmp_path / "custom.keras", _add_to_first_dense(entry))
    assert [(f.severity, f.kind) for f in keras_findings(path)] == [("suspicious", "unknown-global")]


def test_keras2_lambda_and_bad_json():
    legacy = {"class_name": "Sequential", "config": {"layers": [
        {"class_name": "Lambda", "config": {"name": "l", "function": ["4wEAAAAAAAAA", None, None],
                                            "function_type": "lambda"}}]}}
    assert [f.kind for f in config_findings(legacy, "<model_config attribute>")] == ["keras-lambda"]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("metadata.json", "{}")
        z.writestr("config.json", "{not json")
        z.writestr("model.weights.h5", b"")
    archive = ZipArchive(buffer.getvalue(), "x.keras")
    assert [(f.severity, f.kind) for f in archive_findings(archive, None)] == \
        [("suspicious", "keras-config-unreadable")]


def test_findings_are_bounded():
    config = {"layers": [{"class_name": "__lambda__", "config": {}}] * (keras_rules.MAX_KERAS_FINDINGS + 5)}
    assert len(config_findings(config)) == keras_rules.MAX_KERAS_FINDINGS


# --- through the rest of safeckpt: found by content, scanned, converted ------------------------

def test_open_source_scan_and_convert_find_keras_files_by_content(made, expected, tmp_path):
    import shutil

    import safeckpt

    for file in ("m.keras", "m.weights.h5"):
        renamed = tmp_path / (file + ".bin")  # the name says nothing: the content does
        shutil.copyfile(made / file, renamed)
        with safeckpt.open_source(renamed) as source:
            assert isinstance(source, KerasSource)
            names = source.keys()
        assert safeckpt.scan(renamed).verdict == "safe", file
        out = tmp_path / (file + ".safetensors")
        safeckpt.convert(renamed, out)
        from safeckpt.numpy import load_file
        assert sorted(load_file(out)) == sorted(names)
    report = safeckpt.scan(made / "lambda.keras")
    assert report.verdict == "malicious" and any(f.kind == "keras-lambda" for f in report.findings)
