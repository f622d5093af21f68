"""CheckpointManager: save training state on a schedule, keep what the policy keeps, restore it verified.

The manager orchestrates: when to save, what to keep, one save in flight at a
time, one writer per directory, which checkpoint a restore takes. The pieces
live elsewhere: `policy` decides when to save and what to keep;
`safeckpt.format.checkpoint_dir` is the directory's layout (a directory per
step holding ``tensors.safetensors``, ``state.json`` and ``manifest.json``,
written last), which it lists, writes, reads and checks;
`safeckpt.format.checkpoint_storage` moves the bytes (a local directory or an
fsspec URL) and commits; `state` turns a state tree into tensors plus a JSON
document and back.

Only a checkpoint whose manifest is complete and intact is listed; ordering
is by the step inside the manifest, never by the name.

Under an initialized torch process group (`torchrun`, FSDP) the manager is one
per rank, created and called alike on every rank: each rank writes its own part of a
save through ``torch.distributed.checkpoint`` with `safeckpt.training.dcp`'s storage
(a step directory of rank files, a JSON layout and the manifest), rank 0 alone decides
(the schedule, retention, pruning, which checkpoint a restore takes, what `list()`
shows; `safeckpt.training.ranks`) and the others take its answer. Such a checkpoint
restores at any world size, also in one process without a process group.

A read-only manager (an evaluator beside the training run) follows a
directory another process writes: it takes no lock and changes nothing, and
as every commit is one atomic step (a rename, or an object store's manifest
put) it only ever sees whole checkpoints. One that the writer prunes while it
is being restored is not an error: the choice is made again from a fresh
listing.

>>> with CheckpointManager("checkpoints", keep_last=3, every_n_steps=100) as mgr:
...     for step in range(start, steps):
...         train_one_step()
...         mgr.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict()})
"""

from __future__ import annotations

import errno
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from ..errors import CheckpointError, CheckpointNotFoundError, IntegrityError, SafeckptError
from ..format.checkpoint_dir import (CheckpointCheck, CheckpointInfo, Listing, best, check_checkpoint,
                                     checkpoint_name, clean_metrics, decode_metrics, directory_name, is_committed,
                                     is_distributed, is_our_file, list_directory, open_checkpoint, our_files,
                                     read_checkpoint)
from ..format.checkpoint_storage import open_directory
from ..sinks.checkpoint import write_checkpoint
from .policy import (Retention, Schedule, check_step, partials_to_remove, should_save,
                     temporaries_to_remove, to_delete)
from .ranks import Ranks, failures_text, process_group_active
from .state import join_state, snapshot, split_state

# A restore whose checkpoint is pruned meanwhile chooses again; each retry means the writer
# committed and pruned once more, so only a writer pruning faster than we read exhausts these.
RESTORE_ATTEMPTS = 5
# What to do about a failed write, by errno; the message ends with it.
_WRITE_FIXES = {
    errno.ENOSPC: "free disk space (or lower keep_last), then save again",
    errno.EDQUOT: "the disk quota is exhausted: free space or raise the quota, then save again",
    errno.EFBIG: "the file size limit (ulimit -f) or the filesystem's largest file is below the checkpoint's "
                 "size: raise the limit or save to another filesystem",
    errno.EACCES: "make the directory writable, then save again",
    errno.EROFS: "the filesystem is read-only: save to another directory",
}

Which = Union[str, int]


@dataclass(frozen=True)
class CheckReport:
    """`CheckpointManager.verify()`: one check per checkpoint, by step."""

    directory: str
    checkpoints: list[CheckpointCheck]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checkpoints)

    @property
    def failures(self) -> list[CheckpointCheck]:
        return [check for check in self.checkpoints if not check.ok]


