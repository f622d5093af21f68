"""CheckpointManager on a local directory: real torch and numpy states, real files, real faults."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safeckpt.errors import (CheckpointError, CheckpointNotFoundError, IntegrityError,  # noqa: E402
                             LockedError, SafeckptError, UnsupportedStateError)
from safeckpt.training.manager import CheckpointManager  # noqa: E402

from tests.files import flip_byte  # noqa: E402
from tests.training.trees import assert_same  # noqa: E402

TENSORS, STATE, MANIFEST = "tensors.safetensors", "state.json", "manifest.json"


def tiny_model() -> "torch.nn.Module":
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))


def train_state(steps: int = 3) -> dict:
    """A model and an Adam optimizer after a few real steps, and some numpy and plain values."""
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    data = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        optimizer.zero_grad()
        model(data).square().mean().backward()
        optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "extra": {
            "bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3) / 3,
            "half": np.linspace(-1, 1, 5).astype(np.float16),
            "mask": np.array([True, False, True]),
            "ids": np.arange(4, dtype=np.uint32),
            "np_bf16": np.ones(3, ml_dtypes.bfloat16),
            "empty": torch.zeros(0, 3),
            "scalar": np.float64(2.5),
        },
        "epoch": 3, "lr": 1e-3, "name": "run-1", "none": None, "pair": (1, "two"),
    }


def numbered(step: int, size: int = 64) -> dict:
    return {"w": torch.full((size,), float(step)), "m": np.full(size, step, np.int64), "step": step}


def committed(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("step-"))


# --- round trips ---------------------------------------------------------------------

def test_a_torch_and_numpy_training_state_comes_back_bit_exact(tmp_path):
    state = train_state()
    with CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.save(3, state, metrics={"loss": 0.5})
        restored = mgr.restore("latest")
        again = mgr.restore(3, verify=False)
    assert_same(restored, state)
    assert_same(again, state)
    model = tiny_model()
    model.load_state_dict(restored["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    optimizer.load_state_dict(restored["optimizer"])
    assert optimizer.state_dict()["state"][0]["step"] == state["optimizer"]["state"][0]["step"]


def test_the_files_are_plain_safetensors_and_json(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    state = train_state()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1200, state, metrics={"loss": 0.25})
    directory = tmp_path / "step-00001200"
    assert sorted(p.name for p in directory.iterdir()) == [MANIFEST, STATE, TENSORS]
    tensors = safetensors_numpy.load_file(directory / TENSORS)  # the stock library reads it
    np.testing.assert_array_equal(tensors["model/0.weight"], state["model"]["0.weight"].numpy())
    document = json.loads((directory / STATE).read_text())
    assert document["step"] == 1200 and document["metrics"] == {"loss": 0.25}
    assert document["state"]["tree"]["epoch"] == 3
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["step"] == 1200
    assert manifest["files"][TENSORS]["size"] == (directory / TENSORS).stat().st_size
    assert set(manifest["files"][TENSORS]["tensors"]) == set(tensors)
    assert "torch" in manifest["versions"] and "numpy" in manifest["versions"]


def test_a_state_with_something_that_is_not_data_is_refused_before_anything_is_written(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(UnsupportedStateError):
            mgr.save(1, {"model": {"w": torch.ones(2)}, "hook": lambda: None})
        assert mgr.list() == []
    assert committed(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == [".safeckpt.lock"]


# --- listing --------------------------------------------------------------------------

def test_list_and_latest_order_by_step_not_by_name(tmp_path):
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        for step in (100, 9, 1000, 10):
            mgr.save(step, numbered(step))
        assert [info.step for info in mgr.list()] == [9, 10, 100, 1000]
        assert mgr.restore("latest")["step"] == 1000
    # Even with names that do not sort (unpadded), the manifest's step decides.
    os.rename(tmp_path / "step-00000009", tmp_path / "step-9")
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        infos = mgr.list()
        assert [info.step for info in infos] == [9, 10, 100, 1000]
        assert Path(infos[0].path).name == "step-9"
        assert infos[-1].size == sum(p.stat().st_size for p in (tmp_path / "step-00001000").iterdir())


def test_metrics_and_time_are_listed(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, numbered(1), metrics={"loss": np.float32(0.5), "acc": torch.tensor(0.75), "n": 3,
                                          "bad": math.nan})
        info, = mgr.list()
    assert info.metrics["loss"] == 0.5 and info.metrics["acc"] == 0.75 and info.metrics["n"] == 3
    assert math.isnan(info.metrics["bad"])
    assert info.time > 1.6e9


def test_a_step_is_never_saved_twice(tmp_path):
    with CheckpointManager(tmp_path, every_n_steps=5) as mgr:
        assert mgr.save(5, numbered(5))
        assert not mgr.save(5, numbered(5))  # the same step again: skipped, not an error
        assert not mgr.save(6, numbered(6))  # not on the schedule
        with pytest.raises(CheckpointError, match="already saved") as info:
            mgr.save(5, numbered(50), force=True)
        assert "step-00000005" in str(info.value)
        assert mgr.restore(5)["step"] == 5


# --- retention ------------------------------------------------------------------------

def test_keep_last_best_and_every_n_combine(tmp_path):
    losses = {100: 0.9, 200: 0.2, 300: math.nan, 400: 0.5, 500: 0.7, 600: 0.8, 700: 0.95}
    with CheckpointManager(tmp_path, keep_last=2, keep_best=1, monitor="loss", mode="min",
                           keep_every_n_steps=500) as mgr:
        for step, loss in losses.items():
            mgr.save(step, numbered(step), metrics={"loss": loss})
        assert [info.step for info in mgr.list()] == [200, 500, 600, 700]
        assert mgr.restore("best")["step"] == 200
    assert committed(tmp_path) == ["step-00000200", "step-00000500", "step-00000600", "step-00000700"]


def test_nan_is_never_best(tmp_path):
    with CheckpointManager(tmp_path, keep_last=None, monitor="loss") as mgr:
        mgr.save(1, numbered(1), metrics={"loss": 0.3})
        mgr.save(2, numbered(2), metrics={"loss": float("nan")})
        mgr.save(3, numbered(3), metrics={"loss": 0.4})
        assert mgr.restore("best")["step"] == 1
    with CheckpointManager(tmp_path / "all-nan", monitor="acc", mode="max") as mgr:
        mgr.save(1, numbered(1), metrics={"acc": math.nan})
        with pytest.raises(CheckpointNotFoundError, match="not NaN"):
            mgr.restore("best")


def test_a_save_without_the_monitored_metric_warns(tmp_path):
    with CheckpointManager(tmp_path, keep_best=1, monitor="val_loss") as mgr:
        with pytest.warns(UserWarning, match="val_loss"):
            mgr.save(1, numbered(1), metrics={"loss": 0.1})


def test_the_checkpoint_a_run_resumed_from_is_never_pruned_by_it(tmp_path):
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        for step in (10, 20, 30):
            mgr.save(step, numbered(step))
    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        resumed = mgr.restore("latest")
        assert [info.step for info in mgr.list()] == [10, 20, 30]  # nothing is pruned before a save
        for step in range(resumed["step"] + 1, resumed["step"] + 4):
            mgr.save(step, numbered(step))
        assert [info.step for info in mgr.list()] == [30, 33]
        assert mgr.restore(30)["step"] == 30
    # A new run did not resume from it: the rule no longer holds it.
    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(34, numbered(34))
        assert [info.step for info in mgr.list()] == [34]


def test_a_new_checkpoint_is_kept_even_below_the_newest_step(tmp_path):
    # A run rewound to an earlier step saves below the old run's newest: keep_last must not eat it.
    with CheckpointManager(tmp_path, keep_last=2) as mgr:
        for step in (100, 200):
            mgr.save(step, numbered(step))
        mgr.save(150, numbered(150))
        assert [info.step for info in mgr.list()] == [150, 200]


def test_files_the_manager_did_not_write_are_never_touched(tmp_path):
    foreign = {"notes.txt": b"mine", "step-final/model.bin": b"x", "step-00000003/weights.bin": b"y",
               "backup/step-00000001/manifest.json": b"{}", ".tmp-mine/a": b"z", "step-00000004": b"a file"}
    for name, data in foreign.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        for step in (1, 2, 5):
            mgr.save(step, numbered(step))
        (tmp_path / "step-00000005" / "README").write_text("a note in a checkpoint")
        mgr.save(6, numbered(6))  # prunes step 5, which now holds a file we did not write
        assert [info.step for info in mgr.list()] == [6]
        with pytest.raises(CheckpointError, match="did not commit"):
            mgr.save(3, numbered(3))  # a directory of that name exists and is not ours
    for name, data in foreign.items():
        assert (tmp_path / name).read_bytes() == data, name
    assert sorted(p.name for p in (tmp_path / "step-00000005").iterdir()) == ["README"]


# --- crash leftovers and the lock ---------------------------------------------------------

def test_stale_temporaries_are_removed_on_start_and_nothing_else(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, numbered(1))
    # What a save killed before its rename leaves behind: a temporary with our files.
    stale = tmp_path / ".tmp-step-00000002-0123456789ab"
    stale.mkdir()
    (stale / TENSORS).write_bytes(b"half a file")
    (stale / STATE).write_bytes(b"{")
    kept = tmp_path / ".tmp-step-00000003-0123456789ab"  # looks like ours but holds a stranger's file
    kept.mkdir()
    (kept / "mine.txt").write_text("keep me")
    (tmp_path / ".tmp-other").mkdir()
    with CheckpointManager(tmp_path) as mgr:
        assert [info.step for info in mgr.list()] == [1]
    assert not stale.exists()
    assert [p.name for p in kept.iterdir()] == ["mine.txt"]
    assert (tmp_path / ".tmp-other").is_dir()


def test_a_second_manager_in_another_process_gets_lockederror_naming_the_holder(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from safeckpt.training.manager import CheckpointManager
        from safeckpt.errors import LockedError
        try:
            CheckpointManager({str(tmp_path)!r})
        except LockedError as exc:
            print("LockedError:", exc)
            sys.exit(3)
    """)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, numbered(1))
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert result.returncode == 3, result.stderr
        assert f"process {os.getpid()}" in result.stdout and str(tmp_path) in result.stdout
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before
        with pytest.raises(LockedError):  # a second manager in this process too
            CheckpointManager(tmp_path)
    with CheckpointManager(tmp_path) as mgr:  # released on close
        assert [info.step for info in mgr.list()] == [1]


