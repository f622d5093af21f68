"""`safeckpt inspect PATH`: what a checkpoint holds, from its header or structure alone.

A safetensors file is described from its validated header (two small reads);
every other format `open_source` reads from its structure, which nothing
executes. The description: totals, the tensors (repeated layers folded, see
`safeckpt.ops.layout`), parameters per module and per dtype, metadata, the
non-tensor tree of a checkpoint (epoch, hyper-parameters), the scan verdict of
pickle-based files, and for a sharded model every shard at once.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Optional

import click

from ..ops.inspect import describe, read_head, scan_summary
from . import output, short_help
from .output import Column, grouped, human_bytes, human_count, printable

if TYPE_CHECKING:
    from rich.console import Console


TENSOR_COLUMNS = (Column("name"), Column("dtype"), Column("shape"), Column("parameters", right=True),
                  Column("bytes", right=True))
GROUP_COLUMNS = (Column("name"), Column("count", right=True), Column("shape"), Column("dtype"),
                 Column("parameters", right=True), Column("bytes", right=True))
MODULE_COLUMNS = (Column("module"), Column("tensors", right=True), Column("parameters", right=True),
                  Column("share", right=True))
DTYPE_COLUMNS = (Column("dtype"), Column("tensors", right=True), Column("parameters", right=True),
                 Column("bytes", right=True))
SHARD_COLUMNS = (Column("shard"), Column("format"), Column("tensors", right=True), Column("bytes", right=True),
                 Column("file size", right=True))
FINDING_COLUMNS = (Column("severity"), Column("what"), Column("where"), Column("why"))
METADATA_COLUMNS = (Column("metadata key"), Column("value"))
# Lines of the non-tensor structure printed (all of it with --json).
STRUCTURE_LINES = 60
# Checkpoint values (epoch, hyper-parameters) listed near the top.
CHECKPOINT_LINES = 40
# Top-level keys whose contents are hyper-parameters, listed near the top key by key.
HYPERPARAMETER_KEYS = ("hyper_parameters", "hparams", "hyper_params", "hparams_initial", "args", "config",
                       "cfg")
# Scan findings shown in the human form (most severe first; --json has JSON_FINDINGS).
SHOWN_FINDINGS = 5
# Module rows printed (all of them with --json).
MODULE_ROWS = 50


# --- the human form -----------------------------------------------------------------

def print_description(console: Console, report: dict[str, Any], *, flat: bool = False) -> None:
    """The human-readable form of `describe`'s report.

    Repeated layers are folded (``model.layers.{0..31}.mlp.up_proj.weight  32 ×``)
    unless `flat` or nothing repeats; then every tensor has its own row.
    """
    _print_summary(console, report)
    _print_scan(console, report.get("scan"))
    _print_checkpoint(console, report.get("structure"))
    _print_shards(console, report)
    console.print()
    groups = report["groups"]
    if not groups:
        console.print("no tensors", markup=False)
    elif flat or len(groups) == report["totals"]["tensors"]:  # then each group is one tensor
        rows = report["tensors"] if flat else [dict(g, name=g["pattern"]) for g in groups]
        output.print_table(console, TENSOR_COLUMNS, [
            (printable(t["name"]), t["dtype"], _shape(t["shape"]), grouped(t["parameters"]),
             grouped(t["bytes"])) for t in rows])
    else:
        times = "×" if console.encoding.lower().startswith("utf") else "x"
        output.print_table(console, GROUP_COLUMNS, [
            (printable(g["pattern"]), f"{g['count']} {times}" if g["count"] > 1 else "", _shape(g["shape"]),
             g["dtype"], grouped(g["parameters"]), grouped(g["bytes"])) for g in groups])
        console.print(f"{grouped(report['totals']['tensors'])} tensors in {grouped(len(groups))} rows, "
                      "repeated layers folded (--flat lists every tensor)", markup=False)
    _print_modules(console, report)
    if groups:
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


def _print_summary(console: Console, report: dict[str, Any]) -> None:
    totals = report["totals"]
    console.print(printable(report["file"]), markup=False)
    if report["format"] != "safetensors":
        console.print(f"  format      {printable(report['description'])}", markup=False)
    header = f", header {grouped(report['header_size'])} bytes" if "header_size" in report else ""
    console.print(f"  file size   {grouped(report['file_size'])} bytes ({human_bytes(report['file_size'])})"
                  f"{header}", markup=False)
    console.print(f"  tensors     {grouped(totals['tensors'])}", markup=False)
    tied = ", tied tensors counted once" if totals.get("tied") else ""
    console.print(f"  parameters  {grouped(totals['parameters'])} ({totals['parameters_human']}{tied})",
                  markup=False)
    if totals["parameters"]:
        shares = ", ".join(f"{dtype} {_percent(share)}" for dtype, share in report["share_by_dtype"].items())
        console.print(f"  dtypes      {shares}", markup=False)


def _percent(share: float) -> str:
    if 0 < share < 0.001:
        return "<0.1%"
    if 0.999 < share < 1:
        return ">99.9%"
    return f"{share * 100:.1f}%"


def _print_scan(console: Console, summary: Optional[dict[str, Any]]) -> None:
    if summary is None:
        return
    verdict, findings, total = summary["verdict"], summary["findings"], summary["findings_total"]
    error = f"; could not be fully read: {printable(summary['error'])}" if summary["error"] else ""
    if verdict == "safe":
        console.print(f"  scan        safe{error}", markup=False)
        return
    several = summary["files"] > 1
    if verdict == "malicious":
        worst = f"{printable(findings[0]['what'])} in {_where(findings[0], several)}" if findings else "see scan"
        line = (f"  scan        MALICIOUS: {worst} - loading this file with torch.load or pickle would run "
                "it; nothing was run here")
        console.print(line + error, markup=False, style="bold red")
    else:
        noun = "finding" if total == 1 else "findings"
        console.print(f"  scan        suspicious ({total} {noun}){error}", markup=False, style="yellow")
    if findings:
        output.print_table(console, FINDING_COLUMNS, [
            (f["severity"], printable(f["what"]), _where(f, several), printable(f["why"]))
            for f in findings[:SHOWN_FINDINGS]])
    if total > SHOWN_FINDINGS:
        console.print(f"  ... {total - SHOWN_FINDINGS} more findings (safeckpt scan lists them all)",
                      markup=False)
    console.print()


def _where(finding: dict[str, Any], with_file: bool) -> str:
    """'archive/data.pkl@57' ('shard.bin:archive/data.pkl@57' when several files were scanned)."""
    at = f"@{finding['offset']}" if finding["offset"] >= 0 else ""
    place = f"{finding['member'] or ''}{at}" or "the file"
    return printable(f"{os.path.basename(finding['file'])}:{place}" if with_file else place)


def _print_checkpoint(console: Console, structure: Any) -> None:
    """Epoch, global step, versions and hyper-parameters first: what a checkpoint is usually opened for."""
    if not isinstance(structure, dict):
        return
    lines = [(key, value) for key, value in structure.items()
             if not isinstance(value, (dict, list)) and not key.startswith("__")]  # "__object__": a marker
    for key in HYPERPARAMETER_KEYS:
        if isinstance(structure.get(key), (dict, list)):
            lines.extend(_flatten(structure[key], key, 0))
    if not lines:
        return
    console.print("checkpoint values (the whole structure is below):", markup=False)
    for key, value in lines[:CHECKPOINT_LINES]:
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        console.print(f"  {printable(key)} = {printable(text)}", markup=False)
    if len(lines) > CHECKPOINT_LINES:
        console.print(f"  ... {len(lines) - CHECKPOINT_LINES} more", markup=False)


def _flatten(value: Any, key: str, depth: int) -> list[tuple[str, Any]]:
    if isinstance(value, dict) and depth < 3:
        return [item for k, v in value.items() for item in _flatten(v, f"{key}.{k}", depth + 1)]
    return [(key, value)]


def _print_shards(console: Console, report: dict[str, Any]) -> None:
    if "shards" not in report:
        return
    index = report["index"]
    console.print()
    output.print_table(console, SHARD_COLUMNS, [
        (printable(s["file"]), s["format"], grouped(s["tensors"]), grouped(s["bytes"]), grouped(s["file_size"]))
        for s in report["shards"]])
    name = printable(os.path.basename(index["file"]))
    if index["matches"] is None:
        console.print(f"index {name} has no total_size; the tensors hold {grouped(index['tensor_bytes'])} bytes",
                      markup=False)
    elif index["matches"]:
        console.print(f"index {name}: total_size {grouped(index['total_size'])} bytes, as the tensors hold",
                      markup=False)
    else:
        console.print(f"warning: index {name} says total_size {grouped(index['total_size'])} bytes but the "
                      f"tensors hold {grouped(index['tensor_bytes'])} bytes "
                      f"({index['tensor_bytes'] - index['total_size']:+,})", markup=False, style="yellow")


def _print_modules(console: Console, report: dict[str, Any]) -> None:
    modules = report["modules"]
    if len(modules) < 2 and not any("children" in m for m in modules):
        return  # one module and nothing under it: the totals above say it all
    console.print()
    if report["modules_prefix"]:
        console.print(f"modules (the {printable(report['modules_prefix'])!r} prefix left out):", markup=False)
    rows = []
    for module in modules[:MODULE_ROWS]:
        rows.append(_module_row(module, ""))
        rows.extend(_module_row(child, "  ") for child in module.get("children", ()))
    output.print_table(console, MODULE_COLUMNS, rows)
    if len(modules) > MODULE_ROWS:
        console.print(f"... {len(modules) - MODULE_ROWS} more modules (--json lists all)", markup=False)


def _module_row(module: dict[str, Any], indent: str) -> tuple[str, ...]:
    return (indent + printable(module["name"]), grouped(module["tensors"]), grouped(module["parameters"]),
            _percent(module["share"]))


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
        lines = json.dumps(short_keys(structure), indent=2, default=str, ensure_ascii=False).splitlines()
        console.print("structure (everything that is not a tensor):", markup=False)
        for line in lines[:STRUCTURE_LINES]:
            console.print("  " + printable(line), markup=False)
        if len(lines) > STRUCTURE_LINES:
            console.print(f"  ... {len(lines) - STRUCTURE_LINES} more lines (--json shows all)",
                          markup=False)


def short_keys(tree: Any) -> Any:
    """The structure with long object keys shortened for printing (`output.short_key`: Lightning's
    ``ModelCheckpoint{'monitor': 'val_loss', ...}``); a key whose short form another key
    of the same dict already has stays whole."""
    if isinstance(tree, list):
        return [short_keys(item) for item in tree]
    if not isinstance(tree, dict):
        return tree
    out: dict[Any, Any] = {}
    for key, value in tree.items():
        short = output.short_key(key) if isinstance(key, str) else key
        out[key if short in out or short in tree and short != key else short] = short_keys(value)
    return out


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


EXIT_CODES = output.exit_codes_help(
    ok="the description was printed, also for a file the scan finds malicious (the verdict\n"
       "     is printed loudly; `safeckpt scan --strict` is the gate for scripts)",
    invalid="the file is invalid or not a format safeckpt reads (the reason is on stderr)",
    error="the file is missing or cannot be read, or the command line is wrong")


@click.command("inspect", cls=output.Command, short_help=short_help("inspect"), epilog=EXIT_CODES)
@click.argument("file", metavar="PATH", type=click.Path(path_type=str))
@click.option("--template", metavar="FILE", type=click.Path(dir_okay=False, path_type=str),
              help="Read PATH as a raw dump (arrays back to back) laid out as the template says: a "
                   "JSON template or an existing .safetensors file.")
@click.option("--flat", is_flag=True, help="One row per tensor, repeated layers not folded.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document instead of tables: the envelope {command, ok, exit_code, error, "
                   "error_type, warnings} with the fields below.")
def command(file: str, template: Optional[str], flat: bool, as_json: bool) -> None:
    """Show what PATH holds: tensors, layers, parameters, dtypes, metadata; nothing is loaded.

    PATH may be a safetensors file, a PyTorch .pt/.pth/.bin (zip or legacy),
    a Lightning or Stable Diffusion .ckpt, a Paddle .pdparams, a plain pickle,
    an .npy/.npz, or a sharded model (its folder or its index JSON: every
    shard at once). The format is recognised from the content, never the
    name. Tensor data is never read (headers and structure only), and nothing
    in the file is executed.

    \b
    Prints: totals (tensors, parameters, share of each dtype); the scan
    verdict of pickle-based files (safe, suspicious or MALICIOUS, with the
    top findings); a checkpoint's epoch, global step and hyper-parameters;
    a sharded model's shards and its index's total_size check; the tensors,
    names that differ only in a layer index folded into one row
    (model.layers.{0..31}.mlp.up_proj.weight  32 × [11008, 4096]  BF16;
    --flat: one row per tensor); parameters per top-level module (inside
    a Lightning state_dict); totals by dtype; the __metadata__; and the
    whole non-tensor structure, tied tensors, and the classes the file
    asks to build.

    \b
    --json prints {command, ok, exit_code, error, error_type, warnings} (on
    errors too, with file) and {file, format, description, file_size, tensors: [{name,
    dtype, shape, parameters, bytes}], totals_by_dtype, share_by_dtype,
    totals, metadata, groups: [{pattern, count, dtype, shape, parameters,
    bytes, indices}], modules: [{name, tensors, parameters, bytes, share,
    children}], modules_prefix}; shares are fractions of all parameters.
    Plus header_size and data_offsets for safetensors (header_size includes
    the 8-byte length prefix, so header_size + totals.bytes == file_size);
    structure, aliases, notes, unknown_globals for other formats; scan:
    {verdict, files, findings (the 20 most severe), findings_total, error}
    for pickle-based files; shards: [{file, format, tensors, bytes,
    file_size}] and index: {file, total_size, tensor_bytes, matches} for
    sharded models.

    \b
    Examples:
      safeckpt inspect model.safetensors
      safeckpt inspect Llama-3-8B/            # every shard of a sharded model
      safeckpt inspect pytorch_model.bin --flat
      safeckpt inspect last.ckpt --json | jq .structure.hyper_parameters
      safeckpt inspect model.safetensors --json | jq '.modules[] | {name, share}'
      safeckpt inspect download.pt --json | jq .scan.verdict
    """
    try:
        report = presented(describe(file, template, tensors=as_json or flat))
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line and an exit code
        code, message = output.describe_failure(exc, file)
        output.fail(code, message + _verdict_of_unreadable(file, template, code), exc=exc, file=file)
    if not as_json:
        print_description(output.make_console(), report, flat=flat)
    output.finish(output.EXIT_OK, report)


def presented(report: dict[str, Any]) -> dict[str, Any]:
    """The report as the CLI shows it: notes in the CLI's spelling, the parameter count in words too."""
    if "notes" in report:
        report["notes"] = output.cli_notes(report["notes"])
    report["totals"]["parameters_human"] = human_count(report["totals"]["parameters"])
    return report


def _verdict_of_unreadable(path: str, template: Optional[str], code: int) -> str:
    """What the scan says of a pickle-based file that could not be described (a hostile one often can't)."""
    if code != output.EXIT_INVALID or template is not None or not os.path.isfile(path):
        return ""
    from ..sources.detect import sniff

    try:
        if sniff(read_head(path)) in (None, "safetensors", "json"):
            return ""
        summary = scan_summary([path])
    except Exception:  # noqa: BLE001 - the description's own error is the one to report
        return ""
    if summary["verdict"] == "safe" or not summary["findings"]:
        return ""
    worst = summary["findings"][0]
    return f" (scan: {summary['verdict']}: {worst['what']} in {_where(worst, False)}; see `safeckpt scan`)"
