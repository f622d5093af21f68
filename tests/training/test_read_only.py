"""CheckpointManager(read_only=True): an evaluator that follows a directory another process writes.

The reader takes no lock and changes nothing on disk (checked by a snapshot of every entry, since
tests may run as root, where chmod stops nothing), ignores what a crashed writer left behind, and
never returns a partial state: not while a real writer is saving and being SIGKILLed, and not when
a checkpoint is pruned while it is being read.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # the writer processes save torch states

from safeckpt import CheckpointManager  # noqa: E402
from safeckpt.errors import CheckpointError, CheckpointNotFoundError, IntegrityError  # noqa: E402
from safeckpt.format.checkpoint_storage import LocalStorage  # noqa: E402

from tests.files import flip_byte  # noqa: E402
from tests.training import fault_child as fc  # noqa: E402

# Kills of the writer while this process reads; each cycle lasts about a tenth of a second.
WRITER_KILLS = 24
# Small states: a save takes milliseconds, so commits and prunes come thick and fast.
WRITER_STATE_MB = 0.25
LEFTOVER_TEMP = ".tmp-step-00000004-0123456789ab"  # a save of step 4 that crashed before its rename
PARTIAL = "step-00000009"  # a step directory without a manifest (an object-store crash, a copy cut short)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root`, and `root` itself: kind, size, permissions, inode, mtime and ctime."""
    entries = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        entries[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), info.st_size, stat.S_IMODE(info.st_mode),
                                                info.st_ino, info.st_mtime_ns, info.st_ctime_ns)
    return entries


def with_leftovers(directory: Path) -> None:
    """Steps 1-3 committed (metric "loss" = 1/step), plus what crashed writers and people leave."""
    fc.seed_checkpoints(directory, [1, 2, 3])
    temp = directory / LEFTOVER_TEMP
    shutil.copytree(directory / "step-00000003", temp)
    (temp / "manifest.json").unlink()
    (directory / PARTIAL).mkdir()
    (directory / PARTIAL / "tensors.safetensors").write_bytes(b"cut short")
    (directory / "notes.txt").write_text("not ours")


def read_everything(directory: Path) -> list[int]:
    """What an evaluator does, every way: list, restore each step, latest and best, verified and not."""
    with CheckpointManager(directory, read_only=True, monitor="loss") as reader:
        steps = [info.step for info in reader.list()]
        for step in steps:
            assert fc.state_problems(reader.restore(step), step) == []
        assert fc.state_problems(reader.restore("latest", verify=False), steps[-1]) == []
        assert reader.restore("best")["step"] == steps[-1]  # loss is 1/step
        assert reader.verify().ok
    return steps


# --- what it reads ---------------------------------------------------------------------

def test_read_only_lists_and_restores_while_the_writer_keeps_its_lock(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=2) as writer:
        writer.save(1, fc.make_state(1))
        with CheckpointManager(tmp_path, read_only=True) as reader:
            assert [info.step for info in reader.list()] == [1]
            for step in (2, 3):
                writer.save(step, fc.make_state(step))
            # list() reads the directory afresh: the new steps are there, the pruned one is gone.
            assert [info.step for info in reader.list()] == [2, 3]
            assert fc.state_problems(reader.restore("latest"), 3) == []
            assert fc.state_problems(reader.restore(2), 2) == []
        writer.save(4, fc.make_state(4))  # the writer never noticed the reader
    assert fc.intact_problems(tmp_path, [3, 4]) == []


def test_a_writer_opens_a_directory_a_reader_already_follows(tmp_path: Path) -> None:
    fc.seed_checkpoints(tmp_path, [1])
    with CheckpointManager(tmp_path, read_only=True) as reader, CheckpointManager(tmp_path) as writer:
        writer.save(2, fc.make_state(2))
        assert [info.step for info in reader.list()] == [1, 2]


def test_save_on_a_read_only_manager_raises(tmp_path: Path) -> None:
    fc.seed_checkpoints(tmp_path, [1])
    before = snapshot(tmp_path)
    with CheckpointManager(tmp_path, read_only=True, every_n_steps=10) as reader:
        with pytest.raises(CheckpointError, match="read-only") as info:
            reader.save(10, fc.make_state(10), force=True)
        reader.wait()
    assert str(tmp_path) in str(info.value)
    assert snapshot(tmp_path) == before


def test_best_ranks_by_the_metric_the_writer_recorded(tmp_path: Path) -> None:
    accuracy = {1: 0.5, 2: 0.9, 3: 0.7}
    with CheckpointManager(tmp_path, keep_last=None, monitor="acc", mode="max") as writer:
        for step, acc in accuracy.items():
            writer.save(step, fc.make_state(step), metrics={"acc": acc, "loss": 1.0 / step})
    with CheckpointManager(tmp_path, read_only=True) as reader:
        assert reader.restore("best")["step"] == 2
    with CheckpointManager(tmp_path, read_only=True, monitor="loss", mode="min") as reader:
        assert reader.restore("best")["step"] == 3
    unranked = tmp_path / "unranked"
    fc.seed_checkpoints(unranked, [1])
    with CheckpointManager(unranked, read_only=True) as reader, pytest.raises(CheckpointError, match="monitor="):
        reader.restore("best")


