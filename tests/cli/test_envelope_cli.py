"""What every command shares: one JSON envelope, one error prefix, exit codes, one-line errors
(click's usage errors, permissions and every OSError too), warnings, --force, and a fast start."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import safeckpt
from safeckpt.cli import COMMANDS, load_command, output

from tests.cli.runner import invoke

ENVELOPE = ["command", "ok", "exit_code", "error", "error_type", "warnings"]
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(64)


def stderr_lines(result) -> list[str]:
    lines = result.stderr.splitlines()
    assert all(line.startswith((output.ERROR_PREFIX, output.WARNING_PREFIX)) for line in lines), result.stderr
    return lines


def envelope_of(result) -> dict:
    """The --json document, checked against what the command printed on stderr."""
    assert "Traceback" not in result.output
    document = json.loads(result.stdout)
    assert list(document)[:len(ENVELOPE)] == ENVELOPE
    assert document["exit_code"] == result.exit_code and document["ok"] is (result.exit_code == 0)
    errors = [line[len(output.ERROR_PREFIX):] for line in stderr_lines(result) if line.startswith("error: ")]
    assert document["error"] == ("; ".join(errors) or None)
    assert document["warnings"] == [line[len(output.WARNING_PREFIX):] for line in stderr_lines(result)
                                    if line.startswith("warning: ")]
    return document


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    rng = np.random.default_rng(0)
    safeckpt.save_file({"w": rng.standard_normal((32, 16)).astype(np.float32),
                        "b": np.linspace(-1, 1, 16, dtype=np.float32), "step": np.array(3)}, path)
    return path


# command -> (arguments that succeed, arguments that fail: a missing input); {m} the model, {t} tmp_path
CASES = {
    "inspect": (["{m}"], ["{t}/missing.safetensors"]),
    "verify": (["{m}"], ["{t}/missing.safetensors"]),
    "scan": (["{m}"], ["{t}/missing.safetensors"]),
    "convert": (["{m}", "{t}/out.safetensors"], ["{t}/missing.bin", "{t}/out.safetensors"]),
    "cast": (["{m}", "{t}/out.safetensors", "--dtype", "bf16"],
             ["{t}/missing.bin", "{t}/out.safetensors", "--dtype", "bf16"]),
    "diff": (["{m}", "{m}"], ["{t}/missing.bin", "{m}"]),
    "merge": (["{m}", "{m}", "-o", "{t}/out.safetensors"], ["{t}/missing.bin", "{m}", "-o", "{t}/out.safetensors"]),
    "ls": (["{t}"], ["{t}/missing"]),
}


def _args(template: list[str], model: Path, tmp_path: Path) -> list[str]:
    return [a.format(m=model, t=tmp_path) for a in template]


def test_every_command_that_prints_results_takes_json():
    with_json = {name for name in COMMANDS
                 if any(p.name == "as_json" for p in load_command(name).params)}
    assert with_json == set(CASES) and set(COMMANDS) - with_json == {"demo"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_envelope_on_success(name, model, tmp_path):
    result = invoke(name, *_args(CASES[name][0], model, tmp_path), "--json")
    assert result.exit_code == 0, result.output
    document = envelope_of(result)
    assert document["command"] == name and document["ok"] is True and document["error"] is None
    assert document["error_type"] is None


@pytest.mark.parametrize("name", sorted(CASES))
def test_envelope_on_error(name, model, tmp_path):
    args = _args(CASES[name][1], model, tmp_path)
    result = invoke(name, *args, "--json")
    assert result.exit_code == 2, result.output
    document = envelope_of(result)
    assert document["command"] == name and document["ok"] is False
    assert "missing" in document["error"] and "no such" in document["error"]
    plain = invoke(name, *args)
    assert plain.exit_code == 2 and "Traceback" not in plain.output
    assert stderr_lines(plain) == [f"error: {document['error']}"]  # the same one line


@pytest.mark.parametrize("name", sorted(CASES))
def test_usage_errors_are_one_line_and_an_envelope(name, model, tmp_path):
    result = invoke(name, *_args(CASES[name][0], model, tmp_path), "--no-such-option", "--json")
    assert result.exit_code == 2
    document = envelope_of(result)
    assert document["command"] == name and document["error_type"] == "NoSuchOption"
    assert document["error"] == f"no such option '--no-such-option' (see `safeckpt {name} --help`)"
    missing_argument = invoke(name)
    assert missing_argument.exit_code == 2 and missing_argument.stdout == ""
    assert stderr_lines(missing_argument)[0].startswith("error: missing argument")
    assert len(missing_argument.stderr.splitlines()) == 1


def test_usage_errors_of_the_group_and_of_click_checks(tmp_path):
    result = invoke("no-such-command", "--json")
    assert result.exit_code == 2 and envelope_of(result)["command"] is None
    result = invoke("merge", "a", "b", "-o", tmp_path / "o.safetensors", "--method", "nope", "--json")
    assert result.exit_code == 2 and envelope_of(result)["error_type"] == "BadParameter"
    result = invoke("merge", "a", "b", "-o", tmp_path / "o.safetensors", "--weights", "x,y")
    assert result.exit_code == 2 and stderr_lines(result) == [
        "error: invalid value for '--weights': 'x,y' is not a comma-separated list of numbers, e.g. 0.5,0.3,0.2 "
        "(see `safeckpt merge --help`)"]
    a_file = tmp_path / "file"
    a_file.write_text("")
    result = invoke("demo", "--dir", a_file)  # click.Path(file_okay=False) refuses it before the demo runs
    assert result.exit_code == 2 and len(stderr_lines(result)) == 1 and str(a_file) in result.stderr


def test_a_command_invoked_alone_has_the_same_usage_errors():
    result = invoke("--json", command=load_command("inspect"))
    assert result.exit_code == 2 and envelope_of(result)["command"] == "inspect"


# --- scan: missing, empty, nothing readable ----------------------------------------------------

def test_scan_of_a_missing_path_says_error(tmp_path):
    result = invoke("scan", tmp_path / "missing.pt", "--json")
    document = envelope_of(result)
    assert result.exit_code == 2 and document["verdict"] == "error"
    assert document["reports"][0]["verdict"] == "error"


@pytest.mark.parametrize("content", [None, {"notes.txt": "not a checkpoint"}])
def test_scan_of_a_directory_with_nothing_to_scan_exits_2(tmp_path, content):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, text in (content or {}).items():
        (folder / name).write_text(text)
    result = invoke("scan", folder)
    assert result.exit_code == 2
    assert stderr_lines(result) == [result.stderr.strip()] and "no checkpoint file to scan in it" in result.stderr
    document = envelope_of(invoke("scan", folder, "--json"))
    assert document["verdict"] == "error" and document["ok"] is False


class Custom:  # not on the scan's allowlist: suspicious, never malicious
    pass


def test_scan_ok_follows_its_exit_code(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "user.pt"
    torch.save({"w": torch.ones(2), "obj": Custom()}, path)
    relaxed = envelope_of(invoke("scan", path, "--json"))
    strict = envelope_of(invoke("scan", path, "--json", "--strict"))
    assert (relaxed["verdict"], relaxed["exit_code"], relaxed["ok"]) == ("suspicious", 0, True)
    assert (strict["verdict"], strict["exit_code"], strict["ok"]) == ("suspicious", 1, False)


# --- unknown content: the same words from every command ---------------------------------------

def test_unknown_content_gets_the_same_message_everywhere(tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(JPEG)
    out = tmp_path / "out.safetensors"
    runs = {"inspect": invoke("inspect", photo), "convert": invoke("convert", photo, out),
            "cast": invoke("cast", photo, out, "--dtype", "bf16"), "diff": invoke("diff", photo, photo),
            "merge": invoke("merge", photo, photo, "-o", out), "verify": invoke("verify", photo),
            "scan": invoke("scan", photo)}
    lines = {name: stderr_lines(result) for name, result in runs.items()}
    expected = lines["convert"]
    assert len(expected) == 1 and expected[0].startswith(f"error: {photo}: not a checkpoint format safeckpt reads")
    assert r"it starts with b'\xff\xd8\xff\xe0" in expected[0]
    assert all(found == expected for found in lines.values()), lines
    assert {name: r.exit_code for name, r in runs.items()} == {
        "inspect": 1, "verify": 1, "convert": 2, "cast": 2, "diff": 2, "merge": 2, "scan": 2}
    assert not out.exists()


def test_a_damaged_safetensors_file_keeps_the_readers_reason(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    result = invoke("inspect", path)
    assert result.exit_code == 1 and "smaller than the 8-byte header length" in result.stderr


# --- diff across a dtype change ----------------------------------------------------------------

def test_diff_compares_values_across_a_dtype_change(model, tmp_path):
    bf16 = tmp_path / "model-bf16.safetensors"
    assert invoke("cast", model, bf16, "--dtype", "bf16").exit_code == 0
    assert "diff model.safetensors model-bf16.safetensors --rtol 1e-2" in invoke("diff", "--help").stdout
    result = invoke("diff", model, bf16, "--rtol", "1e-2")  # the help's own example passes
    assert result.exit_code == 0, result.output
    assert "dtype changed: F32 -> BF16 (2 tensors); compared by value" in result.stdout
    assert "WITHIN TOLERANCE (rtol=0.01), 2 tensors in another dtype" in result.stdout
    strict = invoke("diff", model, bf16, "--rtol", "1e-2", "--strict-dtype")
    assert strict.exit_code == 1 and "2 tensors in another dtype (--strict-dtype)" in strict.stdout
    document = envelope_of(invoke("diff", model, bf16, "--rtol", "1e-2", "--strict-dtype", "--json"))
    assert document["strict_dtype"] is True and document["exit_code"] == 1
    assert document["dtype_changes"] == [{"dtype_a": "F32", "dtype_b": "BF16", "tensors": 2}]
    assert invoke("diff", model, bf16).exit_code == 1  # no tolerance: bf16 rounded some values
    f64 = tmp_path / "model-f64.safetensors"
    assert invoke("cast", model, f64, "--dtype", "fp64").exit_code == 0
    widened = invoke("diff", model, f64)  # exact: a dtype change alone passes ...
    assert widened.exit_code == 0 and "SAME VALUES, 2 tensors in another dtype" in widened.stdout
    assert invoke("diff", model, f64, "--strict-dtype").exit_code == 1  # ... unless --strict-dtype


# --- never clobber: --force, inputs, warnings, read-only folders ---------------------------------

@pytest.mark.parametrize("name, args", [
    ("convert", ["{m}", "{o}"]), ("cast", ["{m}", "{o}", "--dtype", "fp16"]), ("merge", ["{m}", "{m}", "-o", "{o}"])])
def test_an_existing_output_needs_force(name, args, model, tmp_path):
    out = tmp_path / "existing.safetensors"
    out.write_bytes(b"precious")
    argv = [a.format(m=model, o=out) for a in args]
    result = invoke(name, *argv)
    assert result.exit_code == 2 and out.read_bytes() == b"precious"
    assert stderr_lines(result) == [f"error: {out}: already exists; nothing was read or written. Replace it "
                                    "with --force, or choose another output"]
    document = envelope_of(invoke(name, *argv, "--json"))
    assert document["error_type"] == "OutputExistsError"
    result = invoke(name, *argv, "--force")
    assert result.exit_code == 0, result.output
    assert safeckpt.load_file(out)["w"].shape == (32, 16)
    refused = invoke(name, *[a.format(m=model, o=model) for a in args], "--force")  # never an input
    assert refused.exit_code == 2 and "is an input of this command" in refused.stderr


def test_a_pickle_name_is_a_one_line_warning(model, tmp_path):
    out = tmp_path / "weights.pt"
    result = invoke("convert", model, out)
    assert result.exit_code == 0
    assert stderr_lines(result) == [f"warning: {out}: writing safetensors under a .pt name; the name says pickle, "
                                    "the content is safetensors (name it .safetensors)"]
    document = envelope_of(invoke("convert", model, tmp_path / "again.bin", "--json"))
    assert document["ok"] is True and len(document["warnings"]) == 1 and ".bin name" in document["warnings"][0]


@pytest.fixture
def read_only(tmp_path, monkeypatch) -> Path:
    """A folder that refuses writes; as root (which the kernel lets write anywhere), the kernel's
    answer for it is given by os.access and os.open."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real_access, real_open = os.access, os.open

        def access(path, mode, *args, **kwargs):
            if os.path.abspath(path) == str(folder) and mode & os.W_OK:
                return False
            return real_access(path, mode, *args, **kwargs)

        def os_open(path, flags, *args, **kwargs):
            if os.path.dirname(os.path.abspath(path)) == str(folder) and flags & (os.O_WRONLY | os.O_RDWR):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
        monkeypatch.setattr(os, "open", os_open)
    yield folder
    folder.chmod(0o755)


