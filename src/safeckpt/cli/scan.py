"""`safeckpt scan PATH...`: what would loading each checkpoint do? Nothing is executed.

Each file is read as every format torch.load, pickle.load and numpy.load would
accept it as, and every pickle those loaders would run is read by the restricted
pickle machine; see `safeckpt.ops.scan` (package) for what is graded how.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Iterable

import click
from rich.console import Console

from ..ops.scan import ScanReport, scan
from . import output
from .output import Column, printable

FILE_COLUMNS = (Column("file"), Column("format"), Column("verdict"), Column("findings", right=True))
FINDING_COLUMNS = (Column("severity"), Column("what"), Column("where"), Column("why"))
SUMMARY_COLUMNS = (Column("verdict"), Column("files", right=True))


def file_reports(reports: Iterable[ScanReport]) -> list[ScanReport]:
    """The per-file reports: a directory stands for the files under it."""
    out: list[ScanReport] = []
    for report in reports:
        if report.format == "directory":
            out.extend(file_reports(report.files))
        else:
            out.append(report)
    return out


def exit_code(reports: list[ScanReport], strict: bool = False) -> int:
    """The command's exit code over all reports, as `ScanReport.exit_code` decides it for one."""
    return ScanReport("", "directory", "safe", files=list(reports)).exit_code(strict)


def where(member: "str | None", offset: int) -> str:
    """'archive/data.pkl@57', '@57' for the file itself, '' when there is no place."""
    at = f"@{offset}" if offset >= 0 else ""
    return printable(f"{member or ''}{at}")


def print_reports(console: Console, reports: list[ScanReport]) -> None:
    """The human-readable form: one table of files, then the findings of each file."""
    files = file_reports(reports)
    output.print_table(console, FILE_COLUMNS, [
        [printable(r.path), r.format, _verdict_cell(r), str(len(r.findings))]
        for r in files])
    for report in reports:
        if report.format == "directory" and report.findings:
            console.print(f"\n{printable(report.path)}", markup=False)
            output.print_table(console, FINDING_COLUMNS, _finding_rows(report))
    for report in files:
        if report.findings:
            console.print(f"\n{printable(report.path)}: {report.verdict}", markup=False)
            output.print_table(console, FINDING_COLUMNS, _finding_rows(report))
    if len(files) > 1 or any(r.format == "directory" for r in reports):
        counts = Counter(r.verdict for r in files)
        rows = [[v, str(counts[v])] for v in ("safe", "suspicious", "malicious") if counts[v]]
        errors = sum(r.error is not None for r in files)
        if errors:
            rows.append(["errors", str(errors)])
        console.print()
        output.print_table(console, SUMMARY_COLUMNS, rows)


def _verdict_cell(report: ScanReport) -> str:
    if report.error is None:
        return report.verdict
    return "malicious (error)" if report.verdict == "malicious" else "error"


def _finding_rows(report: ScanReport) -> list[list[str]]:
    return [[f.severity, printable(f.what), where(f.member, f.offset), printable(f.why)]
            for f in report.findings]


@click.command("scan", short_help="Check checkpoints for code that loading them would run.",
               epilog=output.exit_codes_help(
                   ok="no file is malicious (and, with --strict, none is suspicious)",
                   invalid="a file is malicious, or a part a loader reads could not be followed (or, "
                           "with --strict, a file is suspicious); this wins over errors",
                   error="a file could not be (fully) read, or the command line is wrong"))
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document: {verdict, exit_code, reports: [{path, format, verdict, "
                   "error, findings: [{severity, kind, what, why, member, offset}], globals, files}]}.")
@click.option("--strict", is_flag=True, help="Fail (exit 1) on suspicious files too: globals that are "
              "not on the allowlist but not known to be dangerous, such as your own classes.")
def command(paths: tuple[str, ...], as_json: bool, strict: bool) -> None:
    """Scan each PATH (a file, or a directory scanned recursively) for what loading it would do.

    Each file is read as every format torch.load, pickle.load and numpy.load
    would accept it as (never by its name or first bytes alone); every pickle
    they would run is read by a restricted machine that never imports or calls
    anything. The verdict is "safe" when every global is on the allowlist,
    "suspicious" when some are not (your own classes), "malicious" for code
    execution, imports, file or network access, nested deserialization, any
    other standard-library function, and files made to be read differently by
    different readers (polyglots, frame and archive tricks). safetensors and
    GGUF files are checked structurally. In a directory, files that are not
    checkpoints (by content) are listed as skipped; links are not followed out
    of it, and a file that cannot be read fails the scan.

    \b
    Examples:
      safeckpt scan pytorch_model.bin
      safeckpt scan --strict downloads/
      safeckpt scan --json model.ckpt | jq '.reports[0].findings'
    """
    reports = [scan(path) for path in paths]
    code = exit_code(reports, strict)
    worst = max((r.verdict for r in reports), key=("safe", "suspicious", "malicious").index)
    if as_json:
        click.echo(json.dumps({"verdict": worst, "exit_code": code, "strict": strict,
                               "reports": [r.to_dict() for r in reports]}, indent=2))
    else:
        print_reports(output.make_console(), reports)
    for report in file_reports(reports) + [r for r in reports if r.format == "directory"]:
        if report.error is not None:
            click.echo(output.one_line(f"ERROR {report.path}: {report.error}"), err=True)
    raise SystemExit(code)
