"""`safeckpt verify FILE...`: is each file a valid safetensors file?

The format has no checksums, so validity is structural: the length prefix,
the header (UTF-8 JSON, no duplicate keys, known dtypes, sane shapes, string
metadata) and the layout (tensors tile the data buffer exactly, each span the
size its shape and dtype need) -- all of which `SafetensorsFile` checks on
open. Together they catch truncated downloads, files with bytes appended,
edited headers, and other formats (pickles, LFS pointers, HTML) saved under a
.safetensors name.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

import click

from ..format.reader import SafetensorsFile
from . import output
from .output import grouped, printable

STATUS_BY_CODE = {output.EXIT_OK: "ok", output.EXIT_INVALID: "invalid", output.EXIT_ERROR: "error"}


@dataclass(frozen=True)
class FileCheck:
    """The verdict on one file; `exit_code` is the command's exit code for it alone."""

    file: str
    status: str  # "ok", "invalid" or "error" (could not be read)
    exit_code: int
    tensors: Optional[int] = None
    parameters: Optional[int] = None
    file_size: Optional[int] = None
    error: Optional[str] = None  # the one-line reason, naming the file
    error_type: Optional[str] = None  # the exception class, e.g. "GapError", "FileNotFoundError"

    def line(self) -> str:
        """What the command prints for this file."""
        if self.status == "ok":
            return (f"OK {printable(self.file)}: {grouped(self.tensors)} tensors, "
                    f"{grouped(self.parameters)} parameters, {grouped(self.file_size)} bytes")
        return f"{self.status.upper()} {self.error}"


def check_file(path: "os.PathLike | str") -> FileCheck:
    """Validate the structure of one file; never raises for bad input.

    >>> check_file("model.safetensors").status
    'ok'
    """
    path = os.fspath(path)
    try:
        with SafetensorsFile(path, backend="pread") as file:
            header = file.header
    except Exception as exc:  # noqa: BLE001 - every failure is a verdict
        code, message = output.describe_failure(exc, path)
        return FileCheck(path, STATUS_BY_CODE[code], code, error=message, error_type=type(exc).__name__)
    return FileCheck(path, "ok", output.EXIT_OK, tensors=len(header.tensors),
                     parameters=sum(info.numel for info in header.tensors.values()),
                     file_size=header.data_start + header.data_size)


def check_paths(paths: Iterable[str]) -> list[FileCheck]:
    """Check each path; a directory stands for the *.safetensors files under it."""
    results: list[FileCheck] = []
    for path in paths:
        if not os.path.isdir(path):
            results.append(check_file(path))
            continue
        found = sorted(str(p) for p in Path(path).rglob("*.safetensors") if p.is_file())
        if not found:
            results.append(FileCheck(path, "error", output.EXIT_ERROR, error=output.one_line(
                f"{path}: no *.safetensors files in this directory"), error_type="NotFound"))
        results.extend(check_file(file) for file in found)
    return results


@click.command("verify", short_help="Check that files are valid safetensors files.",
               epilog=output.exit_codes_help(ok="every file is valid"))
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document: {valid, files: [{file, status, exit_code, tensors, "
                   "parameters, file_size, error, error_type}]}.")
def command(files: tuple[str, ...], as_json: bool) -> None:
    """Check that each FILE is a valid safetensors file.

    Validates everything the format defines: the header length, the header
    JSON (UTF-8, no duplicate keys, known dtypes, valid shapes and offsets,
    string-only metadata) and the layout (tensors cover the data exactly, no
    gaps, overlaps or trailing bytes). Only the header is read. A directory
    stands for the *.safetensors files under it.

    Prints "OK FILE: N tensors, P parameters, B bytes" on stdout for a valid
    file; "INVALID FILE: reason" or "ERROR FILE: reason" on stderr otherwise.
    With several files the exit code is the worst one.

    \b
    Examples:
      safeckpt verify model.safetensors
      safeckpt verify checkpoints/             # every *.safetensors under it
      safeckpt verify --json model-*.safetensors
    """
    results = check_paths(files)
    if as_json:
        click.echo(json.dumps({"valid": all(r.status == "ok" for r in results),
                               "files": [asdict(r) for r in results]}, indent=2))
    for result in results:
        if result.status != "ok":
            click.echo(result.line(), err=True)
        elif not as_json:
            click.echo(result.line())
    if len(results) > 1 and not as_json:
        valid = sum(r.status == "ok" for r in results)
        click.echo(f"{valid} of {len(results)} valid")
    raise SystemExit(max(r.exit_code for r in results))
