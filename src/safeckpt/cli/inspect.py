"""`safeckpt inspect FILE`: what a safetensors file holds, from its header alone."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import click
from rich.console import Console

from ..format.dtypes import DTYPES
from ..format.reader import SafetensorsFile
from ..sources import open_source
from ..sources.detect import SNIFF_BYTES, sniff
from . import output
from .output import Column, grouped, human_bytes, human_count, printable

TENSOR_COLUMNS = (Column("name"), Column("dtype"), Column("shape"), Column("parameters", right=True),
                  Column("bytes", right=True))
DTYPE_COLUMNS = (Column("dtype"), Column("tensors", right=True), Column("parameters", right=True),
                 Column("bytes", right=True))
METADATA_COLUMNS = (Column("metadata key"), Column("value"))
# Lines of the non-tensor structure printed (all of it with --json).
STRUCTURE_LINES = 60


def describe(path: "os.PathLike | str", template: Optional[str] = None) -> dict[str, Any]:
    """Everything `inspect` shows, as a JSON-able dict; tensor data is never read.

    A safetensors file is described from its validated header alone; any other
    format `open_source` reads (PyTorch, Lightning, npz, sharded folders, ...)
    from its structure, which nothing executes.

    >>> describe("model.safetensors")["totals"]["parameters"]
    1228800
    """
    path = os.fspath(path)
    # Unrecognised content goes to the safetensors reader, whose errors say what the file is.
    if template is not None or os.path.isdir(path) or sniff(_head(path)) not in (None, "safetensors"):
        return _describe_source(path, template)
    # pread: the header is read with two small reads; the data is never mapped or read.
    with SafetensorsFile(path, backend="pread") as file:
        header = file.header
    tensors = [{"name": name, "dtype": info.dtype, "shape": list(info.shape), "parameters": info.numel,
                "bytes": info.nbytes, "data_offsets": list(info.data_offsets)}
               for name, info in header.tensors.items()]
    return _report(path, "safetensors", "safetensors file", header.data_start + header.data_size,
                   tensors, header.metadata, header_size=header.data_start)


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(SNIFF_BYTES)


def _describe_source(path: str, template: Optional[str] = None) -> dict[str, Any]:
    with open_source(path, template=template) as source:
        tensors = [{"name": name, "dtype": info.dtype, "shape": list(info.shape),
                    "parameters": info.numel, "bytes": info.nbytes}
                   for name, info in source.infos.items()]
        size = os.path.getsize(path) if os.path.isfile(path) else sum(
            os.path.getsize(s.path) for s in getattr(source, "shards", {}).values())
        report = _report(path, source.format, source.describe(), size, tensors, source.metadata)
        report["structure"] = without_tensors(source.tree)
        report["aliases"] = dict(source.aliases)
        report["notes"] = list(source.notes)
        report["unknown_globals"] = sorted({f"{g.module}.{g.name}" for g in getattr(source, "globals", ())
                                            if not g.allowed})
    return report


def without_tensors(tree: Any) -> Any:
    """The structure with tensor references and containers of only tensors left out."""
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return None
        kept = {k: without_tensors(v) for k, v in tree.items()}
        kept = {k: v for k, v in kept.items() if v is not None}
        return kept or None
    if isinstance(tree, list):
        kept_list = [without_tensors(v) for v in tree]
        return None if all(v is None for v in kept_list) and tree else kept_list
    return tree


def _report(path: str, format: str, description: str, file_size: int, tensors: list,
            metadata: Any, header_size: Any = None) -> dict[str, Any]:
    by_dtype: dict[str, dict[str, int]] = {}
    for tensor in tensors:
        totals = by_dtype.setdefault(tensor["dtype"], {"tensors": 0, "parameters": 0, "bytes": 0})
        totals["tensors"] += 1
        totals["parameters"] += tensor["parameters"]
        totals["bytes"] += tensor["bytes"]
    parameters = sum(t["parameters"] for t in by_dtype.values())
    report = {
        "file": path,
        "format": format,
        "description": description,
        "file_size": file_size,
        "tensors": tensors,
        # In the order the format writes dtypes: widest first.
        "totals_by_dtype": {name: by_dtype[name] for name in sorted(by_dtype, key=lambda n: -DTYPES[n].rank)},
        "totals": {"tensors": len(tensors), "parameters": parameters,
                   "parameters_human": human_count(parameters),
                   "bytes": sum(t["bytes"] for t in by_dtype.values())},
        "metadata": metadata,
    }
    if header_size is not None:
        # with the 8-byte length prefix: header_size + bytes = file_size
        report["header_size"] = header_size
    return report


def print_description(console: Console, report: dict[str, Any]) -> None:
    """The human-readable form of `describe`'s report."""
    totals = report["totals"]
    console.print(printable(report["file"]), markup=False)
    if report["format"] != "safetensors":
        console.print(f"  format      {printable(report['description'])}", markup=False)
    header = f", header {grouped(report['header_size'])} bytes" if "header_size" in report else ""
    console.print(f"  file size   {grouped(report['file_size'])} bytes ({human_bytes(report['file_size'])})"
                  f"{header}", markup=False)
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
    elif report["format"] == "safetensors":
        console.print("no __metadata__")
    _print_structure(console, report)


