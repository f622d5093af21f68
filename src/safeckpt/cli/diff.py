"""`safeckpt diff A B`: compare two checkpoints tensor by tensor; a CI gate with --atol/--rtol.

A thin command over `safeckpt.ops.diff.compare.diff` (the semantics of every status,
stat and the tolerance are in its docstring): this module prints a summary
and a table of the differing tensors (or the report as JSON), draws the
per-layer chart with --plot, and turns the result into an exit code.
"""

from __future__ import annotations

import importlib.util
import math
from collections import Counter
from typing import TYPE_CHECKING, Any, Optional

import click

from . import output, short_help
from .output import Column, grouped, human_bytes, printable

if TYPE_CHECKING:
    from ..ops.diff import DiffEntry, DiffReport

# Rows of the table without --all.
SHOWN_ROWS = 50

EXIT_CODES = ("\b\nExit codes:\n"
              "  0  identical (every tensor bit-identical, the same names), or the same values in\n"
              "     another dtype; with --atol/--rtol: every tensor within tolerance (a dtype change\n"
              "     too) and no structural difference\n"
              "  1  the checkpoints differ (with --atol/--rtol: a tensor beyond tolerance, or a name\n"
              "     only on one side, a new shape, a renamed tensor); with --strict-dtype also any\n"
              "     dtype change\n"
              "  2  a file is missing, unreadable or malformed, or the command line is wrong")

JSON_HELP = ("Print one JSON document: {command, ok, exit_code, error, error_type, warnings, a, b, format_a, format_b, "
             "identical, within_tolerance, atol, rtol, strict_dtype, summary, bytes_compared, seconds, notes, "
             "entries: [{name, status, dtype_a, dtype_b, shape_a, shape_b, numel, max_abs, mean_abs, rel_l2, cosine, "
             "changed_elements, nonfinite_mismatch, within_tolerance, beyond_tolerance, renamed_to, note}], "
             "dtype_changes: [{dtype_a, dtype_b, tensors}], plot}; non-finite numbers as \"inf\", \"-inf\", "
             "\"nan\".")

COLUMNS = (Column("tensor"), Column("status"), Column("dtype / shape"), Column("max abs", right=True),
           Column("mean abs", right=True), Column("rel L2", right=True), Column("cosine", right=True))
_LABELS = {"equal": "equal", "changed": "changed", "dtype": "dtype changed", "shape": "shape changed",
           "renamed": "renamed", "only_a": "only in A", "only_b": "only in B"}


@click.command("diff", cls=output.Command, short_help=short_help("diff"), epilog=EXIT_CODES)
@click.argument("a", type=click.Path(path_type=str))
@click.argument("b", type=click.Path(path_type=str))
@click.option("--atol", type=float, metavar="X",
              help="Absolute tolerance: an element fails when |a-b| > atol + rtol*|a| (A is the reference).")
@click.option("--rtol", type=float, metavar="X", help="Relative tolerance (see --atol).")
@click.option("--strict-dtype", is_flag=True,
              help="Fail (exit 1) on any dtype change. Without it a tensor in another dtype is compared by "
                   "its values: within --atol/--rtol, or equal after the cast without them.")
@click.option("--plot", "plot_path", metavar="FILE", type=click.Path(dir_okay=False, path_type=str),
              help="Draw the relative change per layer to FILE (.png, .svg, .pdf); needs matplotlib.")
@click.option("--extract", default="auto", show_default=True, metavar="KEY|auto|none",
              help="Compare only the tensors under KEY, without the prefix; auto does it for Lightning and "
                   "Stable Diffusion checkpoints (state_dict), as convert does.")
@click.option("--select", multiple=True, metavar="GLOB", help="Compare only tensors whose name matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out tensors whose name matches (repeatable).")
@click.option("--all", "show_all", is_flag=True, help="List every tensor, equal ones included, not only the "
                                                     f"first {SHOWN_ROWS} differences.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def command(a: str, b: str, atol: Optional[float], rtol: Optional[float], strict_dtype: bool,
            plot_path: Optional[str], extract: str, select: tuple[str, ...], exclude: tuple[str, ...],
            show_all: bool, as_json: bool) -> None:
    """Compare checkpoint B with checkpoint A (the reference), tensor by tensor.

    A and B may be in any format safeckpt reads (safetensors, PyTorch .bin/.pt,
    Lightning or SD .ckpt, npz, sharded folders), so a .ckpt compares with the
    safetensors file converted from it. Each tensor is equal (bit-identical),
    changed, dtype changed, shape changed, renamed (same bytes under a new
    name), or only in A / only in B. For changed values: max and mean |a-b|,
    relative L2 ||a-b||/||a|| and cosine similarity, computed in float64
    (bf16 and fp8 are read exactly). A tensor whose dtype changed is compared
    by its values too, so a cast passes the gate when it is within
    --atol/--rtol; --strict-dtype fails on any dtype change. Tensors stream
    one at a time; nothing in either file is executed.

    \b
    Examples:
      safeckpt diff base.safetensors finetuned.safetensors
      safeckpt diff last.ckpt model.safetensors            # a conversion: all equal
      safeckpt diff model.safetensors model-bf16.safetensors --rtol 1e-2
      safeckpt diff old/ new/ --atol 1e-6 --json > diff.json   # CI gate: exit 1 beyond
      safeckpt diff base.safetensors tuned.safetensors --plot diff.png
      safeckpt diff step-100/tensors.safetensors step-200/tensors.safetensors --select 'model/*'
    """
    from ..ops.diff import diff

    if plot_path is not None:
        _check_matplotlib()
    bar = output.ProgressBar("comparing", enabled=not as_json)
    try:
        report = diff(a, b, atol=atol, rtol=rtol, extract=None if extract.lower() == "none" else extract,
                      select=select or None, exclude=exclude or None, progress=bar, strict_dtype=strict_dtype)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure is one line and exit 2
        bar.close()
        _fail(exc, a, b)
    bar.close()
    if plot_path is not None:
        from ..ops.diff.plot import plot_diff

        try:
            plot_diff(report, plot_path)
        except Exception as exc:  # noqa: BLE001 - a failed plot is an error like any other
            output.fail_with(exc, writing=plot_path, code=output.EXIT_ERROR)
    if not as_json:
        _print(report, show_all, plot_path)
    code = output.EXIT_OK if report.within_tolerance else output.EXIT_INVALID
    output.finish(code, dict(report.to_dict(), notes=output.cli_notes(report.notes),
                             dtype_changes=dtype_changes(report), plot=plot_path))


