"""The `safeckpt` command.

Each command is a module here with a click command named `command`; to add
one, write the module and list it in COMMANDS. Shared pieces (exit codes,
error lines, tables, human units) are in `output`.
"""

from __future__ import annotations

import click

from .._version import __version__
from . import cast, convert, demo, diff, inspect, ls, merge, output, scan, verify

COMMANDS = (inspect.command, verify.command, demo.command, convert.command, cast.command, diff.command,
            merge.command, scan.command, ls.command)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=output.exit_codes_help(
    ok="success", invalid="invalid input (a file that is not valid safetensors, a failed check)",
    error="a file is missing or cannot be read, or the command line is wrong")
    + "\n\nEach command's --help says what its exit codes mean for it.")
@click.version_option(__version__, "-V", "--version", prog_name="safeckpt")
def main() -> None:
    """Safe, fast, portable model weights: inspect and verify safetensors files.

    No command ever executes file content. Every command takes --help, and
    --json where it prints results, for scripts.

    \b
    Examples:
      safeckpt inspect model.safetensors
      safeckpt verify model.safetensors
      safeckpt demo
    """


for _command in COMMANDS:
    main.add_command(_command)

__all__ = ["main", "COMMANDS"]
