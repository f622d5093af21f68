"""convert: real checkpoints (torch.save, safetensors) in, files the real libraries load out."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import safeckpt
from safeckpt.format.dtypes import DTYPES
from safeckpt import errors
from safeckpt.ops import cast as casting
from safeckpt.ops import convert as convert_module
from safeckpt.sinks import safetensors as sink_module
from safeckpt.ops.convert import ConvertReport, convert, parse_size
from safeckpt.sources.detect import open_source

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open as hf_safe_open  # noqa: E402

import safeckpt.torch  # noqa: E402

from tests.files import tensor_bytes  # noqa: E402
from tests.ops.malicious_corpus import malicious_torch_file  # noqa: E402


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def hf_metadata(path) -> dict:
    with hf_safe_open(str(path), framework="pt") as f:
        return f.metadata()


def torch_bits_equal(a, b) -> bool:
    """Bit-exact equality, NaN-safe: compare the raw bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and tensor_bytes(a) == tensor_bytes(b)


class Tied(torch.nn.Module):
    """A language-model-like module whose output head shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight


@pytest.fixture
def torch_checkpoint(tmp_path):
    """A torch.save'd state dict: tied weights, every common dtype, views of storages."""
    torch.manual_seed(0)
    model = Tied()
    state = model.state_dict()
    base = torch.randn(6, 10)
    state.update({
        "half": torch.randn(5, 3).half(),
        "bf16": torch.randn(4, 4).bfloat16(),
        "steps": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "transposed": base.t(),  # non-contiguous view
        "rows": base[2:4],  # a view at a storage offset
        "strided": base[:, ::3],
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    })
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    return path, model