@pytest.mark.parametrize("name, extra", [("convert", []), ("cast", ["--dtype", "bf16"])])
def test_a_read_only_destination_is_one_line(name, extra, model, read_only):
    result = invoke(name, model, read_only / "out.safetensors", *extra)
    assert result.exit_code == 2
    assert stderr_lines(result) == [f"error: cannot write {read_only}: permission denied"]
    assert ".tmp" not in result.output and list(read_only.iterdir()) == []


def test_a_write_refused_past_the_check_names_the_folder_not_a_temporary(model, read_only, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)  # the check passes; the kernel says no
    result = invoke("merge", model, model, "-o", read_only / "out.safetensors", "--json")
    assert result.exit_code == 2 and ".tmp" not in result.output
    assert envelope_of(result)["error"] == f"cannot write {read_only}: permission denied"


@pytest.mark.parametrize("name, args", [
    ("inspect", ["{m}"]), ("verify", ["{m}"]), ("scan", ["{m}"]), ("convert", ["{m}", "{t}/o.safetensors"]),
    ("cast", ["{m}", "{t}/o.safetensors", "--dtype", "bf16"]), ("diff", ["{m}", "{m}"]),
    ("merge", ["{m}", "{m}", "-o", "{t}/o.safetensors"])])
def test_an_unreadable_input_is_one_line(name, args, model, tmp_path, monkeypatch):
    real_open = os.open

    def os_open(path, flags, *rest, **kwargs):
        if os.path.abspath(path) == str(model):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *rest, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    argv = [a.format(m=model, t=tmp_path) for a in args]
    result = invoke(name, *argv)
    assert result.exit_code == 2, result.output
    assert stderr_lines(result) == [f"error: {model}: cannot read: permission denied"], result.stderr
    assert envelope_of(invoke(name, *argv, "--json"))["ok"] is False


