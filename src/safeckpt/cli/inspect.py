"""`safeckpt inspect FILE`: what a safetensors file holds, from its header alone."""

from __future__ import annotations

import json
import os
from typing import Any

import click
from rich.console import Console

from ..format.dtypes import DTYPES
from ..format.reader import SafetensorsFile
from . import output
from .output import Column, grouped, human_bytes, human_count, printable

TENSOR_COLUMNS = (Column("name"), Column("dtype"), Column("shape"), Column("parameters", right=True),
                  Column("bytes", right=True))
DTYPE_COLUMNS = (Column("dtype"), Column("tensors", right=True), Column("parameters", right=True),
                 Column("bytes", right=True))
METADATA_COLUMNS = (Column("metadata key"), Column("value"))


def describe(path: "os.PathLike | str") -> dict[str, Any]:
    """Everything `inspect` shows, as a JSON-able dict; reads and validates the header only.

    >>> describe("model.safetensors")["totals"]["parameters"]
    1228800
    """
    # pread: the header is read with two small reads; the data is never mapped or read.
    with SafetensorsFile(path, backend="pread") as file:
        header = file.header
    tensors = [{"name": name, "dtype": info.dtype, "shape": list(info.shape), "parameters": info.numel,
                "bytes": info.nbytes, "data_offsets": list(info.data_offsets)}
               for name, info in header.tensors.items()]
    by_dtype: dict[str, dict[str, int]] = {}
    for tensor in tensors:
        totals = by_dtype.setdefault(tensor["dtype"], {"tensors": 0, "parameters": 0, "bytes": 0})
        totals["tensors"] += 1
        totals["parameters"] += tensor["parameters"]
        totals["bytes"] += tensor["bytes"]
    parameters = sum(t["parameters"] for t in by_dtype.values())
    return {
        "file": os.fspath(path),
        "file_size": header.data_start + header.data_size,
        "header_size": header.data_start,  # with the 8-byte length prefix: header_size + bytes = file_size
        "tensors": tensors,
        # In the order the format writes dtypes: widest first.
        "totals_by_dtype": {name: by_dtype[name] for name in sorted(by_dtype, key=lambda n: -DTYPES[n].rank)},
        "totals": {"tensors": len(tensors), "parameters": parameters,
                   "parameters_human": human_count(parameters), "bytes": header.data_size},
        "metadata": header.metadata,
    }


def print_description(console: Console, report: dict[str, Any]) -> None:
    """The human-readable form of `describe`'s report."""
    totals = report["totals"]
    console.print(printable(report["file"]), markup=False)
    console.print(f"  file size   {grouped(report['file_size'])} bytes ({human_bytes(report['file_size'])}), "
                  f"header {grouped(report['header_size'])} bytes", markup=False)
    console.print(f"  tensors     {grouped(totals['tensors'])}", markup=False)
    console.print(f"  parameters  {grouped(totals['parameters'])} ({totals['parameters_human']})",
                  markup=False)
    console.print()
    output.print_table(console, TENSOR_COLUMNS, [
        (printable(t["name"]), t["dtype"], _shape(t["shape"]), grouped(t["parameters"]), grouped(t["bytes"]))
        for t in report["tensors"]])
    console.print()
    output.print_table(console, DTYPE_COLUMNS, [
        (dtype, grouped(t["tensors"]), grouped(t["parameters"]), grouped(t["bytes"]))
        for dtype, t in report["totals_by_dtype"].items()])
    metadata = report["metadata"]
    console.print()
    if metadata:
        output.print_table(console, METADATA_COLUMNS,
                           [(printable(key), printable(value)) for key, value in metadata.items()])
    else:
        console.print("no __metadata__")


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


EXIT_CODES = output.exit_codes_help(
    ok="the description was printed",
    invalid="the file is not a valid safetensors file (the reason is on stderr)",
    error="the file is missing or cannot be read, or the command line is wrong")


@click.command("inspect", short_help="Show the tensors, dtypes, sizes and metadata of a file.",
               epilog=EXIT_CODES)
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
def command(file: str, as_json: bool) -> None:
    """Show the tensors, dtypes, sizes and metadata of a safetensors FILE.

    Only the header is read (the tensor data is never touched), so this is
    instant on files of any size. The header is fully validated first: an
    invalid file is refused with the reason.

    \b
    Prints, in file order: name, dtype, shape, parameters (elements) and
    bytes of each tensor; totals by dtype; the total parameter count; the
    file size; and the __metadata__ key/values.

    \b
    --json prints {file, file_size, header_size, tensors: [{name, dtype,
    shape, parameters, bytes, data_offsets}], totals_by_dtype, totals,
    metadata}; header_size includes the 8-byte length prefix, so
    header_size + totals.bytes == file_size.

    \b
    Examples:
      safeckpt inspect model.safetensors
      safeckpt inspect model.safetensors --json | jq .totals.parameters
    """
    try:
        report = describe(file)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line and an exit code
        code, message = output.describe_failure(exc, file)
        output.exit_with(code, f"error: {message}")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        print_description(output.make_console(), report)
