"""`safeckpt scan PATH...`: what would loading each checkpoint do? Nothing is executed.

Each file is read as every format torch.load, pickle.load and numpy.load would
accept it as, and every pickle those loaders would run is read by the restricted
pickle machine; see `safeckpt.ops.scan` (package) for what is graded how.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable

import click

from . import output, short_help
from .output import Column, printable

if TYPE_CHECKING:
    from rich.console import Console

    from ..ops.scan import ScanReport

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
    from ..ops.scan import ScanReport

    return ScanReport("", "directory", "safe", files=list(reports)).exit_code(strict)


def verdict_of(report: ScanReport) -> str:
    """A report's verdict as the command shows it: "error" for a file that could not be (fully)
    read, unless what was read is already malicious."""
    if report.error is None:
        return report.verdict
    return "malicious" if report.verdict == "malicious" else "error"


def overall_verdict(reports: list[ScanReport], code: int) -> str:
    """The verdict over every PATH, consistent with the exit code: "malicious" wins, then
    "error" (exit 2), then the worst of the rest."""
    from ..ops.scan import VERDICT_RANK  # loaded by the scan that made the reports

    verdicts = [r.verdict for report in reports for r in report.walk()]
    if "malicious" in verdicts:
        return "malicious"
    if code == output.EXIT_ERROR:
        return "error"
    return max(verdicts, key=VERDICT_RANK.__getitem__, default="safe")


def report_dict(report: ScanReport) -> dict[str, Any]:
    """`ScanReport.to_dict` with the verdict the command shows (see `verdict_of`)."""
    out = report.to_dict()
    out["verdict"] = verdict_of(report)
    out["files"] = [report_dict(child) for child in report.files]
    return out


def _in_common_words(report: ScanReport) -> None:
    """A file the scan reads as no checkpoint at all gets the words every other command gives
    it (`open_source`'s: "not a checkpoint format safeckpt reads: ..."); only its first bytes
    are read again, and only when no opener claims them."""
    from ..errors import SafeckptError, UnknownFormatError
    from ..ops.scan.scanner import NOT_A_CHECKPOINT
    from ..sources import open_source
    from ..sources.detect import SNIFF_BYTES, sniff

    if report.format != "unknown" or not (report.error or "").startswith(NOT_A_CHECKPOINT):
        return
    try:
        with open(report.path, "rb") as f:
            if sniff(f.read(SNIFF_BYTES)) is not None:
                return  # a format a reader claims: the scan's own words are the precise ones
        open_source(report.path).close()
    except UnknownFormatError as exc:
        report.error = exc.detail
    except (OSError, SafeckptError):
        pass  # the scan's own words stand


def _nothing_scanned(report: ScanReport) -> None:
    """A directory with no checkpoint file in it is an error: a scan that looked at nothing
    must not pass as a clean one."""
    if report.format != "directory" or report.error is not None or file_reports([report]):
        return
    skipped = next((f for f in report.findings if f.kind == "skipped-files"), None)
    report.error = "no checkpoint file to scan in it" + (
        f" ({skipped.what} skipped: {skipped.why})" if skipped is not None else " (it is empty)")


def where(member: "str | None", offset: int) -> str:
    """'archive/data.pkl@57', '@57' for the file itself, '' when there is no place."""
    at = f"@{offset}" if offset >= 0 else ""
    return printable(f"{member or ''}{at}")


def print_reports(console: Console, reports: list[ScanReport]) -> None:
    """The human-readable form: one table of files, then the findings of each file."""
    files = file_reports(reports)
    if files:
        output.print_table(console, FILE_COLUMNS, [
            [printable(r.path), r.format, _verdict_cell(r), str(len(r.findings))]
            for r in files])
    for report in reports:
        if report.format == "directory" and report.findings:
            console.print(f"\n{printable(report.path)}" if files else printable(report.path), markup=False)
            output.print_table(console, FINDING_COLUMNS, _finding_rows(report))
    for report in files:
        if report.findings:
            console.print(f"\n{printable(report.path)}: {report.verdict}", markup=False)
            output.print_table(console, FINDING_COLUMNS, _finding_rows(report))
    if len(files) > 1 or any(r.format == "directory" for r in reports):
        counts = Counter(r.verdict for r in files)
        rows = [[v, str(counts[v])] for v in ("safe", "suspicious", "malicious") if counts[v]]
        errors = sum(r.error is not None for r in files + [r for r in reports if r.format == "directory"])
        if errors:
            rows.append(["errors", str(errors)])
        console.print()
        output.print_table(console, SUMMARY_COLUMNS, rows)


def _verdict_cell(report: ScanReport) -> str:
    verdict = verdict_of(report)
    return "malicious (error)" if verdict == "malicious" and report.error is not None else verdict


def _finding_rows(report: ScanReport) -> list[list[str]]:
    return [[f.severity, printable(f.what), where(f.member, f.offset), printable(f.why)]
            for f in report.findings]


@click.command("scan", cls=output.Command, short_help=short_help("scan"),
               epilog=output.exit_codes_help(
                   ok="no file is malicious (and, with --strict, none is suspicious)",
                   invalid="a file is malicious, or a part a loader reads could not be followed (or, "
                           "with --strict, a file is suspicious); this wins over errors",
                   error="a file could not be (fully) read, a directory holds no checkpoint file, or\n"
                         "     the command line is wrong"))
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document: {command, ok, exit_code, error, error_type, warnings, verdict, "
                   "strict, reports: [{path, format, verdict, error, findings: [{severity, kind, what, why, "
                   "member, offset}], globals, files}]}; verdict is safe, suspicious, malicious or error; ok is "
                   "exit_code == 0.")
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
    of it, and a file that cannot be read fails the scan, as does a directory
    with no checkpoint file in it (exit 2: nothing was checked).

    \b
    Examples:
      safeckpt scan pytorch_model.bin
      safeckpt scan --strict downloads/
      safeckpt scan --json model.ckpt | jq '.reports[0].findings'
    """
    from ..ops.scan import scan

    reports = [scan(path) for path in paths]
    for report in reports:
        _in_common_words(report)
        _nothing_scanned(report)
    code = exit_code(reports, strict)
    if not as_json:
        print_reports(output.make_console(), reports)
    for report in file_reports(reports) + [r for r in reports if r.format == "directory"]:
        if report.error is not None:
            output.error_line(f"{report.path}: {report.error}")
    output.finish(code, {"verdict": overall_verdict(reports, code), "strict": strict,
                         "reports": [report_dict(r) for r in reports]})
