"""The benchmark harness still runs end to end (`python -m benchmarks --quick --no-write`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_prints_the_table():
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--no-write"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| operation | vs | ours | theirs | ratio | ratio of bests | floor | result |" in done.stdout
    for row in ("save_file, torch dict", "save_file, numpy dict", "load_file torch, lazy",
                "load_file torch + read every page", "numpy load_file", "load_file(copy=True) bandwidth",
                "get_slice one row, pread: bytes read", "get_slice one row, mmap: pages resident",
                "diff of two checkpoints (float64 stats)", "merge --method linear of three checkpoints",
                "merge --method linear: extra peak RSS", "verify (blake3 manifest check): hashing",
                "safe_open + keys(), a header of 1M tensors (fewer below --size 1GiB)",
                "inspect, a header of 1M tensors", "inspect --json, 1M tensors: extra peak RSS"):
        assert f"| {row} |" in done.stdout
    assert "error" not in done.stdout
    assert "byte-identical: yes" in done.stdout
