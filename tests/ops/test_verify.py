"""safeckpt.verify: structure of every format, then BLAKE3 manifests; sha256 and Git LFS pointers."""

from __future__ import annotations

import hashlib
import json
import shutil

import blake3
import numpy as np
import pytest

import safeckpt
from safeckpt import errors
from safeckpt.ops.verify import range_hash
from safeckpt.ops.verify import (LfsPointer, load_manifest, manifest_path, parse_lfs_pointer, read_lfs_pointer,
                                 sha256_file, verify)
from safeckpt.format.integrity import root_hash
from safeckpt.sources.base import mapped

from tests.files import flip_byte, lfs_pointer_text, tensor_bytes

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch", reason="the safetensors oracle is not installed")


def b3(data) -> str:
    return blake3.blake3(bytes(data)).hexdigest()


@pytest.fixture
def tensors():
    torch.manual_seed(0)
    return {"embed.weight": torch.randn(64, 16), "head.bias": torch.randn(16, dtype=torch.float16),
            "layer.weight": torch.randn(16, 16).to(torch.bfloat16), "step": torch.tensor(7),
            "empty": torch.zeros(0, 4)}


@pytest.fixture
def model(tmp_path, tensors):
    path = tmp_path / "model.safetensors"
    st_torch.save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def span(path, name) -> tuple[int, int]:
    with safeckpt.open_source(path) as source:
        found = source.file_span(name)
        return found.offset, found.nbytes


# --- safetensors ----------------------------------------------------------------------

def test_structure_only_without_a_manifest(model, tensors):
    report = verify(model)
    assert report.ok and report.exit_code == 0
    assert (report.kind, report.format, report.hashes, report.manifest) == ("file", "safetensors", "missing", None)
    assert report.tensors == len(tensors)
    assert report.parameters == sum(t.numel() for t in tensors.values())
    assert report.size == model.stat().st_size and report.hashed_bytes == 0


def test_write_then_verify(model, tensors):
    written = verify(model, write=True)
    assert written.ok and written.hashes == "written"
    manifest = model.with_name("model.safetensors.blake3.json")
    assert written.manifest == str(manifest) == manifest_path(model)
    entry = load_manifest(manifest)["files"]["model.safetensors"]
    data = model.read_bytes()
    for name, tensor in tensors.items():
        begin, end = entry["tensors"][name]["range"]
        assert data[begin:end] == tensor_bytes(tensor)
        assert entry["tensors"][name]["blake3"] == b3(data[begin:end])
    ranges = [entry["header"]] + sorted(entry["tensors"].values(), key=lambda part: part["range"])
    assert ranges[0]["range"][0] == 0 and ranges[-1]["range"][1] == len(data)
    assert entry["blake3"] == root_hash([part["blake3"] for part in ranges])
    assert entry["size"] == len(data)
    checked = verify(model)
    assert checked.ok and checked.hashes == "verified" and checked.manifest == str(manifest)
    assert checked.hashed_bytes == len(data)


