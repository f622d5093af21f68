"""What every command shares: exit codes, error lines, human units, tables.

Commands print results to stdout and one line per error to stderr, never a
traceback for bad input. Tables are rich tables; past `RICH_TABLE_ROWS` rows
(rich spends ~0.3 ms a row, 30 s for a 100k-tensor file) the same table is
written as plain aligned text, in the same layout, in linear time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator, NoReturn, Optional, Sequence, TextIO

import click
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ..errors import SafeckptError

# Exit codes shared by every command; each command's --help says what they mean for it.
EXIT_OK = 0
EXIT_INVALID = 1  # the input was read and is not valid (or a check failed)
EXIT_ERROR = 2  # the input could not be read (missing, unreadable), or a usage error (click's code)

# Above this many rows a table is written as plain text (see the module docstring).
RICH_TABLE_ROWS = 1000
# Cells longer than this (metadata values holding whole configs) are cut in tables; --json has them whole.
MAX_CELL_CHARS = 200
# The progress bar appears only for work that has already taken this long.
PROGRESS_AFTER_SECONDS = 1.0
# Set to see the traceback of an unexpected error (for bug reports).
TRACEBACK_ENV = "SAFECKPT_TRACEBACK"
# In --json output, a list longer than this has one compact item per line: json's indenting
# encoder is pure Python (20 s for the tensors of a million-tensor file), its compact one is C.
JSON_COMPACT_ITEMS = 1000


# --- exit codes and errors ---------------------------------------------------------

def exit_codes_help(ok: str = "success",
                    invalid: str = "a file is not a valid safetensors file (the reason is on stderr)",
                    error: str = "a file is missing or cannot be read, or the command line is wrong") -> str:
    """The "Exit codes" section of a command's --help (click keeps lines after \\b as written)."""
    return f"\b\nExit codes:\n  0  {ok}\n  1  {invalid}\n  2  {error}"


def one_line(text: str) -> str:
    """`text` on a single line: error lines must stay one line each, whatever a file name holds."""
    return " ".join(text.splitlines())


def describe_failure(exc: BaseException, path: "os.PathLike | str") -> tuple[int, str]:
    """The exit code and the one-line message for an error met while reading `path`."""
    path = os.fspath(path)
    if isinstance(exc, SafeckptError):
        message = str(exc) if exc.path is not None else f"{path}: {exc}"
        return EXIT_ERROR if isinstance(exc, OSError) else EXIT_INVALID, one_line(message)  # OSError: not read
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        return EXIT_ERROR, one_line(f"{path}: cannot read: {reason}")
    if os.environ.get(TRACEBACK_ENV):
        raise exc
    return EXIT_ERROR, one_line(
        f"{path}: internal error {type(exc).__name__}: {exc} (a bug in safeckpt: please report it; "
        f"set {TRACEBACK_ENV}=1 to see the traceback)")


def exit_with(code: int, message: str) -> NoReturn:
    """Print `message` on stderr and exit with `code`."""
    click.echo(message, err=True)
    sys.exit(code)


# --- numbers ----------------------------------------------------------------------

def human_count(n: int) -> str:
    """1234 -> '1.2K', 1_228_800 -> '1.2M', 7_241_732_096 -> '7.2B' (the units model cards use)."""
    if n < 1000:
        return str(n)
    value = float(n)
    for unit in ("K", "M", "B", "T"):
        value /= 1000
        if round(value, 1) < 1000 or unit == "T":
            return f"{value:.1f}{unit}"
    raise AssertionError("unreachable")


def human_bytes(n: int) -> str:
    """812 -> '812 B', 4_915_208 -> '4.7 MiB'."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if round(value, 1) < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def grouped(n: int) -> str:
    """1234567 -> '1,234,567'."""
    return f"{n:,}"


def printable(text: str) -> str:
    """Text safe to put in a table cell: control characters escaped, long text cut."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    if len(text) > MAX_CELL_CHARS:
        text = f"{text[:MAX_CELL_CHARS]}… ({len(text)} chars)"
    return text


# --- JSON -------------------------------------------------------------------------

def write_json(document: object, file: Optional[TextIO] = None) -> None:
    """Write `document` (and a newline) to `file` (stdout) as JSON indented by two, except that the
    items of a list longer than `JSON_COMPACT_ITEMS` (the tensors of a big model) are written one
    compact line each, a few thousand lines at a time.

    >>> write_json({"a": [1, 2]})
    {
      "a": [
        1,
        2
      ]
    }
    """
    out = sys.stdout if file is None else file
    for piece in _json_pieces(document, ""):
        out.write(piece)
    out.write("\n")
    out.flush()