def test_a_closed_manager_refuses_work(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.close()
    mgr.close()
    with pytest.raises(CheckpointError, match="closed"):
        mgr.save(1, numbered(1))


# --- corruption ---------------------------------------------------------------------------

def test_flipped_bytes_in_any_committed_file_are_detected(tmp_path):
    state = train_state()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(7, state)
    directory = tmp_path / "step-00000007"
    manifest = json.loads((directory / MANIFEST).read_text())
    ranges = manifest["files"][TENSORS]["tensors"]
    rng = random.Random(4)
    flips = 0
    for name in (TENSORS, STATE, MANIFEST):
        path = directory / name
        size = path.stat().st_size
        for offset in sorted({0, size - 1} | {rng.randrange(size) for _ in range(10)}):
            mask = rng.randrange(1, 256)
            flip_byte(path, offset, mask)
            try:
                with CheckpointManager(tmp_path) as mgr:
                    report = mgr.verify()
                    assert not report.ok, (name, offset)
                    with pytest.raises(IntegrityError) as info:
                        mgr.restore(7)
                    assert info.value.path is not None and info.value.path.endswith(name), (name, offset)
                    inside = [t for t, e in ranges.items() if e["range"][0] <= offset < e["range"][1]]
                    if name == TENSORS and inside:
                        assert info.value.tensor == inside[0]
                        assert repr(inside[0]) in str(info.value)
                        assert report.failures[0].tensor == inside[0]
                    assert str(directory / name) in str(info.value)
            finally:
                flip_byte(path, offset, mask)  # undone
            flips += 1
    assert flips >= 30
    with CheckpointManager(tmp_path) as mgr:  # undone: intact again
        assert mgr.verify().ok
        assert_same(mgr.restore(7), state)


def test_a_truncated_or_missing_file_is_an_integrity_error(tmp_path):
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        mgr.save(1, numbered(1))
        mgr.save(2, numbered(2))
        tensors = tmp_path / "step-00000002" / TENSORS
        tensors.write_bytes(tensors.read_bytes()[:-4])
        with pytest.raises(IntegrityError, match="truncated"):
            mgr.restore(2)
        (tmp_path / "step-00000001" / STATE).unlink()
        with pytest.raises(IntegrityError, match="missing"):
            mgr.restore(1)
        report = mgr.verify()
        assert [(c.step, c.ok) for c in report.checkpoints] == [(1, False), (2, False)]
        assert report.checkpoints[0].file.endswith(STATE)


def test_a_damaged_newest_manifest_stops_restore_latest_and_is_never_deleted(tmp_path):
    with CheckpointManager(tmp_path, keep_last=2) as mgr:
        for step in (1, 2):
            mgr.save(step, numbered(step))
    manifest = tmp_path / "step-00000002" / MANIFEST
    manifest.write_bytes(manifest.read_bytes().replace(b'"step": 2', b'"step": 3'))
    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        assert [info.step for info in mgr.list()] == [1]
        with pytest.raises(IntegrityError, match=r"newest checkpoint \(step 2\) is damaged.*restore\(1\)"):
            mgr.restore("latest")
        with pytest.raises(IntegrityError):
            mgr.restore(2)
        assert [(c.step, c.ok) for c in mgr.verify().checkpoints] == [(1, True), (2, False)]
        assert not mgr.verify(2).ok
        mgr.save(5, numbered(5))  # prunes step 1; the damaged one is not ours to judge
        assert mgr.restore("latest")["step"] == 5
    assert committed(tmp_path) == ["step-00000002", "step-00000005"]


def test_restore_errors_say_what_exists(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(CheckpointNotFoundError, match="save one first"):
            mgr.restore("latest")
        mgr.save(4, numbered(4))
        with pytest.raises(CheckpointNotFoundError, match="saved steps: 4"):
            mgr.restore(5)
        with pytest.raises(CheckpointError, match="monitor="):
            mgr.restore("best")
        with pytest.raises(CheckpointError, match="'latest', 'best' or a step"):
            mgr.restore("newest")
        with pytest.raises(CheckpointNotFoundError):
            mgr.verify(5)


def test_target_is_checked_against_the_checkpoint(tmp_path):
    state = train_state()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state)
        fresh = {**state, "model": tiny_model().state_dict()}
        assert_same(mgr.restore(1, target=fresh), state)
        wider = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
        with pytest.raises(CheckpointError, match=r"'model/0.weight' is shape \[5, 6\] in the checkpoint but "
                                                  r"\[7, 6\] in target"):
            mgr.restore(1, target={**state, "model": wider.state_dict()})
        with pytest.raises(CheckpointError, match="target lacks"):
            mgr.restore(1, target={**state, "extra": {}})


# --- async -------------------------------------------------------------------------------

def test_async_save_holds_the_values_at_save_time(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = torch.randn(16, 6, generator=torch.Generator().manual_seed(2))
    big = np.zeros(1 << 20, np.float32)
    with CheckpointManager(tmp_path, async_save=True, keep_last=None) as mgr:
        for step in range(1, 4):
            optimizer.zero_grad()
            model(data).square().mean().backward()
            optimizer.step()
            big[:] = step
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "big": big}
            expected = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "big": big.copy()}
            assert mgr.save(step, state)
            # Train on at once, in place, as a real loop does, while the write is in flight.
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.mul_(-3.0).add_(1.0)
            big[:] = -1
            mgr.wait()
            restored = mgr.restore(step)
            assert_same(dict(restored["model"]), expected["model"])
            assert_same(restored["big"], expected["big"])
        assert [info.step for info in mgr.list()] == [1, 2, 3]