def test_a_flipped_byte_names_the_tensor_and_the_file(model):
    verify(model, write=True)
    begin, nbytes = span(model, "head.bias")
    flip_byte(model, begin + nbytes // 2, 0x10)
    assert verify(model, write=False).hashes == "failed"
    report = verify(model)
    assert not report.ok and report.exit_code == 1 and report.status == "invalid"
    assert report.failed_tensor == "head.bias" and report.failed_file == str(model)
    assert report.error_type == "IntegrityError"
    assert str(model) in report.error and "'head.bias'" in report.error


def test_the_first_damaged_tensor_in_file_order_is_named(model):
    verify(model, write=True)
    for name in ("step", "embed.weight"):
        begin, _ = span(model, name)
        flip_byte(model, begin, 0x10)
    with safeckpt.SafetensorsFile(model) as file:
        first = min(("step", "embed.weight"), key=lambda n: file.header.tensors[n].data_offsets[0])
    assert verify(model).failed_tensor == first


def test_a_changed_header_is_reported_as_such(model):
    verify(model, write=True)
    data = model.read_bytes()
    model.write_bytes(data.replace(b'"format":"pt"', b'"format":"np"', 1))
    report = verify(model)
    assert report.exit_code == 1 and report.failed_tensor is None
    assert "header" in report.error and "every tensor's bytes match" in report.error


def test_truncation_is_a_structural_error(model):
    verify(model, write=True)
    model.write_bytes(model.read_bytes()[:-10])
    report = verify(model)
    assert report.exit_code == 1 and report.hashes == "unchecked"
    assert report.error_type not in (None, "IntegrityError")
    assert "truncated" in report.error


@pytest.mark.parametrize("edit", ["hash", "space", "reorder"])
def test_an_edited_manifest_is_detected(model, edit):
    verify(model, write=True)
    manifest = model.with_name("model.safetensors.blake3.json")
    raw = manifest.read_bytes()
    if edit == "hash":  # a recorded hash changed to match a tampered file, self-hash left as is
        document = json.loads(raw)
        key = document["files"]["model.safetensors"]["tensors"]["step"]["blake3"]
        raw = raw.replace(key.encode(), ("0" if key[0] != "0" else "1").encode() + key[1:].encode())
    elif edit == "space":  # the same JSON meaning
        raw = raw.replace(b'"schema_version": 1', b'"schema_version":  1')
    else:
        raw = raw.replace(b'"hash": "blake3"', b'"hash":"blake3"')
    manifest.write_bytes(raw)
    report = verify(model)
    assert report.exit_code == 1 and report.hashes == "failed"
    assert report.failed_file == str(manifest) and "edited" in report.error


def test_a_manifest_of_another_file_is_refused(model, tmp_path):
    verify(model, write=True)
    other = tmp_path / "other.safetensors"
    shutil.copy(model, other)
    shutil.copy(model.with_name("model.safetensors.blake3.json"), tmp_path / "other.safetensors.blake3.json")
    report = verify(other)
    assert report.exit_code == 1
    assert report.missing == [str(tmp_path / "model.safetensors")] and report.extra == [str(other)]


def test_write_refuses_an_invalid_file(model):
    model.write_bytes(model.read_bytes() + b"\0" * 8)
    report = verify(model, write=True)
    assert report.exit_code == 1 and report.hashes == "unchecked"
    assert not model.with_name("model.safetensors.blake3.json").exists()


def test_a_missing_path_is_an_error(tmp_path):
    report = verify(tmp_path / "nope.safetensors")
    assert report.exit_code == 2 and report.status == "error" and "No such file" in report.error


# --- other formats --------------------------------------------------------------------

def test_torch_file_tensor_hashes_equal_the_converted_files(tmp_path, tensors):
    tensors = dict(tensors, transposed=torch.arange(12, dtype=torch.float32).reshape(3, 4).T)
    pt = tmp_path / "model.pt"
    torch.save(tensors, pt)
    assert verify(pt).ok and verify(pt).format == "torch-zip"
    assert verify(pt, write=True).hashes == "written"
    entry = load_manifest(tmp_path / "model.pt.blake3.json")["files"]["model.pt"]
    assert entry["blake3"] == b3(pt.read_bytes())  # other formats: b3sum of the whole file
    assert "nbytes" in entry["tensors"]["transposed"]  # not C-contiguous: hashed from its values
    assert "range" in entry["tensors"]["embed.weight"]
    out = tmp_path / "converted.safetensors"
    safeckpt.convert(pt, out)
    verify(out, write=True)
    converted = load_manifest(tmp_path / "converted.safetensors.blake3.json")["files"]["converted.safetensors"]
    for name in tensors:
        assert entry["tensors"][name]["blake3"] == converted["tensors"][name]["blake3"], name
    assert entry["tensors"]["transposed"]["blake3"] == b3(tensors["transposed"].contiguous().numpy().tobytes())
    assert verify(pt).hashes == "verified"
    begin, nbytes = span(pt, "head.bias")
    flip_byte(pt, begin + 1, 0x10)
    report = verify(pt)
    assert report.exit_code == 1 and report.failed_tensor == "head.bias" and report.failed_file == str(pt)


def test_npz_and_lightning_checkpoints(tmp_path, model_like):
    npz = tmp_path / "arrays.npz"
    np.savez(npz, a=np.arange(10.0), b=np.ones((2, 3), np.int32))
    ckpt = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(4)}, "hyper_parameters": {"lr": 0.1}}, ckpt)
    for path in (npz, ckpt):
        assert verify(path, write=True).hashes == "written"
        report = verify(path)
        assert report.ok and report.hashes == "verified", report.error
    assert verify(npz).format == "npz" and verify(npz).tensors == 2
    assert verify(ckpt).tensors == 1


def test_a_truncated_torch_file_is_invalid(tmp_path, tensors):
    pt = tmp_path / "model.pt"
    torch.save(tensors, pt)
    pt.write_bytes(pt.read_bytes()[:-300])
    report = verify(pt)
    assert report.exit_code == 1 and str(pt) in report.error


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt", "model.bin"])
def test_a_git_lfs_pointer_in_place_of_the_file_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_text(lfs_pointer_text("a" * 64, 1234))
    report = verify(path)
    assert report.exit_code == 1 and report.error_type == "WrongFormatError"
    assert "Git LFS pointer" in report.error and "git lfs pull" in report.error and "1,234 bytes" in report.error


