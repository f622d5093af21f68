"""Stress CheckpointManager with the faults of tests/training/test_faults.py, at scale.

    python scripts/stress_checkpoints.py --iterations 500 [--async] [--flips 2000] [--seed 0]

Runs, on fresh directories: `--iterations` SIGKILLs of a child saving in a loop (each checked by
a new manager: last committed step intact, nothing partial listed), `--flips` single-byte flips of
committed files (each must be caught by verify() and restore()), and `--iterations // 10` saves
cut by ENOSPC at random byte counts. Prints a summary; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "training"))

import fault_child as fc  # noqa: E402

# Failures printed in full; the rest are counted.
SHOWN_FAILURES = 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=100, help="SIGKILLs of the saving child")
    parser.add_argument("--async", dest="async_save", action="store_true", help="the child saves with async_save=True")
    parser.add_argument("--flips", type=int, default=None, help="single-byte flips (default: max(300, iterations))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--megabytes", type=float, default=fc.CRASH_STATE_MB, help="size of each crash-loop state")
    parser.add_argument("--kill-delay", type=float, default=fc.KILL_DELAY_MAX_S,
                        help="largest delay, in seconds, between the child saving and its kill")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a fresh temporary one)")
    args = parser.parse_args(argv)
    flips = args.flips if args.flips is not None else max(300, args.iterations)
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="stress-ckpt-") as work:
        work = Path(work)
        failures: list[str] = []
        mode = "async" if args.async_save else "sync"

        started = time.monotonic()
        crash = fc.crash_loop(work / "crash", work, args.iterations, args.async_save, rng,
                              megabytes=args.megabytes, kill_delay_max=args.kill_delay, on_kill=_progress)
        print(file=sys.stderr)
        failures += [f"crash: {p}" for p in crash.problems]
        if crash.kills and not crash.mid_write:
            failures.append("crash: no kill landed inside a write; raise --megabytes or --kill-delay")
        print(f"crash ({mode}): {crash.kills} kills, {crash.mid_write} cut a write, {crash.saves_seen} saves "
              f"returned, reached step {crash.final_step}, {len(crash.problems)} problems "
              f"({time.monotonic() - started:.1f} s)")

        started = time.monotonic()
        flip_dir = work / "flips"
        fc.seed_checkpoints(flip_dir, [1, 2])
        flipped = fc.flip_bytes(flip_dir, flips, rng)
        failures += [f"flip: {p}" for p in flipped.problems]
        print(f"flips: {flipped.flips} over {len(flipped.regions)} regions, "
              f"{len(flipped.problems)} problems ({time.monotonic() - started:.1f} s)")

        started = time.monotonic()
        runs = max(1, args.iterations // 10)
        cost = fc.bytes_per_save(work / "rehearsal", 1.0, args.async_save)
        disk_problems = 0
        for run in range(runs):
            budget = rng.randrange(0, cost - fc.JSON_JITTER_BYTES)
            found = fc.disk_full_problems(work / f"full-{run}", budget, args.async_save, 1.0)
            disk_problems += len(found)
            failures += [f"enospc after {budget} of {cost} bytes: {p}" for p in found]
        print(f"enospc ({mode}): {runs} saves cut at random bytes of {cost}, {disk_problems} problems "
              f"({time.monotonic() - started:.1f} s)")

    for failure in failures[:SHOWN_FAILURES]:
        print("FAIL", failure)
    if len(failures) > SHOWN_FAILURES:
        print(f"... and {len(failures) - SHOWN_FAILURES} more")
    print("OK" if not failures else f"FAILED: {len(failures)} problems")
    return 1 if failures else 0


def _progress(kill: int, report: fc.CrashReport) -> None:
    print(f"\rkill {kill + 1}: step {report.final_step}, {report.mid_write} cut writes", end="", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
