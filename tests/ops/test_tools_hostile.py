"""The daily tools on the hostile corpus: never run a payload, refuse to launder it, fail cleanly.

diff and verify only read (nothing is executed, so they may describe a hostile
file); merge and cast write, so like convert they refuse a file the scan finds
malicious. Any failure is a SafeckptError (or a report), never a crash from inside.
"""

from __future__ import annotations

import shutil

import numpy as np

import safeckpt
from safeckpt.errors import SafeckptError, UnsafeFileError
from safeckpt.ops.convert import cast
from safeckpt.ops.diff import diff
from safeckpt.ops.merge import merge
from safeckpt.ops.verify import verify



def test_tools_never_run_the_corpus(malicious_corpus, tmp_path):
    benign = tmp_path / "benign.safetensors"
    safeckpt.save_file({"w": np.ones(3, np.float32)}, benign)
    crashed, laundered = [], []
    for item in malicious_corpus:
        copy = tmp_path / f"copy-{item.path.name}"
        shutil.copyfile(item.path, copy)
        steps = {
            "diff": lambda: diff(item.path, benign),
            "diff self": lambda: diff(item.path, item.path),
            "verify": lambda: verify(item.path),
            "verify --write": lambda: verify(copy, write=True),
            "merge": lambda: merge([item.path, benign], tmp_path / "merged.safetensors"),
            "cast": lambda: cast(item.path, tmp_path / "cast.safetensors", "bf16"),
        }
        for step, run in steps.items():
            try:
                run()
                if step in ("merge", "cast"):
                    laundered.append(f"{step} {item.name}")
            except UnsafeFileError as exc:
                assert exc.report.verdict == "malicious"
            except SafeckptError:
                if step in ("merge", "cast"):  # refused, but not as unsafe
                    laundered.append(f"{step} {item.name} (not refused as unsafe)")
            except Exception as exc:  # noqa: BLE001 - listed below
                crashed.append(f"{step} {item.name}: {type(exc).__name__}: {exc}")
            assert not item.canary.exists(), (step, item.name)
    assert not laundered, "written from a malicious file:\n" + "\n".join(laundered)
    assert not crashed, "crashed instead of a clear error:\n" + "\n".join(crashed)
    assert not (tmp_path / "merged.safetensors").exists() and not (tmp_path / "cast.safetensors").exists()
