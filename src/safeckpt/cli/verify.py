"""`safeckpt verify PATH...`: is each checkpoint intact? Its structure, then its BLAKE3 hashes.

A thin command over `safeckpt.ops.verify.verifier.verify` (which says what is checked;
`safeckpt.ops.verify.manifest` says how manifests look): this module only prints one line per checked file, sharded
model or training checkpoint (OK on stdout; an error line with the reason on
stderr), or one JSON document, and draws a progress bar while hashing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import click

from . import output, short_help
from .output import grouped, printable

if TYPE_CHECKING:
    from ..ops.verify import VerifyReport

STATUS_BY_CODE = {output.EXIT_OK: "ok", output.EXIT_INVALID: "invalid", output.EXIT_ERROR: "error"}

EXIT_CODES = ("\b\nExit codes:\n"
              "  0  every PATH is intact: valid structure, and hashes that match its manifest\n"
              "     where it has one (with --write: the manifest is written)\n"
              "  1  a PATH is invalid or damaged: its structure, a tensor's or file's hash, a\n"
              "     size, a missing or unrecorded file, an edited manifest, or a mismatch with\n"
              "     the LFS pointer (the reason is on stderr)\n"
              "  2  a PATH is missing or cannot be read, the LFS pointer file is malformed, or\n"
              "     the command line is wrong")

JSON_HELP = ("Print one JSON document: {command, ok, exit_code, error, error_type, warnings, notes, files: [{file, "
             "kind, format, status, exit_code, tensors, parameters, file_size, files, manifest, hashes, error, "
             "error_type, failed_file, failed_tensor, problems, missing, extra, sha256, lfs, hashed_bytes, seconds, "
             "notes}]}; status is ok, invalid or error; hashes is verified, written, missing (no manifest), failed "
             "or unchecked.")


def run_verify(path: str, **options) -> VerifyReport:
    """`verify(path, **options)`, with an unexpected error (a bug) turned into an "error" report."""
    from ..errors import SafeckptError
    from ..ops.verify import VerifyReport, verify

    try:
        return verify(path, **options)
    except SafeckptError:
        raise  # the caller's mistake (a bad LFS pointer): the command checks those first
    except Exception as exc:  # noqa: BLE001 - one line and exit 2, never a traceback
        code, message = output.describe_failure(exc, path)
        return VerifyReport(path, "file", status=STATUS_BY_CODE[code], hashes="unchecked", error=message,
                            error_type=type(exc).__name__, problems=[message])


def ok_line(report: VerifyReport) -> str:
    """'OK PATH: N tensors, P parameters, B bytes', and what the hashes showed."""
    line = f"OK {printable(report.path)}: "
    if report.tensors is not None:
        line += f"{grouped(report.tensors)} tensors, {grouped(report.parameters or 0)} parameters, "
    line += f"{grouped(report.size or 0)} bytes"
    if len(report.files) > 1:
        line += f" in {len(report.files)} files"
    if report.format not in (None, "safetensors"):
        line += f" ({report.format})"
    if report.hashes == "verified":
        line += f", hashes match {printable(report.manifest or '')}"
    elif report.hashes == "written":
        line += f", manifest written: {printable(report.manifest or '')}"
    if report.lfs is not None and report.lfs.get("match"):
        line += ", size and sha256 match the LFS pointer"
    return line


def leaf_dict(report: VerifyReport) -> dict:
    """A leaf report as JSON: `file` is the PATH checked, `file_size` its bytes (as before manifests)."""
    out = report.to_dict()
    out.pop("children")
    out["notes"] = output.cli_notes(out.get("notes") or ())
    return {"file": out.pop("path"), "kind": out.pop("kind"), "status": out.pop("status"),
            "exit_code": out.pop("exit_code"), "format": out.pop("format"), "tensors": out.pop("tensors"),
            "parameters": out.pop("parameters"), "file_size": out.pop("size"), **out}


def _print_human(reports: list[VerifyReport]) -> None:
    leaves = [leaf for report in reports for leaf in report.leaves()]
    for report in reports:
        for note in report.notes if report.children else ():
            output.note_line(note)
    for leaf in leaves:
        if leaf.status == "ok":
            click.echo(ok_line(leaf))
        else:
            _problems([leaf])
        for file, digest in leaf.sha256.items():
            click.echo(f"{digest}  {printable(file)}")
        for note in leaf.notes:
            output.note_line(note)
    if len(leaves) > 1:
        click.echo(f"{sum(leaf.status == 'ok' for leaf in leaves)} of {len(leaves)} valid")
    unhashed = [leaf for leaf in leaves if leaf.status == "ok" and leaf.hashes == "missing"]
    if len(unhashed) == 1:
        click.echo(f"no manifest: structure checked only (run `safeckpt verify --write "
                   f"{printable(unhashed[0].path)}` to record its hashes)")
    elif unhashed:
        click.echo(f"{len(unhashed)} without a manifest: structure checked only (run `safeckpt verify --write` "
                   "on them to record their hashes)")


def _problems(leaves: list[VerifyReport]) -> None:
    """One error line per problem of each file that is not intact."""
    for leaf in leaves:
        if leaf.status != "ok":
            for problem in leaf.problems or [leaf.error or f"{leaf.path}: failed"]:
                output.error_line(problem)


@click.command("verify", cls=output.Command, short_help=short_help("verify"), epilog=EXIT_CODES)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--write", is_flag=True,
              help="Record the BLAKE3 hash of each file and of each tensor in a manifest beside PATH "
                   "(FILE.blake3.json; for a sharded model INDEX.blake3.json), after checking the structure. "
                   "Replaces an older manifest.")
@click.option("--sha256", "sha256", is_flag=True,
              help="Also print each file's sha256 (as `sha256sum` does): the oid the Hugging Face Hub shows for "
                   "an LFS file.")
@click.option("--lfs-pointer", metavar="POINTER", type=click.Path(path_type=str),
              help="Compare the file's size and sha256 with this Git LFS pointer file (one PATH, a file).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def command(paths: tuple[str, ...], write: bool, sha256: bool, lfs_pointer: Optional[str], as_json: bool) -> None:
    """Check that each PATH is intact: its structure, then its hashes.

    PATH is a checkpoint file of any format safeckpt reads (a file named
    *.safetensors must be one), a sharded model (its folder or index JSON), a
    training checkpoint of CheckpointManager (a step-* directory or the
    manager's directory), or a folder: each checkpoint file under it.

    The structure check needs no manifest: the safetensors header and layout
    (truncated downloads, appended bytes, edited headers, a pickle or LFS
    pointer under the wrong name), or the parser's checks for other formats.
    `verify --write` then records BLAKE3 hashes of every file and tensor
    (hashed on all cores); a later `verify` checks them and names the first
    damaged tensor and its file, missing and unrecorded files, and an edited
    manifest. Training checkpoints carry their manifest.json already.

    Prints "OK PATH: N tensors, P parameters, B bytes" on stdout for an intact
    PATH; "error: PATH: reason" on stderr otherwise (the exit code says
    invalid or unreadable). With several, the exit code is the worst one.

    \b
    Examples:
      safeckpt verify model.safetensors
      safeckpt verify --write model.safetensors     # then: safeckpt verify model.safetensors
      safeckpt verify --write Llama-3-8B/           # a sharded model: one manifest for all shards
      safeckpt verify checkpoints/                  # every step a CheckpointManager saved
      safeckpt verify --sha256 pytorch_model.bin
      safeckpt verify model.safetensors --lfs-pointer model.safetensors.pointer
      safeckpt verify --json downloads/
    """
    from ..errors import SafeckptError
    from ..ops.verify import read_lfs_pointer

    pointer = None
    if lfs_pointer is not None:
        if len(paths) != 1 or os.path.isdir(paths[0]):
            output.fail(output.EXIT_ERROR, "--lfs-pointer compares one file: give exactly one PATH, a file",
                        notes=[], files=[])
        try:
            pointer = read_lfs_pointer(lfs_pointer)
        except (SafeckptError, OSError) as exc:
            code, message = output.describe_failure(exc, lfs_pointer)
            output.fail(output.EXIT_ERROR, message, exc=exc, notes=[], files=[])
    bar = output.ProgressBar("hashing", enabled=not as_json)
    try:
        reports = [run_verify(path, write=write, sha256=sha256, lfs_pointer=pointer, progress=bar)
                   for path in paths]
    finally:
        bar.close()
    code = max(report.exit_code for report in reports)
    leaves = [leaf for report in reports for leaf in report.leaves()]
    if as_json:
        _problems(leaves)
    else:
        _print_human(reports)
    notes = [note for report in reports if report.children for note in report.notes]
    output.finish(code, {"notes": output.cli_notes(notes), "files": [leaf_dict(leaf) for leaf in leaves]})
