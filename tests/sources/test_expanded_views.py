"""Torch views whose size x stride reach fewer elements than they hold (``expand``, overlapping
``as_strided``): small ones are read as torch reads them; past `torch_file.MAX_EXPANDED_BYTES`
(all the expanded views of a file together) they stay listed but reading one is refused, so that
no convert, cast, merge or diff writes terabytes or asks for them in memory.
"""

from __future__ import annotations

import numpy as np
import pytest

import safeckpt
from safeckpt import errors
from safeckpt.sources import torch_file

torch = pytest.importorskip("torch")

TIB = 4 << 40  # 2**40 float32 elements

# expanded (tests/conftest.py): torch.save of a 4-byte storage expanded by stride 0 to 2**40 elements.


def test_an_expanded_view_is_listed_but_refused_on_read(expanded):
    with safeckpt.open_source(expanded) as source:
        assert source["w"].nbytes == TIB and source["w"].shape == (2**40,)
        assert any(note.startswith("w: a view of 4 bytes expanded") for note in source.notes)
        np.testing.assert_array_equal(source.read("b"), np.ones(3, np.float32))
        with pytest.raises(errors.SourceError) as caught:
            source.read("w")
    message = str(caught.value)
    assert caught.value.tensor == "w" and str(expanded) in message
    assert "a view of 4 bytes expanded to 4,398,046,511,104 bytes by stride 0: refused" in message
    assert "MAX_EXPANDED_BYTES" in message and "--exclude" in message


@pytest.mark.parametrize("op", ["convert", "cast", "merge"])
def test_writing_ops_refuse_it_and_write_nothing(expanded, tmp_path, op):
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    run = {"convert": lambda: safeckpt.convert(expanded, out),
           "cast": lambda: safeckpt.cast(expanded, out, "bf16"),
           "merge": lambda: safeckpt.merge([expanded, expanded], out)}[op]
    with pytest.raises(errors.SourceError, match="tensor 'w'.*stride 0"):
        run()
    assert list(out.parent.iterdir()) == []  # no output, no temporary file left


def test_diff_refuses_it_instead_of_allocating(expanded):
    with pytest.raises(errors.SourceError, match="tensor 'w'.*stride 0"):
        safeckpt.diff(expanded, expanded)


def test_convert_without_it(expanded, tmp_path):
    report = safeckpt.convert(expanded, tmp_path / "model.safetensors", exclude="w")
    assert report.tensors == 1
    assert list(safeckpt.load_file(tmp_path / "model.safetensors")) == ["b"]


def test_small_expanded_and_overlapping_views_are_read_as_torch_reads_them(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    views = {"row": base[2:5].expand(4, 3), "column": base[:4].view(4, 1).expand(4, 6),
             "windows": base.as_strided((5, 4), (2, 1)),  # overlapping strides
             "plain": base[1:9].view(2, 4)}
    path = tmp_path / "views.pt"
    torch.save(views, path)
    with safeckpt.open_source(path) as source:
        assert not source.notes
        for name, view in views.items():
            np.testing.assert_array_equal(source.read(name), view.contiguous().numpy())
    safeckpt.convert(path, tmp_path / "views.safetensors")
    loaded = safeckpt.load_file(tmp_path / "views.safetensors")
    assert all(np.array_equal(loaded[name], view.numpy()) for name, view in views.items())


def test_the_limit_counts_every_expanded_view_of_the_file(tmp_path, monkeypatch):
    """Many views of one storage, each small, add up: past the budget the rest are refused."""
    monkeypatch.setattr(torch_file, "MAX_EXPANDED_BYTES", 1000)
    storage = torch.zeros(4)
    views = {f"v{i}": storage[i:i + 1].expand(100) for i in range(4)}  # 400 bytes each; a tied name is free
    views["tied"] = views["v0"]
    views["windows"] = torch.arange(8.0).as_strided((30, 4), (0, 1))  # 480 bytes over 16
    path = tmp_path / "many.pt"
    torch.save(views, path)
    with safeckpt.open_source(path) as source:
        assert source.aliases == {"tied": "v0"}
        for name in ("v0", "v1", "tied"):
            assert source.read(name).shape == (100,)
        for name, how in (("v2", "stride 0"), ("v3", "stride 0"), ("windows", "stride 0")):
            with pytest.raises(errors.SourceError, match=how):
                source.read(name)


def test_overlapping_strides_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_file, "MAX_EXPANDED_BYTES", 0)
    path = tmp_path / "overlap.pt"
    torch.save({"w": torch.arange(10.0).as_strided((5, 5), (1, 1))}, path)
    with safeckpt.open_source(path) as source, \
            pytest.raises(errors.SourceError, match="a view of 36 bytes expanded to 100 bytes by overlapping strides"):
        source.read("w")
