"""diff: real checkpoints made with torch / safetensors, stats checked against plain float64 numpy."""

from __future__ import annotations

import json
import math
import sys

import ml_dtypes
import numpy as np
import pytest

import safeckpt
from safeckpt.ops.diff import compare as diff_module
from safeckpt.ops.diff import sums as diff_sums
from safeckpt.ops.diff import DiffReport, diff
from safeckpt.ops.diff.plot import LayerName, layer_of, plot_diff
from safeckpt.sources import open_source

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")


def reference(a: np.ndarray, b: np.ndarray) -> dict:
    """The stats, the obvious way, in float64."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    d = np.abs(a - b)
    return {"max_abs": d.max(), "mean_abs": d.mean(), "rel_l2": np.linalg.norm(a - b) / np.linalg.norm(a),
            "cosine": a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), "changed_elements": int((a != b).sum())}


def check_stats(entry, expected: dict, rtol: float = 1e-12) -> None:
    for key, value in expected.items():
        assert getattr(entry, key) == pytest.approx(value, rel=rtol, abs=1e-300), (entry.name, key)


def state_dict() -> dict:
    torch.manual_seed(0)
    return {
        "layers.0.weight": torch.randn(16, 8),
        "layers.0.bf16": torch.randn(33).to(torch.bfloat16),
        "layers.0.half": torch.randn(5, 3).half(),
        "layers.1.fp8": torch.randn(40).to(torch.float8_e4m3fn),
        "steps": torch.arange(7),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


# --- across formats: a conversion is equal everywhere -------------------------------------

def test_lightning_checkpoint_equals_its_conversion(tmp_path):
    sd = state_dict()
    checkpoint = {"state_dict": sd, "epoch": 3, "global_step": 10, "pytorch-lightning_version": "2.4.0",
                  "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}}], "hyper_parameters": {"lr": 1e-3}}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    safeckpt.convert(tmp_path / "last.ckpt", tmp_path / "model.safetensors")
    report = diff(tmp_path / "last.ckpt", tmp_path / "model.safetensors")
    assert report.identical and report.within_tolerance
    assert sorted(e.name for e in report.entries) == sorted(sd)  # the state_dict. prefix is gone
    assert {e.status for e in report.entries} == {"equal"}
    assert report.summary["equal"] == len(sd) and report.format_a == "torch-zip"
    assert any("state_dict" in note for note in report.notes)


def test_tied_tensors_are_equal_to_a_file_that_stores_them_once(tmp_path):
    torch.manual_seed(1)
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(10, 4)
    model.head = torch.nn.Linear(4, 10, bias=False)
    model.head.weight = model.embed.weight
    torch.save(model.state_dict(), tmp_path / "tied.pt")
    safeckpt.convert(tmp_path / "tied.pt", tmp_path / "ours.safetensors")
    st_torch.save_model(model, str(tmp_path / "hf.safetensors"))
    for other in ("ours.safetensors", "hf.safetensors"):
        assert len(st_torch.load_file(str(tmp_path / other))) == 1  # stored once, the tie in metadata
        for a, b in ((tmp_path / "tied.pt", tmp_path / other), (tmp_path / other, tmp_path / "tied.pt")):
            report = diff(a, b)
            assert report.identical, [(e.name, e.status) for e in report.entries]
            assert sorted(e.name for e in report.entries) == ["embed.weight", "head.weight"]


def test_big_endian_npz_equals_its_conversion(tmp_path):
    np.savez(tmp_path / "be.npz", w=np.arange(6, dtype=">f4").reshape(2, 3), c=np.array([1 + 2j], ">c8"))
    safeckpt.convert(tmp_path / "be.npz", tmp_path / "be.safetensors")
    assert diff(tmp_path / "be.npz", tmp_path / "be.safetensors").identical


# --- value stats --------------------------------------------------------------------------

def test_stats_match_a_float64_reference(tmp_path):
    rng = np.random.default_rng(0)
    a = {"w": rng.standard_normal((64, 32)).astype(np.float32), "v": rng.standard_normal(100)}
    b = {"w": a["w"] + np.float32(1e-3) * rng.standard_normal((64, 32)).astype(np.float32),
         "v": a["v"] * 1.5 - 0.25}
    safeckpt.save_file(a, tmp_path / "a.safetensors")
    safeckpt.save_file(b, tmp_path / "b.safetensors")
    report = diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    entries = {e.name: e for e in report.entries}
    for name in a:
        assert entries[name].status == "changed"
        check_stats(entries[name], reference(a[name], b[name]))
        assert entries[name].nonfinite_mismatch == 0 and entries[name].within_tolerance is None
    assert not report.identical and not report.within_tolerance and not report.tolerance


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_blocks_and_parts_give_the_same_stats(tmp_path, monkeypatch, threads):
    monkeypatch.setattr(diff_sums, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(diff_sums, "DOT_PIECE", 16)
    monkeypatch.setattr(diff_module, "PART_ELEMENTS", 100)
    rng = np.random.default_rng(1)
    a = {"w": rng.standard_normal(1000).astype(np.float32), "c": rng.standard_normal(300).astype(np.complex64),
         "tail": np.arange(700, dtype=np.float64), "same": np.ones(500, np.float32)}
    b = {"w": a["w"] * np.float32(1.01), "c": a["c"] + np.complex64(0.5j), "tail": a["tail"].copy(),
         "same": a["same"]}
    b["tail"][-1] += 3  # only the last block of the last part differs: the equal parts get stats too
    safeckpt.save_file(a, tmp_path / "a.safetensors")
    safeckpt.save_file(b, tmp_path / "b.safetensors")
    entries = {e.name: e for e in diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                                       threads=threads).entries}
    check_stats(entries["w"], reference(a["w"], b["w"]))
    check_stats(entries["tail"], reference(a["tail"], b["tail"]))
    assert entries["tail"].changed_elements == 1 and entries["same"].status == "equal"
    ca, cb = a["c"].astype(np.complex128), b["c"].astype(np.complex128)
    check_stats(entries["c"], {"max_abs": np.abs(ca - cb).max(), "mean_abs": np.abs(ca - cb).mean(),
                               "rel_l2": np.linalg.norm(ca - cb) / np.linalg.norm(ca),
                               "cosine": np.real(np.vdot(ca, cb)) / np.linalg.norm(ca) / np.linalg.norm(cb)})


def test_bf16_fp8_fp16_are_read_as_torch_reads_them(tmp_path):
    sd = state_dict()
    other = {name: tensor.clone() for name, tensor in sd.items()}
    for name in ("layers.0.bf16", "layers.0.half", "layers.1.fp8"):
        other[name] = (sd[name].float() * 0.9 + 0.01).to(sd[name].dtype)
    torch.save(sd, tmp_path / "a.pt")
    st_torch.save_file(other, str(tmp_path / "b.safetensors"))
    entries = {e.name: e for e in diff(tmp_path / "a.pt", tmp_path / "b.safetensors").entries}
    for name in ("layers.0.bf16", "layers.0.half", "layers.1.fp8"):
        assert entries[name].status == "changed", name
        check_stats(entries[name], reference(sd[name].double().numpy(), other[name].double().numpy()))
    assert {entries[n].status for n in sd if n not in ("layers.0.bf16", "layers.0.half", "layers.1.fp8")} \
        == {"equal"}


def test_a_cast_is_a_dtype_change_with_stats_and_a_tolerance(tmp_path):
    torch.manual_seed(2)
    fp32 = {"w": torch.randn(50, 20), "ids": torch.arange(4)}
    bf16 = {"w": fp32["w"].to(torch.bfloat16), "ids": fp32["ids"]}
    st_torch.save_file(fp32, str(tmp_path / "fp32.safetensors"))
    st_torch.save_file(bf16, str(tmp_path / "bf16.safetensors"))
    report = diff(tmp_path / "fp32.safetensors", tmp_path / "bf16.safetensors", rtol=1e-2)
    entry = next(e for e in report.entries if e.name == "w")
    assert (entry.status, entry.dtype_a, entry.dtype_b) == ("dtype", "F32", "BF16")
    check_stats(entry, reference(fp32["w"].numpy(), bf16["w"].double().numpy()))
    assert entry.within_tolerance and entry.beyond_tolerance == 0  # bf16 keeps 8 bits: < 0.4% off
    assert report.within_tolerance  # judged on its values; only strict_dtype makes it structural
    assert not diff(tmp_path / "fp32.safetensors", tmp_path / "bf16.safetensors", rtol=1e-2,
                    strict_dtype=True).within_tolerance
    tight = diff(tmp_path / "fp32.safetensors", tmp_path / "bf16.safetensors", atol=1e-4)
    a, b = fp32["w"].double().numpy(), bf16["w"].double().numpy()
    assert next(e for e in tight.entries if e.name == "w").beyond_tolerance == int((np.abs(a - b) > 1e-4).sum())


def test_integers_and_bools_count_changed_elements(tmp_path):
    a = {"ids": np.arange(10, dtype=np.int64), "mask": np.array([True, False, True, True])}
    b = {"ids": a["ids"].copy(), "mask": np.array([True, True, True, False])}
    b["ids"][[2, 7]] = [-5, 100]
    safeckpt.save_file(a, tmp_path / "a.safetensors")
    safeckpt.save_file(b, tmp_path / "b.safetensors")
    entries = {e.name: e for e in diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors").entries}
    check_stats(entries["ids"], reference(a["ids"], b["ids"]))
    assert entries["ids"].changed_elements == 2 and entries["mask"].changed_elements == 2
    assert entries["mask"].max_abs == 1.0 and entries["mask"].mean_abs == 0.5


# --- NaN, inf, zero norms, JSON -----------------------------------------------------------

def test_nan_and_inf(tmp_path):
    a = np.array([1.0, np.nan, np.inf, 2.0, -np.inf, 3.0], np.float32)
    same_nans = a.copy()
    other = a.copy()
    other[[0, 1, 4]] = [1.5, 7.0, np.inf]  # a NaN that became a number, -inf that became +inf
    safeckpt.save_file({"x": a}, tmp_path / "a.safetensors")
    safeckpt.save_file({"x": same_nans}, tmp_path / "same.safetensors")
    safeckpt.save_file({"x": other}, tmp_path / "b.safetensors")
    assert diff(tmp_path / "a.safetensors", tmp_path / "same.safetensors").identical
    entry = diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", atol=1.0).entries[0]
    assert entry.nonfinite_mismatch == 2 and entry.changed_elements == 3
    finite = [0, 3, 5]  # stats over the pairs where both are finite
    expected = reference(a[finite], other[finite])
    del expected["changed_elements"]  # counted above, with the non-finite mismatches
    check_stats(entry, expected)
    assert entry.beyond_tolerance == 2 and entry.within_tolerance is False  # 0.5 is within atol=1


def test_zero_reference_and_json(tmp_path):
    safeckpt.save_file({"z": np.zeros(4, np.float32), "zz": np.zeros(2, np.float32)}, tmp_path / "a.safetensors")
    safeckpt.save_file({"z": np.ones(4, np.float32), "zz": -np.zeros(2, np.float32)}, tmp_path / "b.safetensors")
    report = diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    entries = {e.name: e for e in report.entries}
    assert entries["z"].rel_l2 == math.inf and entries["z"].cosine is None
    # -0.0 has other bits than 0.0: changed, but by nothing
    assert entries["zz"].status == "changed" and entries["zz"].max_abs == 0 and entries["zz"].rel_l2 == 0
    document = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert document["entries"][[e["name"] for e in document["entries"]].index("z")]["rel_l2"] == "inf"
    assert document["summary"]["changed"] == 2 and document["identical"] is False


def test_f6_values_are_compared_as_bytes(raw_file):
    header = {"x": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}
    a, same, b = raw_file(header, b"\x01\x02\x03"), raw_file(header, b"\x01\x02\x03"), raw_file(header, b"\x01\x02\x04")
    assert diff(a, same).identical
    entry = diff(a, b, atol=1).entries[0]
    assert entry.status == "changed" and entry.max_abs is None and "bytes" in entry.note
    assert entry.within_tolerance is False


# --- names: only on one side, shapes, renames ---------------------------------------------

def test_structural_differences(tmp_path):
    rng = np.random.default_rng(3)
    w, v = rng.standard_normal((4, 4)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    a = {"kept": w, "old.name": v, "gone": np.ones(3, np.float32), "grown": np.ones((2, 2), np.float32),
         "lookalike": np.zeros(5, np.float32)}
    b = {"kept": w, "new.name": v, "added": np.ones(3, np.int32), "grown": np.ones((2, 3), np.float32),
         "other": np.ones(5, np.float32)}
    safeckpt.save_file(a, tmp_path / "a.safetensors")
    safeckpt.save_file(b, tmp_path / "b.safetensors")
    report = diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", atol=1e9)
    statuses = {e.name: e.status for e in report.entries}
    assert statuses == {"kept": "equal", "old.name": "renamed", "gone": "only_a", "grown": "shape",
                        "lookalike": "only_a", "added": "only_b", "other": "only_b"}
    renamed = next(e for e in report.entries if e.status == "renamed")
    assert renamed.renamed_to == "new.name"
    grown = next(e for e in report.entries if e.name == "grown")
    assert (grown.shape_a, grown.shape_b, grown.max_abs) == ((2, 2), (2, 3), None)
    assert report.summary == {"equal": 1, "changed": 0, "dtype": 0, "shape": 1, "renamed": 1, "only_a": 2,
                              "only_b": 2}
    assert not report.within_tolerance  # structural differences fail any tolerance


def test_tolerance_gate_matches_numpy(tmp_path):
    rng = np.random.default_rng(4)
    a = rng.standard_normal(2000)
    b = a + rng.standard_normal(2000) * 1e-3
    safeckpt.save_file({"x": a}, tmp_path / "a.safetensors")
    safeckpt.save_file({"x": b}, tmp_path / "b.safetensors")
    for atol, rtol in ((1e-3, 1e-3), (0.0, 1e-2), (1e-2, None), (None, 1e-9)):
        report = diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", atol=atol, rtol=rtol)
        expected = int((np.abs(a - b) > (atol or 0) + (rtol or 0) * np.abs(a)).sum())
        assert report.entries[0].beyond_tolerance == expected
        assert report.within_tolerance == (expected == 0) == np.allclose(b, a, rtol=rtol or 0, atol=atol or 0)
    with pytest.raises(safeckpt.SafeckptError, match="atol"):
        diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", atol=-1)


def test_sources_progress_and_release(tmp_path, monkeypatch):
    safeckpt.save_file({"a": np.ones(10, np.float32), "b": np.zeros(3)}, tmp_path / "a.safetensors")
    safeckpt.save_file({"a": np.ones(10, np.float32), "b": np.ones(3)}, tmp_path / "b.safetensors")
    released, calls = [], []
    with open_source(tmp_path / "a.safetensors") as a, open_source(tmp_path / "b.safetensors") as b:
        monkeypatch.setattr(a, "release", released.append)
        report = diff(a, b, progress=lambda done, total, name: calls.append((done, total, name)))
        assert a.read("a").sum() == 10  # a source passed in is left open
    assert isinstance(report, DiffReport) and sorted(released) == ["a", "b"]
    assert calls[-1][0] == calls[-1][1] == 40 + 40 + 24 + 24 and {c[2] for c in calls} == {"a", "b"}


def test_unreadable_file_is_a_safeckpt_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    safeckpt.save_file({"a": np.ones(2)}, tmp_path / "ok.safetensors")
    with pytest.raises(safeckpt.SafeckptError) as caught:
        diff(tmp_path / "ok.safetensors", tmp_path / "bad.safetensors")
    assert "bad.safetensors" in str(caught.value)


# --- the plot ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("model.layers.12.mlp.up_proj.weight", LayerName("model.layers", 12, "mlp.up_proj.weight")),
    ("transformer.h.3.attn.c_attn.weight", LayerName("transformer.h", 3, "attn.c_attn.weight")),
    ("blocks.7.norm1.weight", LayerName("blocks", 7, "norm1.weight")),
    ("bert.encoder.layer.5.attention.self.query.bias",
     LayerName("bert.encoder.layer", 5, "attention.self.query.bias")),
    ("model.diffusion_model.input_blocks.1.0.proj_in.weight",
     LayerName("model.diffusion_model.input_blocks", 1, "0.proj_in.weight")),
    ("0.weight", LayerName("", 0, "weight")),
    ("lm_head.weight", None),
    ("model.embed_tokens.weight", None),
    ("conv1.weight", None),
])
def test_layer_of_real_names(name, expected):
    assert layer_of(name) == expected


def fine_tuned(tmp_path):
    rng = np.random.default_rng(5)
    a = {"model.embed_tokens.weight": rng.standard_normal((20, 8)).astype(np.float32),
         "lm_head.weight": rng.standard_normal((20, 8)).astype(np.float32)}
    for i in range(6):
        for kind in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
            a[f"model.layers.{i}.{kind}"] = rng.standard_normal((8, 8)).astype(np.float32)
    b = {name: value if "norm" in name else value * np.float32(1 + 0.01 * (1 + len(name) % 5))
         for name, value in a.items()}
    b["lm_head.weight"] = np.zeros_like(b["lm_head.weight"])
    safeckpt.save_file(a, tmp_path / "base.safetensors")
    safeckpt.save_file(b, tmp_path / "tuned.safetensors")
    return diff(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG\r\n\x1a\n"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_plot_is_written_in_the_format_of_its_extension(tmp_path, suffix, magic):
    pytest.importorskip("matplotlib")
    path = tmp_path / f"diff{suffix}"
    assert plot_diff(fine_tuned(tmp_path), path) == str(path)
    data = path.read_bytes()
    assert data.startswith(magic) and len(data) > 10_000


def test_plot_without_layers_or_values(tmp_path):
    pytest.importorskip("matplotlib")
    safeckpt.save_file({"a": np.ones(3, np.float32)}, tmp_path / "a.safetensors")
    safeckpt.save_file({"b": np.ones(4, np.float32)}, tmp_path / "b.safetensors")
    nothing = diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    plot_diff(nothing, tmp_path / "nothing.png")
    flat = diff(tmp_path / "a.safetensors", tmp_path / "a.safetensors")
    plot_diff(flat, tmp_path / "flat.png")
    assert (tmp_path / "nothing.png").stat().st_size > 1000 and (tmp_path / "flat.png").stat().st_size > 1000


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    safeckpt.save_file({"a": np.ones(3, np.float32)}, tmp_path / "a.safetensors")
    with pytest.raises(safeckpt.SafeckptError, match=r"pip install 'safeckpt\[plot\]'"):
        plot_diff(diff(tmp_path / "a.safetensors", tmp_path / "a.safetensors"), tmp_path / "x.png")



def test_select_and_exclude_filter_both_sides(tmp_path):
    a = {"model.w": np.ones(4, np.float32), "model.norm": np.ones(2, np.float32), "opt.m": np.zeros(3, np.float32)}
    b = {"model.w": np.full(4, 2, np.float32), "model.norm": np.ones(2, np.float32), "opt.x": np.zeros(1, np.float32)}
    safeckpt.save_file(a, tmp_path / "a.safetensors")
    safeckpt.save_file(b, tmp_path / "b.safetensors")
    report = diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", select="model.*", exclude=["*norm*"])
    assert [(e.name, e.status) for e in report.entries] == [("model.w", "changed")]
    assert diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", select=["model.norm"]).identical


def test_a_dtype_change_passes_on_its_values_unless_strict(tmp_path):
    a = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    safeckpt.save_file({"w": a, "ids": np.arange(4)}, tmp_path / "a.safetensors")
    safeckpt.save_file({"w": a.astype(ml_dtypes.bfloat16), "ids": np.arange(4)}, tmp_path / "bf16.safetensors")
    safeckpt.save_file({"w": a.astype(np.float64), "ids": np.arange(4)}, tmp_path / "f64.safetensors")
    a_path, bf16, f64 = (str(tmp_path / n) for n in ("a.safetensors", "bf16.safetensors", "f64.safetensors"))

    report = diff(a_path, bf16, rtol=1e-2)  # the CLI help's own example
    assert report.summary["dtype"] == 1 and report.within_tolerance
    assert not diff(a_path, bf16, rtol=1e-2, strict_dtype=True).within_tolerance
    assert not diff(a_path, bf16, rtol=1e-5).within_tolerance  # bf16 rounding is beyond 1e-5
    assert not diff(a_path, bf16).within_tolerance  # no tolerance: the values differ
    exact = diff(a_path, f64)  # every value survives the cast: only the dtype changed
    assert exact.summary["dtype"] == 1 and exact.entries[0].changed_elements == 0 and exact.within_tolerance
    assert not diff(a_path, f64, strict_dtype=True).within_tolerance
    assert diff(a_path, f64, strict_dtype=True).to_dict()["strict_dtype"] is True
