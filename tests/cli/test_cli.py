"""The `safeckpt` command: inspect, verify, demo, help and exit codes."""

from __future__ import annotations

import io
import json
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import safeckpt
from safeckpt.cli import COMMANDS, output
from safeckpt.format import reader

from tests.cli.runner import CONSOLE_SCRIPT, cells, invoke, run_script
from tests.files import safetensors_bytes


def table_rows(stdout: str) -> dict[str, list[str]]:
    """First cell of each table line -> the line's cells."""
    rows = {}
    for line in stdout.splitlines():
        rows.setdefault(cells(line)[0], cells(line))
    return rows


@pytest.fixture
def ours(tmp_path, model_like) -> Path:
    path = tmp_path / "ours.safetensors"
    safeckpt.save_file(model_like, path, {"format": "np", "step": "7"})
    return path


@pytest.fixture
def theirs(tmp_path) -> Path:
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch", reason="the safetensors oracle is not installed")
    path = tmp_path / "theirs.safetensors"
    torch.manual_seed(0)
    st_torch.save_file({"wte": torch.randn(100, 8), "ln.bias": torch.zeros(8, dtype=torch.bfloat16),
                        "ids": torch.arange(5, dtype=torch.int64), "mask": torch.ones(3, 3, dtype=torch.bool)},
                       str(path), metadata={"format": "pt"})
    return path


# --- inspect ---------------------------------------------------------------------

def test_inspect_table(ours, model_like):
    result = invoke("inspect", ours)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    out = result.stdout
    rows = table_rows(out)
    order = safeckpt.SafetensorsFile(ours).keys()
    for name in order:
        array = model_like[name]
        assert rows[name] == [name, safeckpt.SafetensorsFile(ours).info(name).dtype,
                              "[" + ", ".join(map(str, array.shape)) + "]", f"{array.size:,}",
                              f"{array.nbytes:,}"]
    positions = [out.index(f"\n{name} ") for name in order]
    assert positions == sorted(positions), "tensors are listed in file order"
    parameters = sum(a.size for a in model_like.values())
    assert f"parameters  {parameters:,} ({output.human_count(parameters)})" in out
    assert f"file size   {ours.stat().st_size:,} bytes" in out
    f32 = [a for a in model_like.values() if a.dtype == np.float32]
    assert rows["F32"] == ["F32", str(len(f32)), f"{sum(a.size for a in f32):,}", f"{sum(a.nbytes for a in f32):,}"]
    assert rows["BF16"][1] == "1"
    assert rows["format"] == ["format", "np"] and rows["step"] == ["step", "7"]


def test_inspect_json(ours, model_like):
    result = invoke("inspect", ours, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    with safeckpt.SafetensorsFile(ours) as f:
        assert [t["name"] for t in report["tensors"]] == f.keys()
        for entry in report["tensors"]:
            info = f.info(entry["name"])
            array = model_like[entry["name"]]
            assert entry == {"name": entry["name"], "dtype": info.dtype, "shape": list(array.shape),
                             "parameters": array.size, "bytes": array.nbytes,
                             "data_offsets": list(info.data_offsets)}
    assert report["file"] == str(ours)
    assert report["file_size"] == ours.stat().st_size
    assert report["header_size"] + report["totals"]["bytes"] == report["file_size"]
    assert report["metadata"] == {"format": "np", "step": "7"}
    assert report["totals"]["tensors"] == len(model_like)
    assert report["totals"]["parameters"] == sum(a.size for a in model_like.values())
    assert report["totals_by_dtype"]["I64"] == {"tensors": 1, "parameters": 1, "bytes": 8}
    assert list(report["totals_by_dtype"]) == ["I64", "F64", "F32", "I32", "BF16", "F16", "BOOL"]


def test_inspect_file_made_by_safetensors(theirs):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open as reference_open
    report = json.loads(invoke("inspect", theirs, "--json").stdout)
    with reference_open(str(theirs), framework="pt") as f:
        assert report["metadata"] == f.metadata()
        assert {t["name"] for t in report["tensors"]} == set(f.keys())
        for entry in report["tensors"]:
            tensor = f.get_tensor(entry["name"])
            assert entry["shape"] == list(tensor.shape)
            assert entry["parameters"] == tensor.numel()
            assert entry["bytes"] == tensor.numel() * tensor.element_size()
    assert report["totals_by_dtype"]["BF16"] == {"tensors": 1, "parameters": 8, "bytes": 16}
    table = invoke("inspect", theirs)
    assert table.exit_code == 0
    assert table_rows(table.stdout)["wte"] == ["wte", "F32", "[100, 8]", "800", "3,200"]
    assert table_rows(table.stdout)["mask"] == ["mask", "BOOL", "[3, 3]", "9", "9"]
    del torch


def test_inspect_reads_only_the_header(tmp_path, monkeypatch):
    path = tmp_path / "big.safetensors"
    safeckpt.save_file({"w": np.zeros((1024, 1024), np.float32)}, path)
    header_size = safeckpt.SafetensorsFile(path).header.data_start
    requested = []
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: requested.append(
        sum(len(b) for b in buffers)) or real_preadv(fd, buffers, offset))
    monkeypatch.setattr(mmap, "mmap", lambda *a, **k: pytest.fail("inspect mapped the file"))
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
    assert 0 < sum(requested) <= header_size + 64  # 64: the head sniffed for other formats


