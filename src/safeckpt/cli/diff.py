"""`safeckpt diff A B`: compare two checkpoints tensor by tensor; a CI gate with --atol/--rtol.

A thin command over `safeckpt.ops.diff.diff` (the semantics of every status,
stat and the tolerance are in its docstring): this module prints a summary
and a table of the differing tensors (or the report as JSON), draws the
per-layer chart with --plot, and turns the result into an exit code.
"""

from __future__ import annotations

import importlib.util
import json
import math
from typing import Optional

import click

from ..errors import SafeckptError
from ..ops.diff import STATUSES, DiffEntry, DiffReport, diff
from . import output
from .output import Column, grouped, human_bytes, printable

# Rows of the table without --all.
SHOWN_ROWS = 50

EXIT_CODES = ("\b\nExit codes:\n"
              "  0  identical (every tensor bit-identical, the same names); with --atol/--rtol:\n"
              "     every tensor within tolerance and no structural difference\n"
              "  1  the checkpoints differ (with --atol/--rtol: a tensor beyond tolerance, or a\n"
              "     name only on one side, a new shape or dtype, a renamed tensor)\n"
              "  2  a file is missing, unreadable or malformed, or the command line is wrong")

COLUMNS = (Column("tensor"), Column("status"), Column("dtype / shape"), Column("max abs", right=True),
           Column("mean abs", right=True), Column("rel L2", right=True), Column("cosine", right=True))
_LABELS = {"equal": "equal", "changed": "changed", "dtype": "dtype changed", "shape": "shape changed",
           "renamed": "renamed", "only_a": "only in A", "only_b": "only in B"}


@click.command("diff", short_help="Compare two checkpoints tensor by tensor (any formats).", epilog=EXIT_CODES)
@click.argument("a", type=click.Path(path_type=str))
@click.argument("b", type=click.Path(path_type=str))
@click.option("--atol", type=float, metavar="X",
              help="Absolute tolerance: an element fails when |a-b| > atol + rtol*|a| (A is the reference).")
@click.option("--rtol", type=float, metavar="X", help="Relative tolerance (see --atol).")
@click.option("--plot", "plot_path", metavar="FILE", type=click.Path(dir_okay=False, path_type=str),
              help="Draw the relative change per layer to FILE (.png, .svg, .pdf); needs matplotlib.")
@click.option("--extract", default="auto", show_default=True, metavar="KEY|auto|none",
              help="Compare only the tensors under KEY, without the prefix; auto does it for Lightning and "
                   "Stable Diffusion checkpoints (state_dict), as convert does.")
@click.option("--select", multiple=True, metavar="GLOB", help="Compare only tensors whose name matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out tensors whose name matches (repeatable).")
@click.option("--all", "show_all", is_flag=True, help="List every tensor, equal ones included, not only the "
                                                     f"first {SHOWN_ROWS} differences.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (non-finite numbers as "
                                                     "\"inf\", \"-inf\", \"nan\").")
def command(a: str, b: str, atol: Optional[float], rtol: Optional[float], plot_path: Optional[str],
            extract: str, select: tuple[str, ...], exclude: tuple[str, ...], show_all: bool,
            as_json: bool) -> None:
    """Compare checkpoint B with checkpoint A (the reference), tensor by tensor.

    A and B may be in any format safeckpt reads (safetensors, PyTorch .bin/.pt,
    Lightning or SD .ckpt, npz, sharded folders), so a .ckpt compares with the
    safetensors file converted from it. Each tensor is equal (bit-identical),
    changed, dtype changed, shape changed, renamed (same bytes under a new
    name), or only in A / only in B. For changed values: max and mean |a-b|,
    relative L2 ||a-b||/||a|| and cosine similarity, computed in float64
    (bf16 and fp8 are read exactly). Tensors stream one at a time; nothing
    in either file is executed.

    \b
    Examples:
      safeckpt diff base.safetensors finetuned.safetensors
      safeckpt diff last.ckpt model.safetensors            # a conversion: all equal
      safeckpt diff model.safetensors model-bf16.safetensors --rtol 1e-2
      safeckpt diff old/ new/ --atol 1e-6 --json > diff.json   # CI gate: exit 1 beyond
      safeckpt diff base.safetensors tuned.safetensors --plot diff.png
      safeckpt diff step-100/tensors.safetensors step-200/tensors.safetensors --select 'model/*'
    """
    if plot_path is not None:
        _check_matplotlib(as_json)
    bar = output.ProgressBar("comparing", enabled=not as_json)
    try:
        report = diff(a, b, atol=atol, rtol=rtol, extract=None if extract.lower() == "none" else extract,
                      select=select or None, exclude=exclude or None, progress=bar)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure is one line and exit 2
        bar.close()
        _fail(exc, a, b, as_json)
    bar.close()
    if plot_path is not None:
        from ..ops.plot import plot_diff

        try:
            plot_diff(report, plot_path)
        except Exception as exc:  # noqa: BLE001 - a failed plot is an error like any other
            _fail(exc, plot_path, plot_path, as_json)
    if as_json:
        click.echo(json.dumps(dict(report.to_dict(), plot=plot_path), indent=2))
    else:
        _print(report, show_all, plot_path)
    raise SystemExit(output.EXIT_OK if report.within_tolerance else output.EXIT_INVALID)


def _check_matplotlib(as_json: bool) -> None:
    if importlib.util.find_spec("matplotlib") is None:  # before the work, not after it
        from ..ops.plot import INSTALL_HINT

        _report_error(f"--plot needs matplotlib: {INSTALL_HINT}", "SafeckptError", as_json)


