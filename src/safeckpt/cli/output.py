"""What every command shares: exit codes, the JSON envelope, error lines, human units, tables.

Commands print results (and ``note:`` lines) to stdout and problems to stderr,
one line each, ``error: ...`` or ``warning: ...`` (`ERROR_PREFIX`,
`WARNING_PREFIX`); never a traceback for bad input or any OSError. Every error goes through `fail` (it
ends the command) or `error_line` (one file of several failed); every failure
is worded by `describe_failure`. With --json a command prints one document,
the `envelope`: ``{"command", "ok", "exit_code", "error", "error_type",
"warnings", ...its own fields}``, on errors too.

Each command is a `Command` (click's, plus the funnel above: Python warnings
become warning lines, an exception that escapes becomes one error line, and
click's own usage errors are one line too, or the envelope with --json).

Tables are rich tables; past `RICH_TABLE_ROWS` rows (rich spends ~0.3 ms a
row, 30 s for a 100k-tensor file) the same table is written as plain aligned
text, in the same layout, in linear time. rich is imported only when a table,
console or progress bar is made: `safeckpt --help` does not pay for it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn, Optional, Sequence, TextIO

import click

from ..errors import OutputNotWritableError, SafeckptError

if TYPE_CHECKING:  # rich is imported when a console is made
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

# Exit codes shared by every command; each command's --help says what they mean for it.
EXIT_OK = 0
EXIT_INVALID = 1  # the input was read and is not valid (or a check failed)
EXIT_ERROR = 2  # the input could not be read (missing, unreadable), or a usage error (click's code)

# The one prefix of each kind of line on stderr.
ERROR_PREFIX = "error: "
WARNING_PREFIX = "warning: "
NOTE_PREFIX = "note: "

# Above this many rows a table is written as plain text (see the module docstring).
RICH_TABLE_ROWS = 1000
# Cells longer than this (metadata values holding whole configs) are cut in tables; --json has them whole.
MAX_CELL_CHARS = 200
# Keys longer than this that name an object with its settings (Lightning's callback keys,
# ``ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', ...}``) are shortened in tables.
MAX_KEY_CHARS = 40
# The progress bar appears only for work that has already taken this long.
PROGRESS_AFTER_SECONDS = 1.0
# Set to see the traceback of an unexpected error (for bug reports).
TRACEBACK_ENV = "SAFECKPT_TRACEBACK"
# In --json output, a list longer than this has one compact item per line: json's indenting
# encoder is pure Python (20 s for the tensors of a million-tensor file), its compact one is C.
JSON_COMPACT_ITEMS = 1000

# The library speaks Python keywords in its messages ("use extract=None to keep all"); on the
# command line the same advice names the option. Exact spellings, most specific first; a
# keyword followed by its option in parentheses ("overwrite=True (--force)") becomes the option.
CLI_SPELLINGS = (
    ("allow_unsafe_structure=True", "--allow-unsafe-structure"),
    ("overwrite=True", "--force"),
    ("strict_dtype=True", "--strict-dtype"),
    ("source_hash=False", "--no-source-hash"),
    ("normalize=False", "--no-normalize"),
    ("extract=None", "--extract none"),
    ("ema='only'", "--ema-only"),
)
_KEYWORD_THEN_OPTION = re.compile(r"\b(?:[a-z]+_[a-z_]+|[a-z_]+=\S+) \((--[a-z][a-z-]*)\)")
# A temporary sibling the writer creates (format/writer.py: ".NAME.HEX.tmp"): never named to users.
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


# --- exit codes, errors, warnings ------------------------------------------------------

def exit_codes_help(ok: str = "success",
                    invalid: str = "a file is not a valid safetensors file (the reason is on stderr)",
                    error: str = "a file is missing or cannot be read, or the command line is wrong") -> str:
    """The "Exit codes" section of a command's --help (click keeps lines after \\b as written)."""
    return f"\b\nExit codes:\n  0  {ok}\n  1  {invalid}\n  2  {error}"


def one_line(text: str) -> str:
    """`text` on a single line: error lines must stay one line each, whatever a file name holds."""
    return " ".join(text.splitlines())


def cli_spelling(text: str) -> str:
    """A library message in the command line's words: ``extract=None`` -> ``--extract none``.

    >>> cli_spelling("use extract=None to keep all")
    'use --extract none to keep all'
    >>> cli_spelling("replace it with overwrite=True (--force)")
    'replace it with --force'
    """
    text = _KEYWORD_THEN_OPTION.sub(r"\1", text)
    for python, option in CLI_SPELLINGS:
        text = text.replace(python, option)
    return text