# Items of a compact list joined into one write.
_JSON_ITEMS_PER_WRITE = 4096


def _json_pieces(value: object, indent: str) -> Iterator[str]:
    inner = indent + "  "
    if isinstance(value, dict) and value:
        yield "{\n"
        for i, (key, item) in enumerate(value.items()):
            if i:
                yield ",\n"
            yield inner + (json.dumps(key) if isinstance(key, str) else json.dumps({key: 0})[1:-4]) + ": "
            yield from _json_pieces(item, inner)
        yield f"\n{indent}}}"
    elif isinstance(value, (list, tuple)) and len(value) > JSON_COMPACT_ITEMS:
        yield "[\n" + inner
        between = ",\n" + inner
        for start in range(0, len(value), _JSON_ITEMS_PER_WRITE):
            if start:
                yield between
            yield between.join(map(json.dumps, value[start:start + _JSON_ITEMS_PER_WRITE]))
        yield f"\n{indent}]"
    else:
        yield json.dumps(value, indent=2).replace("\n", "\n" + indent)


# --- tables -----------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    header: str
    right: bool = False  # right-aligned (numbers)


def make_console(stderr: bool = False) -> Console:
    """A console on the current stdout (or stderr); not a terminal: no wrapping, no colour."""
    console = Console(stderr=stderr, highlight=False, emoji=False)
    if not console.is_terminal:
        console.width = 100_000  # piped output: long tensor names stay on one line
    return console


def print_table(console: Console, columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> None:
    """Print a table: a header, a rule, then the rows, columns separated by three spaces."""
    if len(rows) <= RICH_TABLE_ROWS:
        console.print(_rich_table(columns, rows))
    else:
        console.file.write(plain_table(columns, rows, _rule_char(console)))
        console.file.flush()


def print_counts(console: Console, counts: dict[str, int], shown: int) -> None:
    """A table of tensor -> count (values that overflowed, ...), largest first, `shown` rows at most."""
    rows = sorted(counts.items(), key=lambda item: -item[1])[:shown]
    print_table(console, (Column("tensor"), Column("values", right=True)),
                [(printable(name), grouped(count)) for name, count in rows])


def _rich_table(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in columns:
        table.add_column(column.header, justify="right" if column.right else "left", overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # Text: names are never read as rich markup
    return table


def _rule_char(console: Console) -> str:
    return "─" if console.encoding.lower().startswith("utf") else "-"


def plain_table(columns: Sequence[Column], rows: Sequence[Sequence[str]], rule: str = "─") -> str:
    """The text rich prints for `_rich_table` on a wide console, in linear time."""
    widths = [_width(c.header) for c in columns]
    for row in rows:
        for i, cell in enumerate(row):
            width = _width(cell)
            if width > widths[i]:
                widths[i] = width
    rights = [c.right for c in columns]
    ascii_line = "   ".join(f"{{:{'>' if right else '<'}{width}}}"
                            for right, width in zip(rights, widths)).format

    def line(cells: Sequence[str]) -> str:
        if "".join(cells).isascii():  # str.format pads by characters: right for ASCII only
            return ascii_line(*cells)
        padded = []
        for right, cell, width in zip(rights, cells, widths):
            fill = " " * (width - _width(cell))
            padded.append(fill + cell if right else cell + fill)
        return "   ".join(padded)

    lines = [line([c.header for c in columns]), rule * (sum(widths) + 3 * (len(widths) - 1))]
    lines.extend(map(line, rows))
    return "\n".join(lines) + "\n"


def _width(text: str) -> int:
    """Terminal cells taken by `text` (wide CJK characters take two)."""
    return len(text) if text.isascii() else cell_len(text)


# --- progress ---------------------------------------------------------------------

class ProgressBar:
    """A `progress(done_bytes, total_bytes, name)` callback: a rich bar on stderr, shown only on a
    terminal and once the work has run for `PROGRESS_AFTER_SECONDS`. Call `close()` when done."""

    def __init__(self, what: str, enabled: bool = True) -> None:
        self.what = what
        self.enabled = enabled
        self.started = time.monotonic()
        self.bar: Optional[Progress] = None
        self.task = None

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.bar is None:
            if not self.enabled or time.monotonic() - self.started < PROGRESS_AFTER_SECONDS:
                return
            console = make_console(stderr=True)
            if not console.is_terminal:
                self.enabled = False
                return
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TimeRemainingColumn(), console=console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=total)
        self.bar.update(self.task, completed=done, description=printable(name)[:40].ljust(40))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
