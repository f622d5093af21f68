"""`safeckpt cast SRC DST --dtype DTYPE`: floating tensors to another precision, streamed.

A thin command over `safeckpt.ops.cast.cast` (itself convert with a target
dtype): --select / --exclude choose which floating tensors are cast, and the
others are copied bit for bit. Values that overflow or underflow the target
are counted per tensor and printed (and in --json); --strict makes them an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import click

from . import convert as convert_cli
from . import output, short_help

if TYPE_CHECKING:
    from ..ops.convert import ConvertReport

EXIT_CODES = ("\b\nExit codes:\n  0  written (overflow and underflow, if any, are reported as warnings)\n"
              "  1  written, but with --strict some values overflowed or underflowed the target\n"
              "  2  not written: the source is unsafe, unreadable or malformed, the output exists (see\n"
              "     --force) or is an input or cannot be written, a verification failed, or the\n"
              "     command line is wrong")


@click.command("cast", cls=output.Command, short_help=short_help("cast"), epilog=EXIT_CODES)
@click.argument("src", type=click.Path(path_type=str))
@click.argument("dst", type=click.Path(path_type=str))
@click.option("--dtype", required=True, metavar="DTYPE",
              help="Target: bf16, fp16, fp32, fp64, F8_E4M3 (fp8), F8_E5M2; torch and numpy names work too.")
@click.option("--select", multiple=True, metavar="GLOB",
              help="Cast only floating tensors whose name matches (repeatable); the rest are copied as is.")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Do not cast tensors whose name matches, e.g. '*norm*' (repeatable).")
@click.option("--shard-size", metavar="SIZE", help="Split into shards of at most SIZE (e.g. 5GB) with an index.")
@click.option("--verify", is_flag=True, help="Re-read the output and compare every tensor bit-exactly.")
@click.option("--strict", is_flag=True, help="Exit 1 when any value overflowed or underflowed the target.")
@click.option("--allow-unsafe-structure", is_flag=True,
              help="Cast even if the scan finds malicious content (it is never executed).")
@click.option("--force", is_flag=True, help=convert_cli.FORCE_HELP)
@click.option("--json", "as_json", is_flag=True, help=convert_cli.JSON_HELP.replace(
    "cast is the target dtype (null: none)", "cast is the target dtype"))
def command(src: str, dst: str, dtype: str, select: tuple[str, ...], exclude: tuple[str, ...],
            shard_size: Optional[str], verify: bool, strict: bool, allow_unsafe_structure: bool, force: bool,
            as_json: bool) -> None:
    """Write SRC (any format safeckpt reads) as safetensors at DST with its floating tensors cast.

    Integer and bool tensors are never cast. Rounding is round-to-nearest-even,
    the bits torch's Tensor.to gives. Values beyond the target's range become
    ±inf (±448 for F8_E4M3, which has no inf, as in torch); non-zero values
    below its smallest subnormal become ±0. Both are counted per tensor.

    \b
    Examples:
      safeckpt cast model.safetensors model-bf16.safetensors --dtype bf16
      safeckpt cast pytorch_model.bin out/ --dtype fp16 --exclude '*norm*' --strict
      safeckpt cast model.safetensors model-fp8.safetensors --dtype fp8 --select '*.mlp.*' --json
    """
    def work(progress: output.ProgressBar) -> ConvertReport:
        from ..ops.convert import cast

        return cast(src, dst, dtype, select=select or None, exclude=exclude or None, shard_size=shard_size,
                    verify=verify, allow_unsafe_structure=allow_unsafe_structure, progress=progress,
                    overwrite=force)

    report = convert_cli.run(work, dst, as_json, verb="cast")
    code = output.EXIT_OK
    if strict and (report.overflow or report.underflow):
        code = output.EXIT_INVALID
        tensors = len(set(report.overflow) | set(report.underflow))
        output.error_line(f"--strict: values overflowed or underflowed {report.cast} in {tensors} "
                          f"tensor{'s' if tensors > 1 else ''} (written: {', '.join(report.outputs)})")
    output.finish(code, convert_cli.report_dict(report))
