"""The `python -m benchmarks` command: set up files, run every case in its own subprocess, report."""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from . import machine, report
from .cases import CASES
from .child import RESULT_PREFIX
from .statedict import GiB, MiB, human_bytes, model_spec, parse_size, spec_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One repetition, ours next to its peers. Odd repetitions run it backwards.
ORDER = [
    "save.torch.ours", "save.torch.safetensors", "save.torch.torch_save",
    "save.numpy.ours", "save.numpy.safetensors", "save.numpy.savez",
    "load.lazy.ours", "load.lazy.safetensors", "load.lazy.torch_mmap",
    "load.full.ours", "load.full.safetensors", "load.full.torch_mmap", "load.full.torch_nommap",
    "safe_load.lazy.ours", "safe_load.full.ours", "safe_load.full.ours_nommap",
    "load.numpy.ours", "load.numpy.safetensors", "load.numpy.npz",
    "copy.ours", "copy.memcpy",
    "slice.pread_row.ours", "slice.pread_whole.ours",
    "slice.mmap_row.ours", "slice.mmap_whole.ours",
    "slice.mmap_row.safetensors", "slice.mmap_whole.safetensors",
    "list.ours", "list.torch", "scan.ours",
    "header.keys.ours", "header.keys.safetensors", "header.inspect.ours", "header.inspect_json.ours",
    "startup.version.ours", "startup.help.ours", "startup.inspect.ours", "startup.python.interpreter",
    "startup.inspect.safetensors",
    "convert.ours", "convert.ours_nohash", "convert.torch_safetensors",
    "ckpt.save.ours", "ckpt.save.plain_write", "ckpt.save.torch_save", "ckpt.async.ours",
    "ckpt.restore.ours", "ckpt.restore_verify.ours", "ckpt.restore.torch_load",
    "lightning.save.ours", "lightning.save.torch_io", "lightning.load.ours", "lightning.load.torch_io",
    "dcp.save.ours", "dcp.save.dcp", "dcp.load.ours", "dcp.load.dcp",
    "diff.ours", "diff.read", "merge.ours", "merge.io", "verify.ours", "verify.sha256",
]
assert set(ORDER) == set(CASES) - {"setup"}, "every case is run"

