"""`safeckpt convert SRC DST`: any checkpoint safeckpt reads -> safetensors, streamed.

A thin command over `safeckpt.ops.convert.convert`: options map one to one onto
its arguments; this module only prints (a summary, or the report as JSON) and
draws a progress bar on stderr when the work takes more than a second.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Callable, Optional

import click

from .. import errors
from . import output, short_help
from .output import grouped, human_bytes, printable

if TYPE_CHECKING:
    from ..ops.convert import ConvertReport
    from ..torch.folders import FolderReport

# Rows of the overflow table and names of skipped tensors shown (all of them with --json).
SHOWN_ROWS = 20

EXIT_CODES = ("\b\nExit codes:\n  0  converted (and verified, with --verify)\n"
              "  2  not converted: the source is unsafe (see --allow-unsafe-structure), unreadable or\n"
              "     malformed, the output exists (see --force) or is an input or cannot be written,\n"
              "     a verification failed, or the command line is wrong; nothing is written")

JSON_HELP = ("Print one JSON document: {command, ok, exit_code, error, error_type, warnings, source, source_format, "
             "outputs, index, tensors, bytes_written, aliases, skipped, cast, overflow, underflow, verified, "
             "seconds, scan_verdict, notes, copied}; cast is the target dtype (null: none); copied, a model folder's other "
             "files copied beside the output; a refused source adds scan. A training folder gives {source, model (the "
             "model's report, or null), states [{source, source_format, outputs, tensors, scan_verdict, objects}], "
             "copied, outputs, seconds, notes}.")
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

    A training checkpoint folder (a transformers Trainer's checkpoint-500/, an
    accelerate save_state folder) becomes a folder with no pickle in it: the model
    as below, each other pickle NAME.pt as NAME.safetensors + NAME.json (read back
    with safeckpt.training.join_state), the other files copied.

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
      safeckpt convert checkpoint-500/ safe-checkpoint-500/
    """
    if drop_ema and ema_only:
        output.fail(output.EXIT_ERROR, "--drop-ema and --ema-only exclude each other")
    ema = "drop" if drop_ema else "only" if ema_only else None

    def work(progress: output.ProgressBar) -> "ConvertReport | FolderReport":
        from ..ops.convert import convert, state_files
        from ..sources import open_source

        if template is None and os.path.isdir(src) and state_files(src):
            return _training_folder()(
                src, dst, shard_size=shard_size, dtype=dtype, select=select or None, exclude=exclude or None,
                extract=None if extract.lower() == "none" else extract, ema=ema, verify=verify,
                allow_unsafe_structure=allow_unsafe_structure, source_hash=not no_source_hash, progress=progress,
                overwrite=force)
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(open_source(src, template=template)) if template else src
            return convert(source, dst, shard_size=shard_size, dtype=dtype, select=select or None,
                           exclude=exclude or None, extract=None if extract.lower() == "none" else extract,
                           ema=ema, verify=verify, allow_unsafe_structure=allow_unsafe_structure,
                           source_hash=not no_source_hash, progress=progress, overwrite=force)

    report = run(work, dst, as_json)
    output.finish(output.EXIT_OK, report_dict(report))


def _training_folder() -> Callable[..., FolderReport]:
    """`convert_folder`, which reads the pickles with torch; without torch, one clear error."""
    try:
        from ..torch.folders import convert_folder
    except ImportError as exc:
        raise errors.SafeckptError(f"this folder holds pickled training state (optimizer, scheduler, RNG states): "
                                   f"turning it into safetensors + JSON needs torch ({exc}); pip install torch") \
            from None
    return convert_folder


def report_dict(report: "ConvertReport | FolderReport") -> dict[str, Any]:
    """The report's fields for --json (notes in the command line's words)."""
    if hasattr(report, "states"):
        model = report_dict(report.model) if report.model is not None else None
        return dict(report.to_dict(), model=model, notes=output.cli_notes(report.notes))
    return dict(report.to_dict(), notes=output.cli_notes(report.notes))


def run(work: Callable[[output.ProgressBar], ConvertReport], dst: str, as_json: bool,
        verb: str = "converted") -> ConvertReport:
    """Run a conversion with a progress bar and print its summary (unless --json); a failure is
    one error line (and the envelope) and exit 2."""
    label = {"converted": "converting", "cast": "casting"}.get(verb, verb)
    report = output.run_writing(work, label, dst, as_json)
    if not as_json:
        _folder_summary(report) if hasattr(report, "states") else _summary(report, verb)
    return report


def _folder_summary(report: FolderReport) -> None:
    if report.model is not None:
        _summary(report.model)
    console = output.make_console()
    for state in report.states:
        outputs = ", ".join(printable(os.path.basename(p)) for p in state.outputs)
        console.print(f"converted {printable(state.source)} ({state.source_format}, scan: {state.scan_verdict}) -> "
                      f"{outputs}: {grouped(state.tensors)} tensors", markup=False)
    copied = [p for p in report.copied if report.model is None or p not in report.model.copied]
    if copied:
        console.print(f"copied: {', '.join(printable(p) for p in copied[:5])}{', ...' if len(copied) > 5 else ''}",
                      markup=False)
    for note in output.cli_notes(report.notes):
        console.print(output.NOTE_PREFIX + note, markup=False)
    console.print(f"no pickle in the output; {report.seconds:.2f} s", markup=False)