# --- sharded models, folders ---------------------------------------------------------------

@pytest.fixture
def sharded(tmp_path, model):
    out = tmp_path / "sharded"
    report = safeckpt.convert(model, out, shard_size=3000)
    assert len(report.outputs) >= 2
    return out


def test_a_sharded_folder_has_one_manifest(sharded, tensors):
    written = verify(sharded, write=True)
    assert written.ok and written.kind == "sharded" and written.hashes == "written", written.error
    index = sharded / "model.safetensors.index.json"
    manifest = load_manifest(str(index) + ".blake3.json")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert sorted(manifest["files"]) == sorted(shards + [index.name])
    checked = verify(sharded)
    assert checked.ok and checked.hashes == "verified" and checked.tensors == len(tensors)
    assert checked.format == "sharded safetensors" and len(checked.files) == len(shards) + 1
    assert verify(index).hashes == "verified"  # the index names the same model


def test_a_damaged_shard_is_named(sharded):
    verify(sharded, write=True)
    shard = sorted(sharded.glob("*.safetensors"))[-1]
    with safeckpt.SafetensorsFile(shard) as file:
        name = file.keys()[-1]
    begin, _ = span(shard, name)
    flip_byte(shard, begin, 0x10)
    report = verify(sharded)
    assert report.exit_code == 1 and report.failed_file == str(shard) and report.failed_tensor == name


def test_a_missing_shard(sharded):
    verify(sharded, write=True)
    shard = sorted(sharded.glob("*.safetensors"))[0]
    shard.unlink()
    report = verify(sharded)
    assert report.exit_code == 1 and shard.name in report.error


def test_a_shard_the_manifest_does_not_know(sharded):
    verify(sharded, write=True)
    index = sharded / "model.safetensors.index.json"
    document = json.loads(index.read_text())
    safeckpt.save_file({"extra": np.ones(3, np.float32)}, sharded / "extra.safetensors")
    document["weight_map"]["extra"] = "extra.safetensors"
    index.write_text(json.dumps(document))
    report = verify(sharded)
    assert report.exit_code == 1 and report.extra == [str(sharded / "extra.safetensors")]
    assert any("model.safetensors.index.json" in problem for problem in report.problems)