def test_async_latest_and_pruning_advance_only_after_commit(tmp_path):
    with CheckpointManager(tmp_path, async_save=True, keep_last=1) as mgr:
        mgr.save(1, numbered(1, 1 << 20))
        mgr.wait()
        mgr.save(2, numbered(2, 1 << 20))
        listed = [info.step for info in mgr.list()]
        assert listed in ([1], [2])  # step 2 is listed only once whole; step 1 only goes after
        mgr.wait()
        assert [info.step for info in mgr.list()] == [2]


def _fail_fsync_once(monkeypatch, code: int = errno.ENOSPC) -> list:
    """The next fsync fails as a full disk makes it fail (then fsync works again)."""
    real = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(code, os.strerror(code))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


@pytest.mark.parametrize("surface", ["save", "wait", "close"])
def test_an_error_in_the_background_write_surfaces_at_the_next_call(tmp_path, monkeypatch, surface):
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, numbered(1))
    mgr.wait()
    _fail_fsync_once(monkeypatch)
    assert mgr.save(2, numbered(2))  # returns: the write fails on the background thread
    with pytest.raises(CheckpointError, match=os.strerror(errno.ENOSPC)) as info:
        if surface == "save":
            mgr.save(3, numbered(3))
        elif surface == "wait":
            mgr.wait()
        else:
            mgr.close()
    assert str(tmp_path / "step-00000002") in str(info.value) and "untouched" in str(info.value)
    assert committed(tmp_path) == ["step-00000001"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    if surface != "close":
        assert mgr.save(2, numbered(2))  # the same step saves once the disk has room
        mgr.wait()
        assert [info.step for info in mgr.list()] == [1, 2]
    mgr.close()


def test_a_failed_synchronous_save_leaves_nothing_and_can_be_retried(tmp_path, monkeypatch):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, numbered(1))
        _fail_fsync_once(monkeypatch, errno.EIO)
        with pytest.raises(CheckpointError) as info:
            mgr.save(2, numbered(2))
        assert isinstance(info.value.__cause__, OSError) and isinstance(info.value, SafeckptError)
        assert committed(tmp_path) == ["step-00000001"]
        assert mgr.save(2, numbered(2))  # no force needed: the failed step was not "saved"
        assert [info.step for info in mgr.list()] == [1, 2]