def cli_notes(notes: Sequence[str]) -> list[str]:
    """Notes as the command line prints them (and puts them in --json)."""
    return [one_line(cli_spelling(note)) for note in notes]


def describe_failure(exc: BaseException, path: "os.PathLike | str | None" = None, *,
                     writing: "os.PathLike | str | None" = None) -> tuple[int, str]:
    """The exit code and the one-line message for an error met while reading `path` (or, for
    a command that writes, writing `writing`).

    OSErrors (and the library's errors that are OSErrors: a FIFO, an output that cannot be
    written) exit 2; other library errors exit 1 (the input was read and is not valid). A
    message names the file it is about; a temporary file's name never shows.
    """
    path = None if path is None else os.fspath(path)
    if isinstance(exc, OutputNotWritableError):
        return EXIT_ERROR, _clean(f"cannot write {exc.path}: {exc.detail}")
    if isinstance(exc, SafeckptError):
        message = str(exc) if exc.path is not None or path is None else f"{path}: {exc}"
        return EXIT_ERROR if isinstance(exc, OSError) else EXIT_INVALID, _clean(message)  # OSError: not read
    if isinstance(exc, OSError):
        reason = os_reason(exc)
        name = exc.filename if exc.filename is not None else None
        if name is not None and writing is not None and _is_output(os.fspath(name), os.fspath(writing)):
            name = os.fspath(name)
            if _TEMP_NAME.fullmatch(os.path.basename(name)):
                name = os.path.dirname(name) or "."
            return EXIT_ERROR, _clean(f"cannot write {name}: {reason}")
        name = name if name is not None else path
        return EXIT_ERROR, _clean(f"{os.fspath(name)}: cannot read: {reason}" if name is not None
                                  else f"cannot read: {reason}")
    if os.environ.get(TRACEBACK_ENV):
        raise exc
    where = f"{path}: " if path is not None else ""
    return EXIT_ERROR, _clean(
        f"{where}internal error {type(exc).__name__}: {exc} (a bug in safeckpt: please report it; "
        f"set {TRACEBACK_ENV}=1 to see the traceback)")


