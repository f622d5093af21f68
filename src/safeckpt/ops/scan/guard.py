"""The gate before an op writes anything from a source: scan it, refuse what is malicious.

Reading a file never executes it (the sources see to that); this gate is about
not laundering a hostile file into a clean-looking output. Every op that
writes model weights (convert, cast, merge) opens its inputs with
`open_checked` and passes `check_safety` over `source.files()`: a file
the scan finds malicious is refused with `UnsafeFileError` before anything is
written, unless the caller allows it (``--allow-unsafe-structure``).
"""

from __future__ import annotations

import os
from typing import Optional

from ... import errors
from ...sources.base import TensorSource
from .paths import scan
from .report import VERDICT_RANK


def open_checked(path: "os.PathLike | str", allow_unsafe: bool, action: str = "convert") -> TensorSource:
    """`open_source(path)`; a file that is both malformed and hostile is reported as hostile."""
    from ...sources import open_source  # at call time: detect grows with every format

    path = os.fspath(path)
    try:
        return open_source(path)
    except errors.SafeckptError:
        if os.path.isfile(path):
            check_safety([path], allow_unsafe, action)
        raise


def check_safety(paths: list[str], allow: bool, action: str = "convert", keep: Optional[dict] = None):
    """Scan the files; a malicious one is refused unless `allow` (nothing is executed either way).

    Returns the report of the worst file (None for no files). `action` names the
    refused operation in the message ("convert", "merge", ...). `keep` receives the
    readings of the files' data.pkl (`scan_bytes`), for a reader that loads them next.

    >>> check_safety(["model.pt"], allow=False).verdict
    'safe'
    """
    worst: Optional[object] = None
    for path in paths:
        report = scan(path, keep=keep) if keep is not None and os.path.isfile(path) else scan(path)
        if worst is None or VERDICT_RANK.get(report.verdict, 1) > VERDICT_RANK.get(worst.verdict, 1):
            worst = report
        if report.verdict == "malicious" and not allow:
            found = [f for f in report.findings if f.severity == "malicious"] or report.findings
            listed = "; ".join(f"{f.what} ({f.why})" for f in found[:5])
            more = f" and {len(found) - 5} more" if len(found) > 5 else ""
            raise errors.UnsafeFileError(
                f"refusing to {action}: the scan found {len(found)} malicious findings: {listed}{more}. Nothing "
                f"was executed or written. Run `safeckpt scan` for details; {action} anyway with "
                "allow_unsafe_structure=True (--allow-unsafe-structure): the file's code is never run",
                report=report, path=path)
    return worst
