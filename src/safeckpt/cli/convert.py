"""`safeckpt convert SRC DST`: any checkpoint safeckpt reads -> safetensors, streamed.

A thin command over `safeckpt.ops.convert.convert`: options map one to one onto
its arguments; this module only prints (a summary, or the report as JSON) and
draws a progress bar on stderr when the work takes more than a second.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from typing import Callable, Optional

import click

from ..errors import SafeckptError, UnsafeFileError
from ..ops.convert import ConvertReport, convert
from ..sources import open_source
from . import output
from .output import grouped, human_bytes, printable

# Rows of the overflow table and names of skipped tensors shown (all of them with --json).
SHOWN_ROWS = 20

EXIT_CODES = ("\b\nExit codes:\n  0  converted (and verified, with --verify)\n"
              "  2  not converted: the source is unsafe (see --allow-unsafe-structure), unreadable or\n"
              "     malformed, a verification failed, or the command line is wrong; nothing is written")


def _failure(exc: BaseException, src: str) -> str:
    """One line for a failed conversion; OSErrors name the file they are about (source or output)."""
    if isinstance(exc, SafeckptError):
        return output.one_line(str(exc))
    if isinstance(exc, OSError):
        return output.one_line(f"{exc.filename or src}: {exc.strerror or exc}")
    return output.describe_failure(exc, src)[1]


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
    for note in report.notes:
        console.print(f"note: {note}", markup=False)
    for counts, what in ((report.overflow, "overflowed (now ±inf, or ±max for F8_E4M3)"),
                         (report.underflow, "underflowed (non-zero values now ±0)")):
        if counts:
            console.print(f"warning: values {what} in {len(counts)} tensors cast to {report.cast}:",
                          markup=False)
            output.print_counts(console, counts, SHOWN_ROWS)


@click.command("convert", short_help="Convert any checkpoint to safetensors; nothing in it is executed.",
               epilog=EXIT_CODES)
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
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def command(src: str, dst: str, shard_size: Optional[str], dtype: Optional[str], select: tuple[str, ...],
            exclude: tuple[str, ...], extract: str, drop_ema: bool, ema_only: bool, verify: bool,
            allow_unsafe_structure: bool, no_source_hash: bool, template: Optional[str],
            as_json: bool) -> None:
    """Convert SRC (PyTorch .bin/.pt/.pth, Lightning or SD .ckpt, npz, sharded folder, safetensors,
    ...) into safetensors at DST, a file or a directory.

    Tensors stream from the mapped source one at a time, so memory stays near the
    largest tensor. The file's pickles are read by a restricted machine that never
    runs code; a source the scan finds malicious is refused unless
    --allow-unsafe-structure. Tied weights are stored once, as save_model does. The
    metadata records format=pt, the source's name, format and sha256, and the
    checkpoint's non-tensor data (epoch, hyper-parameters) as JSON.

    \b
    Examples:
      safeckpt convert pytorch_model.bin model.safetensors
      safeckpt convert model.ckpt out/ --dtype bf16 --drop-ema
      safeckpt convert big.bin out/model.safetensors --shard-size 5GB --verify
      safeckpt convert last.ckpt weights.safetensors --exclude 'loss.*' --json
      safeckpt convert dump.bin model.safetensors --template layout.json
    """
    if drop_ema and ema_only:
        output.exit_with(output.EXIT_ERROR, "error: --drop-ema and --ema-only exclude each other")
    ema = "drop" if drop_ema else "only" if ema_only else None

    def work(progress: output.ProgressBar) -> ConvertReport:
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(open_source(src, template=template)) if template else src
            return convert(source, dst, shard_size=shard_size, dtype=dtype, select=select or None,
                           exclude=exclude or None, extract=None if extract.lower() == "none" else extract,
                           ema=ema, verify=verify, allow_unsafe_structure=allow_unsafe_structure,
                           source_hash=not no_source_hash, progress=progress)

    run(work, src, as_json)


def run(work: Callable[[output.ProgressBar], ConvertReport], src: str, as_json: bool,
        verb: str = "converted") -> ConvertReport:
    """Run a conversion with a progress bar; print its report, or one line and exit 2 on failure."""
    bar = output.ProgressBar({"converted": "converting", "cast": "casting"}.get(verb, verb), enabled=not as_json)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # overflow is printed from the report
            report = work(bar)
    except UnsafeFileError as exc:
        bar.close()
        if as_json:
            click.echo(json.dumps({verb: False, "error": str(exc), "error_type": "UnsafeFileError",
                                   "scan": exc.report.to_dict() if hasattr(exc.report, "to_dict") else None},
                                  indent=2))
        output.exit_with(output.EXIT_ERROR, output.one_line(f"REFUSED {exc}"))
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure is one line and exit 2
        bar.close()
        if isinstance(exc, KeyboardInterrupt):
            output.exit_with(output.EXIT_ERROR, "interrupted: nothing was written")
        message = _failure(exc, src)
        if as_json:
            click.echo(json.dumps({verb: False, "error": message, "error_type": type(exc).__name__}, indent=2))
        output.exit_with(output.EXIT_ERROR, f"ERROR {message}")
    bar.close()
    if as_json:
        click.echo(json.dumps(dict(report.to_dict(), **{verb: True}), indent=2))
    else:
        _summary(report, verb)
    return report
