"""Inputs made to exhaust the machine get one line and an exit code from every command.

* a torch view of 4 bytes expanded to 4 TiB by stride 0: listed by inspect, refused (exit 2,
  nothing written) by convert, cast, merge and diff, invalid for verify;
* an integer of 5000 digits in a checkpoint's structure: every command works as usual;
* a FIFO or a device instead of a file: refused at once, never opened (a hang fails the test
  through the subprocess timeout instead of blocking the suite).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.cli.runner import invoke

pytest.importorskip("torch")


def one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith(("ERROR", "error:", "INVALID"))]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    return lines[0]


# --- a view expanded to terabytes ---------------------------------------------------------

# expanded (tests/conftest.py): a 4-byte torch storage expanded by stride 0 to 2**40 elements.

@pytest.mark.parametrize("command", [
    ["convert", "{src}", "{out}/model.safetensors"],
    ["convert", "--json", "{src}", "{out}/model.safetensors"],
    ["cast", "{src}", "{out}/model.safetensors", "--dtype", "bf16"],
    ["merge", "{src}", "{src}", "-o", "{out}/model.safetensors"],
    ["diff", "{src}", "{src}"],
    ["diff", "--json", "{src}", "{src}"],
], ids=lambda c: " ".join(c[:2]))
def test_expanded_view_is_refused_with_nothing_written(expanded, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(*(part.format(src=expanded, out=out) for part in command))
    assert result.exit_code == 2, result.output
    line = one_line_error(result)
    assert "tensor 'w': a view of 4 bytes expanded to 4,398,046,511,104 bytes by stride 0: refused" in line
    assert list(out.iterdir()) == []


def test_inspect_lists_the_expanded_view_and_verify_finds_it_invalid(expanded):
    result = invoke("inspect", expanded)
    assert result.exit_code == 0, result.output
    assert "note: w: a view of 4 bytes expanded to 4,398,046,511,104 bytes by stride 0" in result.output
    report = json.loads(invoke("inspect", "--json", expanded).output)
    assert {t["name"]: t["bytes"] for t in report["tensors"]} == {"w": 4 << 40, "b": 12}
    result = invoke("verify", expanded)
    assert result.exit_code == 1 and "tensor 'w'" in one_line_error(result)


# --- an integer too long for str() ---------------------------------------------------------

# big_int_file (tests/conftest.py): a pickle and a torch checkpoint holding 10**5000.

@pytest.mark.parametrize("command", [
    ["inspect", "{src}"], ["inspect", "--json", "{src}"], ["scan", "{src}"], ["scan", "--json", "{src}"],
    ["verify", "{src}"], ["verify", "--json", "{src}"],
    ["convert", "{src}", "{out}/c.safetensors"], ["convert", "--json", "{src}", "{out}/c.safetensors"],
    ["cast", "{src}", "{out}/c.safetensors", "--dtype", "bf16"],
    ["diff", "{src}", "{src}"], ["diff", "--json", "{src}", "{src}"],
    ["merge", "{src}", "{src}", "-o", "{out}/m.safetensors"],
], ids=lambda c: " ".join(c[:2]))
def test_every_command_reads_a_huge_int(big_int_file, tmp_path, command):
    result = invoke(*(part.format(src=big_int_file, out=tmp_path) for part in command))
    assert result.exit_code == 0, result.output
    assert "internal error" not in result.output and "Exceeds the limit" not in result.output
    if "--json" in command:
        json.loads(result.stdout)


def test_inspect_shows_its_size(big_int_file):
    report = json.loads(invoke("inspect", "--json", big_int_file).stdout)
    assert report["structure"]["n"] == {"__int__": "<integer of 2077 bytes>"}


# --- FIFOs and devices -----------------------------------------------------------------------

# Run in a child: opening a FIFO blocks until a writer comes, so a regression must time out
# there, not hang the suite. Each call prints its name first, so a timeout says which hung.
CHILD = textwrap.dedent("""
    import json, sys
    from click.testing import CliRunner
    import safeckpt
    from safeckpt.cli import main

    path, out = sys.argv[1], sys.argv[2]
    commands = [["inspect", path], ["inspect", "--json", path], ["verify", path], ["verify", "--json", path],
                ["convert", path, out + "/c.safetensors"], ["convert", "--json", path, out + "/c.safetensors"],
                ["cast", path, out + "/c.safetensors", "--dtype", "bf16"], ["diff", path, path],
                ["merge", path, path, "-o", out + "/m.safetensors"]]
    results = {}
    for command in commands:
        print(" ".join(command), flush=True)
        result = CliRunner().invoke(main, command)
        results[" ".join(command[:2])] = [result.exit_code, result.output]
    for name, call in [("open_source", safeckpt.open_source), ("load_file", safeckpt.load_file),
                       ("safe_open", safeckpt.safe_open)]:
        print(name, flush=True)
        try:
            call(path)
            results[name] = [0, "no error"]
        except safeckpt.SafeckptError as exc:
            results[name] = [type(exc).__name__, str(exc)]
    print("RESULTS " + json.dumps(results), flush=True)
""")


def special_files(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    return {"a FIFO": fifo, "a character device": "/dev/zero"}


@pytest.mark.parametrize("kind", ["a FIFO", "a character device"])
def test_fifos_and_devices_are_refused_at_once(tmp_path, kind):
    path = special_files(tmp_path)[kind]
    out = tmp_path / "out"
    out.mkdir()
    try:
        child = subprocess.run([sys.executable, "-c", CHILD, str(path), str(out)], capture_output=True,
                               text=True, timeout=120, check=True)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"blocked on {kind}; last call started: {(exc.stdout or b'').splitlines()[-1:]}")
    results = json.loads(child.stdout.split("RESULTS ", 1)[1])
    for name, (code, text) in results.items():
        assert f"not a regular file ({kind})" in text, (name, text)
        if name.startswith(("open_source", "load_file", "safe_open")):
            assert code == "NotRegularFileError"
        else:
            assert code == 2 and "internal error" not in text, (name, text)
    assert list(out.iterdir()) == []


def test_a_shard_or_template_that_is_a_fifo(tmp_path):
    fifo = tmp_path / "model-00001-of-00001.safetensors"
    os.mkfifo(fifo)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"w": fifo.name}}))
    raw = tmp_path / "dump.bin"
    raw.write_bytes(bytes(8))
    script = textwrap.dedent(f"""
        from click.testing import CliRunner
        from safeckpt.cli import main
        for args in (["inspect", {str(index)!r}], ["inspect", {str(raw)!r}, "--template", {str(fifo)!r}]):
            result = CliRunner().invoke(main, args)
            print(result.exit_code, result.output.strip())
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           check=True)
    first, second = child.stdout.splitlines()
    assert first.startswith("1 ") and "names shard 'model-00001-of-00001.safetensors', which does not exist " \
        "or is not a file" in first
    assert second.startswith("2 ") and "not a regular file (a FIFO)" in second