def test_restore_still_checks_hashes(tmp_path: Path) -> None:
    fc.seed_checkpoints(tmp_path, [1, 2])
    flip_byte(tmp_path / "step-00000002" / "tensors.safetensors", -1)
    with CheckpointManager(tmp_path, read_only=True) as reader:
        with pytest.raises(IntegrityError, match="momentum"):
            reader.restore("latest")  # damage is not a vanished checkpoint: no fallback to step 1
        assert fc.state_problems(reader.restore("latest", verify=False), 2) != []
        assert [(check.step, check.ok) for check in reader.verify().checkpoints] == [(1, True), (2, False)]


# --- what it never does ------------------------------------------------------------------

def test_read_only_never_writes(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    with_leftovers(directory)
    # A write would fail here, except as root (where tests may run): the snapshot is the check.
    directories = [directory, *(p for p in directory.rglob("*") if p.is_dir())]
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(0o444)
    for path in directories:
        path.chmod(0o555)
    before, beside = snapshot(directory), sorted(os.listdir(tmp_path))
    try:
        assert read_everything(directory) == [1, 2, 3]
        after = snapshot(directory)
    finally:
        for path in directories:
            path.chmod(0o755)
    assert after == before
    assert sorted(os.listdir(tmp_path)) == beside


def test_a_missing_directory_lists_empty_and_is_not_created(tmp_path: Path) -> None:
    directory = tmp_path / "not-yet"
    with CheckpointManager(directory, read_only=True) as reader:
        assert reader.list() == []
        with pytest.raises(CheckpointNotFoundError, match="check the path, or wait") as info:
            reader.restore("latest")
        assert str(directory) in str(info.value)
        assert reader.verify().checkpoints == []
        assert not directory.exists()
        fc.seed_checkpoints(directory, [5])  # the training run starts after its evaluator
        assert [info.step for info in reader.list()] == [5]
        assert fc.state_problems(reader.restore("latest"), 5) == []


def test_a_file_where_the_directory_should_be_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    path.write_text("a file")
    with pytest.raises(CheckpointError, match="not a directory") as info:
        CheckpointManager(path, read_only=True)
    assert str(path) in str(info.value)


def test_leftovers_of_a_killed_writer_are_ignored_and_kept(tmp_path: Path, paused_writer) -> None:
    directory = tmp_path / "ckpt"
    _, holder = paused_writer(directory)  # inside save(2): its temporary exists, the lock is held
    with CheckpointManager(directory, read_only=True) as reader:
        assert [info.step for info in reader.list()] == [1]
        assert fc.state_problems(reader.restore("latest"), 1) == []
    holder.kill()
    holder.join()
    leftovers = fc.stray_entries(directory)
    assert leftovers and all(name.startswith(".tmp-step-00000002-") for name in leftovers)
    (directory / PARTIAL).mkdir()
    (directory / PARTIAL / "tensors.safetensors").write_bytes(b"cut short")
    before = snapshot(directory)
    with CheckpointManager(directory, read_only=True) as reader:
        assert [info.step for info in reader.list()] == [1]
        assert fc.state_problems(reader.restore("latest"), 1) == []
        assert [check.step for check in reader.verify().checkpoints] == [1]
    assert snapshot(directory) == before
    shutil.rmtree(directory / PARTIAL)
    assert fc.intact_problems(directory, [1]) == []  # the next writer cleans its own temporary


def test_read_only_on_an_object_store_creates_nothing(tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    run = f"/read-only-{os.getpid()}"
    partial = f"{run}/{PARTIAL}/tensors.safetensors"  # data without a manifest: a save cut short
    try:
        with CheckpointManager(f"memory:/{run}", read_only=True) as reader:
            assert reader.list() == []
            assert not memory.exists(run)
            with CheckpointManager(f"memory:/{run}", keep_last=2) as writer:
                for step in (1, 2, 3):
                    writer.save(step, {"w": np.full(4, step)})
            memory.pipe(partial, b"cut short")
            assert [info.step for info in reader.list()] == [2, 3]
            assert reader.restore("latest")["w"].tolist() == [3] * 4
        assert memory.exists(partial)
    finally:
        memory.rm(run, recursive=True)


# --- a checkpoint pruned while it is being read ---------------------------------------------

@pytest.fixture
def prune_while_reading(monkeypatch):
    """prune_while_reading(action, times=1, reading="read_array"): run `action(path)` on a checkpoint
    just before its file is opened by that LocalStorage method (restore reads tensors with read_array,
    verify maps files with mapped), the first `times` times: the moment a writer's prune hurts most."""

    def install(action, times: int = 1, reading: str = "read_array"):
        real = getattr(LocalStorage, reading)
        left = [times]

        def read_then(storage, *parts):
            if left[0] > 0:
                left[0] -= 1
                action(storage.path(parts[0]))
            return real(storage, *parts)

        monkeypatch.setattr(LocalStorage, reading, read_then)

    return install


def test_latest_pruned_mid_read_restores_the_newer_one(tmp_path: Path, prune_while_reading) -> None:
    with CheckpointManager(tmp_path, keep_last=1) as writer, CheckpointManager(tmp_path, read_only=True) as reader:
        writer.save(1, fc.make_state(1))
        prune_while_reading(lambda path: writer.save(2, fc.make_state(2)))  # commits 2, prunes 1
        assert fc.state_problems(reader.restore("latest"), 2) == []
        assert not (tmp_path / "step-00000001").exists()


def test_latest_deleted_mid_read_falls_back_to_the_next_newest(tmp_path: Path, prune_while_reading) -> None:
    fc.seed_checkpoints(tmp_path, [1, 2, 3])
    prune_while_reading(shutil.rmtree)  # someone deletes step 3 by hand
    with CheckpointManager(tmp_path, read_only=True) as reader:
        assert fc.state_problems(reader.restore("latest"), 2) == []


def test_a_step_pruned_mid_read_is_not_found(tmp_path: Path, prune_while_reading) -> None:
    with CheckpointManager(tmp_path, keep_last=1) as writer, CheckpointManager(tmp_path, read_only=True) as reader:
        writer.save(1, fc.make_state(1))
        prune_while_reading(lambda path: writer.save(2, fc.make_state(2)))
        with pytest.raises(CheckpointNotFoundError, match="deleted while it was being read") as info:
            reader.restore(1)
        assert "step-00000001" in str(info.value)


def test_a_writer_pruning_faster_than_the_reader_reads_is_a_bounded_error(tmp_path: Path,
                                                                          prune_while_reading) -> None:
    with CheckpointManager(tmp_path, keep_last=1) as writer, CheckpointManager(tmp_path, read_only=True) as reader:
        writer.save(1, fc.make_state(1))
        steps = iter(range(2, 100))
        prune_while_reading(lambda path: writer.save(next(steps), fc.make_state(1)), times=99)
        with pytest.raises(CheckpointError, match="raise its keep_last"):
            reader.restore("latest")
        assert next(steps) < 10  # it gave up after a few tries


def test_verify_leaves_out_a_checkpoint_pruned_while_it_is_checked(tmp_path: Path, prune_while_reading) -> None:
    with CheckpointManager(tmp_path, keep_last=2) as writer, CheckpointManager(tmp_path, read_only=True) as reader:
        for step in (1, 2):
            writer.save(step, fc.make_state(step))
        prune_while_reading(lambda path: writer.save(3, fc.make_state(3)), reading="mapped")  # prunes 1
        report = reader.verify()
        assert report.ok, report.failures
        assert [check.step for check in report.checkpoints] == [2]


# --- a real writer, killed again and again ------------------------------------------------

@pytest.mark.slow
def test_a_reader_never_sees_a_partial_checkpoint_of_a_writer_killed_again_and_again(tmp_path: Path) -> None:
    """A child saves step after step (pruning to 3) and is SIGKILLed at random moments, then restarts
    from latest; meanwhile this process lists and restores latest and the oldest step, again and again.
    Every state restored must be one the child saved, whole: every value equal to its step."""
    directory = tmp_path / "ckpt"
    writer_problems: list[str] = []
    writer = threading.Thread(target=lambda: writer_problems.extend(fc.kill_writer_repeatedly(
        directory, tmp_path, WRITER_KILLS, random.Random(12), WRITER_STATE_MB)))
    problems, latest_seen, rounds, vanished, temporaries_seen = [], 0, 0, 0, 0
    rng = random.Random(34)
    reader = CheckpointManager(directory, read_only=True)
    writer.start()
    try:
        while writer.is_alive() and len(problems) < 10:
            infos = reader.list()
            steps = [info.step for info in infos]
            temporaries_seen += bool(fc.stray_entries(directory))
            if steps != sorted(set(steps)):
                problems.append(f"list() steps are not strictly increasing: {steps}")
            if not infos:
                continue
            # Latest never goes back: the writer resumes from it, and pruning keeps the newest.
            newest = max(latest_seen, steps[-1])
            latest = reader.restore("latest", verify=rng.random() < 0.8)
            latest_seen = latest["step"]
            problems += [f"latest (step {latest_seen}): {p}" for p in fc.state_problems(latest, latest_seen)]
            if latest_seen < newest:
                problems.append(f"latest went back to step {latest_seen} after step {newest}")
            oldest = infos[0].step  # the one the writer prunes next
            try:
                state = reader.restore(oldest)
            except CheckpointNotFoundError:
                vanished += 1
            else:
                problems += [f"step {oldest}: {p}" for p in fc.state_problems(state, oldest)]
            rounds += 1
    finally:
        writer.join()
        reader.close()

    assert writer_problems == [], writer_problems
    assert problems == [], "\n".join(problems)
    # The reader did race the writer: many rounds, saves in flight seen, steps moving on.
    assert rounds >= 50, rounds
    assert temporaries_seen >= 1
    assert latest_seen >= 2 * fc.KEEP_LAST, latest_seen  # so some steps were pruned while it read
    assert rounds - vanished >= 1
    assert fc.intact_problems(directory) == []
    assert latest_seen <= fc.latest_step(directory)
