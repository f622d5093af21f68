"""Faults for CheckpointManager: what runs in child processes, and the checks after each fault.

tests/training/test_faults.py runs each fault a few dozen times; scripts/stress_checkpoints.py
runs the same drivers with ``--iterations N``. Every driver returns a list of problems (empty when
the manager behaved), so the test asserts on it and the stress script counts it.

Children are forked by a multiprocessing forkserver that imports torch and safeckpt once: a
kill-and-restart cycle then costs milliseconds instead of a two-second torch import, which is what
lets dozens of SIGKILLs fit in CI.

Every state saved here encodes its step in every value (tensors filled with the step, scalars equal
to it, a string naming it), so one number tells whether a restored state is the right one and whole.
"""

from __future__ import annotations

import builtins
import errno
import io
import multiprocessing
import os
import random
import resource
import signal
import stat
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import _io
import numpy as np
import torch

from safeckpt import CheckpointManager
from safeckpt.errors import SafeckptError
from safeckpt.frameworks import to_numpy

# A crash-loop state of a few MB makes a save take milliseconds, so random kills land inside writes.
CRASH_STATE_MB = 4.0
# Small states for faults that do not need long writes (flips, locks): hashing stays fast.
SMALL_STATE_MB = 1 / 16
# A kill lands up to this long after the child is saving; several saves fit in it.
KILL_DELAY_MAX_S = 0.25
# Every 4th kill lands right after the fork instead: while the child opens the directory
# (cleaning temporaries, taking the lock) or restores.
EARLY_KILL_EVERY = 4
EARLY_KILL_MAX_S = 0.05
# A child that has not answered by then is stuck (a deadlock is a failure, not a wait).
CHILD_TIMEOUT_S = 60.0
KEEP_LAST = 3
# Two saves of the same state differ in size by a few bytes (the time and its digits in the JSON
# files): an ENOSPC budget this far below a rehearsal's byte count is sure to cut the save.
JSON_JITTER_BYTES = 64
LOCK_NAME = ".safeckpt.lock"
STEP_PREFIX = "step-"


# --- the state ----------------------------------------------------------------

