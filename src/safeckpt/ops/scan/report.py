"""What a scan reports: findings, one report per file (or per directory), and exit codes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

from .rules import INFO, MALICIOUS, SAFE, SUSPICIOUS

# Severity order; "info" findings never change a verdict.
SEVERITIES = {INFO: 0, SUSPICIOUS: 1, MALICIOUS: 2}
VERDICT_RANK = {SAFE: 0, SUSPICIOUS: 1, MALICIOUS: 2}
# Suspicious findings that fail a scan (exit 1) without --strict: the scan could not
# follow what a loader would do there, so the file is not known to be safe.
BLOCKING_KINDS = frozenset(["unfollowed"])

@dataclass(frozen=True)
class Finding:
    """One thing a scan found.

    `member` is the archive member, or the nesting path of an embedded payload
    (``archive/data.pkl > [pickle.loads call at 57]``); None for the file itself.
    `offset` is the byte offset of the opcode within `member` when it is set, else in
    the file; for ``zip-*`` findings it is the offset in the archive; -1 for none.
    """

    severity: str          # "malicious" | "suspicious" | "info"
    kind: str              # stable id: "dangerous-global", "unknown-global", "zip-duplicate-name", ...
    what: str              # the global (os.system) or the trick
    why: str               # one sentence: what it would do if loaded
    member: Optional[str]  # archive member or nesting path; None for the file itself
    offset: int


@dataclass
class ScanReport:
    """The verdict on one file (or a directory: `files` holds one report per checkpoint)."""

    path: str
    format: str
    verdict: str
    findings: list[Finding] = field(default_factory=list)
    globals: list[str] = field(default_factory=list)
    error: Optional[str] = None
    files: list["ScanReport"] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-able form, nested reports included."""
        return {"path": self.path, "format": self.format, "verdict": self.verdict,
                "error": self.error, "findings": [asdict(f) for f in self.findings],
                "globals": list(self.globals), "files": [r.to_dict() for r in self.files]}

    def exit_code(self, strict: bool = False) -> int:
        """0 safe, 1 malicious (or suspicious with `strict`, or not followed), 2 could not be
        (fully) read.

        A malicious finding, or a part a loader reads that the scan could not follow, wins
        over an error: it is the one thing a script must not miss.
        """
        reports = list(self.walk())
        if any(r.verdict == MALICIOUS or any(f.kind in BLOCKING_KINDS for f in r.findings)
               for r in reports):
            return 1
        if any(r.error is not None for r in reports):
            return 2
        if strict and any(r.verdict == SUSPICIOUS for r in reports):
            return 1
        return 0

    def walk(self) -> Iterator["ScanReport"]:
        """This report and every nested one."""
        yield self
        for child in self.files:
            yield from child.walk()