def test_safetensors_round_trip(tmp_path, model_like):
    src = tmp_path / "in.safetensors"
    safeckpt.save_file(model_like, src, {"note": "kept"})
    report = convert(src, tmp_path / "out.safetensors", verify=True)
    assert isinstance(report, ConvertReport) and report.verified
    assert report.outputs == [str(tmp_path / "out.safetensors")] and report.index is None
    assert report.tensors == len(model_like) and report.source_format == "safetensors"
    out = safeckpt.load_file(tmp_path / "out.safetensors")
    for name, value in model_like.items():
        assert out[name].dtype == value.dtype and out[name].shape == value.shape
        assert out[name].tobytes() == value.tobytes(), name
    meta = hf_metadata(tmp_path / "out.safetensors")
    assert meta["note"] == "kept" and meta["format"] == "pt"
    assert meta["safeckpt.source"] == "in.safetensors" and meta["safeckpt.source_format"] == "safetensors"
    assert meta["safeckpt.version"] == safeckpt.__version__
    assert meta["safeckpt.source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert "safeckpt.tree" not in meta  # a safetensors file has no structure beyond its metadata
    assert report.bytes_written == os.path.getsize(tmp_path / "out.safetensors")
    assert json.loads(json.dumps(report.to_dict()))["tensors"] == len(model_like)


def test_torch_state_dict_matches_torch_load(tmp_path, torch_checkpoint):
    path, model = torch_checkpoint
    dst = tmp_path / "model.safetensors"
    report = convert(path, dst, verify=True)
    assert report.source_format == "torch-zip" and report.verified
    expected = torch.load(path, weights_only=True)
    loaded = st_torch.load_file(str(dst))  # the real safetensors reads it
    meta = hf_metadata(dst)
    assert report.aliases == {"head.weight": "embed.weight"}  # the name save_model keeps
    assert meta["head.weight"] == "embed.weight" and "head.weight" not in loaded
    assert report.tensors == len(expected) - 1
    for name, tensor in expected.items():
        got = loaded[meta[name]] if name in report.aliases else loaded[name]
        assert torch_bits_equal(got, tensor), name
    assert "safeckpt.tree" not in meta  # a plain state dict holds nothing but tensors


def test_tied_model_round_trips_through_load_model(tmp_path):
    torch.manual_seed(1)
    model = Tied()
    torch.save(model.state_dict(), tmp_path / "tied.pt")
    dst = tmp_path / "tied.safetensors"
    convert(tmp_path / "tied.pt", dst)
    for load_model in (st_torch.load_model, safeckpt.torch.load_model):
        fresh = Tied()
        missing, unexpected = load_model(fresh, str(dst))
        assert not missing and not unexpected
        assert fresh.head.weight is fresh.embed.weight
        for name, tensor in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[name], tensor), name
    # the file is the one save_model would write (same tensors kept, same alias entry)
    st_torch.save_model(model, str(tmp_path / "hf.safetensors"))
    ours, theirs = st_torch.load_file(str(dst)), st_torch.load_file(str(tmp_path / "hf.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert hf_metadata(dst)["head.weight"] == hf_metadata(tmp_path / "hf.safetensors")["head.weight"]


def test_same_storage_views_are_stored_once(tmp_path):
    weight = torch.randn(4, 4)
    torch.save({"b.weight": weight, "a.weight": weight, "c.other": weight.t()}, tmp_path / "x.pt")
    report = convert(tmp_path / "x.pt", tmp_path / "x.safetensors", verify=True)
    assert report.aliases == {"a.weight": "b.weight"}  # same view: once, under the first name; the transpose
    loaded = st_torch.load_file(str(tmp_path / "x.safetensors"))  # is other values
    assert sorted(loaded) == ["b.weight", "c.other"] and torch.equal(loaded["c.other"], weight.t())


def test_same_memory_is_found_without_the_source_saying_so(tmp_path):
    weight = torch.randn(3, 3)
    torch.save({"z": weight, "y": weight, "x": torch.ones(2)}, tmp_path / "x.pt")
    with open_source(tmp_path / "x.pt") as source:
        source.aliases = {}  # a source that reports no aliases: the arrays' memory tells
        report = convert(source, tmp_path / "x.safetensors")
    assert report.aliases == {"y": "z"}  # the first name in the source's order is kept


def test_source_hash_and_tree_metadata(tmp_path):
    checkpoint = {"state_dict": {"layer.weight": torch.ones(2, 2)}, "epoch": 3, "global_step": 10,
                  "hyper_parameters": {"lr": 0.1, "name": "tiny"}}
    torch.save(checkpoint, tmp_path / "c.ckpt")
    convert(tmp_path / "c.ckpt", tmp_path / "a.safetensors")
    meta = hf_metadata(tmp_path / "a.safetensors")
    assert meta["safeckpt.source_sha256"] == hashlib.sha256((tmp_path / "c.ckpt").read_bytes()).hexdigest()
    tree = json.loads(meta["safeckpt.tree"])
    assert tree["epoch"] == 3 and tree["global_step"] == 10 and tree["hyper_parameters"]["lr"] == 0.1
    assert tree["state_dict"]["layer.weight"] == {"__tensor__": "state_dict.layer.weight"}
    assert meta["safeckpt.extract"] == "state_dict"
    convert(tmp_path / "c.ckpt", tmp_path / "b.safetensors", source_hash=False, metadata={"who": "me"})
    meta = hf_metadata(tmp_path / "b.safetensors")
    assert "safeckpt.source_sha256" not in meta and meta["who"] == "me"


def test_huge_tree_is_cut_not_dropped(tmp_path, monkeypatch):
    torch.save({"w": torch.ones(2), "small": 1, "big": ["x" * 100] * 50}, tmp_path / "t.pt")
    monkeypatch.setattr(convert_module, "MAX_TREE_JSON_BYTES", 1000)
    report = convert(tmp_path / "t.pt", tmp_path / "t.safetensors")
    tree = json.loads(hf_metadata(tmp_path / "t.safetensors")["safeckpt.tree"])
    assert tree["small"] == 1 and tree["big"].startswith("<cut:")
    assert any("cut" in note for note in report.notes)


# --- sharding ---------------------------------------------------------------------

def test_sharded_output_in_the_hugging_face_layout(tmp_path):
    tensors = {f"layers.{i}.weight": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    tensors["big"] = torch.arange(1024, dtype=torch.float32)  # 4 KiB: larger than a shard
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    out = tmp_path / "out"
    report = convert(tmp_path / "pytorch_model.bin", out / "model.safetensors", shard_size="2KiB", verify=True)  # two per shard
    names = [f"model-{k:05d}-of-00004.safetensors" for k in range(1, 5)]
    assert files_in(out) == sorted(names + ["model.safetensors.index.json"])
    assert report.outputs == [str(out / n) for n in names]
    assert report.index == str(out / "model.safetensors.index.json")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # read it as transformers does: every shard the weight map names, merged
    merged = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = st_torch.load_file(str(out / shard))
        assert all(index["weight_map"][name] == shard for name in part)
        assert hf_metadata(out / shard)["format"] == "pt"
        merged.update(part)
    assert sorted(merged) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(merged[name], tensor)
    assert list(st_torch.load_file(str(out / names[3]))) == ["big"]  # alone, in write order


def test_one_shard_is_a_single_file_and_a_directory_destination(tmp_path, model_like):
    src = tmp_path / "in.safetensors"
    safeckpt.save_file(model_like, src)
    out = tmp_path / "out"
    out.mkdir()
    report = convert(src, out, shard_size="5GB")
    assert files_in(out) == ["model.safetensors"] and report.index is None
    report = convert(src, tmp_path / "new" / "deeper", shard_size=1000)  # no extension: a new directory
    assert report.index == str(tmp_path / "new" / "deeper" / "model.safetensors.index.json")
    assert all(Path(p).parent.name == "deeper" and Path(p).name.startswith("model-") for p in report.outputs)
    report = convert(src, tmp_path / "new" / "weights.safetensors", shard_size=1000)
    assert report.index == str(tmp_path / "new" / "weights.safetensors.index.json")
    assert all(Path(p).name.startswith("weights-0000") for p in report.outputs)


@pytest.mark.parametrize("text, value", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("10KiB", 10240), ("8Mb", 10**6),
    (1234, 1234), ("1234", 1234), ("1.5GB", 1_500_000_000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["5 parsecs", "GB", "", "-1GB", 0, -5, 1.5, True])
def test_parse_size_refuses(bad):
    with pytest.raises(errors.SafeckptError, match="shard size"):
        parse_size(bad)


# --- cast -------------------------------------------------------------------------

def test_cast_to_fp16_reports_overflow(tmp_path):
    weights = torch.tensor([1.0, 7e4, -1e6, float("inf"), float("nan"), 0.1]).repeat(3)
    torch.save({"w": weights, "ids": torch.arange(4), "b": torch.randn(3).double()}, tmp_path / "m.pt")
    with pytest.warns(RuntimeWarning, match="overflowed"):
        report = convert(tmp_path / "m.pt", tmp_path / "m.safetensors", dtype="float16", verify=True)
    assert report.cast == "F16" and report.overflow == {"w": 6}  # inf was never finite
    loaded = st_torch.load_file(str(tmp_path / "m.safetensors"))
    assert torch_bits_equal(loaded["w"], weights.half())
    assert loaded["ids"].dtype == torch.int64 and torch.equal(loaded["ids"], torch.arange(4))
    assert hf_metadata(tmp_path / "m.safetensors")["safeckpt.cast"] == "F16"


@pytest.mark.parametrize("target, torch_dtype", [
    ("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32),
    ("F8_E4M3", torch.float8_e4m3fn), ("float8_e5m2", torch.float8_e5m2)])
def test_cast_matches_torch_bit_for_bit(target, torch_dtype):
    torch.manual_seed(0)
    values = torch.cat([torch.randn(5000) * 300, torch.tensor([1e5, -1e5, 1e39 * 0, 448.0, 464.0, 480.0,
                                                               float("inf"), -float("inf"), 6e4, 7e4])])
    values = values.reshape(-1, 5).t()  # non-contiguous
    with np.errstate(over="ignore"):
        ours, _ = casting.cast_array(values.numpy(), target)
    theirs = values.to(torch_dtype)
    assert ours.shape == tuple(theirs.shape)
    assert ours.tobytes() == tensor_bytes(theirs)


def test_cast_blocks_are_bounded_and_ordered(monkeypatch):
    monkeypatch.setattr(casting, "BLOCK_ELEMENTS", 7)
    values = np.arange(60, dtype=np.float64).reshape(6, 10).T * 1e4  # 3e5 > fp16 max from index 31 on
    blocks = list(casting.cast_blocks(values, "fp16"))
    assert max(b.values.size for b in blocks) <= 7
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16).tobytes()
    assert np.concatenate([b.values for b in blocks]).tobytes() == expected
    assert sum(b.overflow for b in blocks) == int(np.count_nonzero(values > 65519))
    out, overflow = casting.cast_array(values, "F16")
    assert out.tobytes() == expected and overflow == sum(b.overflow for b in blocks)


@pytest.mark.parametrize("source, target", [(np.float32, "fp16"), (np.float32, "bf16"), (np.float64, "fp32"),
                                            (ml_dtypes.bfloat16, "fp16"), (np.float32, "F8_E4M3"),
                                            (np.float16, "F8_E5M2")])
def test_cast_counts_values_that_underflow_to_zero(source, target):
    tiny = np.array([0.0, -0.0, 1.0, 1e-30, -1e-30, 1e-42, 1e-50, 3e-8, np.nan, np.inf, 1e-5, -2e-3],
                    np.float64).astype(source)
    name = casting.target_dtype(target)
    with np.errstate(under="ignore", over="ignore", invalid="ignore"):
        out = tiny.astype(DTYPES[name].numpy)
    expected = int(np.count_nonzero((tiny.astype(np.float64) != 0) & (out.astype(np.float64) == 0)))
    assert expected > 0
    assert sum(b.underflow for b in casting.cast_blocks(tiny, target)) == expected


def test_cast_refuses_what_it_cannot_do():
    with pytest.raises(errors.SafeckptError, match="cannot cast to 'int8'"):
        casting.target_dtype("int8")
    with pytest.raises(errors.UnsupportedTensorError, match="only floating"):
        casting.cast_array(np.arange(3), "bf16")
    same = np.ones(3, ml_dtypes.bfloat16)
    assert casting.cast_array(same, "BF16")[0] is same
    assert casting.target_dtype("torch.bfloat16") == "BF16" and casting.target_dtype("HALF") == "F16"


def test_e4m3_saturates_like_torch_and_counts():
    out, overflow = casting.cast_array(np.array([500.0, -1e6, np.nan, 1.0], np.float32), "F8_E4M3")
    assert out.astype(np.float32)[[0, 1, 3]].tolist() == [448.0, -448.0, 1.0] and np.isnan(out[2].astype(float))
    assert overflow == 2


# --- choosing tensors --------------------------------------------------------------

def test_select_and_exclude(tmp_path):
    tensors = {"enc.0.w": torch.ones(2), "enc.1.w": torch.ones(2), "dec.0.w": torch.ones(2), "dec.0.b": torch.ones(1)}
    torch.save(tensors, tmp_path / "m.pt")
    report = convert(tmp_path / "m.pt", tmp_path / "a.safetensors", select=["enc.*", "dec.*.w"], exclude="enc.1.*")
    assert sorted(st_torch.load_file(str(tmp_path / "a.safetensors"))) == ["dec.0.w", "enc.0.w"]
    assert sorted(report.skipped) == ["dec.0.b", "enc.1.w"]
    with pytest.raises(errors.SafeckptError, match="nothing to convert"):
        convert(tmp_path / "m.pt", tmp_path / "b.safetensors", select=["nope.*"])
    assert not (tmp_path / "b.safetensors").exists()


@pytest.fixture
def lightning_like(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    checkpoint = {"state_dict": net.state_dict(), "epoch": 3, "global_step": 10,
                  "pytorch-lightning_version": "2.4.0", "optimizer_states": [optimizer.state_dict()],
                  "hyper_parameters": {"lr": 0.001}}
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    return path, net


def test_extract_lightning_state_dict(tmp_path, lightning_like):
    path, net = lightning_like
    report = convert(path, tmp_path / "auto.safetensors")
    loaded = st_torch.load_file(str(tmp_path / "auto.safetensors"))
    assert sorted(loaded) == sorted(net.state_dict())
    for name, tensor in net.state_dict().items():
        assert torch.equal(loaded[name], tensor)
    assert any("Lightning" in note for note in report.notes)
    assert any(name.startswith("optimizer_states.") for name in report.skipped)
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    fresh.load_state_dict(loaded)  # strict: the names are the module's own

    explicit = convert(path, tmp_path / "explicit.safetensors", extract="state_dict")
    assert explicit.tensors == report.tensors
    everything = convert(path, tmp_path / "all.safetensors", extract=None)
    names = st_torch.load_file(str(tmp_path / "all.safetensors"))
    assert "state_dict.0.weight" in names and "optimizer_states.0.state.0.exp_avg" in names
    assert everything.skipped == []
    with pytest.raises(errors.SafeckptError, match="cannot extract 'model'.*top-level keys"):
        convert(path, tmp_path / "bad.safetensors", extract="model")


@pytest.fixture
def stable_diffusion_like(tmp_path):
    torch.manual_seed(0)
    weights = {"model.diffusion_model.input_blocks.0.weight": torch.randn(4, 4),
               "model.diffusion_model.out.bias": torch.randn(4),
               "first_stage_model.decoder.conv.weight": torch.randn(2, 2),
               "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10, dtype=torch.int32),
               "model_ema.diffusion_modelinput_blocks0weight": torch.randn(4, 4),
               "model_ema.diffusion_modeloutbias": torch.randn(4)}
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": weights, "global_step": 470000}, path)
    return path, weights


def test_stable_diffusion_ema(tmp_path, stable_diffusion_like):
    path, weights = stable_diffusion_like
    convert(path, tmp_path / "drop.safetensors", ema="drop")
    dropped = st_torch.load_file(str(tmp_path / "drop.safetensors"))
    assert sorted(dropped) == sorted(n for n in weights if not n.startswith("model_ema."))
    report = convert(path, tmp_path / "only.safetensors", ema="only", verify=True)
    only = st_torch.load_file(str(tmp_path / "only.safetensors"))
    assert sorted(only) == sorted(dropped)
    assert torch.equal(only["model.diffusion_model.input_blocks.0.weight"],
                       weights["model_ema.diffusion_modelinput_blocks0weight"])
    assert torch.equal(only["model.diffusion_model.out.bias"], weights["model_ema.diffusion_modeloutbias"])
    assert torch.equal(only["first_stage_model.decoder.conv.weight"], weights["first_stage_model.decoder.conv.weight"])
    assert any("EMA" in note for note in report.notes)
    assert hf_metadata(tmp_path / "only.safetensors")["safeckpt.ema"] == "only"
    torch.save({"state_dict": {"model.a.b": torch.ones(2), "model_ema.ab": torch.ones(3)}}, tmp_path / "odd.ckpt")
    with pytest.raises(errors.SafeckptError, match="EMA copy 'model_ema.ab' has shape") as caught:
        convert(tmp_path / "odd.ckpt", tmp_path / "x.safetensors", ema="only")
    assert caught.value.tensor == "model.a.b"
    torch.save({"state_dict": {"model.x": torch.ones(1)}}, tmp_path / "no_ema.ckpt")
    with pytest.raises(errors.SafeckptError, match="no EMA weights"):
        convert(tmp_path / "no_ema.ckpt", tmp_path / "x.safetensors", ema="only")
    assert not (tmp_path / "x.safetensors").exists()


# --- verification, failures, hostile input -------------------------------------------

def without_copy_file_range(monkeypatch) -> None:
    """An OS without copy_file_range: tensor bytes go through user space (and the sink's write_all)."""
    def not_implemented(*args, **kwargs):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(os, "copy_file_range", not_implemented)


@pytest.fixture
def no_kernel_copy(monkeypatch):
    without_copy_file_range(monkeypatch)


def test_verify_detects_a_corrupted_write(tmp_path, model_like, monkeypatch, no_kernel_copy):
    src = tmp_path / "in.safetensors"
    safeckpt.save_file(model_like, src)
    real = sink_module.write_all
    calls = []

    def flip_one_byte(fd, data):
        calls.append(data.nbytes)
        if len(calls) == 3:  # the second tensor's bytes (the first call is the header)
            data = bytearray(data)
            data[0] ^= 0x01
            data = memoryview(data)
        real(fd, data)

    monkeypatch.setattr(sink_module, "write_all", flip_one_byte)
    (tmp_path / "out.safetensors").write_bytes(b"previous")
    with pytest.raises(errors.SafeckptError, match="verification failed: byte 0") as caught:
        convert(src, tmp_path / "out.safetensors", verify=True, overwrite=True)
    assert caught.value.tensor is not None and caught.value.tensor in model_like
    assert files_in(tmp_path) == ["in.safetensors", "out.safetensors"]  # no temp file left behind
    assert (tmp_path / "out.safetensors").read_bytes() == b"previous"  # what it would replace is intact
    calls.clear()
    convert(src, tmp_path / "unchecked.safetensors")  # the same flip, unverified, goes through
    unchecked = safeckpt.load_file(tmp_path / "unchecked.safetensors")
    name = caught.value.tensor
    assert unchecked[name].tobytes() != model_like[name].tobytes()


@pytest.mark.parametrize("failure", [errors.SourceError("bad record"), KeyboardInterrupt()])
def test_failure_midway_leaves_nothing(tmp_path, failure, monkeypatch):
    torch.save({f"t{i}": torch.full((300,), float(i)) for i in range(6)}, tmp_path / "m.pt")
    out = tmp_path / "out"
    reads = []
    original = sink_module.SinkRun._write_tensor

    def failing_write(self, fd, plan, path):
        reads.append(plan.name)
        if len(reads) == 4:
            raise failure
        return original(self, fd, plan, path)

    monkeypatch.setattr(sink_module.SinkRun, "_write_tensor", failing_write)
    with pytest.raises(type(failure)):
        convert(tmp_path / "m.pt", out / "model.safetensors", shard_size=2400)  # two tensors per shard
    assert not out.exists()  # shards already renamed, temp files and the new directory are all gone
    monkeypatch.undo()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "model.safetensors").write_bytes(b"old")
    monkeypatch.setattr(sink_module.SinkRun, "_write_tensor", failing_write)
    reads.clear()
    with pytest.raises(type(failure)):
        convert(tmp_path / "m.pt", tmp_path / "kept" / "model.safetensors", overwrite=True)
    assert files_in(tmp_path / "kept") == ["model.safetensors"]
    assert (tmp_path / "kept" / "model.safetensors").read_bytes() == b"old"  # an old file is untouched


@pytest.mark.parametrize("path", ["write", "copy_file_range"])
def test_disk_full_leaves_nothing(tmp_path, monkeypatch, path):
    torch.save({"a": torch.ones(100), "b": torch.ones(100)}, tmp_path / "m.pt")
    real_write, real_copy = sink_module.write_all, os.copy_file_range

    def enospc_write(fd, data):
        if data.nbytes == 400:
            raise OSError(28, "No space left on device")
        real_write(fd, data)

    def enospc_copy(src, dst, count, offset_src=None, offset_dst=None):
        if count == 400:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, count, offset_src, offset_dst)

    if path == "write":
        without_copy_file_range(monkeypatch)
        monkeypatch.setattr(sink_module, "write_all", enospc_write)
    else:
        monkeypatch.setattr(os, "copy_file_range", enospc_copy)
    with pytest.raises(OSError, match="No space"):
        convert(tmp_path / "m.pt", tmp_path / "out.safetensors")
    assert files_in(tmp_path) == ["m.pt"]


def test_malicious_source_is_refused_and_nothing_is_written(tmp_path):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.bin"
    malicious_torch_file(path, canary)
    with pytest.raises(errors.UnsafeFileError, match="posix.system.*allow_unsafe_structure") as caught:
        convert(path, tmp_path / "out" / "model.safetensors")
    assert caught.value.report.verdict == "malicious"
    assert files_in(tmp_path) == ["evil.bin"] and not canary.exists()
    report = convert(path, tmp_path / "out.safetensors", allow_unsafe_structure=True, verify=True)
    assert report.scan_verdict == "malicious" and not canary.exists()
    assert torch.equal(st_torch.load_file(str(tmp_path / "out.safetensors"))["w"], torch.arange(6.0).reshape(2, 3))


def test_hostile_tensor_name_is_refused_before_writing(tmp_path):
    torch.save({"__metadata__": torch.ones(2)}, tmp_path / "m.pt")
    with pytest.raises(errors.InvalidNameError, match="reserved"):
        convert(tmp_path / "m.pt", tmp_path / "out.safetensors")
    assert files_in(tmp_path) == ["m.pt"]


def test_bad_arguments(tmp_path, model_like):
    src = tmp_path / "in.safetensors"
    safeckpt.save_file(model_like, src)
    with pytest.raises(errors.SafeckptError, match="ema must be"):
        convert(src, tmp_path / "o.safetensors", ema="maybe")
    with pytest.raises(errors.SafeckptError, match="cannot cast"):
        convert(src, tmp_path / "o.safetensors", dtype="int4")
    with pytest.raises(errors.InvalidMetadataError):
        convert(src, tmp_path / "o.safetensors", metadata={"n": 1})
    assert files_in(tmp_path) == ["in.safetensors"]


# --- streaming ---------------------------------------------------------------------

def test_progress_and_release_per_tensor(tmp_path, torch_checkpoint, monkeypatch):
    path, _ = torch_checkpoint
    released, seen = [], []
    with open_source(path) as source:
        monkeypatch.setattr(source, "release", released.append)
        report = convert(source, tmp_path / "o.safetensors",
                         progress=lambda done, total, name: seen.append((done, total, name)))
        assert source.keys()  # a source passed in stays open
    done = [d for d, _, _ in seen]
    assert done == sorted(done) and done[-1] == seen[-1][1] == sum(
        info.nbytes for name, info in source.infos.items() if name not in report.aliases)
    assert sorted(set(released)) == sorted(n for n in source.infos if n not in report.aliases)


def test_memory_stays_near_one_block(tmp_path):
    """Four 16 MiB tensors cast to bf16: a few blocks in memory at once, not a tensor (8 MiB as bf16)."""
    tensors = {f"t{i}": np.full(4 * 2**20, i, np.float32) for i in range(4)}
    safeckpt.save_file(tensors, tmp_path / "big.safetensors")
    tracemalloc.start()
    try:
        convert(tmp_path / "big.safetensors", tmp_path / "out.safetensors", dtype="bf16", source_hash=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak
    out = safeckpt.load_file(tmp_path / "out.safetensors")
    assert all((out[f"t{i}"] == i).all() for i in range(4))


def test_every_dtype_passes_through_and_casts(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.standard_normal(8).astype(np.float32)
    tensors = {
        "f8": values.astype(ml_dtypes.float8_e4m3fn), "f8_e5": values.astype(ml_dtypes.float8_e5m2),
        "f4": values.astype(ml_dtypes.float4_e2m1fn), "e8m0": np.abs(values).astype(ml_dtypes.float8_e8m0fnu),
        "f6": safeckpt.RawTensor("F6_E2M3", (4,), bytes([1, 2, 3])),  # 4 values x 6 bits
        "c64": (values + 1j * values).astype(np.complex64), "u16": np.arange(8, dtype=np.uint16),
        "f64": values.astype(np.float64), "be": values.astype(">f4"),
    }
    src = tmp_path / "exotic.safetensors"
    safeckpt.save_file(tensors, src)
    convert(src, tmp_path / "same.safetensors", verify=True)
    with safeckpt.SafetensorsFile(src) as a, safeckpt.SafetensorsFile(tmp_path / "same.safetensors") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for name in a.keys():
            assert a.info(name).dtype == b.info(name).dtype and a.storage(name).tobytes() == b.storage(name).tobytes()
    report = convert(src, tmp_path / "bf16.safetensors", dtype="bf16", verify=True)
    with safeckpt.SafetensorsFile(tmp_path / "bf16.safetensors") as out:
        dtypes = {name: out.info(name).dtype for name in out.keys()}
        assert out.array("f8").tobytes() == tensors["f8"].astype(ml_dtypes.bfloat16).tobytes()
        assert out.array("f4").tobytes() == tensors["f4"].astype(ml_dtypes.bfloat16).tobytes()
    assert dtypes == {"f8": "BF16", "f8_e5": "BF16", "f4": "BF16", "e8m0": "BF16", "f6": "F6_E2M3",
                      "c64": "C64", "u16": "U16", "f64": "BF16", "be": "BF16"}
    assert report.overflow == {}


def test_sharded_source_converts_as_a_whole_and_each_shard_is_scanned(tmp_path):
    shards = {"part-1.bin": {"a": torch.ones(2), "b": torch.zeros(3)}, "part-2.bin": {"c": torch.arange(4)}}
    for file, tensors in shards.items():
        torch.save(tensors, tmp_path / file)
    index = {"metadata": {"total_size": 52}, "weight_map": {"a": "part-1.bin", "b": "part-1.bin", "c": "part-2.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    report = convert(tmp_path, tmp_path / "out.safetensors", verify=True)
    assert report.source_format == "sharded" and report.scan_verdict == "safe"
    loaded = st_torch.load_file(str(tmp_path / "out.safetensors"))
    assert sorted(loaded) == ["a", "b", "c"] and torch.equal(loaded["c"], torch.arange(4))
    malicious_torch_file(tmp_path / "part-2.bin", tmp_path / "canary")  # now holds "w" and os.system
    index["weight_map"] = {"a": "part-1.bin", "w": "part-2.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(errors.UnsafeFileError) as caught:
        convert(tmp_path / "pytorch_model.bin.index.json", tmp_path / "refused.safetensors")
    assert caught.value.path == str(tmp_path / "part-2.bin") and not (tmp_path / "refused.safetensors").exists()
    assert not (tmp_path / "canary").exists()


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path, model_like):
    path = tmp_path / "model.safetensors"
    safeckpt.save_file(model_like, path)
    before = path.read_bytes()
    with pytest.raises(errors.OutputIsInputError, match="is an input of this command"):
        convert(path, path, dtype="fp16", overwrite=True)
    assert path.read_bytes() == before and files_in(tmp_path) == ["model.safetensors"]


def test_kernel_copy_and_user_space_copy_write_the_same_bytes(tmp_path, monkeypatch):
    big = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    torch.save({"big": big, "rows": big[2:5], "cols": big[:, ::2], "bf": big.bfloat16(),
                "ids": torch.arange(5)}, tmp_path / "m.pt")
    convert(tmp_path / "m.pt", tmp_path / "kernel.safetensors")
    without_copy_file_range(monkeypatch)
    convert(tmp_path / "m.pt", tmp_path / "user.safetensors")
    assert (tmp_path / "kernel.safetensors").read_bytes() == (tmp_path / "user.safetensors").read_bytes()
    loaded = safeckpt.load_file(tmp_path / "kernel.safetensors")
    np.testing.assert_array_equal(loaded["cols"], big[:, ::2].numpy())
    np.testing.assert_array_equal(loaded["rows"], big[2:5].numpy())


def test_sharded_sources_convert_as_a_whole(tmp_path):
    """A pytorch_model.bin.index.json folder -> one file; our own shards -> one file, ties kept."""
    folder = tmp_path / "bin"
    folder.mkdir()
    embed = torch.randn(10, 4)
    torch.save({"embed.weight": embed, "head.weight": embed}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"norm.bias": torch.zeros(4)}, folder / "pytorch_model-00002-of-00002.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "embed.weight": "pytorch_model-00001-of-00002.bin", "head.weight": "pytorch_model-00001-of-00002.bin",
        "norm.bias": "pytorch_model-00002-of-00002.bin"}}))
    report = convert(folder, tmp_path / "whole.safetensors")
    assert report.aliases == {"head.weight": "embed.weight"} and report.tensors == 2
    loaded = safeckpt.load_file(tmp_path / "whole.safetensors")
    np.testing.assert_array_equal(loaded["embed.weight"], embed.numpy())
    sharded = convert(tmp_path / "whole.safetensors", tmp_path / "shards", shard_size=100)
    assert len(sharded.outputs) == 2
    again = convert(tmp_path / "shards", tmp_path / "again.safetensors")
    assert again.source_format == "sharded"
    with safeckpt.safe_open(tmp_path / "again.safetensors") as f:
        assert f.metadata()["head.weight"] == "embed.weight"  # the tie survives the round trip
        assert sorted(f.keys()) == ["embed.weight", "norm.bias"]
