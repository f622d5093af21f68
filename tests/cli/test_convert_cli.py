"""`safeckpt convert`: exit codes, output, options, and a refused malicious source."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

import safeckpt
from safeckpt.cli import COMMANDS, main
from safeckpt.cli import convert as convert_cli
from safeckpt.cli import output

from tests.cli.runner import invoke
from tests.ops.malicious_corpus import malicious_torch_file

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    tensors = {"enc.weight": torch.randn(8, 8), "enc.bias": torch.randn(8), "dec.weight": torch.randn(8, 8),
               "steps": torch.arange(3), "huge": torch.tensor([1.0, 1e5, -1e6])}
    path = tmp_path / "pytorch_model.bin"
    torch.save(tensors, path)
    return path, tensors


def test_registered():
    assert "convert" in COMMANDS and main.get_command(None, "convert") is convert_cli.command


def test_convert_prints_a_summary(tmp_path, checkpoint):
    path, tensors = checkpoint
    result = invoke("convert", path, tmp_path / "model.safetensors")
    assert result.exit_code == 0, result.output
    assert f"converted {path} (torch-zip)" in result.stdout and "5 tensors" in result.stdout
    loaded = st_torch.load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_json_report(tmp_path, checkpoint):
    path, _ = checkpoint
    result = invoke("convert", path, tmp_path / "out", "--shard-size", "300B", "--dtype", "bf16",
                    "--verify", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["command"] == "convert" and report["ok"] is True and report["error"] is None
    assert report["verified"] is True and report["cast"] == "BF16"
    assert report["index"].endswith("model.safetensors.index.json") and len(report["outputs"]) > 1
    index = json.loads(Path(report["index"]).read_text())
    assert sorted(index["weight_map"]) == sorted(checkpoint[1])
    with safeckpt.safe_open(report["outputs"][0]) as f:
        assert "safeckpt.source_sha256" in f.metadata()


def test_overflow_is_shown(tmp_path, checkpoint):
    path, _ = checkpoint
    result = invoke("convert", path, tmp_path / "h.safetensors", "--dtype", "fp16")
    assert result.exit_code == 0, result.output
    assert "warning: values overflowed (now ±inf, or ±max for F8_E4M3) in 1 tensors cast to F16" in result.stdout
    assert "huge" in result.stdout and "RuntimeWarning" not in result.output


def test_select_exclude_extract_and_no_hash(tmp_path, checkpoint):
    path, _ = checkpoint
    result = invoke("convert", path, tmp_path / "s.safetensors", "--select", "enc.*", "--select", "steps",
                    "--exclude", "*.bias", "--no-source-hash", "--extract", "none")
    assert result.exit_code == 0, result.output
    assert sorted(st_torch.load_file(str(tmp_path / "s.safetensors"))) == ["enc.weight", "steps"]
    assert "skipped 3 source tensors" in result.stdout
    with safeckpt.safe_open(tmp_path / "s.safetensors") as f:
        assert "safeckpt.source_sha256" not in f.metadata()


def test_ema_flags(tmp_path):
    weights = {"model.a.weight": torch.zeros(2), "model_ema.aweight": torch.ones(2),
               "model_ema.decay": torch.tensor(0.99)}
    torch.save({"state_dict": weights}, tmp_path / "sd.ckpt")
    result = invoke("convert", tmp_path / "sd.ckpt", tmp_path / "e.safetensors", "--ema-only")
    assert result.exit_code == 0, result.output
    assert torch.equal(st_torch.load_file(str(tmp_path / "e.safetensors"))["model.a.weight"], torch.ones(2))
    result = invoke("convert", tmp_path / "sd.ckpt", tmp_path / "d.safetensors", "--drop-ema")
    assert result.exit_code == 0 and list(st_torch.load_file(str(tmp_path / "d.safetensors"))) == ["model.a.weight"]
    result = invoke("convert", tmp_path / "sd.ckpt", tmp_path / "x.safetensors", "--drop-ema", "--ema-only")
    assert result.exit_code == 2 and "exclude each other" in result.stderr


def test_malicious_source_is_refused(tmp_path):
    canary = tmp_path / "canary"
    malicious_torch_file(tmp_path / "evil.bin", canary)
    result = invoke("convert", tmp_path / "evil.bin", tmp_path / "out.safetensors")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'evil.bin'}: refusing to convert")
    assert "posix.system" in result.stderr
    assert "--allow-unsafe-structure" in result.stderr and len(result.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.bin"] and not canary.exists()
    result = invoke("convert", tmp_path / "evil.bin", tmp_path / "out.safetensors", "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 2 and report["scan"]["verdict"] == "malicious" and report["ok"] is False
    assert report["error_type"] == "UnsafeFileError" and "--allow-unsafe-structure" in report["error"]
    result = invoke("convert", tmp_path / "evil.bin", tmp_path / "out.safetensors", "--allow-unsafe-structure")
    assert result.exit_code == 0, result.output
    assert "malicious" in result.stdout and not canary.exists()
    assert list(st_torch.load_file(str(tmp_path / "out.safetensors"))) == ["w"]


@pytest.mark.parametrize("args, message", [
    (["missing.bin", "o.safetensors"], "missing.bin: cannot read: no such file or directory"),
    (["{src}", "o.safetensors", "--dtype", "int3"], "cannot cast to 'int3'"),
    (["{src}", "o.safetensors", "--shard-size", "lots"], "is not a size"),
    (["{src}", "o.safetensors", "--select", "nothing*"], "nothing to convert"),
])
def test_errors_exit_2_with_one_line(tmp_path, checkpoint, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = invoke("convert", *[a.format(src=checkpoint[0]) for a in args])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "o.safetensors").exists()


def test_progress_bar_only_after_a_second(monkeypatch):
    shown = io.StringIO()
    monkeypatch.setattr(output, "make_console",
                        lambda stderr=False: Console(file=shown, force_terminal=True, width=100))
    bar = output.ProgressBar("converting", enabled=True)
    bar(10, 100, "first")
    assert bar.bar is None  # under a second: nothing drawn
    bar.started -= output.PROGRESS_AFTER_SECONDS
    bar(50, 100, "layers.0.weight")
    assert bar.bar is not None
    bar.close()
    assert "layers.0.weight" in shown.getvalue()


def test_raw_dump_with_a_template(tmp_path):
    """A headerless dump (arrays back to back) converts and inspects against a safetensors template."""
    import numpy as np
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "ids": np.arange(5, dtype=np.int64)}
    safeckpt.save_file(arrays, tmp_path / "layout.safetensors")
    order = safeckpt.SafetensorsFile(tmp_path / "layout.safetensors").keys()
    (tmp_path / "dump.bin").write_bytes(b"".join(arrays[name].tobytes() for name in order))
    result = invoke("convert", tmp_path / "dump.bin", tmp_path / "out.safetensors",
                    "--template", tmp_path / "layout.safetensors")
    assert result.exit_code == 0, result.output
    loaded = safeckpt.load_file(tmp_path / "out.safetensors")
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)
    report = json.loads(invoke("inspect", tmp_path / "dump.bin", "--template", tmp_path / "layout.safetensors",
                               "--json").stdout)
    assert report["format"] == "raw" and report["totals"]["tensors"] == 2
    assert invoke("convert", tmp_path / "dump.bin", tmp_path / "no.safetensors").exit_code == 2


def test_a_model_folders_other_files_are_listed(tmp_path):
    import numpy as np
    folder = tmp_path / "model"
    folder.mkdir()
    safeckpt.save_file({"w": np.ones(2, np.float32)}, folder / "model.safetensors")
    (folder / "config.json").write_text('{"hidden": 2}')
    result = invoke("convert", folder, tmp_path / "out/")
    assert result.exit_code == 0, result.output
    assert f"copied beside it: {tmp_path / 'out' / 'config.json'}" in result.stdout
