"""`safeckpt diff`: output, exit codes (0 identical / within tolerance, 1 different, 2 error), --json, --plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

import safeckpt

from tests.cli.runner import invoke

torch = pytest.importorskip("torch")


@pytest.fixture
def pair(tmp_path):
    """A Lightning-style checkpoint, its conversion, and a fine-tuned safetensors file."""
    torch.manual_seed(0)
    sd = {f"model.layers.{i}.{kind}": torch.randn(8, 8) for i in range(3) for kind in ("q.weight", "v.weight")}
    sd["model.norm.weight"] = torch.ones(8)
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 7, "pytorch-lightning_version": "2.4.0"},
               tmp_path / "last.ckpt")
    safeckpt.convert(tmp_path / "last.ckpt", tmp_path / "model.safetensors")
    tuned = {name: (t * 1.001 if "layers.2" in name else t).numpy() for name, t in sd.items()}
    safeckpt.save_file(tuned, tmp_path / "tuned.safetensors")
    return tmp_path / "last.ckpt", tmp_path / "model.safetensors", tmp_path / "tuned.safetensors"


def test_a_conversion_is_identical(pair):
    ckpt, converted, _ = pair
    result = invoke("diff", ckpt, converted)
    assert result.exit_code == 0, result.output
    assert "7 equal" in result.stdout and "IDENTICAL" in result.stdout
    assert "model.layers.0.q.weight" not in result.stdout  # equal tensors are not listed ...
    listed = invoke("diff", ckpt, converted, "--all")
    assert listed.exit_code == 0 and "model.layers.0.q.weight" in listed.stdout  # ... unless --all


def test_differences_exit_1_with_a_table_sorted_by_change(pair):
    _, converted, tuned = pair
    result = invoke("diff", converted, tuned)
    assert result.exit_code == 1, result.output
    assert "5 equal, 2 changed" in result.stdout and "DIFFERENT" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("model.")]
    assert [line.split()[0] for line in lines] == ["model.layers.2.q.weight", "model.layers.2.v.weight"] or \
        [line.split()[0] for line in lines] == ["model.layers.2.v.weight", "model.layers.2.q.weight"]
    assert "F32 [8, 8]" in lines[0] and "0.001" in lines[0]  # rel L2 of x -> 1.001 x


def test_tolerance_is_a_ci_gate(pair):
    _, converted, tuned = pair
    loose = invoke("diff", converted, tuned, "--rtol", "2e-3")
    assert loose.exit_code == 0, loose.output
    assert "WITHIN TOLERANCE (rtol=0.002)" in loose.stdout
    tight = invoke("diff", converted, tuned, "--atol", "1e-9")
    assert tight.exit_code == 1 and "NOT WITHIN TOLERANCE" in tight.stdout and "beyond tol" in tight.stdout


def test_structural_difference_fails_any_tolerance(tmp_path):
    safeckpt.save_file({"a": np.ones(3, np.float32), "b": np.ones(2)}, tmp_path / "a.safetensors")
    safeckpt.save_file({"a": np.ones(3, np.float32)}, tmp_path / "b.safetensors")
    result = invoke("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--atol", "1e9")
    assert result.exit_code == 1 and "only in A" in result.stdout and "1 structural" in result.stdout


def test_json_parses(pair):
    _, converted, tuned = pair
    result = invoke("diff", converted, tuned, "--json", "--atol", "1e-9")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["identical"] is False and report["within_tolerance"] is False and report["atol"] == 1e-9
    assert report["summary"]["changed"] == 2 and len(report["entries"]) == 7
    changed = [e for e in report["entries"] if e["status"] == "changed"]
    assert all(e["rel_l2"] == pytest.approx(1e-3, rel=1e-3) and e["beyond_tolerance"] > 0 for e in changed)


@pytest.mark.parametrize("args", [("missing.safetensors", "model.safetensors"),
                                  ("garbage.safetensors", "model.safetensors"),
                                  ("model.safetensors", "model.safetensors", "--atol", "-1")])
def test_errors_exit_2_with_one_line(pair, args):
    directory = pair[1].parent
    (directory / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    result = invoke("diff", *[directory / a if a.endswith(".safetensors") else a for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    as_json = invoke("diff", *[directory / a if a.endswith(".safetensors") else a for a in args], "--json")
    report = json.loads(as_json.stdout)
    assert as_json.exit_code == 2 and report["exit_code"] == 2 and report["ok"] is False
    assert report["error"] == result.stderr.strip().removeprefix("error: ")


def test_plot_is_written(pair, tmp_path):
    pytest.importorskip("matplotlib")
    _, converted, tuned = pair
    result = invoke("diff", converted, tuned, "--plot", tmp_path / "diff.png")
    assert result.exit_code == 1 and "plot: " in result.stdout
    data = (tmp_path / "diff.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_long_lists_are_cut_unless_all(tmp_path):
    safeckpt.save_file({f"t{i:03d}": np.full(2, i, np.float32) for i in range(60)}, tmp_path / "a.safetensors")
    safeckpt.save_file({f"t{i:03d}": np.full(2, i + 1, np.float32) for i in range(60)}, tmp_path / "b.safetensors")
    short = invoke("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert short.exit_code == 1 and "... and 10 more differences (use --all" in short.stdout
    assert short.stdout.splitlines()[5].startswith("t000")  # rel L2 1/0 = inf comes first
    every = invoke("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--all")
    assert "more differences" not in every.stdout and "t059" in every.stdout


def test_help_has_examples_and_exit_codes():
    result = invoke("diff", "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout and "Exit codes:" in result.stdout and "--atol" in result.stdout
