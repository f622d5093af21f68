"""`safeckpt merge`: exit codes, summary, --json, options, and refused inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

import safeckpt

from tests.cli.runner import invoke
from tests.ops.malicious_corpus import malicious_torch_file

torch = pytest.importorskip("torch")


@pytest.fixture
def checkpoints(tmp_path):
    """A torch.save'd state dict, a Lightning .ckpt and a safetensors file of one model, and a base."""
    values = []
    for seed in range(4):
        torch.manual_seed(seed)
        values.append({"enc.weight": torch.randn(4, 4), "enc.bias": torch.randn(4), "steps": torch.tensor(seed)})
    torch.save(values[0], tmp_path / "a.pt")
    torch.save({"state_dict": values[1], "epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.4.0"},
               tmp_path / "b.ckpt")
    safeckpt.save_file({k: v.numpy() for k, v in values[2].items()}, tmp_path / "c.safetensors")
    torch.save(values[3], tmp_path / "base.pt")
    paths = [tmp_path / "a.pt", tmp_path / "b.ckpt", tmp_path / "c.safetensors"]
    return paths, [{k: v.numpy() for k, v in d.items()} for d in values]


def test_linear_summary(tmp_path, checkpoints):
    paths, values = checkpoints
    result = invoke("merge", *paths, "-o", tmp_path / "soup.safetensors")
    assert result.exit_code == 0, result.output
    assert "merged 3 checkpoints (linear)" in result.stdout and "2 merged, 1 copied" in result.stdout
    got = safeckpt.load_file(str(tmp_path / "soup.safetensors"))
    np.testing.assert_allclose(got["enc.weight"], np.mean([v["enc.weight"] for v in values[:3]], axis=0),
                               rtol=1e-6, atol=1e-7)
    assert got["steps"] == 0


def test_json_report_with_options(tmp_path, checkpoints):
    paths, values = checkpoints
    result = invoke("merge", *paths, "-o", tmp_path / "out", "--method", "dare", "--base", tmp_path / "base.pt",
                    "--weights", "1,0.5,0.25", "--density", "0.5", "--seed", "3", "--lambda", "0.8",
                    "--dtype", "bf16", "--shard-size", "40B", "--verify", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["method"] == "dare" and report["verified"] is True
    assert report["parameters"] == {"weights": [1.0, 0.5, 0.25], "lambda": 0.8, "density": 0.5, "seed": 3}
    assert report["cast"] == "BF16" and report["index"].endswith("model.safetensors.index.json")
    assert len(report["outputs"]) > 1 and report["differing"] == ["steps"]


def test_weights_and_ema(tmp_path, checkpoints):
    paths, values = checkpoints
    result = invoke("merge", *paths, "-o", tmp_path / "ema.safetensors", "--method", "ema", "--decay", "0.5")
    assert result.exit_code == 0, result.output
    got = safeckpt.load_file(str(tmp_path / "ema.safetensors"))["enc.bias"]
    expected = 0.25 * values[0]["enc.bias"] + 0.25 * values[1]["enc.bias"] + 0.5 * values[2]["enc.bias"]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_incompatible_inputs_exit_1(tmp_path, checkpoints):
    paths, _ = checkpoints
    safeckpt.save_file({"enc.weight": np.zeros((2, 8), np.float32), "enc.bias": np.zeros(4, np.float32)},
                       tmp_path / "other.safetensors")
    result = invoke("merge", paths[0], tmp_path / "other.safetensors", "-o", tmp_path / "o.safetensors", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["error_type"] == "IncompatibleInputsError"
    assert report["offenders"] == ["enc.weight: a.pt F32[4, 4], other.safetensors F32[2, 8]"]
    assert "1 tensor differs in shape" in result.stderr and not (tmp_path / "o.safetensors").exists()


def test_allow_missing(tmp_path, checkpoints):
    paths, values = checkpoints
    safeckpt.save_file({"enc.weight": np.ones((4, 4), np.float32)}, tmp_path / "part.safetensors")
    result = invoke("merge", paths[0], tmp_path / "part.safetensors", "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 1 and "--allow-missing" in result.stderr
    result = invoke("merge", paths[0], tmp_path / "part.safetensors", "-o", tmp_path / "o.safetensors",
                    "--allow-missing")
    assert result.exit_code == 0, result.output
    got = safeckpt.load_file(str(tmp_path / "o.safetensors"))
    np.testing.assert_array_equal(got["enc.bias"], values[0]["enc.bias"])


@pytest.mark.parametrize("args, message", [
    (["--method", "slerp"], "exactly two"),
    (["--method", "ties"], "needs the base"),
    (["--weights", "1,2"], "2 weights for 3 inputs"),
    (["--weights", "1,x,2"], "comma-separated"),
    (["--t", "0.3"], "t does not apply to linear"),
    (["--method", "soup"], "invalid value for '--method'"),
])
def test_usage_errors_exit_2(tmp_path, checkpoints, args, message):
    paths, _ = checkpoints
    result = invoke("merge", *paths, "-o", tmp_path / "o.safetensors", *args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "o.safetensors").exists()


def test_missing_input_exit_2(tmp_path, checkpoints):
    paths, _ = checkpoints
    result = invoke("merge", paths[0], tmp_path / "nope.pt", "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 2 and "nope.pt" in result.stderr


def test_malicious_input_refused(tmp_path, checkpoints):
    paths, _ = checkpoints
    evil, canary = tmp_path / "evil.pt", tmp_path / "canary"
    malicious_torch_file(evil, canary)
    result = invoke("merge", evil, evil, "-o", tmp_path / "o.safetensors", "--json")
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {evil}: refusing to merge")
    report = json.loads(result.stdout)
    assert report["scan"]["verdict"] == "malicious" and report["error_type"] == "UnsafeFileError"
    assert not (tmp_path / "o.safetensors").exists() and not canary.exists()
    result = invoke("merge", evil, evil, "-o", tmp_path / "o.safetensors", "--allow-unsafe-structure")
    assert result.exit_code == 0, result.output
    assert not canary.exists()


def test_help_has_examples_and_exit_codes():
    result = invoke("merge", "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.output and "Exit codes:" in result.output
    assert "--method" in result.output and "--allow-missing" in result.output
