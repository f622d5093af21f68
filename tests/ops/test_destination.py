"""No op writes over one of its inputs, nor over an existing file unless asked (ops/destination.py)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

import safeckpt
from safeckpt import errors
from safeckpt.format import atomic
from safeckpt.ops import convert as convert_module
from safeckpt.ops.merge import merger as merge_module

torch = pytest.importorskip("torch")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def lightning_like(tmp_path) -> Path:
    path = tmp_path / "victim.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3, 4)}, "optimizer_states": [{"state": {}}], "epoch": 3}, path)
    return path


@pytest.fixture
def never_read(monkeypatch):
    """Fail the test if any input is opened: refusals come before reading."""
    def refuse(*args, **kwargs):
        raise AssertionError("an input was opened before the destination was checked")
    for module in (convert_module, merge_module):
        monkeypatch.setattr(module, "open_checked", refuse)
        monkeypatch.setattr(module, "check_safety", refuse)


def spellings(tmp_path: Path, victim: Path) -> list[Path]:
    """The same file under other names: itself, relative with ``..``, a symlink, a hard link."""
    link, hard = tmp_path / "link.safetensors", tmp_path / "hard.ckpt"
    link.symlink_to(victim)
    os.link(victim, hard)
    roundabout = tmp_path / ".." / tmp_path.name / "sub" / ".." / victim.name
    (tmp_path / "sub").mkdir()
    return [victim, roundabout, link, hard]


def test_convert_refuses_its_input_under_every_spelling(tmp_path, lightning_like, never_read):
    for dst in spellings(tmp_path, lightning_like):
        before = snapshot(tmp_path)
        for overwrite in (False, True):
            with pytest.raises(errors.OutputIsInputError, match="is (an|the) input") as caught:
                safeckpt.convert(lightning_like, dst, overwrite=overwrite)
            assert isinstance(caught.value, OSError) and "\n" not in str(caught.value)
        assert snapshot(tmp_path) == before


def test_cast_and_merge_refuse_their_inputs(tmp_path, never_read):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    safeckpt.save_file({"w": np.ones(4, np.float32)}, a)
    safeckpt.save_file({"w": np.zeros(4, np.float32)}, b)
    before = snapshot(tmp_path)
    with pytest.raises(errors.OutputIsInputError):
        safeckpt.cast(a, a, "bf16", overwrite=True)
    with pytest.raises(errors.OutputIsInputError):
        safeckpt.merge([a, b], a, overwrite=True)
    with pytest.raises(errors.OutputIsInputError):
        safeckpt.merge([a], b, "task-arithmetic", base=b, overwrite=True)  # the base is an input too
    assert snapshot(tmp_path) == before


def sharded_model(folder: Path) -> Path:
    folder.mkdir()
    safeckpt.save_file({"a": np.ones(4, np.float32)}, folder / "model-00001-of-00002.safetensors")
    safeckpt.save_file({"b": np.ones(4, np.float32)}, folder / "model-00002-of-00002.safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 32}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return index


@pytest.mark.parametrize("given", ["index", "folder"])
def test_a_shard_or_the_index_of_an_input_is_refused(tmp_path, given, never_read):
    index = sharded_model(tmp_path / "m")
    source = index if given == "index" else index.parent
    before = snapshot(tmp_path)
    for dst in (index.parent / "model-00002-of-00002.safetensors", index):
        with pytest.raises(errors.OutputIsInputError):
            safeckpt.convert(source, dst, overwrite=True)
    with pytest.raises(errors.OutputIsInputError):  # a sharded write into the input's own folder
        safeckpt.convert(source, index.parent, shard_size="16B", overwrite=True)
    assert snapshot(tmp_path) == before


def test_an_existing_output_needs_overwrite(tmp_path, lightning_like, never_read, monkeypatch):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(errors.OutputExistsError, match="already exists.*--force") as caught:
        safeckpt.convert(lightning_like, out)
    assert isinstance(caught.value, FileExistsError) and out.read_bytes() == b"precious"
    monkeypatch.undo()
    report = safeckpt.convert(lightning_like, out, overwrite=True)
    assert report.outputs == [str(out)] and safeckpt.load_file(out)["w"].shape == (3, 4)


def test_existing_shards_of_a_sharded_output_need_overwrite(tmp_path, lightning_like):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model-00001-of-00003.safetensors").write_bytes(b"old shard")
    with pytest.raises(errors.OutputExistsError, match="model-00001-of-00003"):
        safeckpt.convert(lightning_like, tmp_path / "out", shard_size="1KB")
    safeckpt.convert(lightning_like, tmp_path / "out")  # unsharded, it replaces nothing


def test_a_pickle_name_for_safetensors_content_warns(tmp_path, lightning_like):
    with pytest.warns(UserWarning, match=r"under a \.pt name"):
        safeckpt.convert(lightning_like, tmp_path / "weights.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        safeckpt.convert(lightning_like, tmp_path / "weights.safetensors")


def test_save_file_keeps_safetensors_overwrite_semantics(tmp_path):
    path = tmp_path / "m.safetensors"
    safeckpt.save_file({"w": np.ones(2, np.float32)}, path)
    safeckpt.save_file({"w": np.zeros(2, np.float32)}, path)
    assert safeckpt.load_file(path)["w"].tolist() == [0.0, 0.0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_named_before_reading(tmp_path, lightning_like, never_read):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(errors.OutputNotWritableError, match=f"^cannot write {folder}: permission denied$"):
            safeckpt.convert(lightning_like, folder / "out.safetensors")
    finally:
        folder.chmod(0o755)


def test_write_errors_never_show_temporary_names(tmp_path, monkeypatch):
    real_open = os.open

    def denied(path, flags, *args):
        if ".tmp" in os.fspath(path):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(errors.OutputNotWritableError) as caught:
        with atomic.atomic_output(str(tmp_path / "m.safetensors")):
            pass
    assert str(caught.value) == f"cannot write {tmp_path}: permission denied"
    assert ".tmp" not in str(caught.value) and os.listdir(tmp_path) == []
