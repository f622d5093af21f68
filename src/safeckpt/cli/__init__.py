"""The `safeckpt` command.

Each command is a module here with a click command named `command`; to add
one, write the module and list it in COMMANDS with its one-line help. A
command's module is imported only when that command runs (or its --help is
asked for), so `safeckpt --version` and `safeckpt --help` load click and
nothing else of weight. Shared pieces (exit codes, the JSON envelope, error
lines, tables, human units) are in `output`.
"""

from __future__ import annotations

import importlib
from typing import Optional

import click

from .._version import __version__
from . import output

# name -> one-line help, in the order `safeckpt --help` lists them. The module is `safeckpt.cli.<name>`;
# its command takes its short_help from here (`short_help(name)`), so the two cannot drift apart.
COMMANDS: dict[str, str] = {
    "inspect": "Show the tensors, layers, dtypes, sizes and metadata of a checkpoint.",
    "verify": "Check checkpoints' structure and BLAKE3 hashes; write hash manifests.",
    "demo": "Tour safeckpt end to end on a tiny model, checking each step.",
    "convert": "Convert any checkpoint to safetensors; nothing in it is executed.",
    "cast": "Cast floating tensors to bf16, fp16, fp32 or fp8.",
    "diff": "Compare two checkpoints tensor by tensor (any formats).",
    "merge": "Merge checkpoints (average, EMA, slerp, task arithmetic, TIES, DARE).",
    "scan": "Check checkpoints for code that loading them would run.",
    "ls": "List the training checkpoints in a directory.",
}


def short_help(name: str) -> str:
    """The one-line help of command `name`, as `safeckpt --help` lists it."""
    return COMMANDS[name]


def load_command(name: str) -> click.Command:
    """Import command `name`'s module and return its click command."""
    return importlib.import_module(f"{__name__}.{name}").command


class LazyGroup(output.OneLineErrors, click.Group):
    """A group that knows its commands' names and one-line help without importing them."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> Optional[click.Command]:
        return load_command(cmd_name) if cmd_name in COMMANDS else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl(list(COMMANDS.items()))


@click.group("safeckpt", cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=output.exit_codes_help(
                 ok="success", invalid="invalid input (a file that is not valid safetensors, a failed check)",
                 error="a file is missing or cannot be read, or the command line is wrong")
             + "\n\nEach command's --help says what its exit codes mean for it. With --json every command "
               "prints one JSON document: {command, ok, exit_code, error, error_type, warnings, ...its "
               "own fields}, on errors too.")
@click.version_option(__version__, "-V", "--version", prog_name="safeckpt")
def main() -> None:
    """Safe, fast, portable model weights: read any checkpoint without running it, scan, convert, compare,
    merge, cast and verify.

    No command ever executes file content. Every command takes --help, and
    --json where it prints results, for scripts.

    \b
    Examples:
      safeckpt inspect model.safetensors
      safeckpt scan pytorch_model.bin
      safeckpt convert pytorch_model.bin model.safetensors
      safeckpt demo
    """


__all__ = ["main", "COMMANDS", "load_command", "short_help"]
