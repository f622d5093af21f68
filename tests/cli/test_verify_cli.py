"""`safeckpt verify`: --write, manifests, --sha256, --lfs-pointer, --json, exit codes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import safeckpt

from tests.cli.runner import invoke
from tests.files import flip_byte, lfs_pointer_text

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch", reason="the safetensors oracle is not installed")


@pytest.fixture
def model(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    st_torch.save_file({"a.weight": torch.randn(32, 8), "b.bias": torch.randn(8), "c.ids": torch.arange(5)},
                       str(path))
    return path


def pointer(tmp_path, oid: str, size: int, name="model.pointer"):
    path = tmp_path / name
    path.write_text(lfs_pointer_text(oid, size))
    return path


def flip_inside(path, tensor):
    with safeckpt.open_source(path) as source:
        offset = source.file_span(tensor).offset
    flip_byte(path, offset)


def test_help_has_examples_and_exit_codes():
    result = invoke("verify", "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout and "Exit codes:" in result.stdout
    assert "safeckpt verify --write" in result.stdout and "--lfs-pointer" in result.stdout


def test_without_a_manifest_the_structure_is_checked_and_the_fix_is_said(model):
    result = invoke("verify", model)
    assert result.exit_code == 0, result.output
    first, hint = result.stdout.splitlines()
    assert first == f"OK {model}: 3 tensors, 269 parameters, {model.stat().st_size:,} bytes"
    assert hint.startswith("no manifest") and f"safeckpt verify --write {model}" in hint


def test_write_then_verify_then_a_flipped_byte(model):
    result = invoke("verify", "--write", model)
    assert result.exit_code == 0, result.output
    manifest = f"{model}.blake3.json"
    assert result.stdout.strip().endswith(f"manifest written: {manifest}")
    result = invoke("verify", model)
    assert result.exit_code == 0 and result.stdout.strip().endswith(f"hashes match {manifest}")
    flip_inside(model, "b.bias")
    result = invoke("verify", model)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {model}: tensor 'b.bias': the tensor's bytes differ")
    assert len(result.stderr.splitlines()) == 1


def test_json(model, tmp_path):
    invoke("verify", "--write", model)
    flip_inside(model, "c.ids")
    missing = tmp_path / "missing.safetensors"
    result = invoke("verify", "--json", model, missing)
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    assert (document["command"], document["ok"], document["exit_code"]) == ("verify", False, 2)
    assert str(missing) in document["error"] and "c.ids" in document["error"]
    damaged, gone = document["files"]
    assert damaged["file"] == str(model) and damaged["status"] == "invalid" and damaged["exit_code"] == 1
    assert damaged["hashes"] == "failed" and damaged["failed_tensor"] == "c.ids"
    assert damaged["failed_file"] == str(model) and damaged["error_type"] == "IntegrityError"
    assert gone["status"] == "error" and "No such file" in gone["error"]


def test_sha256_prints_what_sha256sum_prints(model):
    result = invoke("verify", "--sha256", model)
    assert result.exit_code == 0
    assert f"{hashlib.sha256(model.read_bytes()).hexdigest()}  {model}" in result.stdout.splitlines()


def test_lfs_pointer(model, tmp_path):
    data = model.read_bytes()
    good = pointer(tmp_path, hashlib.sha256(data).hexdigest(), len(data))
    result = invoke("verify", model, "--lfs-pointer", good)
    assert result.exit_code == 0 and "size and sha256 match the LFS pointer" in result.stdout
    result = invoke("verify", model, "--lfs-pointer", pointer(tmp_path, "f" * 64, len(data), "wrong-oid"))
    assert result.exit_code == 1 and "differs from the oid" in result.stderr
    wrong_size = pointer(tmp_path, hashlib.sha256(data).hexdigest(), 5, "wrong-size")
    result = invoke("verify", model, "--lfs-pointer", wrong_size)
    assert result.exit_code == 1 and f"is {len(data):,} bytes but the LFS pointer" in result.stderr
    malformed = tmp_path / "bad.pointer"
    malformed.write_text("version https://git-lfs.github.com/spec/v1\noid md5:abc\nsize 3\n")
    result = invoke("verify", model, "--lfs-pointer", malformed)
    assert result.exit_code == 2 and "not a valid Git LFS pointer" in result.stderr and str(malformed) in result.stderr
    result = invoke("verify", model, model, "--lfs-pointer", good)
    assert result.exit_code == 2 and "exactly one PATH" in result.stderr


def test_a_pointer_in_place_of_the_model(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_text(lfs_pointer_text("a" * 64, 99))
    result = invoke("verify", path)
    assert result.exit_code == 1 and "Git LFS pointer" in result.stderr and "git lfs pull" in result.stderr


def test_every_format_and_the_worst_exit_code(tmp_path, model):
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3, 2)}, pt)
    npz = tmp_path / "arrays.npz"
    np.savez(npz, x=np.arange(4))
    result = invoke("verify", "--write", model, pt, npz)
    assert result.exit_code == 0 and result.stdout.count("manifest written") == 3
    assert "(torch-zip)" in result.stdout and "(npz)" in result.stdout and "3 of 3 valid" in result.stdout
    flip_inside(pt, "w")
    result = invoke("verify", model, pt, npz)
    assert result.exit_code == 1 and "2 of 3 valid" in result.stdout and "tensor 'w'" in result.stderr
    assert invoke("verify", model, pt, tmp_path / "gone.pt").exit_code == 2


def test_a_sharded_model_and_a_checkpoint_directory(tmp_path, model):
    out = tmp_path / "sharded"
    safeckpt.convert(model, out, shard_size=600)
    result = invoke("verify", "--write", out)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors.index.json.blake3.json").exists()
    result = invoke("verify", out)
    assert result.exit_code == 0 and "(sharded safetensors), hashes match" in result.stdout
    with safeckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"w": np.ones(4, np.float32)})
        mgr.save(2, {"w": np.zeros(4, np.float32)})
    result = invoke("verify", tmp_path / "run")
    assert result.exit_code == 0 and "2 of 2 valid" in result.stdout
    flip_inside(tmp_path / "run" / "step-00000002" / "tensors.safetensors", "w")
    result = invoke("verify", tmp_path / "run")
    assert result.exit_code == 1 and "tensor 'w'" in result.stderr and "restore another step" in result.stderr
