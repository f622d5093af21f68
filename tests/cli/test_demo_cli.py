"""`safeckpt demo`: the whole story runs green in a fresh process, cleans up, and fails loudly."""

from __future__ import annotations

import sys

import pytest

from tests.cli.runner import invoke, run_script


@pytest.mark.slow
def test_demo_runs_green(tmp_path):
    pytest.importorskip("torch")
    result = run_script("demo", "--dir", tmp_path, timeout=180)  # about 15 s here
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "checks passed" in out and "✗" not in out
    for command in ("$ safeckpt scan planted.pt", "$ safeckpt inspect tinylm.ckpt",
                    "$ safeckpt convert tinylm.ckpt converted/", "$ safeckpt verify converted/ --write",
                    "$ safeckpt diff tinylm.ckpt converted/", "$ safeckpt ls run/",
                    "$ safeckpt merge run/step-*/tensors.safetensors -o averaged.safetensors",
                    "$ safeckpt verify truncated.safetensors"):
        assert command in out, command
    assert "posix.system" in out and "error: truncated.safetensors:" in result.stderr  # errors go to stderr
    assert list(tmp_path.iterdir()) == [], "the demo removes its files unless --keep"


@pytest.mark.slow
def test_demo_keep(tmp_path):
    pytest.importorskip("torch")
    result = invoke("demo", "--dir", tmp_path, "--keep")
    assert result.exit_code == 0, result.output
    (workdir,) = tmp_path.iterdir()
    assert (workdir / "model.safetensors").is_file() and f"files kept in {workdir}" in result.stdout
    assert (workdir / "averaged.safetensors").is_file() and (workdir / "run").is_dir()
    assert not (workdir / "PWNED").exists()
    assert invoke("verify", workdir / "model.safetensors").exit_code == 0


@pytest.mark.slow
def test_demo_fails_when_a_check_fails(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import safeckpt.torch as sct
    monkeypatch.setattr(sct, "restore_training_state", lambda state, *objects: state["extra"])  # restores nothing
    result = invoke("demo", "--dir", tmp_path)
    assert result.exit_code == 1
    assert "checks failed" in result.stdout and "as they were" in result.stdout.split("checks failed")[1]


def test_demo_directory_that_cannot_be_made(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "file").write_text("")
    result = invoke("demo", "--dir", tmp_path / "file" / "sub")
    assert result.exit_code == 2 and "cannot create the demo's directory" in result.stderr


def test_demo_without_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    result = invoke("demo")
    assert result.exit_code == 2
    assert "pip install torch" in result.stderr