def _check_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:  # before the work, not after it
        from ..ops.diff.plot import INSTALL_HINT

        output.fail(output.EXIT_ERROR, f"--plot needs matplotlib: {INSTALL_HINT}")


def _fail(exc: BaseException, a: str, b: str) -> None:
    if isinstance(exc, OSError) and not exc.filename and not getattr(exc, "path", None):
        output.fail_with(exc, f"{a}, {b}", code=output.EXIT_ERROR)  # which of the two is not known
    output.fail_with(exc, code=output.EXIT_ERROR)  # a library error names its file; one without a path is about the options


def dtype_changes(report: DiffReport) -> list[dict[str, Any]]:
    """[{dtype_a, dtype_b, tensors}]: the tensors kept under the same name in another dtype."""
    counts = Counter((e.dtype_a, e.dtype_b) for e in report.entries if e.status == "dtype")
    return [{"dtype_a": a, "dtype_b": b, "tensors": n} for (a, b), n in counts.items()]


# --- the human-readable report -----------------------------------------------------

def _print(report: DiffReport, show_all: bool, plot_path: Optional[str]) -> None:
    console = output.make_console()
    console.print(f"A: {printable(report.a)} ({report.format_a})\nB: {printable(report.b)} ({report.format_b})",
                  markup=False)
    for note in output.cli_notes(report.notes):
        console.print(output.NOTE_PREFIX + note, markup=False)
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
    changes = dtype_changes(report)
    if changes:
        listed = ", ".join(f"{c['dtype_a']} -> {c['dtype_b']} ({_count(c['tensors'])})" for c in changes)
        judged = "each fails the gate (--strict-dtype)" if report.strict_dtype else \
            "compared by value (--strict-dtype would fail them)"
        console.print(f"dtype changed: {listed}; {judged}", markup=False)
    console.print(verdict_line(report), markup=False)
    if plot_path is not None:
        console.print(f"plot: {printable(plot_path)}", markup=False)


def summary_line(report: DiffReport) -> str:
    """'291 tensors (1.2 GiB compared): 280 equal, 10 changed, 1 only in A'."""
    from ..ops.diff import STATUSES

    counts = report.summary
    parts = [f"{grouped(counts[s])} {_LABELS[s]}" for s in STATUSES if counts[s]]
    return (f"{grouped(len(report.entries))} tensors ({human_bytes(report.bytes_compared)} compared in "
            f"{report.seconds:.2f} s): " + (", ".join(parts) or "none"))


def verdict_line(report: DiffReport) -> str:
    """The line that explains the exit code."""
    limits = ", ".join(f"{k}={v:g}" for k, v in (("atol", report.atol), ("rtol", report.rtol)) if v is not None)
    recast = sum(e.status == "dtype" for e in report.entries)
    if report.within_tolerance:
        if report.identical:
            return "IDENTICAL"
        if not report.tolerance:
            return f"SAME VALUES, {_count(recast)} in another dtype"
        return f"WITHIN TOLERANCE ({limits})" + (f", {_count(recast)} in another dtype" if recast else "")
    reasons = []
    beyond = [e for e in report.entries if e.status in ("changed", "dtype") and e.within_tolerance is False]
    if beyond:
        reasons.append(f"{_count(len(beyond))} beyond tolerance")
    structural = [e for e in report.differences if e.status not in ("changed", "equal", "dtype")]
    if structural:
        reasons.append(f"{len(structural)} structural difference{'s' if len(structural) > 1 else ''}")
    if not report.tolerance:
        other = [e for e in report.entries if e.status == "changed"
                 or e.status == "dtype" and (e.changed_elements or e.nonfinite_mismatch)]
        if other:
            reasons.insert(0, f"{_count(len(other))} with other values")
    if report.strict_dtype and recast:
        reasons.append(f"{_count(recast)} in another dtype (--strict-dtype)")
    if not report.tolerance:
        return "DIFFERENT" + (f": {', '.join(reasons)}" if reasons else "")
    return f"NOT WITHIN TOLERANCE ({limits}): " + ", ".join(reasons)


def _count(tensors: int) -> str:
    return f"{grouped(tensors)} tensor{'s' if tensors != 1 else ''}"


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
