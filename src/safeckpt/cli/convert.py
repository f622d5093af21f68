"""`safeckpt convert SRC DST`: any checkpoint safeckpt reads -> safetensors, streamed.

A thin command over `safeckpt.ops.convert.convert`: options map one to one onto
its arguments; this module only prints (a summary, or the report as JSON) and
draws a progress bar on stderr when the work takes more than a second.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Optional

import click

from . import output, short_help
from .output import grouped, human_bytes, printable

if TYPE_CHECKING:
    from ..ops.convert import ConvertReport

# Rows of the overflow table and names of skipped tensors shown (all of them with --json).
SHOWN_ROWS = 20

EXIT_CODES = ("\b\nExit codes:\n  0  converted (and verified, with --verify)\n"
              "  2  not converted: the source is unsafe (see --allow-unsafe-structure), unreadable or\n"
              "     malformed, the output exists (see --force) or is an input or cannot be written,\n"
              "     a verification failed, or the command line is wrong; nothing is written")

JSON_HELP = ("Print one JSON document: {command, ok, exit_code, error, error_type, warnings, source, source_format, "
             "outputs, index, tensors, bytes_written, aliases, skipped, cast, overflow, underflow, verified, "
             "seconds, scan_verdict, notes, copied}; cast is the target dtype (null: none); copied, a model folder's other "
             "files copied beside the output; a refused source adds scan.")
FORCE_HELP = "Replace DST if it exists (never an input); without it an existing DST is refused."


def _summary(report: ConvertReport, verb: str = "converted") -> None:
    console = output.make_console()
    written = ", ".join(printable(p) for p in report.outputs)
    console.print(f"{verb} {printable(report.source)} ({report.source_format}) -> {written}", markup=False)
    if report.index:
        console.print(f"index: {printable(report.index)}", markup=False)
    line = (f"{grouped(report.tensors)} tensors, {human_bytes(report.bytes_written)} in "
            f"{len(report.outputs)} file{'s' if len(report.outputs) > 1 else ''}, {report.seconds:.2f} s")
    if report.cast:
        line += f", cast to {report.cast}"
    if report.verified:
        line += ", verified bit-exact"
    console.print(line, markup=False)
    if report.aliases:
        console.print(f"tied tensors stored once: {len(report.aliases)} "
                      f"({', '.join(f'{a} -> {b}' for a, b in list(report.aliases.items())[:3])}"
                      f"{', ...' if len(report.aliases) > 3 else ''})", markup=False)
    if report.skipped:
        shown = ", ".join(printable(n) for n in report.skipped[:5])
        console.print(f"skipped {len(report.skipped)} source tensors ({shown}"
                      f"{', ...' if len(report.skipped) > 5 else ''})", markup=False)
    if report.copied:
        console.print(f"copied beside it: {', '.join(printable(p) for p in report.copied[:5])}"
                      f"{', ...' if len(report.copied) > 5 else ''}", markup=False)
    for note in output.cli_notes(report.notes):
        console.print(output.NOTE_PREFIX + note, markup=False)
    for counts, what in ((report.overflow, "overflowed (now ±inf, or ±max for F8_E4M3)"),
                         (report.underflow, "underflowed (non-zero values now ±0)")):
        if counts:
            console.print(f"warning: values {what} in {len(counts)} tensors cast to {report.cast}:",
                          markup=False)
            output.print_counts(console, counts, SHOWN_ROWS)


@click.command("convert", cls=output.Command, short_help=short_help("convert"), epilog=EXIT_CODES)
@click.argument("src", type=click.Path(path_type=str))
@click.argument("dst", type=click.Path(path_type=str))
@click.option("--shard-size", metavar="SIZE",
              help="Split into shards of at most SIZE (e.g. 5GB, 500MB, 2GiB) with a Hugging Face "
                   "model.safetensors.index.json.")
@click.option("--dtype", metavar="DTYPE",
              help="Cast floating tensors: bf16, fp16, fp32 (also F8_E4M3, F8_E5M2). Integers and bools "
                   "are kept.")
@click.option("--select", multiple=True, metavar="GLOB", help="Keep only tensors whose name matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out tensors whose name matches (repeatable).")
@click.option("--extract", default="auto", show_default=True, metavar="KEY|auto|none",
              help="Convert only the tensors under KEY, without the prefix; auto does it for Lightning and "
                   "Stable Diffusion checkpoints (state_dict).")
@click.option("--drop-ema", is_flag=True, help="Leave out Stable Diffusion EMA weights (model_ema.*).")
@click.option("--ema-only", is_flag=True, help="Write the EMA weights in place of the model.* weights.")
@click.option("--verify", is_flag=True, help="Re-read the output and compare every tensor bit-exactly.")
@click.option("--allow-unsafe-structure", is_flag=True,
              help="Convert even if the scan finds malicious content (it is never executed).")
@click.option("--no-source-hash", is_flag=True, help="Do not record the source file's sha256 in the metadata.")
@click.option("--template", metavar="FILE", type=click.Path(dir_okay=False, path_type=str),
              help="Read SRC as a raw dump (arrays back to back, no header) whose tensors, dtypes and "
                   "shapes are named by FILE: a JSON template or an existing .safetensors file.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def command(src: str, dst: str, shard_size: Optional[str], dtype: Optional[str], select: tuple[str, ...],
            exclude: tuple[str, ...], extract: str, drop_ema: bool, ema_only: bool, verify: bool,
            allow_unsafe_structure: bool, no_source_hash: bool, template: Optional[str], force: bool,
            as_json: bool) -> None:
    """Convert SRC (PyTorch .bin/.pt/.pth, Lightning or SD .ckpt, npz, sharded folder, safetensors,
    ...) into safetensors at DST, a file or a directory.

    Tensors stream from the mapped source one at a time, so memory stays near the
    largest tensor. The file's pickles are read by a restricted machine that never
    runs code; a source the scan finds malicious is refused unless
    --allow-unsafe-structure. Tied weights are stored once, as save_model does. The
    metadata records format=pt, the source's name, format and sha256, and the
    checkpoint's non-tensor data (epoch, hyper-parameters) as JSON. DST is
    never an input, and an existing DST is replaced only with --force.

    \b
    Examples:
      safeckpt convert pytorch_model.bin model.safetensors
      safeckpt convert model.ckpt out/ --dtype bf16 --drop-ema
      safeckpt convert big.bin out/model.safetensors --shard-size 5GB --verify
      safeckpt convert last.ckpt weights.safetensors --exclude 'loss.*' --json
      safeckpt convert dump.bin model.safetensors --template layout.json
    """
    if drop_ema and ema_only:
        output.fail(output.EXIT_ERROR, "--drop-ema and --ema-only exclude each other")
    ema = "drop" if drop_ema else "only" if ema_only else None

    def work(progress: output.ProgressBar) -> ConvertReport:
        from ..ops.convert import convert
        from ..sources import open_source

        with contextlib.ExitStack() as stack:
            source = stack.enter_context(open_source(src, template=template)) if template else src
            return convert(source, dst, shard_size=shard_size, dtype=dtype, select=select or None,
                           exclude=exclude or None, extract=None if extract.lower() == "none" else extract,
                           ema=ema, verify=verify, allow_unsafe_structure=allow_unsafe_structure,
                           source_hash=not no_source_hash, progress=progress, overwrite=force)

    report = run(work, dst, as_json)
    output.finish(output.EXIT_OK, report_dict(report))


def report_dict(report: ConvertReport) -> dict[str, Any]:
    """The report's fields for --json (notes in the command line's words)."""
    return dict(report.to_dict(), notes=output.cli_notes(report.notes))


def run(work: Callable[[output.ProgressBar], ConvertReport], dst: str, as_json: bool,
        verb: str = "converted") -> ConvertReport:
    """Run a conversion with a progress bar and print its summary (unless --json); a failure is
    one error line (and the envelope) and exit 2."""
    label = {"converted": "converting", "cast": "casting"}.get(verb, verb)
    report = output.run_writing(work, label, dst, as_json)
    if not as_json:
        _summary(report, verb)
    return report
