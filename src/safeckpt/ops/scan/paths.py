"""Scanning a path: one file, or every file under a directory.

A path that is not a regular file (a FIFO, a socket, a device) is never opened:
reading one could block forever, and no loader reads a checkpoint from it. A
directory is walked without following a symbolic link out of it or back into a
folder already walked (a loop); every folder skipped that way, every file that
could not be read and every file that is not a checkpoint is reported, and a file
that was not read is never counted as safe.
"""

from __future__ import annotations

import os
import stat
from typing import Optional

from ...format.storage import SPECIAL_FILES
from ...sources.base import mapped
from .report import VERDICT_RANK, Finding, ScanReport
from .rules import INFO, SAFE, SUSPICIOUS
from .scanner import NOT_A_CHECKPOINT, scan_bytes

# The graph of a SavedModel directory, by the names tf.saved_model.load opens.
SAVED_MODEL_GRAPHS = ("saved_model.pb", "saved_model.pbtxt")

# Files scanned under one directory.
MAX_DIRECTORY_FILES = 100_000

def scan(path: "os.PathLike | str", *, keep: Optional[dict] = None) -> ScanReport:
    """Scan a file or, recursively, a directory; the file is read, never executed.

    >>> scan("model.pt").verdict
    'safe'
    >>> [(r.path, r.verdict) for r in scan("downloads/").files]
    [('downloads/model.ckpt', 'malicious'), ('downloads/w.npz', 'safe')]

    `keep` (a file only): as in `scan_bytes`, receives the readings of its data.pkl.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return _unreadable(path, f"cannot read: {exc.strerror or exc}")
    if stat.S_ISDIR(mode):
        return _scan_directory(path)
    if not stat.S_ISREG(mode):
        return _unreadable(path, f"not a regular file ({SPECIAL_FILES.get(stat.S_IFMT(mode), 'a special file')}): "
                                 "not read, since reading it could block; no loader reads a checkpoint from it")
    try:
        with mapped(path) as data:
            return scan_bytes(data, path=path, keep=keep)
    except OSError as exc:
        return _unreadable(path, f"cannot read: {exc.strerror or exc}")


def _unreadable(path: str, error: str) -> ScanReport:
    return ScanReport(path, "unknown", SUSPICIOUS, error=error)


def _scan_directory(top: str) -> ScanReport:
    report = ScanReport(top, "directory", SAFE)
    skipped: list[str] = []
    links: list[str] = []
    count = 0
    root_real = os.path.realpath(top)
    visited = {_identity(top)}
    folders = [top]
    while folders:
        folder = folders.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            report.files.append(_unreadable(folder, f"cannot list: {exc.strerror or exc}"))
            continue
        subfolders = []
        for entry in entries:
            if _is_dir(entry):
                reason = _not_followed(entry, root_real, visited)
                if reason is None:
                    subfolders.append(entry.path)
                else:
                    links.append(f"{os.path.relpath(entry.path, top)} ({reason})")
                continue
            if count >= MAX_DIRECTORY_FILES:
                report.findings.append(Finding(INFO, "too-many-files", f"{MAX_DIRECTORY_FILES} files",
                                               "the rest of the directory was not scanned", None, -1))
                report.error = f"more than {MAX_DIRECTORY_FILES} files; the rest were not scanned"
                return _finish_directory(report, skipped, links)
            count += 1
            child = scan(entry.path)
            unreadable = child.format == "unknown" and (child.error or "").startswith(NOT_A_CHECKPOINT)
            if (unreadable or child.format == "json") and all(f.severity == INFO for f in child.findings):
                skipped.append(os.path.relpath(entry.path, top))
                continue
            report.files.append(child)
        folders.extend(reversed(subfolders))
    return _finish_directory(report, skipped, links)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # a link to a folder counts: it is followed or reported
    except OSError:
        return False


def _identity(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _not_followed(entry: os.DirEntry, root_real: str, visited: set) -> Optional[str]:
    """Why a folder is not walked (None: walk it): a link out of the tree or into a folder
    already walked (a loop)."""
    if entry.is_symlink():
        real = os.path.realpath(entry.path)
        if os.path.commonpath([real, root_real]) != root_real:
            return f"a link out of the directory, to {real}"
    identity = _identity(entry.path)
    if identity in visited:
        return "a link to a folder already scanned (a loop)"
    visited.add(identity)
    return None


def _finish_directory(report: ScanReport, skipped: list[str], links: list[str]) -> ScanReport:
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        report.findings.append(Finding(INFO, "skipped-files", f"{len(skipped)} files",
                                       f"not checkpoints by their content: {shown}", None, -1))
    if links:
        shown = "; ".join(links[:5]) + ("; ..." if len(links) > 5 else "")
        report.findings.append(Finding(INFO, "skipped-links", f"{len(links)} folders",
                                       f"symbolic links not followed: {shown}", None, -1))
    pickles = _pickles_explained(report)
    if pickles is not None:
        report.findings.append(pickles)
    graphs = [name for name in skipped if os.path.basename(name) in SAVED_MODEL_GRAPHS]
    if graphs:
        report.findings.append(Finding(SUSPICIOUS, "saved-model-graph", ", ".join(graphs[:5]),
                                       "a TensorFlow SavedModel's graph: tf.saved_model.load and Keras build and "
                                       "run its functions, whose ops may read and write files (TensorFlow "
                                       "treats a SavedModel as a program); its variables alone are data: "
                                       "safeckpt convert DIR out.safetensors reads only those", None, -1))
    verdicts = [r.verdict for r in report.files] + ([SUSPICIOUS] if graphs else [])
    report.verdict = max(verdicts, key=VERDICT_RANK.__getitem__, default=SAFE)
    return report


# Findings that name something a loader would import and call.
_CALLING = frozenset({"dangerous-global", "unknown-global"})
# Formats whose loading runs a pickle program (torch.load, pickle.load).
PICKLED_FORMATS = frozenset({"torch-zip", "torch-legacy", "torch-tar", "pickle"})


def _pickles_explained(report: ScanReport) -> Optional[Finding]:
    """Which files of a folder are pickles, and which of those would run code named in them when loaded."""
    pickled = [child for child in report.files if child.format in PICKLED_FORMATS]
    if not pickled:
        return None
    name = lambda child: os.path.relpath(child.path, report.path)  # noqa: E731
    running = []
    for child in pickled:
        if child.verdict == SAFE:
            continue
        called = sorted({f.what for f in child.findings if f.kind in _CALLING})
        other = sorted({f.kind for f in child.findings if f.severity != INFO and f.kind not in _CALLING})
        if called:
            running.append(f"{name(child)} would import and call {len(called)} ({', '.join(called[:2])}"
                           f"{', ...' if len(called) > 2 else ''})")
        else:
            running.append(f"{name(child)} is {child.verdict} ({', '.join(other[:2])})")
    code = "; ".join(running[:3]) + ("; ..." if len(running) > 3 else "") if running else "all name only data"
    shown = ", ".join(name(child) for child in pickled[:4]) + (", ..." if len(pickled) > 4 else "")
    return Finding(INFO, "pickled-files", f"{len(pickled)} pickles: {shown}",
                   f"torch.load runs them as programs; {code}. `safeckpt convert` of the folder makes them "
                   "safetensors + JSON", None, -1)
