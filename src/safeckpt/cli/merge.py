"""`safeckpt merge SRC... -o DST`: average, interpolate or task-merge checkpoints into safetensors.

A thin command over `safeckpt.ops.merge.merger.merge` (the methods, how missing
tensors, dtypes and tied weights are handled are in its docstring): options
map one to one onto its arguments; this module only parses them, prints a
summary (or the report as JSON), draws a progress bar on stderr when the work
takes more than a second, and turns failures into exit codes.
"""

from __future__ import annotations

from typing import Optional

import click

# --method's choices come from the op: this module is imported only when `merge` runs
from ..ops.merge import DEFAULT_DENSITY, METHODS, MergeReport, merge
from . import output, short_help
from .output import grouped, human_bytes, printable

# Rows of the overflow table and names listed in a line (all of them with --json).
SHOWN_ROWS = 20
SHOWN_NAMES = 5

EXIT_CODES = ("\b\nExit codes:\n  0  merged (and verified, with --verify)\n"
              "  1  the inputs cannot be merged: tensors whose shapes differ, or tensors missing from\n"
              "     some inputs (see --allow-missing); the offenders are listed, nothing is written\n"
              "  2  an input is unsafe (see --allow-unsafe-structure), missing, unreadable or malformed,\n"
              "     the output exists (see --force) or is an input or cannot be written, or the\n"
              "     options are wrong (e.g. slerp of three models); nothing is written")

JSON_HELP = ("Print one JSON document: {command, ok, exit_code, error, error_type, warnings, method, inputs, base, "
             "parameters, outputs, index, tensors, merged, copied, missing, differing, aliases, cast, overflow, "
             "bytes_written, verified, seconds, scan_verdicts, notes}; inputs that cannot be merged add "
             "offenders, a refused input adds scan.")


def _weights(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[list[float]]:
    if value is None:
        return None
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 0.5,0.3,0.2") from None


def _names(names: list[str]) -> str:
    shown = ", ".join(printable(n) for n in names[:SHOWN_NAMES])
    return shown + (f", ... ({len(names)} in all)" if len(names) > SHOWN_NAMES else "")


def _summary(report: MergeReport) -> None:
    console = output.make_console()
    written = ", ".join(printable(p) for p in report.outputs)
    console.print(f"merged {len(report.inputs)} checkpoints ({report.method}) -> {written}", markup=False)
    console.print(f"inputs: {', '.join(printable(p) for p in report.inputs)}"
                  + (f"; base: {printable(report.base)}" if report.base else ""), markup=False)
    if report.parameters:
        console.print("parameters: " + ", ".join(f"{k}={v}" for k, v in report.parameters.items()), markup=False)
    if report.index:
        console.print(f"index: {printable(report.index)}", markup=False)
    line = (f"{grouped(report.tensors)} tensors ({grouped(report.merged)} merged, {grouped(len(report.copied))} "
            f"copied), {human_bytes(report.bytes_written)} in {len(report.outputs)} "
            f"file{'s' if len(report.outputs) > 1 else ''}, {report.seconds:.2f} s")
    if report.cast:
        line += f", cast to {report.cast}"
    if report.verified:
        line += ", verified"
    console.print(line, markup=False)
    if report.aliases:
        console.print(f"tied tensors stored once: {len(report.aliases)} "
                      f"({_names([f'{a} -> {b}' for a, b in report.aliases.items()])})", markup=False)
    if report.missing:
        console.print(f"not in every input (merged over those that have them): {_names(list(report.missing))}",
                      markup=False)
    for note in output.cli_notes(report.notes):
        console.print(output.NOTE_PREFIX + note, markup=False)
    if report.overflow:
        console.print(f"warning: values overflowed their dtype in {len(report.overflow)} tensors "
                      "(now ±inf, or ±max for F8_E4M3):", markup=False)
        output.print_counts(console, report.overflow, SHOWN_ROWS)


@click.command("merge", cls=output.Command, short_help=short_help("merge"), epilog=EXIT_CODES)
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--output", "dst", required=True, metavar="DST", type=click.Path(path_type=str),
              help="The merged model: a .safetensors file, or a directory (sharded with --shard-size).")
@click.option("--method", type=click.Choice(METHODS), default="linear", show_default=True,
              help="linear: weighted average (model soup); ema: exponential moving average over the inputs in "
                   "order; slerp: spherical interpolation of two models; task-arithmetic, ties, dare: add the "
                   "inputs' differences from --base.")
@click.option("--weights", callback=_weights, metavar="W1,W2,...",
              help="One weight per input (linear: normalised to sum to 1, default uniform; task methods: "
                   "scales each task vector, default 1).")