def _fail(exc: BaseException, a: str, b: str, as_json: bool) -> None:
    if isinstance(exc, KeyboardInterrupt):
        output.exit_with(output.EXIT_ERROR, "interrupted")
    if isinstance(exc, SafeckptError) and exc.path is None:  # about the options, not a file
        message = output.one_line(str(exc))
    elif isinstance(exc, OSError) and not exc.filename:
        message = output.one_line(f"{a}, {b}: {exc.strerror or exc}")
    else:
        message = output.describe_failure(exc, exc.filename if isinstance(exc, OSError) else a)[1]
    _report_error(message, type(exc).__name__, as_json)


def _report_error(message: str, kind: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"error": message, "error_type": kind}, indent=2))
    output.exit_with(output.EXIT_ERROR, f"ERROR {message}")


# --- the human-readable report -----------------------------------------------------

def _print(report: DiffReport, show_all: bool, plot_path: Optional[str]) -> None:
    console = output.make_console()
    console.print(f"A: {printable(report.a)} ({report.format_a})\nB: {printable(report.b)} ({report.format_b})",
                  markup=False)
    for note in report.notes:
        console.print(f"note: {note}", markup=False)
    console.print(summary_line(report), markup=False)
    rows = sorted(report.entries if show_all else report.differences, key=_order)
    shown = rows if show_all else rows[:SHOWN_ROWS]
    if shown:
        columns = COLUMNS + ((Column("beyond tol", right=True),) if report.tolerance else ())
        output.print_table(console, columns, [_row(entry, report.tolerance) for entry in shown])
    if len(rows) > len(shown):
        console.print(f"... and {grouped(len(rows) - len(shown))} more differences (use --all to list them)",
                      markup=False)
    nonfinite = [e for e in report.entries if e.nonfinite_mismatch]
    if nonfinite:
        console.print(f"{_tensors(len(nonfinite))} NaN or inf where the other side has another value "
                      f"(e.g. {printable(nonfinite[0].name)}: {grouped(nonfinite[0].nonfinite_mismatch)})",
                      markup=False)
    console.print(verdict_line(report), markup=False)
    if plot_path is not None:
        console.print(f"plot: {printable(plot_path)}", markup=False)


def summary_line(report: DiffReport) -> str:
    """'291 tensors (1.2 GiB compared): 280 equal, 10 changed, 1 only in A'."""
    counts = report.summary
    parts = [f"{grouped(counts[s])} {_LABELS[s]}" for s in STATUSES if counts[s]]
    return (f"{grouped(len(report.entries))} tensors ({human_bytes(report.bytes_compared)} compared in "
            f"{report.seconds:.2f} s): " + (", ".join(parts) or "none"))


def verdict_line(report: DiffReport) -> str:
    """The line that explains the exit code."""
    if not report.tolerance:
        return "IDENTICAL" if report.identical else "DIFFERENT"
    limits = ", ".join(f"{k}={v:g}" for k, v in (("atol", report.atol), ("rtol", report.rtol)) if v is not None)
    if report.within_tolerance:
        return f"WITHIN TOLERANCE ({limits})"
    beyond = [e for e in report.entries if e.within_tolerance is False]
    structural = [e for e in report.differences if e.status not in ("changed", "equal")]
    reasons = []
    if beyond:
        reasons.append(f"{len(beyond)} tensor{'s' if len(beyond) > 1 else ''} beyond tolerance")
    if structural:
        reasons.append(f"{len(structural)} structural difference{'s' if len(structural) > 1 else ''}")
    return f"NOT WITHIN TOLERANCE ({limits}): " + ", ".join(reasons)


def _tensors(count: int) -> str:
    return f"{grouped(count)} tensor has" if count == 1 else f"{grouped(count)} tensors have"


def _order(entry: DiffEntry) -> tuple:
    """Largest relative change first; entries without one (structural) before all."""
    if entry.rel_l2 is None:
        return (0, 0.0)
    return (1, -entry.rel_l2 if not math.isnan(entry.rel_l2) else 0.0)


def _row(entry: DiffEntry, tolerance: bool) -> list[str]:
    status = _LABELS[entry.status]
    if entry.renamed_to is not None:
        status = f"renamed to {printable(entry.renamed_to)}"
    row = [printable(entry.name), status, _kind(entry), _number(entry.max_abs), _number(entry.mean_abs),
           _number(entry.rel_l2), _cosine(entry.cosine)]
    if tolerance:
        row.append("-" if entry.beyond_tolerance is None else grouped(entry.beyond_tolerance))
    return row


def _kind(entry: DiffEntry) -> str:
    def shape(s: Optional[tuple]) -> str:
        return "[" + ", ".join(map(str, s)) + "]" if s is not None else "?"

    dtype = entry.dtype_a or entry.dtype_b or "?"
    if entry.dtype_a and entry.dtype_b and entry.dtype_a != entry.dtype_b:
        dtype = f"{entry.dtype_a} -> {entry.dtype_b}"
    if entry.status == "shape":
        return f"{dtype} {shape(entry.shape_a)} -> {shape(entry.shape_b)}"
    return f"{dtype} {shape(entry.shape_a if entry.shape_a is not None else entry.shape_b)}"


def _number(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return "0" if value == 0 else f"{value:.3g}"


def _cosine(value: Optional[float]) -> str:
    """Cosines near 1 as 1-ε, so that 0.9999995 does not read as 1.000000."""
    if value is None:
        return "-"
    if value == 1.0:
        return "1"
    if 1 - value < 1e-12:  # rounding noise of a dot product: not a change worth digits
        return "~1"
    if value > 0.999:
        return f"1-{1 - value:.2g}"
    return f"{value:.4f}"
