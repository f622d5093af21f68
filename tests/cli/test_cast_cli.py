"""`safeckpt cast` and `safeckpt.ops.cast.cast`: which tensors are cast, the bits, overflow and underflow."""

from __future__ import annotations

import json

import numpy as np
import pytest

import safeckpt
from safeckpt.ops.convert import cast

from tests.cli.runner import invoke
from tests.files import tensor_bytes
from tests.ops.malicious_corpus import malicious_torch_file

torch = pytest.importorskip("torch")


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    state = {"layers.0.attn.weight": torch.randn(16, 16), "layers.0.norm.weight": torch.rand(16) + 0.5,
             "layers.0.mlp.weight": torch.randn(16, 8).double(), "position_ids": torch.arange(16),
             "mask": torch.rand(4) > 0.5, "tiny_and_huge": torch.tensor([1.0, 1e-9, -1e-9, 7e4, 1e6, 0.0])}
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    return path, state


def test_cast_to_bf16_matches_torch_bits_and_keeps_ints_bools_and_excluded(tmp_path, checkpoint):
    path, state = checkpoint
    report = cast(path, tmp_path / "out.safetensors", "bf16", exclude="*norm*")
    loaded = safeckpt.load_file(tmp_path / "out.safetensors", framework="pt")
    for name in ("layers.0.attn.weight", "layers.0.mlp.weight", "tiny_and_huge"):
        assert loaded[name].dtype == torch.bfloat16
        assert tensor_bytes(loaded[name]) == tensor_bytes(state[name].to(torch.bfloat16)), name
    assert loaded["layers.0.norm.weight"].dtype == torch.float32  # excluded: copied bit for bit
    assert tensor_bytes(loaded["layers.0.norm.weight"]) == tensor_bytes(state["layers.0.norm.weight"])
    assert torch.equal(loaded["position_ids"], state["position_ids"])
    assert torch.equal(loaded["mask"], state["mask"])
    assert report.cast == "BF16" and report.overflow == {} and report.underflow == {}


def test_select_casts_only_the_matching_tensors(tmp_path, checkpoint):
    path, state = checkpoint
    cast(path, tmp_path / "out.safetensors", "fp16", select=["*.mlp.*"])
    with safeckpt.safe_open(tmp_path / "out.safetensors", "np") as f:
        dtypes = {name: str(f.get_tensor(name).dtype) for name in f.keys()}
    assert dtypes["layers.0.mlp.weight"] == "float16"
    assert dtypes["layers.0.attn.weight"] == "float32" and dtypes["tiny_and_huge"] == "float32"


def test_overflow_and_underflow_are_counted_per_tensor(tmp_path, checkpoint):
    path, state = checkpoint
    with pytest.warns(RuntimeWarning, match="overflowed"):
        report = cast(path, tmp_path / "out.safetensors", "fp16")
    assert report.overflow == {"tiny_and_huge": 2}  # 7e4 and 1e6 are past fp16's 65504
    assert report.underflow == {"tiny_and_huge": 2}  # ±1e-9 are under fp16's smallest subnormal
    loaded = safeckpt.load_file(tmp_path / "out.safetensors", framework="pt")
    assert tensor_bytes(loaded["tiny_and_huge"]) == tensor_bytes(state["tiny_and_huge"].to(torch.float16))


def test_fp8_saturates_like_torch(tmp_path, checkpoint):
    path, state = checkpoint
    with pytest.warns(RuntimeWarning):
        cast(path, tmp_path / "out.safetensors", "fp8", select="tiny_and_huge")
    loaded = safeckpt.load_file(tmp_path / "out.safetensors", framework="pt")
    expected = state["tiny_and_huge"].clamp(-448, 448).to(torch.float8_e4m3fn)
    assert loaded["tiny_and_huge"].view(torch.uint8).tolist() == expected.view(torch.uint8).tolist()


def test_cli_reports_counts_and_strict_exits_1(tmp_path, checkpoint):
    path, _ = checkpoint
    result = invoke("cast", path, tmp_path / "a.safetensors", "--dtype", "fp16")
    assert result.exit_code == 0, result.output
    assert "overflowed" in result.stdout and "underflowed" in result.stdout and "tiny_and_huge" in result.stdout
    result = invoke("cast", path, tmp_path / "b.safetensors", "--dtype", "fp16", "--strict", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["command"] == "cast" and report["ok"] is False and report["exit_code"] == 1
    assert report["cast"] == "F16" and report["overflow"] == {"tiny_and_huge": 2}  # the target dtype
    assert "--strict" in report["error"] and result.stderr.startswith("error: --strict: values overflowed")
    assert (tmp_path / "b.safetensors").exists()
    clean = invoke("cast", path, tmp_path / "c.safetensors", "--dtype", "bf16", "--strict", "--verify")
    assert clean.exit_code == 0, clean.output


def test_cli_errors(tmp_path, checkpoint):
    path, _ = checkpoint
    result = invoke("cast", path, tmp_path / "x.safetensors", "--dtype", "int8")
    assert result.exit_code == 2 and "cannot cast to 'int8'" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    missing = invoke("cast", tmp_path / "nope.bin", tmp_path / "x.safetensors", "--dtype", "bf16")
    assert missing.exit_code == 2 and "nope.bin" in missing.stderr
    assert invoke("cast", path, tmp_path / "x.safetensors").exit_code == 2  # --dtype is required
    assert "Examples:" in invoke("cast", "--help").output


def test_malicious_source_is_refused_and_never_run(tmp_path):
    canary = tmp_path / "canary"
    malicious_torch_file(tmp_path / "evil.pt", canary)
    result = invoke("cast", tmp_path / "evil.pt", tmp_path / "out.safetensors", "--dtype", "bf16")
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {tmp_path / 'evil.pt'}: refusing to ")
    assert not canary.exists() and not (tmp_path / "out.safetensors").exists()


def test_every_format_casts(tmp_path):
    values = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    np.savez(tmp_path / "arrays.npz", w=values, ids=np.arange(3))
    cast(tmp_path / "arrays.npz", tmp_path / "out.safetensors", "bf16")
    loaded = safeckpt.load_file(tmp_path / "out.safetensors")
    assert loaded["w"].dtype.name == "bfloat16" and loaded["ids"].dtype == np.int64
    np.testing.assert_array_equal(loaded["w"].astype(np.float32),
                                  torch.from_numpy(values).bfloat16().float().numpy())
