"""`safeckpt demo`: the whole story in a temporary directory, checked as it goes.

Each step prints what a user would type (``$`` for the shell, ``>>>`` for
Python) and runs it: shell commands through the real command line, in this
process, with their real output. Every outcome is checked; the demo exits 1 if
any check fails, so it doubles as a smoke test. The steps are in `demo_story`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import click

from .._version import __version__
from . import demo_story, output, short_help

if TYPE_CHECKING:
    from rich.console import Console


class Story:
    """Prints steps, commands and checks; counts failed checks."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.steps = 0
        self.checks = 0
        self.failed: list[str] = []
        utf = console.encoding.lower().startswith("utf")
        self._marks = ("✓", "✗") if utf else ("+", "x")

    def step(self, title: str) -> None:
        from rich.text import Text

        self.steps += 1
        self.console.print()
        self.console.print(Text(f"{self.steps}. {title}", style="bold"))

    def shell(self, *commands: str) -> None:
        from rich.text import Text

        for command in commands:
            self.console.print(Text(f"$ {command}", style="cyan"))

    def python(self, *lines: str) -> None:
        from rich.text import Text

        for i, line in enumerate(lines):
            self.console.print(Text(f"{'>>>' if i == 0 or not line.startswith(' ') else '...'} {line}",
                                    style="cyan"))

    def say(self, text: str, style: Optional[str] = None) -> None:
        from rich.text import Text

        self.console.print(Text(text, style=style or ""))

    def cli(self, *args: str) -> int:
        """Run `safeckpt ARGS` in this process, its output shown as a user sees it; the exit code."""
        from . import main  # at call time: the command group imports this module

        try:
            result = main.main(list(args), prog_name="safeckpt", standalone_mode=False)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else output.EXIT_ERROR
        return result if isinstance(result, int) else output.EXIT_OK

    def check(self, passed: bool, what: str) -> bool:
        from rich.text import Text

        self.checks += 1
        if passed:
            self.console.print(Text(f"  {self._marks[0]} {what}", style="green"))
        else:
            self.failed.append(what)
            self.console.print(Text(f"  {self._marks[1]} {what}", style="bold red"))
        return passed


@contextlib.contextmanager
def _inside(directory: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)


EXIT_CODES = output.exit_codes_help(
    ok="every check passed", invalid="a check failed (listed at the end)",
    error="PyTorch is not installed (pip install torch), or the command line is wrong")


@click.command("demo", cls=output.Command, short_help=short_help("demo"), epilog=EXIT_CODES)
@click.option("--dir", "parent", type=click.Path(file_okay=False, path_type=Path),
              help="Create the demo's directory here instead of the system temporary directory.")
@click.option("--keep", is_flag=True, help="Keep the files the demo wrote (their directory is printed).")
def command(parent: Optional[Path], keep: bool) -> None:
    """Run an end-to-end tour of safeckpt on a tiny model, checking every step.

    A torch .pt and a Lightning .ckpt (from a real Trainer, if Lightning is
    installed) are scanned, and a planted payload is caught and refused without
    running; the .ckpt is inspected, converted to sharded safetensors, verified
    with a blake3 manifest and diffed against the original; the model is saved
    byte-identical to the `safetensors` package; a short training run keeps
    checkpoints with CheckpointManager, two are diffed (with a plot, if
    matplotlib is installed), three averaged with merge, and the run resumed;
    damaged files are refused and the damaged tensor named. Each step prints
    the command you would type and runs it. Takes about 15 seconds; needs PyTorch.

    \b
    Examples:
      safeckpt demo
      safeckpt demo --dir . --keep     # keep the files to try the commands yourself
    """
    try:
        import torch
    except ImportError:
        output.fail(output.EXIT_ERROR, "the demo needs PyTorch: pip install torch")
    try:
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="safeckpt-demo-", dir=parent))
    except OSError as exc:
        output.fail(output.EXIT_ERROR, f"cannot create the demo's directory in {parent}: {output.os_reason(exc)}")
    console = output.make_console()
    story = Story(console)
    story.say(f"safeckpt {__version__} demo", "bold")
    try:
        with _inside(workdir):
            story.shell(f"cd {workdir}")
            demo_story.run_story(story, torch)
    except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported in one line
        if os.environ.get(output.TRACEBACK_ENV):
            raise
        story.check(False, f"step {story.steps} stopped: {type(exc).__name__}: {output.one_line(str(exc))}")
    finally:
        if keep:
            story.console.print()
            story.say(f"files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    console.print()
    if story.failed:
        story.say(f"{len(story.failed)} of {story.checks} checks failed:", "bold red")
        for what in story.failed:
            story.say(f"  {what}", "red")
        raise SystemExit(output.EXIT_INVALID)
    story.say(f"All {story.checks} checks passed.", "bold green")
