"""Scan a checkpoint for what loading it would do; nothing in it is ever executed.

`scan(path)` grades a file (or every file under a directory) ``safe``,
``suspicious`` or ``malicious``; `scan_bytes` does the same for bytes in memory.
`scanner` reads a file the way the loaders would, `rules` grades what it names,
`report` holds the results and `paths` walks directories.

    >>> from safeckpt.ops.scan import scan
    >>> scan("pytorch_model.bin").verdict
    'safe'
"""

from .paths import MAX_DIRECTORY_FILES, scan
from .report import SEVERITIES, VERDICT_RANK, Finding, ScanReport
from .rules import DENYLIST, NESTED_LOADERS, grade_global
from .scanner import MAX_DEPTH, scan_bytes

__all__ = ["Finding", "ScanReport", "scan", "scan_bytes", "grade_global", "DENYLIST",
           "NESTED_LOADERS", "SEVERITIES", "VERDICT_RANK", "MAX_DEPTH", "MAX_DIRECTORY_FILES"]
