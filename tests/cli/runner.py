"""Running the `safeckpt` command in tests: in this process through click, or as the installed script.

    >>> result = invoke("inspect", path, "--json")
    >>> result.exit_code, json.loads(result.stdout)["command"]
    (0, 'inspect')
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner, Result

from safeckpt.cli import main

# The console script pip installed next to this interpreter.
CONSOLE_SCRIPT = Path(sys.executable).with_name("safeckpt")


def invoke(*args, command: click.Command = main) -> Result:
    """`safeckpt ARGS...` in this process (paths and numbers as text); `command`: a command alone."""
    return CliRunner().invoke(command, [str(a) for a in args])


def run_script(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    """`safeckpt ARGS...` as the installed script in a new process; the timeout only stops a hang."""
    return subprocess.run([str(CONSOLE_SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def cells(line: str) -> list[str]:
    """The cells of one line of a printed table (cells are 3+ spaces apart)."""
    return re.split(r" {3,}", line.strip())
