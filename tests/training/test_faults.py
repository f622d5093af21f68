"""Faults a training checkpoint must survive: kills mid-write, a full disk, flipped bytes, two writers.

Each test provokes a real fault on real files (SIGKILLed child processes, RLIMIT_FSIZE, a tiny
tmpfs, ENOSPC from the write calls, bytes flipped on disk, a second process) and then checks what a
resumed run would see: the last committed step, intact, and nothing partial. The drivers live in
fault_child.py, shared with scripts/stress_checkpoints.py, which runs the same faults at scale; the
fixtures `fault_child` and `paused_writer` (conftest.py) start its children and kill what is left.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the writer processes save torch states

from safeckpt import CheckpointManager  # noqa: E402
from safeckpt.errors import CheckpointError, IntegrityError, LockedError  # noqa: E402

from tests.files import flip_byte  # noqa: E402
from tests.training import fault_child as fc  # noqa: E402

CRASH_KILLS = 30
FLIPS = 300


# --- crash -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigkill_at_random_moments_keeps_the_last_committed_step(tmp_path: Path, async_save: bool) -> None:
    directory = tmp_path / "ckpt"
    report = fc.crash_loop(directory, tmp_path, kills=CRASH_KILLS, async_save=async_save,
                           rng=random.Random(1000 + async_save))

    assert report.problems == [], "\n".join(report.problems)
    assert report.kills == CRASH_KILLS
    # The kills did land inside writes (a temporary was left behind), and the run moved on.
    assert report.mid_write >= 1, report
    assert report.final_step >= CRASH_KILLS // 3, report
    assert fc.latest_step(directory) == report.final_step


# --- disk full and file size limit ---------------------------------------------------

@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_file_size_limit_efbig_fails_the_save_and_keeps_earlier_checkpoints(tmp_path: Path, fault_child,
                                                                             async_save: bool) -> None:
    directory = tmp_path / "ckpt"
    limit = 1 << 20  # the small checkpoints fit, the 4 MB one does not
    parent, child = fault_child(fc.efbig_child, str(directory), limit, async_save, 4.0)
    outcome = fc.receive(parent, child)
    child.join(fc.CHILD_TIMEOUT_S)

    assert "child_failed" not in outcome, outcome.get("child_failed")
    assert child.exitcode == 0
    assert outcome["raised"] is not None, "save(3) beyond RLIMIT_FSIZE succeeded"
    assert outcome["safeckpt"], outcome
    assert "CheckpointError" in outcome["classes"], outcome
    assert str(directory) in outcome["message"]
    assert os.strerror(errno.EFBIG) in outcome["message"] or "EFBIG" in outcome["message"], outcome["message"]
    assert outcome["listed"] == [1, 2]
    assert fc.intact_after_failure(directory) == []
    assert fc.intact_problems(directory, [1, 2]) == []


@pytest.fixture(scope="module")
def write_cost(tmp_path_factory) -> int:
    """Bytes one save(3) of a 1 MB state writes, counted in a rehearsal."""
    return fc.bytes_per_save(tmp_path_factory.mktemp("rehearsal"), 1.0, async_save=False)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("fraction", [0.0, 0.0001, 0.5, 1.0], ids=["first", "header", "middle", "last"])
def test_enospc_at_any_point_of_a_save_fails_it_cleanly(tmp_path: Path, write_cost: int,
                                                       fraction: float, async_save: bool) -> None:
    # "last": inside manifest.json, the last file written (it is far larger than the jitter).
    budget = min(int(write_cost * fraction), write_cost - fc.JSON_JITTER_BYTES)
    problems = fc.disk_full_problems(tmp_path / "ckpt", budget, async_save, 1.0)
    assert problems == [], "\n".join(problems)


def test_enospc_when_writes_fail_from_the_start(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    fc.seed_checkpoints(directory, [1, 2])
    with CheckpointManager(directory) as mgr, fc.WriteBudget(0):
        with pytest.raises(CheckpointError) as info:
            mgr.save(3, fc.make_state(3), force=True)
    assert str(directory) in str(info.value)
    assert os.strerror(errno.ENOSPC) in str(info.value)
    assert fc.intact_problems(directory, [1, 2]) == []


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 2 MB tmpfs: a real filesystem that runs out of space (needs root; skipped otherwise)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the ENOSPC write tests cover the same path")
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:  # no mount program, or it hangs
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_real_enospc_on_a_full_tmpfs(tiny_tmpfs: Path) -> None:
    directory = tiny_tmpfs / "ckpt"
    fc.seed_checkpoints(directory, [1, 2])
    with CheckpointManager(directory) as mgr:
        with pytest.raises(CheckpointError) as info:
            mgr.save(3, fc.make_state(3, 4.0), force=True)
        assert str(directory) in str(info.value)
        assert os.strerror(errno.ENOSPC) in str(info.value)
        assert [i.step for i in mgr.list()] == [1, 2]
    assert fc.intact_after_failure(directory) == []
    assert fc.intact_problems(directory, [1, 2]) == []
    with CheckpointManager(directory) as mgr:  # the space of the failed save is free again
        mgr.save(3, fc.make_state(3), force=True)
    assert fc.intact_problems(directory, [1, 2, 3]) == []


# --- corruption ------------------------------------------------------------------------

def test_every_single_flipped_byte_is_detected(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    fc.seed_checkpoints(directory, [1, 2])
    report = fc.flip_bytes(directory, FLIPS, random.Random(7))

    assert report.problems == [], "\n".join(report.problems[:40])
    assert report.flips >= FLIPS * 0.9
    files = {where.split(" ")[0] for where in report.regions}
    for step in ("step-00000001", "step-00000002"):
        for name in ("tensors.safetensors", "state.json", "manifest.json"):
            assert f"{step}/{name}" in files, sorted(files)
    assert any("(header)" in where for where in report.regions)
    assert any("(data)" in where for where in report.regions)


def test_a_flipped_tensor_byte_names_the_file_and_tensor(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    fc.seed_checkpoints(directory, [1])
    tensors = directory / "step-00000001" / "tensors.safetensors"
    flip_byte(tensors, -1, 0x40)  # the last byte of the data: inside the last tensor written
    with CheckpointManager(directory) as mgr:
        with pytest.raises(IntegrityError) as info:
            mgr.restore(1)
        state = mgr.restore(1, verify=False)  # asked not to check: the damage is visible
    assert "tensors.safetensors" in str(info.value)
    assert "momentum" in str(info.value)  # the last tensor in the file (F32 after I64, then by name)
    assert fc.state_problems(state, 1) != []


# --- concurrency -------------------------------------------------------------------------

def test_a_second_process_gets_lockederror_and_touches_nothing(tmp_path: Path, fault_child,
                                                               paused_writer) -> None:
    directory = tmp_path / "ckpt"
    holder_conn, holder = paused_writer(directory)  # inside save(2), before its commit
    in_flight = fc.stray_entries(directory)
    assert in_flight, "save(2) is in flight but no temporary is visible in the directory"
    before = _tree(directory)

    second_conn, second = fault_child(fc.open_child, str(directory), step=9)
    outcome = fc.receive(second_conn, second)
    second.join(fc.CHILD_TIMEOUT_S)
    assert outcome["raised"] == "LockedError", outcome
    assert str(directory) in outcome["message"]
    with pytest.raises(LockedError) as info:  # and from this process too
        CheckpointManager(directory)
    assert str(directory) in str(info.value)
    assert isinstance(info.value, CheckpointError)
    assert _tree(directory) == before  # the in-flight temporary was left alone

    holder_conn.send("go")
    assert fc.receive(holder_conn, holder) == "saved 2"
    holder_conn.send("close")
    assert fc.receive(holder_conn, holder) == "closed"
    holder.join(fc.CHILD_TIMEOUT_S)
    assert holder.exitcode == 0
    assert fc.intact_problems(directory, [1, 2]) == []
    with CheckpointManager(directory) as mgr:  # after the first exits, a new manager works
        mgr.save(3, fc.make_state(3), force=True)
    assert fc.intact_problems(directory, [1, 2, 3]) == []


def test_a_killed_lock_holder_does_not_lock_out_the_next_run(tmp_path: Path, paused_writer) -> None:
    directory = tmp_path / "ckpt"
    _, holder = paused_writer(directory)
    holder.kill()
    holder.join()
    assert fc.intact_problems(directory, [1]) == []


def test_two_processes_starting_together_one_wins_one_is_refused(tmp_path: Path, fault_child) -> None:
    for round_ in range(3):
        directory = tmp_path / f"ckpt{round_}"
        start = fc.context().Event()
        runs = []
        for step in (1, 2):
            conn, child = fault_child(fc.open_child, str(directory), start, step, 0.5)
            runs.append((step, conn, child))
        start.set()
        outcomes = {step: fc.receive(conn, child) for step, conn, child in runs}
        for _, _, child in runs:
            child.join(fc.CHILD_TIMEOUT_S)
        raised = sorted(str(o["raised"]) for o in outcomes.values())
        assert raised == ["LockedError", "None"], outcomes
        winner = next(step for step, o in outcomes.items() if o["raised"] is None)
        assert fc.intact_problems(directory, [winner]) == []


def _tree(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): (p.stat().st_size if p.is_file() else -1)
            for p in sorted(directory.rglob("*"))}