def os_reason(exc: OSError) -> str:
    """"permission denied", "no such file or directory": the OS's words, without paths."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return reason[:1].lower() + reason[1:]


def _is_output(name: str, dst: str) -> bool:
    """Whether an OSError about `name` is about writing `dst`: dst itself, a folder it goes
    in, or a temporary beside it."""
    name, dst = os.path.abspath(name), os.path.abspath(dst)
    if name == dst or dst.startswith(name.rstrip(os.sep) + os.sep):
        return True
    return _TEMP_NAME.fullmatch(os.path.basename(name)) is not None


# The OS's words for the failures users meet, as they appear inside library messages
# ("cannot read: No such file or directory"): written in lower case like the rest of a line.
_OS_WORDS = {os.strerror(code): os.strerror(code)[:1].lower() + os.strerror(code)[1:]
             for code in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EROFS,
                          errno.ENOSPC, errno.EIO, errno.ELOOP, errno.ENAMETOOLONG, errno.EEXIST, errno.EDQUOT)}


def _clean(message: str) -> str:
    message = one_line(cli_spelling(message))
    for words, lower in _OS_WORDS.items():
        if words in message:
            message = message.replace(f": {words}", f": {lower}")
    return message


def error_line(message: str) -> None:
    """Print one error line on stderr (and keep it for the --json envelope's `error`): the one
    way every command reports an error."""
    message = _clean(message)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta.setdefault(_ERRORS_KEY, []).append(message)
    click.echo(ERROR_PREFIX + message, err=True)


def warning_line(message: str) -> None:
    """Print one warning line on stderr (and keep it for the --json envelope's `warnings`)."""
    message = _clean(message)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta.setdefault(_WARNINGS_KEY, []).append(message)
    click.echo(WARNING_PREFIX + message, err=True)


def note_line(message: str) -> None:
    """Print one note line on stdout."""
    click.echo(NOTE_PREFIX + _clean(message))


def fail(code: int, message: str, *, exc: Optional[BaseException] = None, **fields: Any) -> NoReturn:
    """End the command with `code`: the error line on stderr (``error: MESSAGE``), and with
    --json the envelope, with `fields`, on stdout.

    Example: ``fail(EXIT_ERROR, "--drop-ema and --ema-only exclude each other")``.
    """
    error_line(message)
    if _json_requested():
        write_json(envelope(code, error_type=type(exc).__name__ if exc is not None else None, **fields))
    sys.exit(code)


def fail_with(exc: BaseException, path: "os.PathLike | str | None" = None, *,
              writing: "os.PathLike | str | None" = None, code: Optional[int] = None, **fields: Any) -> NoReturn:
    """`fail` with `describe_failure`'s words for `exc`, and its exit code unless `code` is given
    (commands that write, and diff, exit 2 on every failure)."""
    if isinstance(exc, KeyboardInterrupt):
        fail(EXIT_ERROR, "interrupted" + ("; nothing was written" if writing is not None else ""), exc=exc, **fields)
    described, message = describe_failure(exc, path, writing=writing)
    fail(described if code is None else code, message, exc=exc, **fields)


def run_writing(work: Callable[["ProgressBar"], Any], label: str, dst: "os.PathLike | str", as_json: bool) -> Any:
    """Run an op that writes `dst` (convert, cast, merge) under a progress bar labelled `label`.

    Every failure is one error line (and the envelope): inputs that cannot be merged exit 1
    with the offenders; a file the scan refuses exits 2 with the scan's report; anything else
    exits 2 (an interruption says nothing was written)."""
    from ..errors import IncompatibleInputsError, UnsafeFileError

    bar = ProgressBar(label, enabled=not as_json)
    try:
        result = work(bar)
    except IncompatibleInputsError as exc:
        bar.close()
        fail(EXIT_INVALID, str(exc), exc=exc, offenders=exc.offenders)
    except UnsafeFileError as exc:
        bar.close()
        fail(EXIT_ERROR, str(exc), exc=exc, scan=exc.report.to_dict() if hasattr(exc.report, "to_dict") else None)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure is one line and exit 2
        bar.close()
        fail_with(exc, writing=dst, code=EXIT_ERROR)
    bar.close()
    return result


def finish(code: int, fields: Optional[dict[str, Any]] = None) -> NoReturn:
    """End the command with `code`; with --json, print the envelope with `fields` first."""
    if _json_requested():
        write_json(envelope(code, **(fields or {})))
    sys.exit(code)


# --- the JSON envelope ----------------------------------------------------------------

_WARNINGS_KEY = "safeckpt.warnings"
_ERRORS_KEY = "safeckpt.errors"
ENVELOPE_KEYS = ("command", "ok", "exit_code", "error", "error_type", "warnings")


def envelope(code: int, *, error: Optional[str] = None, error_type: Optional[str] = None,
             command: Optional[str] = None, **fields: Any) -> dict[str, Any]:
    """The one --json document: the keys every command shares, then the command's own fields.

    `ok` is ``exit_code == 0`` for every command; `error` is what the command printed on
    stderr as error lines, without the prefix (several joined by "; "), None when it printed
    none; `warnings` are the warning lines it printed.

    >>> envelope(0, command="verify", files=[])
    {'command': 'verify', 'ok': True, 'exit_code': 0, 'error': None, 'error_type': None, 'warnings': [], 'files': []}
    """
    ctx = click.get_current_context(silent=True)
    if command is None and ctx is not None:
        command = ctx.command.name
    meta = ctx.meta if ctx is not None else {}
    if error is None and meta.get(_ERRORS_KEY):
        error = "; ".join(meta[_ERRORS_KEY])
    shared = {"command": command, "ok": code == EXIT_OK, "exit_code": code, "error": error,
              "error_type": error_type, "warnings": list(meta.get(_WARNINGS_KEY, ()))}
    for key in ENVELOPE_KEYS:
        fields.pop(key, None)  # a report's own "ok" or "error" must not shadow the envelope's
    return {**shared, **fields}


def _json_requested() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.params.get("as_json"))


# --- the command class: warnings, escaped errors and usage errors as lines -----------------

class OneLineErrors:
    """click's `main` with every error one line: usage errors (a missing argument, a bad
    option, `click.Path` checks) print ``error: ...`` (and the envelope with --json), exit 2."""

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra: Any) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)  # type: ignore[misc]
        except click.ClickException as exc:
            self._usage_error(exc, args)
        except click.Abort:
            error_line("interrupted")
            sys.exit(EXIT_ERROR)
        except OSError as exc:  # the output pipe closed (`| head`), a terminal gone
            if exc.errno == errno.EPIPE:
                _silence_stdout()
                sys.exit(EXIT_ERROR)
            error_line(describe_failure(exc)[1])
            sys.exit(EXIT_ERROR)
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else EXIT_OK)
        return result

    def _usage_error(self, exc: click.ClickException, args: list[str]) -> NoReturn:
        if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):
            click.echo(exc.format_message())  # `safeckpt` alone: the help, as click prints it
            sys.exit(EXIT_ERROR)
        message = exc.format_message().rstrip(".")
        if message[:1].isupper() and message[1:2].islower():  # "No such option" -> "no such option"
            message = message[0].lower() + message[1:]
        ctx = getattr(exc, "ctx", None)
        if ctx is not None and isinstance(exc, click.UsageError):
            message += f" (see `{ctx.command_path} --help`)"
        message = _clean(message)
        options = args[:args.index("--")] if "--" in args else args
        if "--json" in options:
            name = getattr(self, "name", None)
            if isinstance(self, click.Group):
                name = next((a for a in options if a in self.list_commands(ctx or click.Context(self))), None)
            write_json(envelope(EXIT_ERROR, error=message, error_type=type(exc).__name__, command=name))
        error_line(message)
        sys.exit(EXIT_ERROR)  # click's own code is 1 for some (a FileError): the command line is wrong


