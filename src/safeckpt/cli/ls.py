"""`safeckpt ls DIR`: the training checkpoints in a CheckpointManager directory.

Reads the manifests only (fast, nothing hashed: `CheckpointManager.verify()`
checks the bytes), takes no lock, and creates, cleans or changes nothing, so
it is safe on a directory a run is writing. What is listed is
`safeckpt.ops.inspect.describe_checkpoints`'s report; this module only presents it.
"""

from __future__ import annotations

import datetime
from typing import Any, Optional

import click

# this module is imported only when `ls` runs: the training machinery comes with it
from ..ops.inspect import describe_checkpoints
from ..training.policy import MODES
from . import output, short_help
from .output import Column, human_bytes, printable

COLUMNS = (Column("step", right=True), Column("time"), Column("size", right=True), Column("metrics"),
           Column("mark"))


def presented(report: dict[str, Any]) -> dict[str, Any]:
    """The report as the CLI shows it: each damaged checkpoint's error on one line."""
    for bad in report["damaged"]:
        bad["error"] = output.one_line(bad["error"])
    return report


def _row(entry: dict) -> list[str]:
    moment = datetime.datetime.fromtimestamp(entry["time"]).isoformat(sep=" ", timespec="seconds")
    metrics = ", ".join(f"{key}={_format_metric(value)}" for key, value in entry["metrics"].items())
    marks = [mark for mark in ("latest", "best") if entry[mark]]
    return [str(entry["step"]), moment, human_bytes(entry["size"]), printable(metrics), " ".join(marks)]


def _format_metric(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


@click.command("ls", cls=output.Command, short_help=short_help("ls"),
               epilog=output.exit_codes_help(
                   ok="listed (an empty directory too)",
                   invalid="a checkpoint's manifest is damaged (listed on stderr; never restored)",
                   error="the directory is missing or cannot be read, or the command line is wrong"))
@click.argument("directory", type=str)
@click.option("--monitor", metavar="METRIC", help="Rank 'best' by this metric (default: the one the run recorded).")
@click.option("--mode", type=click.Choice(MODES), help="Whether lower (min) or higher (max) METRIC is better.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document: {command, ok, exit_code, error, error_type, warnings, directory, "
                   "monitor, mode, latest, best, checkpoints: [{step, time, size, path, metrics, latest, best}], "
                   "damaged: [{step, path, error}]}.")
def command(directory: str, monitor: Optional[str], mode: Optional[str], as_json: bool) -> None:
    """List the checkpoints a CheckpointManager committed in DIRECTORY.

    DIRECTORY is a local path or an fsspec URL (s3://bucket/run). One row per
    committed checkpoint, oldest step first: step, save time, size, metrics,
    and which is the latest and which the best. Only manifests are read:
    run a manager's verify() to check every byte.

    \b
    Examples:
      safeckpt ls checkpoints/
      safeckpt ls checkpoints/ --monitor val_acc --mode max
      safeckpt ls s3://bucket/run --json
    """
    try:
        report = presented(describe_checkpoints(directory, monitor, mode))
    except Exception as exc:  # noqa: BLE001 - every failure is a one-line message
        output.fail_with(exc, directory, directory=directory)
    if not as_json:
        if report["checkpoints"]:
            output.print_table(output.make_console(), COLUMNS, [_row(entry) for entry in report["checkpoints"]])
            if report["monitor"] and report["best"] is None:
                output.warning_line(f"no checkpoint has a value of {report['monitor']!r} that is not NaN")
        else:
            output.warning_line(f"{printable(directory)}: no committed checkpoints")
    for bad in report["damaged"]:
        output.error_line(f"step {bad['step']} ({bad['path']}): damaged: {bad['error']}")
    output.finish(output.EXIT_INVALID if report["damaged"] else output.EXIT_OK, report)