def test_inspect_100k_tensors_lists_every_one(tmp_path):  # its speed: the benchmarks' header.inspect rows
    n = 100_000
    header = {f"model.layers.{i}.weight": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
              for i in range(n)}
    path = tmp_path / "many.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(4 * n)))
    result = invoke("inspect", path, "--flat")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert sum(line.startswith("model.layers.") for line in lines) == n
    assert f"model.layers.{n - 1}.weight   F32     [1]" in result.stdout
    assert table_rows(result.stdout)["F32"] == ["F32", "100,000", "100,000", "400,000"]


def test_plain_table_is_what_rich_prints():
    columns = [output.Column("name"), output.Column("dtype"), output.Column("bytes", right=True),
               output.Column("value")]
    rows = [("embed.weight", "F32", "4,096", "x"), ("b", "BF16", "12", "longer value"),
            ("日本語", "F8_E4M3", "1", "é")]
    buffer = io.StringIO()
    Console(file=buffer, width=100_000).print(output._rich_table(columns, rows))
    assert output.plain_table(columns, rows) == buffer.getvalue()


def test_names_are_printed_verbatim_on_one_line(tmp_path):
    path = tmp_path / "odd.safetensors"
    names = ["[bold]not markup[/bold]", "two\nlines", "tab\there"]
    safeckpt.save_file({name: np.zeros(2, np.float32) for name in names}, path, {"[red]k": "v\nw"})
    result = invoke("inspect", path)
    assert result.exit_code == 0
    rows = table_rows(result.stdout)
    assert rows["[bold]not markup[/bold]"][1] == "F32"
    assert rows["two\\nlines"][1] == "F32"
    assert rows["tab\\there"][1] == "F32"
    assert rows["[red]k"] == ["[red]k", "v\\nw"]
    report = json.loads(invoke("inspect", path, "--json").stdout)
    assert sorted(t["name"] for t in report["tensors"]) == sorted(names)


def test_inspect_without_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    safeckpt.save_file({"w": np.ones(3, np.float32)}, path)
    result = invoke("inspect", path)
    assert "no __metadata__" in result.stdout
    assert json.loads(invoke("inspect", path, "--json").stdout)["metadata"] is None