QUICK_SIZE = 16 * MiB
CHILD_TIMEOUT_S = 900


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time safeckpt against safetensors, torch.save/torch.load and numpy.savez on a model-like "
                    "state dict, each case in a fresh subprocess, and write the table to BENCHMARKS.md.")
    parser.add_argument("--size", default="1GiB", help="bytes of tensors, e.g. 256MiB, 1GiB, 4GiB (default 1GiB)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions per case; medians are reported (default 5)")
    parser.add_argument("--dir", default=None,
                        help="where to put the files (a fresh folder inside it; default /dev/shm, a tmpfs)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {human_bytes(QUICK_SIZE)}, one repetition, all cases in one subprocess")
    parser.add_argument("--no-write", action="store_true", help="print the table only; leave BENCHMARKS.md alone")
    parser.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"), help="markdown file to write")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a floor fails")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark files")
    parser.add_argument("--no-prime", action="store_true",
                        help="do not touch and free the case's size of memory just before timing it")
    parser.add_argument("--only", default=None, metavar="PATTERNS",
                        help="run only the cases matching these comma-separated globs, e.g. 'save.*,copy.*'")
    args = parser.parse_args(argv)
    try:
        args.size_bytes = QUICK_SIZE if args.quick else parse_size(args.size)
    except ValueError as exc:
        parser.error(str(exc))
    if args.quick:
        args.repeat = 1
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def run_child(cases: List[str], cfg: dict) -> List[dict]:
    """Run cases in one fresh subprocess; their results (raises RuntimeError if it failed)."""
    command = [sys.executable, "-m", "benchmarks.child", json.dumps({**cfg, "cases": cases})]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX) and done.returncode == 0:
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"{', '.join(cases)} exited with status {done.returncode}:\n"
                       f"{done.stderr.strip()[-3000:]}")


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: List[str] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    parent = args.dir or ("/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
                          else tempfile.gettempdir())
    directory = tempfile.mkdtemp(prefix="safeckpt-bench-", dir=parent)
    info = machine.describe(ROOT, parent)
    spec = model_spec(args.size_bytes)
    sizes = spec_bytes(spec)

    need = 6 * sizes["total"] + GiB
    if machine.available_ram() < need:
        log(f"warning: about {human_bytes(need)} of RAM is needed (files in {parent} plus the largest case); "
            f"{human_bytes(machine.available_ram())} is available")
    if not info["directory"].endswith("(tmpfs)"):
        log(f"warning: {parent} is not a tmpfs; files are read once before each read case to warm the page "
            "cache, and safeckpt's fsync makes its saves durable where the peers' are not")

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    cfg = {"dir": directory, "size": args.size_bytes, "tmpfs": info["directory"].endswith("(tmpfs)"),
           "out": os.path.join(directory, "saved.out"),
           "prime": 0 if args.no_prime else sizes["total"] + 64 * MiB}
    results: Dict[str, List[dict]] = {}
    errors: List[str] = []
    started = time.monotonic()
    try:
        log(f"setup: {human_bytes(sizes['total'])} in {len(spec)} tensors, files in {directory}")
        setup = run_child(["setup"], cfg)[0]
        selected = [name for name in ORDER
                    if not args.only or any(fnmatch.fnmatch(name, p) for p in args.only.split(","))]
        for rep in range(args.repeat):
            order = selected if rep % 2 == 0 else selected[::-1]
            batches = [order] if args.quick else [[name] for name in order]
            for batch in batches:
                _remove(cfg["out"])
                try:
                    measured = run_child(batch, cfg)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    errors.append(str(exc))
                    log(f"error: {exc}")
                    continue
                finally:
                    _remove(cfg["out"])
                for result in measured:
                    results.setdefault(result["case"], []).append(result)
                    log(f"[{rep + 1}/{args.repeat}] {result['case']:<28} {result['seconds']:8.3f} s  "
                        f"extra peak RSS {human_bytes(result['peak_extra']):>10}  minor faults {result['faults']}")
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)

    if load_start is not None:
        load_end = os.getloadavg()
        info["load average (1/5/15 min)"] = (f"{'/'.join(f'{x:.2f}' for x in load_start)} at start, "
                                             f"{'/'.join(f'{x:.2f}' for x in load_end)} at end")
    command = "python -m benchmarks" + "".join(" " + shlex.quote(a) for a in argv)
    summary = (f"Model-like state dict: {human_bytes(sizes['total'])} in {len(spec)} tensors "
               f"({human_bytes(sizes['F32'])} fp32, {human_bytes(sizes['BF16'])} bf16); "
               f"{args.repeat} repetition{'s' if args.repeat > 1 else ''}, medians; "
               f"files by safeckpt and safetensors byte-identical: {'yes' if setup['identical_bytes'] else 'NO'}; "
               f"whole run {time.monotonic() - started:.0f} s.")
    notes = []
    if not results.get("save.torch.ours", [{}])[0].get("exact_peak", True):
        notes.append("the OS could not reset the peak RSS: extra peak RSS counts everything since process start")
    if args.quick:
        notes.append("--quick: a smoke run (tiny size, one repetition, all cases in one process); "
                     "its numbers say nothing about performance")
    notes += [f"error: {e.splitlines()[0]}" for e in errors]
    table = report.rows(results)
    notes += report.floor_notes(table)
    print(summary)
    print()
    print(report.comparison_table(table))
    for note in notes:
        print(f"\nnote: {note}")
    if not args.no_write:
        with open(args.output, "w") as out:
            out.write(report.markdown(info, command, summary, table, results, ORDER, notes))
        log(f"wrote {args.output}")
    if errors:
        return 1
    if args.strict and any(r.verdict == "FAIL" for r in table):
        return 1
    return 0
