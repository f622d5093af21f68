"""`safeckpt ls DIR`: the checkpoints a CheckpointManager committed, read from their manifests."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import numpy as np
import pytest

from safeckpt.training.manager import CheckpointManager

from tests.cli.runner import cells, invoke


def rows(stdout: str) -> dict[str, list[str]]:
    """Table rows by their step cell."""
    return {row[0]: row for row in map(cells, stdout.splitlines()) if row[0].isdigit()}


@pytest.fixture
def run(tmp_path) -> Path:
    """Four checkpoints with a val_loss (NaN at step 1000), saved by a manager that monitors it."""
    directory = tmp_path / "run"
    with CheckpointManager(directory, keep_last=None, monitor="val_loss") as mgr:
        for step, loss in ((9, 0.9), (10, 0.4), (100, 0.6), (1000, math.nan)):
            mgr.save(step, {"w": np.full(1000, step, np.float32), "step": step}, metrics={"val_loss": loss})
    return directory


def test_ls_shows_steps_in_order_with_latest_and_best(run):
    result = invoke("ls", run)
    assert result.exit_code == 0, result.output
    table = rows(result.stdout)
    assert list(table) == ["9", "10", "100", "1000"]
    assert table["1000"][-1] == "latest"  # NaN is never best
    assert table["10"][-1] == "best"
    assert table["10"][3] == "val_loss=0.4"
    assert table["9"][2].endswith("KiB")
    assert "step" in result.stdout.splitlines()[0] and "metrics" in result.stdout.splitlines()[0]


def test_ls_json_and_another_monitor(run):
    result = invoke("ls", run, "--json", "--monitor", "val_loss", "--mode", "max")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["latest"] == 1000 and report["best"] == 9 and report["mode"] == "max"
    assert [c["step"] for c in report["checkpoints"]] == [9, 10, 100, 1000]
    assert report["checkpoints"][-1]["metrics"] == {"val_loss": "NaN"}  # standard JSON
    sizes = {c["step"]: c["size"] for c in report["checkpoints"]}
    assert sizes[9] == sum(p.stat().st_size for p in (run / "step-00000009").iterdir())


def test_ls_reports_a_damaged_checkpoint_and_exits_1(run):
    manifest = run / "step-00000100" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"val_loss":0.6', b'"val_loss":0.1'))
    result = invoke("ls", run)
    assert result.exit_code == 1
    assert list(rows(result.stdout)) == ["9", "10", "1000"]
    assert result.stderr.startswith("error: step 100 (") and ": damaged: " in result.stderr
    assert "manifest.json" in result.stderr and len(result.stderr.splitlines()) == 1


def test_ls_changes_nothing_and_takes_no_lock(run):
    with CheckpointManager(run, keep_last=None) as mgr:  # a run holds the directory
        (run / ".tmp-step-00002000-0123456789ab").mkdir()  # and is writing step 2000
        before = {str(p): p.stat().st_mtime_ns for p in run.rglob("*")}
        result = invoke("ls", run)
        assert result.exit_code == 0, result.output
        assert list(rows(result.stdout)) == ["9", "10", "100", "1000"]
        assert {str(p): p.stat().st_mtime_ns for p in run.rglob("*")} == before
        assert [info.step for info in mgr.list()] == [9, 10, 100, 1000]


def test_ls_of_an_empty_or_missing_directory(tmp_path):
    result = invoke("ls", tmp_path)
    assert result.exit_code == 0 and "no committed checkpoints" in result.stderr
    result = invoke("ls", tmp_path / "nowhere")
    assert result.exit_code == 2 and "nowhere" in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_ls_of_a_memory_url():
    pytest.importorskip("fsspec")
    url = f"memory://ls-{uuid.uuid4().hex[:8]}"
    with CheckpointManager(url) as mgr:
        mgr.save(42, {"w": np.ones(3, np.float32)}, metrics={"loss": 1.5})
    result = invoke("ls", url, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["latest"] == 42 and report["best"] is None and report["monitor"] is None
    assert report["checkpoints"][0]["path"] == f"{url}/step-00000042"