def test_an_oserror_from_anywhere_is_one_line(model, monkeypatch):
    import safeckpt.ops.diff

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(safeckpt.ops.diff, "diff", broken)
    result = invoke("diff", model, model)
    assert result.exit_code == 2 and stderr_lines(result) == [
        f"error: {model}, {model}: cannot read: input/output error"]
    monkeypatch.setattr(safeckpt.ops.scan, "scan", broken)
    result = invoke("scan", model, "--json")  # escapes the command: the funnel words it
    assert result.exit_code == 2 and envelope_of(result)["error"] == "cannot read: input/output error"


# --- the command line's words ------------------------------------------------------------------

def test_library_keywords_are_spelled_as_options():
    assert output.cli_spelling("use extract=None to keep all") == "use --extract none to keep all"
    assert output.cli_spelling("with allow_unsafe_structure=True (--allow-unsafe-structure): x") == \
        "with --allow-unsafe-structure: x"
    assert output.cli_spelling("pass allow_missing (--allow-missing) to merge") == "pass --allow-missing to merge"
    assert output.cli_spelling("ema='only' but") == "--ema-only but"
    assert output.cli_spelling("pass source_hash=False to convert") == "pass --no-source-hash to convert"
    assert output.cli_spelling("the option (--force)") == "the option (--force)"