class CheckpointManager:
    """Save, list, prune, verify and restore training checkpoints in one directory.

    `directory` is a local path or an fsspec URL ("s3://bucket/run",
    "memory://run"; `storage_options` go to fsspec). Saving follows the
    schedule (`every_n_steps`, `every_seconds`; with neither, every call
    saves; `force=True` always saves). After each commit, checkpoints that no
    retention rule keeps are deleted: rules are `keep_last` newest steps
    (None: keep all), `keep_best` best by `monitor` (`mode` "min" or "max";
    NaN is never best) and `keep_every_n_steps` multiples (kept forever). The
    checkpoint this manager restored from is never deleted by it.

    With `async_save=True`, `save()` copies the state's tensors and returns;
    the write happens on a background thread, one at a time, and its error
    surfaces at the next `save()`, `wait()` or `close()`.

    Under an initialized torch process group, creating the manager, `save`,
    `restore`, `list`, `wait` and `close` are collectives: call them on every
    rank. `state` is then a dict as ``torch.distributed.checkpoint`` takes it
    (DTensors, FSDP2's `get_state_dict`); each rank writes its shards, the step
    is committed when every rank has finished, and rank 0 prunes. `restore()`
    without `target` gives every rank the whole state; with `target` (this
    rank's state dict, e.g. from `get_state_dict`) it loads each rank's part
    in place, at whatever world size and sharding `target` has, and returns it.

    A local directory is locked (flock) for the manager's life: a second
    manager gets LockedError. Object stores have no locks: give each run its
    own prefix.

    With `read_only=True` the manager lists, restores and verifies, nothing
    more: it takes no lock, so it can follow a directory that another
    process's manager is writing, and it never creates, cleans, prunes or
    deletes anything; `save()` raises CheckpointError, and the saving options
    are ignored. A directory that does not exist (yet) lists as empty.

    >>> with CheckpointManager("ckpt", keep_last=2, keep_best=1, monitor="val_loss") as mgr:
    ...     mgr.save(100, {"model": model.state_dict()}, metrics={"val_loss": 0.31})
    ...     state = mgr.restore("best")
    >>> evaluator = CheckpointManager("ckpt", read_only=True)  # in another process, meanwhile
    >>> state = evaluator.restore("latest")
    """

    def __init__(self, directory, keep_last: Optional[int] = 3, keep_best: Optional[int] = None,
                 monitor: Optional[str] = None, mode: str = "min", every_n_steps: Optional[int] = None,
                 every_seconds: Optional[float] = None, async_save: bool = False,
                 keep_every_n_steps: Optional[int] = None, *, read_only: bool = False,
                 storage_options: Optional[Mapping[str, Any]] = None) -> None:
        self.retention = Retention(keep_last=keep_last, keep_best=keep_best, monitor=monitor, mode=mode,
                                   keep_every_n_steps=keep_every_n_steps)
        self.schedule = Schedule(every_n_steps=every_n_steps, every_seconds=every_seconds)
        self.async_save = bool(async_save)
        self.read_only = bool(read_only)
        self._storage = open_directory(directory, storage_options, create=not self.read_only,
                                       missing_ok=self.read_only)
        self.directory = self._storage.url
        self._lock = None
        self._closed = False
        self._mutex = threading.Lock()
        self._protected: set[str] = set()  # restored from: never deleted by this manager
        self._last_save_time = time.time()
        self._last_saved_step: Optional[int] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[Future] = None
        self._ranks = Ranks(self.async_save) if not self.read_only and process_group_active() else None
        if self.read_only:
            return  # the leftovers belong to the writer, which may still be writing them
        if self._ranks is not None and self._storage.remote:
            raise CheckpointError("under a process group every rank writes its part to a local or shared file "
                                  "system (object stores: not yet): give a directory path", path=self.directory)
        if self._ranks is None:
            self._take_directory()
        else:
            self._ranks.agree(self._take_directory)

    def _take_directory(self) -> None:
        """Lock the directory and remove what crashed saves left (rank 0 alone under a process group)."""
        self._lock = self._storage.lock()
        try:
            self._remove_leftovers()
        except BaseException:
            self._release()
            raise

    # -- saving ------------------------------------------------------------------------

    def save(self, step: int, state: Any, metrics: Optional[Mapping[str, Any]] = None,
             force: bool = False) -> bool:
        """Save `state` as checkpoint `step` if the schedule says so; returns whether it saved.

        `state` is a tree of dicts, lists and tuples of tensors (numpy, torch,
        jax), numbers, strings and None. `metrics` (numbers) are recorded in
        the manifest and rank `keep_best`. A step is never overwritten.

        >>> mgr.save(1200, {"model": model.state_dict(), "epoch": 3}, metrics={"val_loss": 0.25})
        True
        """
        self._check_open()
        if self.read_only:
            raise CheckpointError(f"cannot save step {step}: this CheckpointManager is read-only; save from the "
                                  "training run's manager (read_only=False)", path=self.directory)
        step = check_step(step)
        metrics = clean_metrics(metrics)
        now = time.time()
        if self._ranks is not None:
            return self._save_across_ranks(step, state, metrics, now, force)
        self._collect_finished()
        if not should_save(self.schedule, step, now, self._last_save_time, self._last_saved_step, force):
            return False
        self.wait()  # at most one save in flight; raises the previous one's error
        self._check_step_is_free(step)
        self._warn_if_unmonitored(step, metrics)
        if self.async_save:
            # The caller may change its tensors as soon as save() returns: copy them now.
            tensors, document = split_state(snapshot(state))
        else:
            tensors, document = split_state(state)
        previous = self._last_saved_step
        self._last_save_time, self._last_saved_step = now, step
        job = _SaveJob(self, step, now, metrics, tensors, document, previous)
        if self.async_save:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="safeckpt-save")
            self._pending = self._executor.submit(job.run)
        else:
            job.run()
        return True

    def _save_across_ranks(self, step: int, state: Any, metrics: dict, now: float, force: bool) -> bool:
        """`save` under a process group: rank 0 decides, every rank writes its part through DCP."""
        import torch.distributed.checkpoint as dcp

        from .dcp import SafeStorageWriter

        def decide() -> Optional[dict]:
            if not should_save(self.schedule, step, now, self._last_save_time, self._last_saved_step, force):
                return None
            return {"time": now, "metrics": metrics}

        decided = self._ranks.agree(decide)  # time and metrics as rank 0 has them
        if decided is None:
            return False
        self.wait()  # the previous save's failure is every rank's (DCP gathers them)
        self._ranks.agree(lambda: self._check_step_is_free(step))
        metrics = decided["metrics"]
        if self._ranks.decides:
            self._warn_if_unmonitored(step, metrics)
        if not isinstance(state, Mapping):
            raise CheckpointError(f"cannot save step {step}: under a process group the state must be a dict (as "
                                  f"torch.distributed.checkpoint saves), got {type(state).__name__}")
        name = checkpoint_name(step)
        writer = SafeStorageWriter(self._storage.path(name), step=step, metrics=metrics,
                                   monitor=self.retention.monitor, mode=self.retention.mode, overwrite=False)
        previous = self._last_saved_step
        self._last_save_time, self._last_saved_step = decided["time"], step
        where = self._storage.display(name)
        if not self.async_save:
            try:
                dcp.save(dict(state), storage_writer=writer, process_group=self._ranks.saving)
            except BaseException as exc:
                raise self._failed_across_ranks(writer, step, previous, exc, where) from None
            if self._ranks.decides:
                self._prune(where)
            return True
        upload = dcp.async_save(dict(state), storage_writer=writer, process_group=self._ranks.saving)
        done: Future = Future()

        def finished(upload: Future) -> None:
            try:
                upload.result()
            except BaseException as exc:  # noqa: BLE001 - raised at the next save(), wait() or close()
                done.set_exception(self._failed_across_ranks(writer, step, previous, exc, where))
                return
            if self._ranks.decides:
                self._prune(where)
            done.set_result(None)

        upload.add_done_callback(finished)
        self._pending = done
        return True

    def _failed_across_ranks(self, writer: Any, step: int, previous: Optional[int], exc: BaseException,
                             where: str) -> BaseException:
        """What a failed save raises on every rank (rank 0 first deletes what it staged)."""
        if self._ranks.decides:
            writer.abort()
        if self._last_saved_step == step:  # a retry of this step must save
            self._last_saved_step = previous
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            return exc
        failures = getattr(exc, "failures", None) or {}
        errnos = [f[0].errno for f in failures.values() if isinstance(f, tuple) and isinstance(f[0], OSError)]
        if not failures:  # a collective failed: a rank died or left the group
            fix = "a rank stopped during the save (see its log): restart the job and restore the latest step"
        else:
            fix = next((_WRITE_FIXES[code] for code in errnos if code in _WRITE_FIXES),
                       "check that the directory is writable and has room on every rank's file system, then "
                       "save again")
        return CheckpointError(f"cannot save step {step}: {failures_text(exc)}; nothing was committed and "
                               f"earlier checkpoints are untouched: {fix}", path=where)

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _collect_finished(self) -> None:
        # (not under a process group: when a background save ends differs from rank to rank)
        if self._pending is not None and self._pending.done():
            self.wait()

    def _check_step_is_free(self, step: int) -> None:
        name = checkpoint_name(step)
        if not self._storage.exists(name):
            return
        listing = list_directory(self._storage)
        where = self._storage.display(name)
        if any(info.step == step for info in listing.checkpoints):
            raise CheckpointError(f"step {step} is already saved; checkpoints are never overwritten: save under "
                                  "a new step, or delete this directory first", path=where)
        if self._storage.remote and name in listing.partials and \
                all(is_our_file(file) for file in listing.partials[name]):
            self._remove(name)  # a crashed save of this very step
            return
        raise CheckpointError(f"cannot save step {step}: something safeckpt did not commit is already at this "
                              "path; move it away, then save again", path=where)

    def _warn_if_unmonitored(self, step: int, metrics: Mapping[str, float]) -> None:
        monitor = self.retention.monitor
        if monitor is not None and monitor not in metrics:
            warnings.warn(f"save({step}) got no metric {monitor!r} (metrics: {sorted(metrics) or 'none'}); this "
                          "checkpoint cannot count as best: pass metrics={" + repr(monitor) + ": value}",
                          stacklevel=3)

    def _write(self, step: int, now: float, metrics: dict, tensors: Mapping[str, Any],
               document: dict) -> CheckpointInfo:
        """Write and commit one checkpoint; nothing is left behind on failure."""
        name = checkpoint_name(step)
        staging = None
        try:
            staging = self._storage.begin(name)
            info = write_checkpoint(staging, step, now, metrics, tensors, document, self.retention.monitor,
                                    self.retention.mode)
            staging.commit()
        except BaseException as exc:
            if staging is not None:
                staging.abort()
            if isinstance(exc, OSError):
                where = staging.final if staging is not None else self.directory
                raise _write_error(exc, step, where) from exc
            raise
        return info

    def _prune(self, saved: str) -> None:
        """Delete what retention no longer keeps, after checkpoint `saved` (a path) was committed."""
        with self._mutex:
            protected = self._protected | {saved}
        for victim in to_delete(list_directory(self._storage).checkpoints, self.retention, protected):
            try:
                self._remove(directory_name(victim.path))
            except OSError as exc:
                warnings.warn(f"{victim.path}: could not delete this pruned checkpoint ({exc}); it stays on "
                              "disk: delete it by hand", stacklevel=2)

    def _remove(self, name: str) -> None:
        """Delete checkpoint `name`: the files a save writes (manifest first), anything else stays."""
        self._storage.remove_checkpoint(name, our_files(self._storage.files(name)))

    # -- reading -----------------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first by step, read afresh from the directory on each call
        (so a read-only manager sees the checkpoints a writer commits and prunes).

        >>> [info.step for info in mgr.list()]
        [9, 10, 100, 1000]
        """
        if self._ranks is not None:
            rows = self._ranks.agree(lambda: [
                {"step": info.step, "time": info.time, "metrics": clean_metrics(info.metrics), "path": info.path,
                 "size": info.size} for info in list_directory(self._storage).checkpoints])
            return [CheckpointInfo(row["step"], row["time"], decode_metrics(row["metrics"]), row["path"], row["size"])
                    for row in rows]
        return list_directory(self._storage).checkpoints

    def restore(self, which: Which = "latest", target: Any = None, verify: bool = True) -> Any:
        """The state saved in a checkpoint: "latest", "best" or a step.

        "best" ranks by this manager's `monitor` and `mode`, or, without one,
        by those the run that saved the checkpoints recorded. Hashes are
        checked first (`verify=False` skips them): a mismatch raises
        IntegrityError naming the file and the tensor. `target`, a state tree
        like the one saved (e.g. a fresh model's state), is checked against
        the checkpoint: every tensor present with its shape and dtype, or a
        CheckpointError naming the first difference. Tensors come back in the
        framework they were saved from.

        A checkpoint deleted while it is read (pruned by the run writing the
        directory) is never half restored: "latest" and "best" are chosen
        again from a fresh listing (up to RESTORE_ATTEMPTS times); a step
        asked for by number raises CheckpointNotFoundError.

        >>> state = mgr.restore("latest")
        >>> model.load_state_dict(state["model"])
        """
        self._check_open()
        which = _check_which(which)
        if self._ranks is not None:  # one choice for every rank; only this manager's rank 0 prunes
            path = self._ranks.agree(lambda: self._choose(list_directory(self._storage), which).path)
            with self._mutex:
                self._protected.add(path)
            storage, info, manifest = open_checkpoint(path)
            return self._read(storage, info, manifest, target, verify)
        for _ in range(RESTORE_ATTEMPTS):
            listing = list_directory(self._storage)
            info = self._choose(listing, which)
            with self._mutex:  # before reading: a background prune must not take it meanwhile
                self._protected.add(info.path)
            try:
                return self._read(self._storage, info, listing.manifests[info.path], target, verify)
            except (SafeckptError, OSError):
                if not _vanished(self._storage, info.path):
                    raise
                if not isinstance(which, str):
                    raise CheckpointNotFoundError(f"step {info.step} was deleted while it was being read (pruned "
                                                  "by the run writing this directory): restore a newer step",
                                                  path=info.path) from None
                continue
        raise CheckpointError(f"restore({which!r}): {RESTORE_ATTEMPTS} checkpoints in a row were deleted while "
                              "being read, as the run writing this directory prunes faster than this reads: "
                              "raise its keep_last, then restore again", path=self.directory)

    def _read(self, storage: Any, info: CheckpointInfo, manifest: Mapping[str, Any], target: Any,
              verify: bool) -> Any:
        """The state checkpoint `info` holds (into `target` for one saved by several ranks)."""
        if is_distributed(manifest):
            return self._read_across_ranks(info, target, verify)
        tensors, document = read_checkpoint(storage, info, manifest, verify)
        if target is not None:
            _check_target(target, document, info.path)
        return join_state(tensors, document)

    def _read_across_ranks(self, info: CheckpointInfo, target: Any, verify: bool) -> Any:
        """A checkpoint saved by several ranks: whole, or each rank's part into `target` through DCP."""
        from .dcp import SafeStorageReader, read_state

        if "://" in info.path:
            raise CheckpointError("checkpoints saved by several ranks are read from local (or shared) file "
                                  "systems for now", path=info.path)
        if target is None:
            return read_state(info.path, verify=verify)
        if not isinstance(target, dict):
            raise CheckpointError(f"target must be a dict (as torch.distributed.checkpoint loads), got "
                                  f"{type(target).__name__}", path=info.path)
        import torch.distributed.checkpoint as dcp

        try:
            with warnings.catch_warnings():  # DCP's "assuming ... a single process": so we are
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                dcp.load(target, storage_reader=SafeStorageReader(info.path, verify=verify),
                         process_group=self._ranks.control if self._ranks is not None else None,
                         no_dist=self._ranks is None)
        except BaseException as exc:
            failures = [f[0] for f in (getattr(exc, "failures", None) or {}).values() if isinstance(f, tuple)]
            if not failures:
                raise
            kind = IntegrityError if any(isinstance(f, IntegrityError) for f in failures) else CheckpointError
            raise kind(f"cannot restore step {info.step}: {failures_text(exc)}", path=info.path) from None
        return target

    def _choose(self, listing: Listing, which: Which) -> CheckpointInfo:
        monitor, mode = self.retention.monitor, self.retention.mode
        if monitor is None:  # rank as the run that saved them did
            monitor, mode = listing.monitor, listing.mode
        if self.read_only and not listing.checkpoints and not listing.damaged:
            raise CheckpointNotFoundError("no committed checkpoint here yet (a directory that does not exist "
                                          "counts as empty): check the path, or wait for the training run's "
                                          "first save (poll mgr.list())", path=self.directory)
        return _choose(listing, which, monitor, mode)

    def verify(self, step: Optional[int] = None) -> CheckReport:
        """Check the hashes of every checkpoint (or of one step); never raises for damage.

        >>> report = mgr.verify(); report.ok, [c.error for c in report.failures]
        """
        self._check_open()
        listing = list_directory(self._storage)
        checks = [check_checkpoint(self._storage, info, listing.manifests[info.path])
                  for info in listing.checkpoints]
        checks += [CheckpointCheck(d.step, d.path, False, str(d.error), type(d.error).__name__,
                                   d.error.path, d.error.tensor) for d in listing.damaged]
        # One pruned while it was checked (by the run writing the directory) is gone, not damaged.
        checks = [check for check in checks if check.ok or not _vanished(self._storage, check.path)]
        checks.sort(key=lambda check: (check.step, check.path))
        if step is not None:
            step = check_step(step)
            checks = [check for check in checks if check.step == step]
            if not checks:
                raise CheckpointNotFoundError(f"no checkpoint of step {step}; saved steps: "
                                              f"{_steps_text(listing)}", path=self.directory)
        return CheckReport(self.directory, checks)

    # -- life ----------------------------------------------------------------------------

    def close(self) -> None:
        """Finish the save in flight, then release the directory; raises that save's error."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._release()

    def _release(self) -> None:
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as background:  # keep the body's error; mention the save's
            if hasattr(exc, "add_note"):
                exc.add_note(f"also, the background save failed: {background}")

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this CheckpointManager is closed; open a new one", path=self.directory)

    def _remove_leftovers(self) -> None:
        """Temporaries of a crashed save (local), and manifest-less partial checkpoints
        older than the newest committed one (object stores)."""
        names = self._storage.entries()
        for name in temporaries_to_remove(name for name, is_dir in names.items() if is_dir):
            self._storage.remove_temporary(name, our_files(self._storage.files(name)))
        if self._storage.remote:
            listing = list_directory(self._storage)
            newest = listing.checkpoints[-1].step if listing.checkpoints else None
            for name in partials_to_remove(listing.partials, newest, is_our_file):
                self._remove(name)

    def __repr__(self) -> str:
        if self.read_only:
            return f"CheckpointManager({self.directory!r}, read_only=True)"
        return f"CheckpointManager({self.directory!r}, {self.retention}, {self.schedule}, async_save={self.async_save})"


@dataclass
class _SaveJob:
    """One save: write, commit, prune. Run on the caller's thread or the background one."""

    manager: CheckpointManager
    step: int
    now: float
    metrics: dict
    tensors: Mapping[str, Any]
    document: dict
    previous_step: Optional[int]

    def run(self) -> None:
        try:
            saved = self.manager._write(self.step, self.now, self.metrics, self.tensors, self.document)
        except BaseException:
            if self.manager._last_saved_step == self.step:  # a retry of this step must save
                self.manager._last_saved_step = self.previous_step
            raise
        finally:
            self.tensors = self.document = None  # a finished job holds no snapshot
        self.manager._prune(saved.path)


# --- helpers ----------------------------------------------------------------------------

def _write_error(exc: OSError, step: int, where: str) -> CheckpointError:
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    fix = _WRITE_FIXES.get(exc.errno, "check that the directory is writable and has room, then save again")
    return CheckpointError(f"cannot save step {step}: {reason}{f' ({code})' if code else ''}; nothing was "
                           f"committed and earlier checkpoints are untouched: {fix}", path=where)


def _check_which(which: Which) -> Which:
    """"latest", "best", or a checked step number."""
    if isinstance(which, str):
        if which not in ("latest", "best"):
            raise CheckpointError(f"restore() takes 'latest', 'best' or a step number, got {which!r}")
        return which
    return check_step(which)


def _choose(listing: Listing, which: Which, monitor: Optional[str], mode: str) -> CheckpointInfo:
    """The checkpoint `which` (checked by `_check_which`) names in `listing`, or the error that says why none."""
    directory_steps = _steps_text(listing)
    if which == "latest":
        if listing.damaged and (not listing.checkpoints or listing.damaged[-1].step > listing.checkpoints[-1].step):
            bad = listing.damaged[-1]
            fallback = (f"restore({listing.checkpoints[-1].step}) restores the newest intact one"
                        if listing.checkpoints else "no intact checkpoint remains")
            raise IntegrityError(f"the newest checkpoint (step {bad.step}) is damaged: {bad.error.detail}; "
                                 f"{fallback}", path=bad.error.path)
        if not listing.checkpoints:
            raise CheckpointNotFoundError("no committed checkpoint to restore; save one first (check "
                                          "mgr.list() before restoring)")
        return listing.checkpoints[-1]
    if which == "best":
        if monitor is None:
            raise CheckpointError("restore('best') needs the metric to rank by, and the checkpoints record "
                                  "none: create the manager with monitor='val_loss' (and mode='min' or 'max')")
        found = best(listing.checkpoints, monitor, mode)
        if found is None:
            raise CheckpointNotFoundError(f"no checkpoint has a value of {monitor!r} that is not NaN "
                                          f"(saved steps: {directory_steps}); pass it in save(..., metrics=...)")
        return found
    for info in listing.checkpoints:
        if info.step == which:
            return info
    for bad in listing.damaged:
        if bad.step == which:
            raise bad.error
    raise CheckpointNotFoundError(f"no checkpoint of step {which}; saved steps: {directory_steps}")


def _check_target(target: Any, document: Mapping[str, Any], path: str) -> None:
    """Every tensor of `target` is in the checkpoint with the same shape and dtype, and vice versa."""
    _, expected = split_state(target)
    want, have = expected["tensors"], document.get("tensors", {})
    for name in want:
        if name not in have:
            raise CheckpointError(f"target has tensor {name!r} but the checkpoint does not; it was saved from "
                                  "a different state: restore without target= to see what it holds", path=path)
        for key in ("dtype", "shape"):
            if want[name].get(key) != have[name].get(key):
                raise CheckpointError(f"tensor {name!r} is {key} {have[name].get(key)} in the checkpoint but "
                                      f"{want[name].get(key)} in target: the model or optimizer differs from the "
                                      "one saved", path=path)
    extra = [name for name in have if name not in want]
    if extra:
        raise CheckpointError(f"the checkpoint has tensors target lacks ({', '.join(map(repr, extra[:5]))}"
                              f"{', ...' if len(extra) > 5 else ''}): it was saved from a different state",
                              path=path)


def _vanished(storage, path: str) -> bool:
    """Whether the checkpoint at `path` is no longer committed: its manifest, which goes first, is gone."""
    return not is_committed(storage, directory_name(path))


def _steps_text(listing: Listing) -> str:
    steps = [str(info.step) for info in listing.checkpoints]
    if len(steps) > 6:
        steps = steps[:3] + ["..."] + steps[-3:]
    return ", ".join(steps) or "none"