def _invalid_files(tmp_path: Path, ours: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, words the one-line reason must hold)."""
    data = ours.read_bytes()
    files = {
        "garbage": (b"this is not a model, just some text\n", "it is a text file"),
        "empty": (b"", "smaller than the 8-byte header length"),
        "truncated": (data[:-10], "the file may be truncated"),
        "trailing": (data + b"\0" * 8, "trailing bytes"),
        "html": (b"<!DOCTYPE html><html><body>404</body></html>", "HTML page"),
        "lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "Git LFS pointer"),
        "gap": (safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)),
                "belong to no tensor"),
    }
    made = {}
    for name, (content, reason) in files.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        made[name] = (path, reason)
    return made


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "trailing", "html", "lfs", "gap"])
def test_invalid_files_exit_1_with_one_line(tmp_path, ours, kind):
    path, reason = _invalid_files(tmp_path, ours)[kind]
    for command in ("inspect", "verify"):
        result = invoke(command, path)
        assert result.exit_code == 1, (command, result.output)
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert str(path) in result.stderr and reason in result.stderr
        assert "Traceback" not in result.output


def test_pickle_is_refused_with_what_it_is(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, path)
    result = invoke("verify", path)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {path}: not a safetensors file: it is a zip archive")


def test_missing_file_exits_2(tmp_path):
    missing = tmp_path / "nope.safetensors"
    result = invoke("inspect", missing)
    assert result.exit_code == 2
    assert result.stderr == f"error: {missing}: cannot read: no such file or directory\n"
    result = invoke("verify", missing)
    assert result.exit_code == 2
    assert result.stderr == f"error: {missing}: cannot read: no such file or directory\n"


def test_file_truncated_after_opening(ours, monkeypatch):
    real = reader.read_header_from_fd

    def truncate_then_read(fd, file_size, path):
        os.truncate(path, 20)  # someone else truncates the file between open and read
        return real(fd, file_size, path)

    monkeypatch.setattr(reader, "read_header_from_fd", truncate_then_read)
    result = invoke("verify", ours)
    assert result.exit_code == 1
    assert "truncated while open" in result.stderr and "Traceback" not in result.output


def test_unexpected_errors_are_one_line_not_a_traceback(ours, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(reader.SafetensorsFile, "__init__", boom)
    result = invoke("inspect", ours)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {ours}: internal error RuntimeError: kaboom")
    assert len(result.stderr.splitlines()) == 1
    monkeypatch.setenv(output.TRACEBACK_ENV, "1")
    assert isinstance(invoke("inspect", ours).exception, RuntimeError)


# --- verify ------------------------------------------------------------------------

def test_verify_valid_files(ours, theirs):
    result = invoke("verify", ours, theirs)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    n_ours = len(safeckpt.SafetensorsFile(ours).keys())
    assert lines[0].startswith(f"OK {ours}: {n_ours} tensors, ")
    assert lines[0].endswith(f", {ours.stat().st_size:,} bytes")
    assert lines[1].startswith(f"OK {theirs}: 4 tensors, 822 parameters, ")
    assert lines[2] == "2 of 2 valid"


def test_verify_exit_code_is_the_worst(tmp_path, ours):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"garbage!" * 4)
    assert invoke("verify", ours, garbage).exit_code == 1
    assert invoke("verify", ours, garbage, tmp_path / "missing").exit_code == 2


def test_verify_json(tmp_path, ours):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"garbage!" * 4)
    result = invoke("verify", "--json", ours, garbage)
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert (report["command"], report["ok"], report["exit_code"]) == ("verify", False, 1)
    assert report["error"] == result.stderr.strip().removeprefix("error: ")
    good, bad = report["files"]
    assert good["status"] == "ok" and good["error"] is None and good["file_size"] == ours.stat().st_size
    assert good["tensors"] == len(safeckpt.SafetensorsFile(ours).keys())
    assert bad["status"] == "invalid" and bad["exit_code"] == 1
    assert bad["error_type"] == "WrongFormatError" and str(garbage) in bad["error"]


def test_verify_directory(tmp_path, ours, theirs):
    (tmp_path / "sub").mkdir()
    safeckpt.save_file({"x": np.ones(1, np.int8)}, tmp_path / "sub" / "shard.safetensors")
    (tmp_path / "notes.txt").write_text("not checked")
    result = invoke("verify", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("OK ") == 3 and "3 of 3 valid" in result.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("verify", empty)
    assert result.exit_code == 2 and "no *.safetensors files" in result.stderr


# --- help, version, console script ---------------------------------------------

@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help_with_examples_and_exit_codes(name):
    result = invoke(name, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout and "Exit codes:" in result.stdout
    assert f"safeckpt {name}" in result.stdout


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout == f"safeckpt, version {safeckpt.__version__}\n"


def test_console_script(ours, tmp_path):
    assert CONSOLE_SCRIPT.exists(), "the console script is installed with the package"
    result = run_script("inspect", "--json", ours)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["file_size"] == ours.stat().st_size
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    result = run_script("verify", garbage)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {garbage}: file is 3 bytes") and "Traceback" not in result.stderr
    assert run_script("inspect", tmp_path / "missing").returncode == 2
    assert run_script("--version").stdout.strip() == f"safeckpt, version {safeckpt.__version__}"



# --- units ------------------------------------------------------------------------

@pytest.mark.parametrize("n, text", [(0, "0"), (999, "999"), (1000, "1.0K"), (1_228_800, "1.2M"),
                                     (999_949, "999.9K"), (999_950, "1.0M"), (7_241_732_096, "7.2B"),
                                     (10**15, "1000.0T")])
def test_human_count(n, text):
    assert output.human_count(n) == text


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (4_915_208, "4.7 MiB"),
                                     (1024**3 * 3, "3.0 GiB")])
def test_human_bytes(n, text):
    assert output.human_bytes(n) == text