def test_notes_speak_the_command_line(tmp_path):
    torch = pytest.importorskip("torch")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"epoch": 1, "state_dict": {"layer.weight": torch.ones(2, 2)}}, ckpt)
    result = invoke("convert", ckpt, tmp_path / "w.safetensors")
    assert result.exit_code == 0, result.output
    assert "use --extract none to keep all" in result.stdout and "extract=None" not in result.stdout
    document = envelope_of(invoke("diff", ckpt, tmp_path / "w.safetensors", "--json"))
    assert any("use --extract none to keep all" in note for note in document["notes"])


def test_lightning_callback_keys_are_short_in_tables(tmp_path):
    torch = pytest.importorskip("torch")
    key = ("ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
           "'every_n_epochs': 1, 'train_time_interval': None}")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(2)},
                "callbacks": {key: {"best_model_score": 0.25, "dirpath": "/ckpts"}}}, ckpt)
    result = invoke("inspect", ckpt)
    assert result.exit_code == 0, result.output
    assert "\"ModelCheckpoint{'monitor': 'val_loss', …}\": {" in result.stdout and key not in result.stdout
    assert key in envelope_of(invoke("inspect", ckpt, "--json"))["structure"]["callbacks"]


# --- start-up: the group loads a command's module only when it runs ------------------------------

def _loaded_after(code: str) -> list[str]:
    script = ("import sys\nfrom safeckpt.cli import main\n"
              f"try:\n    {code}\nexcept SystemExit:\n    pass\n"
              "heavy = {'torch', 'matplotlib', 'fsspec', 'numpy', 'ml_dtypes', 'rich'}\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
              "             or m in ('safeckpt.ops.merge.merger', 'safeckpt.ops.diff.compare', 'safeckpt.training')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"'))


@pytest.mark.parametrize("args", [["--version"], ["--help"]])
def test_version_and_help_import_nothing_heavy(args):
    assert _loaded_after(f"main({args!r})") == []


def test_inspect_of_a_small_file_imports_no_framework(model):
    loaded = _loaded_after(f"main(['inspect', {str(model)!r}])")
    assert not [m for m in loaded if m.split(".")[0] in ("torch", "matplotlib", "fsspec")]
    assert not [m for m in loaded if m.startswith(("safeckpt.ops.merge.merger", "safeckpt.ops.diff.compare", "safeckpt.training"))]


def test_help_lists_each_commands_short_help_without_importing_it():
    listing = " ".join(invoke("--help").stdout.split())
    for name, help_line in COMMANDS.items():
        assert f"{name} {help_line}" in listing
        assert load_command(name).short_help == help_line


def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "safeckpt.cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout == f"safeckpt, version {safeckpt.__version__}\n"