def _print_structure(console: Console, report: dict[str, Any]) -> None:
    for alias, kept in report.get("aliases", {}).items():
        console.print(f"  {printable(alias)} is the same tensor as {printable(kept)}", markup=False)
    for note in report.get("notes", ()):
        console.print(f"  note: {printable(note)}", markup=False)
    if report.get("unknown_globals"):
        console.print("  classes the file asks to build (inert here; see `safeckpt scan`): "
                      + ", ".join(map(printable, report["unknown_globals"][:20])), markup=False)
    structure = report.get("structure")
    if structure:
        lines = json.dumps(structure, indent=2, default=str).splitlines()
        console.print("structure (everything that is not a tensor):", markup=False)
        for line in lines[:STRUCTURE_LINES]:
            console.print("  " + printable(line), markup=False)
        if len(lines) > STRUCTURE_LINES:
            console.print(f"  ... {len(lines) - STRUCTURE_LINES} more lines (--json shows all)",
                          markup=False)


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


EXIT_CODES = output.exit_codes_help(
    ok="the description was printed",
    invalid="the file is invalid or not a format safeckpt reads (the reason is on stderr)",
    error="the file is missing or cannot be read, or the command line is wrong")


@click.command("inspect", short_help="Show the tensors, dtypes, sizes and metadata of a file.",
               epilog=EXIT_CODES)
@click.argument("file", type=click.Path(path_type=str))
@click.option("--template", metavar="FILE", type=click.Path(dir_okay=False, path_type=str),
              help="Read FILE as a raw dump (arrays back to back) laid out as the template says: a "
                   "JSON template or an existing .safetensors file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
def command(file: str, template: Optional[str], as_json: bool) -> None:
    """Show the tensors, dtypes, sizes and metadata of FILE, in any format safeckpt reads.

    FILE may be a safetensors file, a PyTorch .pt/.pth/.bin (zip or legacy),
    a Lightning or Stable Diffusion .ckpt, a Paddle .pdparams, a plain pickle,
    an .npy/.npz, or a sharded model (its index JSON or its folder). The format
    is recognised from the content, never the name. Tensor data is never read,
    and nothing in the file is executed.

    \b
    Prints, in file order: name, dtype, shape, parameters (elements) and
    bytes of each tensor; totals by dtype; the total parameter count; the
    file size; the __metadata__ key/values; and for checkpoints the
    structure that is not tensors (epoch, hyper-parameters, optimizer
    settings), tied tensors, and the classes the file asks to build.

    \b
    --json prints {file, format, description, file_size, tensors: [{name,
    dtype, shape, parameters, bytes}], totals_by_dtype, totals, metadata},
    plus header_size and data_offsets for safetensors (header_size includes
    the 8-byte length prefix, so header_size + totals.bytes == file_size) and
    structure, aliases, notes, unknown_globals for other formats.

    \b
    Examples:
      safeckpt inspect model.safetensors
      safeckpt inspect pytorch_model.bin
      safeckpt inspect last.ckpt --json | jq .structure.hyper_parameters
      safeckpt inspect model.safetensors --json | jq .totals.parameters
    """
    try:
        report = describe(file, template)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line and an exit code
        code, message = output.describe_failure(exc, file)
        output.exit_with(code, f"error: {message}")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        print_description(output.make_console(), report)
