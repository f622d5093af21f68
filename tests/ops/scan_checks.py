"""What the scan must say of a benign file: safe, loud about nothing, every global in the allowlist.

    >>> report = assert_safe(tmp_path / "model.pt")
"""

from __future__ import annotations

from pathlib import Path

from safeckpt.ops.scan import ScanReport, scan
from safeckpt.sources.pickle_vm import ALLOWLIST


def assert_safe(path: Path) -> ScanReport:
    """Scan `path` and check it is safe, strictly too; returns the report."""
    report = scan(path)
    loud = [(f.severity, f.kind, f.what) for f in report.findings if f.severity != "info"]
    assert report.verdict == "safe" and report.error is None and not loud, (path.name, loud, report.error)
    assert report.exit_code() == 0 and report.exit_code(strict=True) == 0
    assert [g for g in report.globals if g not in ALLOWLIST] == [], path.name
    return report
