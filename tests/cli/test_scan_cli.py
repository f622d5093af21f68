"""`safeckpt scan`: exit codes, the tables, --json, --strict, directories, unreadable files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.cli.runner import cells, invoke
from tests.ops.malicious_corpus import Call, G, benign_pickle, program, torch_zip


def rows(stdout: str) -> list[list[str]]:
    return [cells(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    evil, _ = program(2, Call(G("os", "system"), (f"touch {tmp_path / 'canary'}",)))
    user, _ = program(4, Call(G("mymodel", "Net"), ()))
    made = {"safe.pt": torch_zip(benign_pickle()), "evil.pt": torch_zip(evil), "user.pkl": user,
            "broken.pkl": benign_pickle()[:-3]}
    out = {}
    for name, data in made.items():
        out[name] = tmp_path / name
        out[name].write_bytes(data)
    return out


def test_safe_file_exits_0_with_a_table(files):
    result = invoke("scan", files["safe.pt"])
    assert result.exit_code == 0, result.output
    assert rows(result.stdout)[0] == ["file", "format", "verdict", "findings"]
    assert rows(result.stdout)[2] == [str(files["safe.pt"]), "torch-zip", "safe", "0"]
    assert result.stderr == ""


def test_malicious_file_exits_1_and_lists_the_finding(files, tmp_path):
    result = invoke("scan", files["evil.pt"])
    assert result.exit_code == 1
    table = rows(result.stdout)
    assert table[2] == [str(files["evil.pt"]), "torch-zip", "malicious", "1"]
    finding = next(r for r in table if r[0] == "malicious")
    assert finding[1:3] == ["os.system", "archive/data.pkl@2"]
    assert "shell commands" in finding[3]
    assert not (tmp_path / "canary").exists()


def test_suspicious_exits_0_unless_strict(files):
    assert invoke("scan", files["user.pkl"]).exit_code == 0
    assert invoke("scan", "--strict", files["user.pkl"]).exit_code == 1
    assert invoke("scan", "--strict", files["safe.pt"]).exit_code == 0


def test_unreadable_files_exit_2(files, tmp_path):
    for path in (files["broken.pkl"], tmp_path / "missing.pt"):
        result = invoke("scan", path)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(f"error: {path}: ") and len(result.stderr.splitlines()) == 1
        assert rows(result.stdout)[2][2] == "error"
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.pt"
        locked.write_bytes(files["safe.pt"].read_bytes())
        locked.chmod(0)
        assert invoke("scan", locked).exit_code == 2


def test_malicious_wins_over_errors(files):
    assert invoke("scan", files["broken.pkl"], files["evil.pt"]).exit_code == 1
    assert invoke("scan", files["broken.pkl"], files["safe.pt"]).exit_code == 2
    assert invoke("scan", "--strict", files["broken.pkl"], files["user.pkl"]).exit_code == 2


def test_json(files):
    result = invoke("scan", "--json", files["evil.pt"], files["safe.pt"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert (doc["verdict"], doc["exit_code"], doc["strict"]) == ("malicious", 1, False)
    evil, safe = doc["reports"]
    assert evil["findings"] == [{"severity": "malicious", "kind": "dangerous-global", "what": "os.system",
                                 "why": evil["findings"][0]["why"], "member": "archive/data.pkl",
                                 "offset": 2}]
    assert safe["verdict"] == "safe" and safe["findings"] == [] and safe["error"] is None
    assert "torch._utils._rebuild_tensor_v2" not in safe["globals"]  # a state dict without tensors


def test_directory_recursion_and_summary(files, tmp_path):
    sub = tmp_path / "nested" / "deeper"
    sub.mkdir(parents=True)
    (sub / "weights.npy").write_bytes(b"")  # empty: unknown content, skipped
    np.save(sub / "w.npy", np.ones(3, np.float32))
    (sub / "config.json").write_text('{"a": 1}')
    files["broken.pkl"].unlink()
    result = invoke("scan", tmp_path)
    assert result.exit_code == 1, result.output
    table = rows(result.stdout)
    listed = {r[0]: r[2] for r in table if len(r) == 4 and r[0].startswith(str(tmp_path))}
    assert listed == {str(tmp_path / "evil.pt"): "malicious", str(tmp_path / "safe.pt"): "safe",
                      str(tmp_path / "user.pkl"): "suspicious", str(sub / "w.npy"): "safe"}
    summary = table[table.index(["verdict", "files"]) + 2:]
    assert summary == [["safe", "2"], ["suspicious", "1"], ["malicious", "1"]]
    skipped = next(r for r in table if r[0] == "info")
    assert skipped[1] == "2 files" and "config.json" in skipped[-1]
    doc = json.loads(invoke("scan", "--json", tmp_path).stdout)
    assert doc["reports"][0]["format"] == "directory" and len(doc["reports"][0]["files"]) == 4


def test_help_documents_exit_codes():
    result = invoke("scan", "--help")
    assert result.exit_code == 0
    assert "Exit codes:" in result.output and "--strict" in result.output and "--json" in result.output
    assert invoke("--help").output.count("scan") >= 1