# --- the pieces underneath: streaming, hashing, the manifest ------------------------------

class _ShortWrites:
    """A sink that takes at most `limit` bytes a call, as a raw file or a socket may."""

    def __init__(self, limit: int) -> None:
        self.limit, self.data = limit, bytearray()

    def write(self, view) -> int:
        taken = bytes(memoryview(view)[:self.limit])
        self.data += taken
        return len(taken)


def test_write_stream_writes_the_bytes_save_writes_through_short_writes(model_like):
    import safeckpt
    from safeckpt.format.writer import prepare
    import blake3
    from safeckpt.format.integrity import root_hash
    from safeckpt.sinks.safetensors import from_prepared, write_stream

    metadata = {"step": "3"}
    expected = safeckpt.save(model_like, metadata)
    sink = _ShortWrites(1000)
    written = write_stream([from_prepared(prepare(name, array)) for name, array in model_like.items()], sink,
                           metadata, hashed=True)
    assert bytes(sink.data) == expected and written.size == len(expected)
    assert written.range_hashes[0] == blake3.blake3(expected[:written.ranges[0][2]]).hexdigest()
    assert written.file_hash == root_hash(written.range_hashes)


def test_hashing_writer_hashes_the_file_and_each_range_whatever_the_chunks():
    import blake3
    from safeckpt.format.integrity import PARALLEL_BYTES, HashingWriter

    data = np.random.default_rng(0).integers(0, 256, 3 * PARALLEL_BYTES + 123, dtype=np.uint8).tobytes()
    ranges = [("header", 0, 100), ("a", 100, 100), ("b", 100, PARALLEL_BYTES + 7), ("c", PARALLEL_BYTES + 7, len(data))]
    sink = _ShortWrites(PARALLEL_BYTES // 3)
    with HashingWriter(sink, ranges) as writer:
        for start, stop in ((0, 50), (50, 2 * PARALLEL_BYTES), (2 * PARALLEL_BYTES, len(data))):
            assert writer.write(memoryview(data)[start:stop]) == stop - start
    assert bytes(sink.data) == data and writer.size == len(data)
    assert writer.hexdigest() == blake3.blake3(data).hexdigest()
    assert writer.range_hashes() == [blake3.blake3(data[b:e]).hexdigest() for _, b, e in ranges]


def test_any_changed_byte_of_a_manifest_is_caught_even_if_the_json_still_means_the_same():
    from safeckpt.format.integrity import decode_manifest, encode_manifest

    document = {"format": "safeckpt-checkpoint", "schema_version": 1, "step": 12, "metrics": {"loss": 0.5}}
    raw = encode_manifest(document)
    assert decode_manifest(raw, "m.json") == document
    for offset in range(len(raw)):
        for replacement in {0x20, 0x09, raw[offset] ^ 0x01}:
            if replacement == raw[offset]:
                continue
            changed = raw[:offset] + bytes([replacement]) + raw[offset + 1:]
            with pytest.raises(IntegrityError) as info:
                decode_manifest(changed, "m.json")
            assert info.value.path == "m.json"
    with pytest.raises(IntegrityError, match="not a complete safeckpt manifest"):
        decode_manifest(raw[:-10], "m.json")
