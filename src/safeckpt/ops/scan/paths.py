"""Scanning a path: one file, or every file under a directory (no link is followed)."""

from __future__ import annotations

import os
import stat

from ...sources.base import mapped
from .report import VERDICT_RANK, Finding, ScanReport
from .rules import INFO, SAFE, SUSPICIOUS
from .scanner import NOT_A_CHECKPOINT, scan_bytes

# Files scanned under one directory.
MAX_DIRECTORY_FILES = 100_000


def scan(path: "os.PathLike | str") -> ScanReport:
    """Scan a file or, recursively, a directory; the file is read, never executed.

    >>> scan("model.pt").verdict
    'safe'
    >>> [(r.path, r.verdict) for r in scan("downloads/").files]
    [('downloads/model.ckpt', 'malicious'), ('downloads/w.npz', 'safe')]
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _scan_directory(path)
    try:
        with mapped(path) as data:
            return scan_bytes(data, path=path)
    except OSError as exc:
        return ScanReport(path, "unknown", SUSPICIOUS, error=f"cannot read: {exc.strerror or exc}")


def _scan_directory(top: str) -> ScanReport:
    report = ScanReport(top, "directory", SAFE)
    skipped: list[str] = []
    count = 0
    for root, dirs, files in os.walk(top, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if count >= MAX_DIRECTORY_FILES:
                report.findings.append(Finding(INFO, "too-many-files", f"{MAX_DIRECTORY_FILES} files",
                                               "the rest of the directory was not scanned", None, -1))
                report.error = f"more than {MAX_DIRECTORY_FILES} files; the rest were not scanned"
                return _finish_directory(report, skipped)
            count += 1
            try:
                special = not stat.S_ISREG(os.stat(path).st_mode)
            except OSError:
                special = False  # a broken link: its report says it cannot be read
            if special:  # fifos, sockets, devices: reading them could block forever
                skipped.append(os.path.relpath(path, top))
                continue
            child = scan(path)
            if child.format == "unknown" and all(f.severity == INFO for f in child.findings) \
                    and (child.error or "").startswith(NOT_A_CHECKPOINT):
                skipped.append(os.path.relpath(path, top))
                continue
            report.files.append(child)
    return _finish_directory(report, skipped)


def _finish_directory(report: ScanReport, skipped: list[str]) -> ScanReport:
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        report.findings.append(Finding(INFO, "skipped-files", f"{len(skipped)} files",
                                       f"not checkpoints by their content: {shown}", None, -1))
    report.verdict = max((r.verdict for r in report.files), key=VERDICT_RANK.__getitem__,
                         default=SAFE)
    return report