def make_state(step: int, megabytes: float = SMALL_STATE_MB) -> dict:
    """A training-like state whose every value is `step`: torch and numpy tensors, scalars, strings.

    >>> make_state(3)["model"]["weight"][0].item()
    3.0
    """
    size = max(1, int(megabytes * 2**20) // 8)  # two float32 tensors carry the bulk
    return {
        "model": {"weight": torch.full((size,), float(step)),
                  "bias": torch.full((8,), step, dtype=torch.int64)},
        "optimizer": {"momentum": np.full((size,), step, dtype=np.float32),
                      "lr": 0.5, "count": [step, {"again": step}]},
        "step": step,
        "size": size,
        "tag": f"step {step}",
        "nothing": None,
    }


def state_problems(state, step: int) -> list[str]:
    """What differs between a restored state and `make_state(step, ...)` (empty: all of it is right)."""
    problems = []
    try:
        size = state["size"]
        tensors = {"model.weight": (state["model"]["weight"], np.float32, size),
                   "model.bias": (state["model"]["bias"], np.int64, 8),
                   "optimizer.momentum": (state["optimizer"]["momentum"], np.float32, size)}
        for name, (value, dtype, count) in tensors.items():
            array = np.asarray(to_numpy(value))
            if array.dtype != dtype or array.shape != (count,):
                problems.append(f"{name} is {array.dtype}{list(array.shape)}, saved as {np.dtype(dtype)}[{count}]")
            elif not np.all(array == step):
                problems.append(f"{name} holds {np.unique(array)[:4].tolist()} instead of {step}")
        scalars = {"step": (state["step"], step), "tag": (state["tag"], f"step {step}"),
                   "nothing": (state["nothing"], None), "optimizer.lr": (state["optimizer"]["lr"], 0.5),
                   "optimizer.count": (list(state["optimizer"]["count"]), [step, {"again": step}])}
        for name, (got, want) in scalars.items():
            if got != want or type(got) is not type(want):
                problems.append(f"{name} is {got!r}, saved as {want!r}")
    except Exception as exc:  # noqa: BLE001 - any way a state can be wrong is reported, not raised
        problems.append(f"the restored state lost its structure: {exc!r}")
    return problems


# --- the directory ---------------------------------------------------------------

def stray_entries(directory: Path) -> list[str]:
    """Entries that are neither a committed step directory nor the lock: temporaries of a cut write."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith(STEP_PREFIX) and p.name != LOCK_NAME)


def step_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(STEP_PREFIX))


def intact_problems(directory: Path, steps: Optional[list[int]] = None) -> list[str]:
    """Open a new manager on `directory` and check what a resumed run would see.

    Temporaries are gone, `list()` shows increasing steps (exactly `steps` when given), every step
    directory on disk is listed (none is half written or half deleted), every listed checkpoint
    restores with its hashes verified and its values equal to its step, and "latest" is the last one.
    """
    problems = []
    try:
        with CheckpointManager(directory, keep_last=KEEP_LAST) as mgr:
            stray = stray_entries(directory)
            if stray:
                problems.append(f"temporaries left after a new manager started: {stray}")
            infos = mgr.list()
            listed = [info.step for info in infos]
            if listed != sorted(set(listed)):
                problems.append(f"list() steps are not strictly increasing: {listed}")
            if steps is not None and listed != steps:
                problems.append(f"list() shows steps {listed}, expected {steps}")
            names = sorted(Path(info.path).name for info in infos)
            if step_dirs(directory) != names:
                problems.append(f"step directories on disk {step_dirs(directory)} but list() shows {names}: "
                                "a partial checkpoint is left behind")
            for info in infos:
                problems += [f"step {info.step}: {p}" for p in _restore_problems(mgr, info.step, info.step)]
            if infos:
                problems += [f"latest: {p}" for p in _restore_problems(mgr, "latest", infos[-1].step)]
    except SafeckptError as exc:
        problems.append(f"a new manager on the directory failed: {exc}")
    return problems


def _restore_problems(mgr, which, step: int) -> list[str]:
    try:
        state = mgr.restore(which, verify=True)
    except SafeckptError as exc:
        return [f"restore({which!r}) failed: {exc}"]
    return state_problems(state, step)


def latest_step(directory: Path) -> int:
    with CheckpointManager(directory, keep_last=KEEP_LAST) as mgr:
        infos = mgr.list()
    return infos[-1].step if infos else 0


def seed_checkpoints(directory: Path, steps: list[int], megabytes: float = SMALL_STATE_MB) -> None:
    """Commit small checkpoints for `steps`, with a metric, so a fault has something to lose."""
    with CheckpointManager(directory, keep_last=KEEP_LAST) as mgr:
        for step in steps:
            mgr.save(step, make_state(step, megabytes), metrics={"loss": 1.0 / step}, force=True)


def message_problems(exc: BaseException, directory: Path, causes: tuple[str, ...]) -> list[str]:
    """An error about a failed save must be ours and say where and why."""
    problems = []
    message = str(exc)
    if not isinstance(exc, SafeckptError):
        problems.append(f"raised a raw {type(exc).__name__}, not a SafeckptError: {message}")
    if str(directory) not in message:
        problems.append(f"the message does not name the checkpoint's path ({directory}): {message!r}")
    if not any(cause in message for cause in causes):
        problems.append(f"the message does not give the cause (any of {causes}): {message!r}")
    return problems


# --- child processes ----------------------------------------------------------------

def context() -> multiprocessing.context.BaseContext:
    """A forkserver that has imported torch and safeckpt: each child starts in milliseconds."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["numpy", "torch", "safeckpt", __name__])
    return ctx


def save_loop_child(directory: str, progress: str, async_save: bool, megabytes: float) -> None:
    """Child: resume from "latest" like a restarted run, then save step after step until killed.

    Lines in `progress` (one write each, so a kill never cuts one): "ready N" once N is restored,
    "saved N" after each `save()` returns, "error ..." if anything goes wrong.
    """
    fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with CheckpointManager(directory, keep_last=KEEP_LAST, async_save=async_save) as mgr:
            step = 0
            if mgr.list():
                state = mgr.restore("latest")
                step = state["step"]
                problems = state_problems(state, step)
                if problems:
                    raise AssertionError(f"resumed from a bad checkpoint: {problems}")
            os.write(fd, f"ready {step}\n".encode())
            while True:
                step += 1
                if not mgr.save(step, make_state(step, megabytes)):
                    raise AssertionError(f"save({step}) skipped the step though no policy was set")
                os.write(fd, f"saved {step}\n".encode())
    except BaseException:
        os.write(fd, ("error " + traceback.format_exc().replace("\n", " | ") + "\n").encode())
        raise


def efbig_child(conn, directory: str, limit: int, async_save: bool, megabytes: float) -> None:
    """Child: under RLIMIT_FSIZE (SIGXFSZ ignored, so writes fail with EFBIG) save 1, 2, then a state too big."""
    try:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        with CheckpointManager(directory, keep_last=KEEP_LAST, async_save=async_save) as mgr:
            for step in (1, 2):
                mgr.save(step, make_state(step), force=True)
            mgr.wait()
            outcome = {"raised": None, "message": ""}
            try:
                mgr.save(3, make_state(3, megabytes), force=True)
                mgr.wait()
            except BaseException as exc:
                outcome = _outcome(exc)
            outcome["listed"] = [info.step for info in mgr.list()]
        conn.send(outcome)
    except BaseException as exc:
        conn.send({"child_failed": traceback.format_exc(), **_outcome(exc)})


def hold_child(conn, directory: str) -> None:
    """Child: own the directory, save 1, then stop inside save(2) at its first fsync until told "go".

    While it waits, a temporary of step 2 exists and the lock is held: a second manager must neither
    open the directory nor touch that temporary.
    """
    real_fsync = os.fsync
    paused = threading.Event()

    def fsync_then_wait(fd: int) -> None:
        if not paused.is_set():
            paused.set()
            conn.send("paused")
            if conn.recv() != "go":
                os._exit(4)
        real_fsync(fd)

    try:
        with CheckpointManager(directory, keep_last=KEEP_LAST) as mgr:
            mgr.save(1, make_state(1), force=True)
            conn.send("saved 1")
            os.fsync = fsync_then_wait
            try:
                mgr.save(2, make_state(2), force=True)
            finally:
                os.fsync = real_fsync
            conn.send("saved 2" if paused.is_set() else "saved 2 without an fsync")
            conn.recv()  # "close"
        conn.send("closed")
    except BaseException:
        conn.send("error " + traceback.format_exc())


def open_child(conn, directory: str, start=None, step: int = 0, hold_s: float = 0.0) -> None:
    """Child: open a manager on `directory` (after `start` is set), save `step`, hold it `hold_s` seconds."""
    if start is not None:
        start.wait(CHILD_TIMEOUT_S)
    try:
        with CheckpointManager(directory, keep_last=KEEP_LAST) as mgr:
            if step:
                mgr.save(step, make_state(step), force=True)
            time.sleep(hold_s)
        conn.send({"raised": None, "message": ""})
    except BaseException as exc:
        conn.send(_outcome(exc))


def _outcome(exc: BaseException) -> dict:
    return {"raised": type(exc).__name__, "message": str(exc), "safeckpt": isinstance(exc, SafeckptError),
            "classes": [cls.__name__ for cls in type(exc).__mro__]}


def receive(conn, child, timeout: float = CHILD_TIMEOUT_S):
    """The child's next message, or AssertionError if it died or hung."""
    if not conn.poll(timeout):
        raise AssertionError(f"child {child.pid} sent nothing in {timeout} s (exit code {child.exitcode})")
    return conn.recv()


# --- crash: SIGKILL at random moments ---------------------------------------------------

@dataclass
class CrashReport:
    kills: int = 0
    mid_write: int = 0       # kills that left a temporary behind: they cut a write
    final_step: int = 0
    saves_seen: int = 0
    problems: list[str] = field(default_factory=list)


def crash_loop(directory: Path, scratch: Path, kills: int, async_save: bool, rng: random.Random,
               megabytes: float = CRASH_STATE_MB, kill_delay_max: float = KILL_DELAY_MAX_S,
               on_kill=None) -> CrashReport:
    """Start a saving child on `directory`, SIGKILL it at a random moment, check, and again, `kills` times.

    After each kill a new manager must see the last committed step intact and nothing partial:
    the latest step is at least the last one the child saw committed (for async saves, the one
    before the last `save()` that returned) and at most one past it, and never goes backwards.
    """
    ctx = context()
    report = CrashReport()
    previous = latest_step(directory) if directory.exists() else 0
    for kill in range(kills):
        progress = scratch / f"progress-{kill}.txt"
        child = ctx.Process(target=save_loop_child, daemon=True,
                            args=(str(directory), str(progress), async_save, megabytes))
        child.start()
        if kill % EARLY_KILL_EVERY == EARLY_KILL_EVERY - 1:
            time.sleep(rng.uniform(0, EARLY_KILL_MAX_S))
        else:
            if not _wait_for_line(progress, "ready", child):
                report.problems.append(f"kill {kill}: the child never got ready: {_read_lines(progress)}")
                child.kill()
                child.join()
                break
            time.sleep(rng.uniform(0, kill_delay_max))
        child.kill()
        child.join()
        report.kills += 1
        lines = _read_lines(progress)
        progress.unlink(missing_ok=True)
        errors = [line for line in lines if line.startswith("error")]
        if errors or child.exitcode != -signal.SIGKILL:
            report.problems.append(f"kill {kill}: the child failed on its own (exit {child.exitcode}): {errors}")
            break
        ready = [int(line.split()[1]) for line in lines if line.startswith("ready")]
        saved = [int(line.split()[1]) for line in lines if line.startswith("saved")]
        report.saves_seen += len(saved)
        committed = max(ready + [previous])
        if saved:
            committed = max(committed, saved[-1] - 1 if async_save else saved[-1])
        newest_possible = max(ready + saved + [previous]) + 1
        if stray_entries(directory):
            report.mid_write += 1
        problems = intact_problems(directory)
        latest = latest_step(directory) if not problems else previous
        if not problems and latest < committed:
            problems.append(f"latest is step {latest} but step {committed} had been committed")
        if not problems and latest > newest_possible:
            problems.append(f"latest is step {latest}, which the child never saved (it reached {newest_possible - 1})")
        report.problems += [f"kill {kill} ({len(saved)} saves): {p}" for p in problems]
        previous = max(previous, latest)
        report.final_step = previous
        if on_kill is not None:
            on_kill(kill, report)
        if problems:
            break  # the directory is now suspect; later kills would only repeat the news
    return report


def kill_writer_repeatedly(directory: Path, scratch: Path, kills: int, rng: random.Random,
                           megabytes: float = SMALL_STATE_MB, kill_delay_max: float = KILL_DELAY_MAX_S) -> list[str]:
    """Start a saving child on `directory`, SIGKILL it at a random moment, `kills` times, without
    checking the directory in between: for tests where a reader checks it meanwhile.

    Returns the child's own failures (an error it reported, a start that never got ready).
    """
    ctx = context()
    problems = []
    for kill in range(kills):
        progress = scratch / f"writer-{kill}.txt"
        child = ctx.Process(target=save_loop_child, daemon=True, args=(str(directory), str(progress), False, megabytes))
        child.start()
        if kill % EARLY_KILL_EVERY == EARLY_KILL_EVERY - 1:
            time.sleep(rng.uniform(0, EARLY_KILL_MAX_S))
        elif _wait_for_line(progress, "ready", child):
            time.sleep(rng.uniform(0, kill_delay_max))
        else:
            problems.append(f"kill {kill}: the child never got ready: {_read_lines(progress)}")
        child.kill()
        child.join()
        errors = [line for line in _read_lines(progress) if line.startswith("error")]
        progress.unlink(missing_ok=True)
        if errors or child.exitcode != -signal.SIGKILL:
            problems.append(f"kill {kill}: the child failed on its own (exit {child.exitcode}): {errors}")
        if problems:
            break
    return problems


def _wait_for_line(path: Path, prefix: str, child) -> bool:
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(line.startswith(prefix) for line in _read_lines(path)):
            return True
        if not child.is_alive():
            return False
        time.sleep(0.002)
    return False


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


# --- disk full: ENOSPC after N bytes --------------------------------------------------------

class WriteBudget:
    """While active, writes to regular files fail with ENOSPC once `budget` bytes are written.

    With `budget=None` it only counts. It covers the ways Python code puts bytes in a file:
    os.write, os.pwrite, os.writev and file objects from open(), io.open, _io.open and os.fdopen.
    A write that crosses the budget is cut short (as the kernel does) and the next one fails.

    >>> with WriteBudget(None) as counter:
    ...     mgr.save(3, make_state(3, 1.0), force=True)
    >>> counter.written
    1050776
    """

    def __init__(self, budget: Optional[int]) -> None:
        self.budget = budget
        self.written = 0
        self.failures = 0
        self._lock = threading.Lock()
        self._saved: list = []

    def allow(self, wanted: int) -> int:
        """How many of `wanted` bytes may be written; raises ENOSPC when none may."""
        with self._lock:
            room = wanted if self.budget is None else self.budget - self.written
            if room <= 0 and wanted > 0:
                self.fail()
            granted = min(wanted, room)
            self.written += granted
            return granted

    def fail(self) -> None:
        self.failures += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self) -> "WriteBudget":
        real_write, real_pwrite, real_open = os.write, os.pwrite, _io.open

        def write(fd, data):
            if not _is_file(fd):
                return real_write(fd, data)
            view = memoryview(data).cast("B")
            return real_write(fd, view[:self.allow(view.nbytes)])

        def pwrite(fd, data, offset):
            view = memoryview(data).cast("B")
            return real_pwrite(fd, view[:self.allow(view.nbytes)], offset)

        def writev(fd, buffers):
            joined = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
            return write(fd, joined)

        def open_(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            return _BudgetFile(handle, self) if any(c in mode for c in "wax+") else handle

        targets = [(os, "write", write), (os, "pwrite", pwrite), (os, "writev", writev),
                   (io, "open", open_), (_io, "open", open_), (builtins, "open", open_)]
        self._saved = [(module, name, getattr(module, name)) for module, name, _ in targets]
        for module, name, replacement in targets:
            setattr(module, name, replacement)
        return self

    def __exit__(self, *exc) -> None:
        for module, name, original in self._saved:
            setattr(module, name, original)


def _is_file(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


class _BudgetFile:
    """A file object whose writes draw on a WriteBudget; everything else passes through."""

    def __init__(self, handle, budget: WriteBudget) -> None:
        self._handle = handle
        self._budget = budget

    def write(self, data):
        size = len(data.encode("utf-8")) if isinstance(data, str) else memoryview(data).nbytes
        if self._budget.allow(size) < size:  # buffered files write all or raise
            self._budget.fail()
        return self._handle.write(data)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __iter__(self):
        return iter(self._handle)

    def __getattr__(self, name):
        return getattr(self._handle, name)


def bytes_per_save(directory: Path, megabytes: float, async_save: bool) -> int:
    """How many bytes saving step 3 after steps 1 and 2 writes (a rehearsal in `directory`)."""
    seed_checkpoints(directory, [1, 2])
    with CheckpointManager(directory, keep_last=KEEP_LAST, async_save=async_save) as mgr:
        with WriteBudget(None) as counter:
            mgr.save(3, make_state(3, megabytes), force=True)
            mgr.wait()
    committed = sum(p.stat().st_size for p in (directory / step_dirs(directory)[-1]).rglob("*") if p.is_file())
    if counter.written < committed:
        raise AssertionError(f"WriteBudget saw {counter.written} bytes written but step 3 holds {committed}: "
                             "the manager writes through a path WriteBudget does not cover")
    return counter.written


def disk_full_problems(directory: Path, budget: int, async_save: bool, megabytes: float) -> list[str]:
    """Steps 1 and 2 committed, then save(3) with ENOSPC after `budget` bytes: check the error and the aftermath."""
    seed_checkpoints(directory, [1, 2])
    problems = []
    with CheckpointManager(directory, keep_last=KEEP_LAST, async_save=async_save) as mgr:
        with WriteBudget(budget) as limit:
            try:
                mgr.save(3, make_state(3, megabytes), force=True)
                mgr.wait()
            except Exception as exc:  # noqa: BLE001 - a raw exception is itself a finding
                problems += message_problems(exc, directory, (os.strerror(errno.ENOSPC), "ENOSPC"))
            else:
                problems.append(f"save(3) succeeded though {limit.failures} writes failed with ENOSPC")
        if limit.failures == 0:
            problems.append(f"no write failed: budget {budget} exceeds what save(3) writes")
        listed = [info.step for info in mgr.list()]
        if listed != [1, 2]:
            problems.append(f"after the failed save list() shows {listed}, expected [1, 2]")
        problems += intact_after_failure(directory)
        # The disk has room again: the same manager saves step 3.
        try:
            mgr.save(3, make_state(3, megabytes), force=True)
            mgr.wait()
        except SafeckptError as exc:
            problems.append(f"once the disk had room, save(3) still failed: {exc}")
    return problems + intact_problems(directory, [1, 2, 3])


def intact_after_failure(directory: Path) -> list[str]:
    dirs = step_dirs(directory)
    if dirs != [f"{STEP_PREFIX}{1:08d}", f"{STEP_PREFIX}{2:08d}"]:
        return [f"after the failed save the step directories are {dirs}: a partial checkpoint is left behind"]
    return []


# --- corruption: single flipped bytes ---------------------------------------------------------

@dataclass
class FlipReport:
    flips: int = 0
    regions: dict = field(default_factory=dict)  # "step-.../file (region)" -> flips there
    problems: list[str] = field(default_factory=list)


def flip_targets(directory: Path, count: int, rng: random.Random) -> list[tuple[Path, int, str]]:
    """About `count` (file, offset, region) spread evenly over every committed file.

    A safetensors file counts as two regions, header and data; each region's first and last byte
    is always among the targets.
    """
    regions = []
    for path in sorted(p for p in directory.glob(f"{STEP_PREFIX}*/**/*") if p.is_file()):
        size = path.stat().st_size
        if path.suffix == ".safetensors":
            header_end = 8 + int.from_bytes(path.read_bytes()[:8], "little")
            regions += [(path, 0, header_end, "header"), (path, header_end, size, "data")]
        else:
            regions.append((path, 0, size, "whole"))
    regions = [r for r in regions if r[2] > r[1]]
    per_region = max(2, -(-count // max(1, len(regions))))
    targets = []
    for path, start, end, name in regions:
        inner = range(start + 1, end - 1)
        offsets = {start, end - 1} | set(rng.sample(inner, min(per_region - 2, len(inner))))
        targets += [(path, offset, name) for offset in sorted(offsets)]
    return targets


def flip_bytes(directory: Path, count: int, rng: random.Random) -> FlipReport:
    """Flip one byte at a time (XOR a random non-zero mask), check that it is caught, put it back.

    Caught means: `verify()` reports it (or raises a SafeckptError) and `restore(step, verify=True)`
    raises a SafeckptError. A restore that returns, and any other exception, is a problem.
    """
    report = FlipReport()
    with CheckpointManager(directory, keep_last=KEEP_LAST) as mgr:
        steps = {Path(info.path).name: info.step for info in mgr.list()}
    for path, offset, region in flip_targets(directory, count, rng):
        step = steps[path.relative_to(directory).parts[0]]
        where = f"{path.relative_to(directory)} ({region})"
        with open(path, "r+b") as handle:
            handle.seek(offset)
            original = handle.read(1)[0]
            flipped = original ^ rng.randrange(1, 256)
            handle.seek(offset)
            handle.write(bytes([flipped]))
        try:
            found = flip_problems(directory, step)
        finally:
            with open(path, "r+b") as handle:
                handle.seek(offset)
                handle.write(bytes([original]))
        report.flips += 1
        report.regions[where] = report.regions.get(where, 0) + 1
        report.problems += [f"{where} byte {offset}: {original:#04x} -> {flipped:#04x}: {p}" for p in found]
    report.problems += [f"after the flips were undone: {p}" for p in intact_problems(directory, sorted(steps.values()))]
    return report


def flip_problems(directory: Path, step: int) -> list[str]:
    problems = []
    try:
        mgr = CheckpointManager(directory, keep_last=KEEP_LAST)
    except Exception as exc:  # noqa: BLE001
        return [f"a manager could not even open the directory ({type(exc).__name__}: {exc}); "
                "one bad checkpoint must not lock a run out of the good ones"]
    with mgr:
        try:
            report = mgr.verify()
        except SafeckptError:
            pass
        except Exception as exc:  # noqa: BLE001
            problems.append(f"verify() raised a raw {type(exc).__name__}: {exc}")
        else:
            if verify_passed(report):
                problems.append(f"verify() did not notice: {report!r}"[:400])
        try:
            state = mgr.restore(step, verify=True)
        except SafeckptError:
            pass
        except Exception as exc:  # noqa: BLE001
            problems.append(f"restore({step}) raised a raw {type(exc).__name__}: {exc}")
        else:
            wrong = state_problems(state, step)
            problems.append(f"restore({step}) returned a state" + (f" with wrong values: {wrong}" if wrong else ""))
    return problems


def verify_passed(report) -> bool:
    """Whether a `CheckpointManager.verify()` report says every checkpoint is intact."""
    return bool(report.ok)