class Command(OneLineErrors, click.Command):
    """A safeckpt command: warnings are warning lines, an escaped exception is one error line."""

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # overflow (RuntimeWarning) is printed from the reports
            warnings.filterwarnings("always", category=UserWarning)
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except (SystemExit, click.ClickException, click.exceptions.Exit, click.Abort):
                raise
            except BrokenPipeError:  # the reader went away (`| head`): nothing to tell it
                _silence_stdout()
                sys.exit(EXIT_ERROR)
            except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - never a traceback
                fail_with(exc, code=EXIT_ERROR)


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                  line: Optional[str] = None) -> None:
    warning_line(str(message))


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so that the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


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


_OBJECT_KEY = re.compile(r"([A-Za-z_][\w.]*)(\{.*\})", re.S)


def short_key(key: str) -> str:
    """A long key that names an object by its settings, as Lightning names its callbacks'
    states, shortened for a table to the class and its first setting (--json has it whole).

    >>> short_key("ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0}")
    "ModelCheckpoint{'monitor': 'val_loss', …}"
    """
    match = _OBJECT_KEY.fullmatch(key)
    if len(key) <= MAX_KEY_CHARS or match is None:
        return key
    settings = match.group(2)[1:-1].split(", ")
    first = settings[0] if len(settings[0]) <= MAX_KEY_CHARS else settings[0][:MAX_KEY_CHARS] + "…"
    return f"{match.group(1)}{{{first}{', …' if len(settings) > 1 or first != settings[0] else ''}}}"


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


def make_console(stderr: bool = False) -> "Console":
    """A console on the current stdout (or stderr); not a terminal: no wrapping, no colour."""
    from rich.console import Console

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


def _rich_table(columns: Sequence[Column], rows: Sequence[Sequence[str]]) -> "Table":
    from rich import box
    from rich.table import Table
    from rich.text import Text

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
    if text.isascii():
        return len(text)
    from rich.cells import cell_len

    return cell_len(text)


# --- progress ---------------------------------------------------------------------

class ProgressBar:
    """A `progress(done_bytes, total_bytes, name)` callback: a rich bar on stderr, shown only on a
    terminal and once the work has run for `PROGRESS_AFTER_SECONDS`. Call `close()` when done."""

    def __init__(self, what: str, enabled: bool = True) -> None:
        self.what = what
        self.enabled = enabled
        self.started = time.monotonic()
        self.bar: "Optional[Progress]" = None
        self.task = None

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.bar is None:
            if not self.enabled or time.monotonic() - self.started < PROGRESS_AFTER_SECONDS:
                return
            console = make_console(stderr=True)
            if not console.is_terminal:
                self.enabled = False
                return
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TimeRemainingColumn(), console=console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=total)
        self.bar.update(self.task, completed=done, description=printable(name)[:40].ljust(40))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