def test_a_plain_folder_checks_each_checkpoint_file(tmp_path, model, tensors):
    torch.save(tensors, tmp_path / "model.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert verify(tmp_path, write=True).ok
    assert (tmp_path / "model.pt.blake3.json").exists()
    report = verify(tmp_path)
    assert report.kind == "directory" and report.ok
    assert sorted(leaf.path for leaf in report.leaves()) == sorted([str(model), str(tmp_path / "model.pt")])
    assert all(leaf.hashes == "verified" for leaf in report.leaves())
    empty = tmp_path / "empty"
    empty.mkdir()
    assert verify(empty).exit_code == 2


# --- training checkpoints --------------------------------------------------------------------

@pytest.fixture
def run(tmp_path):
    from safeckpt import CheckpointManager
    directory = tmp_path / "run"
    with CheckpointManager(directory, keep_last=None) as mgr:
        for step in (10, 20):
            mgr.save(step, {"model": {"w": np.full((8, 8), step, np.float32), "b": np.arange(4.0)}, "epoch": 1})
    return directory


def test_a_checkpoint_manager_directory(run):
    report = verify(run)
    assert report.kind == "checkpoints" and report.ok
    assert [child.path for child in report.children] == [str(run / "step-00000010"), str(run / "step-00000020")]
    assert all(child.hashes == "verified" and child.tensors == 2 for child in report.children)
    step = verify(run / "step-00000020", write=True)
    assert step.ok and step.kind == "checkpoint" and step.notes  # --write leaves manifest.json alone
    assert not list(run.rglob("*.blake3.json"))


def test_a_damaged_checkpoint_names_the_tensor(run):
    tensors_file = run / "step-00000020" / "tensors.safetensors"
    begin, nbytes = span(tensors_file, "model/w")
    flip_byte(tensors_file, begin + nbytes - 1, 0x10)
    report = verify(run)
    assert report.exit_code == 1
    good, bad = report.children
    assert good.ok and not bad.ok
    assert bad.failed_tensor == "model/w" and bad.failed_file == str(tensors_file)
    assert "restore another step" in bad.error
    state = run / "step-00000010" / "state.json"
    state.write_bytes(state.read_bytes().replace(b'"epoch"', b'"epocH"'))
    assert verify(run / "step-00000010").failed_file == str(state)


def test_a_damaged_checkpoint_manifest(run):
    manifest = run / "step-00000010" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"step": 10', b'"step": 11'))
    report = verify(run)
    assert report.exit_code == 1 and [child.ok for child in report.children] == [False, True]
    assert str(manifest) in report.children[0].error


# --- sha256 and Git LFS pointers -------------------------------------------------------------

def test_sha256_equals_hashlib(model, tmp_path):
    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    assert sha256_file(model) == expected
    assert verify(model, sha256=True).sha256 == {str(model): expected}
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_lfs_pointer_match_and_mismatch(model, tmp_path):
    data = model.read_bytes()
    good = tmp_path / "good.pointer"
    good.write_text(lfs_pointer_text(hashlib.sha256(data).hexdigest(), len(data)))
    report = verify(model, lfs_pointer=good)
    assert report.ok and report.lfs == {"pointer": str(good), "oid": hashlib.sha256(data).hexdigest(),
                                        "size": len(data), "match": True}
    wrong_oid = tmp_path / "oid.pointer"
    wrong_oid.write_text(lfs_pointer_text("0" * 64, len(data)))
    report = verify(model, lfs_pointer=wrong_oid)
    assert report.exit_code == 1 and report.lfs["match"] is False and "differs from the oid" in report.error
    wrong_size = tmp_path / "size.pointer"
    wrong_size.write_text(lfs_pointer_text(hashlib.sha256(data).hexdigest(), len(data) + 1))
    report = verify(model, lfs_pointer=wrong_size)
    assert report.exit_code == 1 and "incomplete" in report.error and report.lfs["match"] is False
    with pytest.raises(errors.SafeckptError, match="one file"):
        verify(tmp_path, lfs_pointer=good)


@pytest.mark.parametrize("text, reason", [
    (b"", "empty"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "64 lower-case hex"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"a" * 64 + b"\n", "no size"),
    (b"version https://git-lfs.github.com/spec/v1\nsize 12\noid sha256:" + b"a" * 64 + b"\n", "sorted"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"a" * 64 + b"\nsize -1\n", "number of bytes"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"a" * 64 + b"\nsize 12", "newline"),
    (b"version https://git-lfs.github.com/spec/v1\r\noid sha256:" + b"a" * 64 + b"\r\nsize 1\r\n", "Windows"),
    (b"version 2\noid sha256:" + b"a" * 64 + b"\nsize 12\n", "first line"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"a" * 64 + b"\nsize 1\nzzz 1\n", "unknown key"),
    (b"\x00" * 2000, "larger than 1024 bytes"),
])
def test_malformed_pointers_are_refused_clearly(tmp_path, text, reason):
    path = tmp_path / "bad.pointer"
    path.write_bytes(text)
    with pytest.raises(errors.SafeckptError, match=reason) as caught:
        read_lfs_pointer(path)
    assert str(path) in str(caught.value) and "not a valid Git LFS pointer" in str(caught.value)


def test_a_pointer_with_extensions_parses():
    text = (b"version https://git-lfs.github.com/spec/v1\next-0-foo sha256:" + b"b" * 64
            + b"\noid sha256:" + b"a" * 64 + b"\nsize 0\n")
    assert parse_lfs_pointer(text) == LfsPointer("a" * 64, 0)


# --- the hashing engine --------------------------------------------------------------------

def test_range_hashes_match_blake3_on_every_path(monkeypatch, tmp_path):
    monkeypatch.setattr(range_hash, "BATCH_BYTES", 4096)  # small batches, and "large" ranges in blocks
    monkeypatch.setattr(range_hash, "BATCH_RANGES", 7)
    monkeypatch.setattr(range_hash, "HASH_BLOCK_BYTES", 10_000)
    rng = np.random.default_rng(1)
    path = tmp_path / "data.bin"
    path.write_bytes(rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    data = path.read_bytes()
    cuts = np.sort(rng.choice(len(data), 60, replace=False)).tolist()
    ranges = list(zip([0] + cuts, cuts + [len(data)])) + [(5, 5), (100, 90_000), (0, len(data))]
    seen = []
    meter = range_hash.Meter(lambda done, total, name: seen.append(done))
    with mapped(str(path)) as mapping:
        digests = list(range_hash.range_digests(mapping, ranges, meter, "data.bin"))
        early = range_hash.range_digests(mapping, ranges, range_hash.Meter(None), "data.bin")
        assert next(early) == b3(data[ranges[0][0]:ranges[0][1]])
        early.close()  # stopping early cancels the rest
    assert digests == [b3(data[begin:end]) for begin, end in ranges]
    assert seen == sorted(seen) and seen[-1] == sum(end - begin for begin, end in ranges)


def test_progress_reaches_the_total(model):
    calls = []
    verify(model, write=True, sha256=True, progress=lambda done, total, name: calls.append((done, total)))
    done, total = calls[-1]
    assert done == total == 2 * model.stat().st_size