@click.option("--no-normalize", is_flag=True, help="linear: use --weights as given (a weighted sum).")
@click.option("--decay", type=float, metavar="D", help="ema: e = D*e + (1-D)*x for each input in order.")
@click.option("--t", "t", type=float, metavar="T", help="slerp: position between the two models, 0..1 "
                                                       "(default 0.5).")
@click.option("--base", metavar="FILE", type=click.Path(path_type=str),
              help="task-arithmetic, ties, dare: the model the inputs were fine-tuned from.")
@click.option("--lambda", "lambda_", type=float, metavar="L", help="Task methods: scale of the merged task "
                                                                  "vector (default 1.0).")
@click.option("--density", type=float, metavar="P",
              help=f"ties: fraction of each task vector kept, by magnitude; dare: probability of keeping each "
                   f"entry (default {DEFAULT_DENSITY}).")
@click.option("--seed", type=int, metavar="N", help="dare: seed of the random drops (default 0); the same seed "
                                                    "gives the same output.")
@click.option("--dtype", metavar="DTYPE", help="Write floating tensors in DTYPE (bf16, fp16, fp32, ...) instead "
                                               "of the inputs' dtype; the arithmetic is float32 (or float64).")
@click.option("--allow-missing", is_flag=True, help="Keep tensors that only some inputs have, merged over those.")
@click.option("--shard-size", metavar="SIZE", help="Split the output into shards of at most SIZE (e.g. 5GB) with "
                                                  "a Hugging Face model.safetensors.index.json.")
@click.option("--extract", default="auto", show_default=True, metavar="KEY|auto|none",
              help="Merge only the tensors under KEY, without the prefix; auto does it for Lightning and "
                   "Stable Diffusion checkpoints (state_dict).")
@click.option("--verify", is_flag=True, help="Re-read the output and compare it with a second computation.")
@click.option("--allow-unsafe-structure", is_flag=True,
              help="Merge even if the scan finds malicious content in an input (it is never executed).")
@click.option("--force", is_flag=True, help="Replace DST if it exists (never an input); without it an existing "
                                             "DST is refused.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def command(sources: tuple[str, ...], dst: str, method: str, weights: Optional[list[float]], no_normalize: bool,
            decay: Optional[float], t: Optional[float], base: Optional[str], lambda_: Optional[float],
            density: Optional[float], seed: Optional[int], dtype: Optional[str], allow_missing: bool,
            shard_size: Optional[str], extract: str, verify: bool, allow_unsafe_structure: bool, force: bool,
            as_json: bool) -> None:
    """Merge the checkpoints SOURCES (any formats safeckpt reads, mixed) into one safetensors model.

    Tensors are computed and written one block at a time, so memory stays near a
    few blocks whatever the model size; the arithmetic is float32 (float64 for
    float64 inputs) and the output keeps the inputs' dtype unless --dtype.
    Integer and bool tensors (step counters, masks) are taken from the first
    input. Lightning .ckpt files merge by their state_dict names, so a .ckpt and
    the .safetensors of the same model line up. Every input is scanned first and
    nothing in it is ever executed.

    \b
    Examples:
      safeckpt merge run1.safetensors run2.safetensors run3.safetensors -o soup.safetensors
      safeckpt merge a.pt b.ckpt c.safetensors -o out.safetensors --weights 0.5,0.3,0.2
      safeckpt merge ckpt-1000.ckpt ckpt-2000.ckpt ckpt-3000.ckpt -o ema.safetensors --method ema --decay 0.9
      safeckpt merge chat.safetensors code.safetensors -o mid.safetensors --method slerp --t 0.3
      safeckpt merge ft1/ ft2/ -o merged/ --method ties --base base/ --density 0.2 --shard-size 5GB
      safeckpt merge ft1.pt ft2.pt -o dare.safetensors --method dare --base base.pt --seed 1 --dtype bf16 --json
    """
    def work(bar: output.ProgressBar) -> MergeReport:
        return merge(list(sources), dst, method, weights, base=base,
                     normalize=False if no_normalize else None, decay=decay, t=t, lambda_=lambda_,
                     density=density, seed=seed, dtype=dtype, allow_missing=allow_missing,
                     shard_size=shard_size, extract=None if extract.lower() == "none" else extract,
                     allow_unsafe_structure=allow_unsafe_structure, verify=verify, progress=bar,
                     overwrite=force)

    report = output.run_writing(work, "merging", dst, as_json)
    if not as_json:
        _summary(report)
    output.finish(output.EXIT_OK, dict(report.to_dict(), notes=output.cli_notes(report.notes)))
