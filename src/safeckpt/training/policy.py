"""When to save and what to keep: pure functions over checkpoint records, no I/O.

The manager asks three questions and this module answers them from plain
values, so each rule can be tested on its own:

- `should_save`: does this step save, given the schedule (every N steps, every
  N seconds, forced)?
- `to_delete`: which committed checkpoints may go, given the retention rules?
  A checkpoint is kept if any rule keeps it: the `keep_last` newest by step,
  the `keep_best` best by the monitored metric (NaN is never best), every
  multiple of `keep_every_n_steps`, and the protected ones (the one this run
  resumed from, the one just saved).
- `temporaries_to_remove` / `partials_to_remove`: which leftovers of a crash
  are ours to clean. Names are matched exactly; anything else in the
  directory is never selected.

Steps are integers everywhere: ordering never depends on directory names
(``step-1000`` sorts before ``step-999`` as a string). The names and the records
(`CheckpointInfo`) are the checkpoint directory's: `safeckpt.format.checkpoint_dir`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Mapping, Optional, Sequence

from ..errors import CheckpointError
from ..format.checkpoint_dir import CheckpointInfo, by_step, is_temporary_name, ranked_best, step_from_name

MODES = ("min", "max")


def check_step(step) -> int:
    """A step must be a non-negative int (numpy and torch integers too, never bool)."""
    if isinstance(step, bool) or not hasattr(step, "__index__"):
        raise CheckpointError(f"step must be a non-negative integer, got {type(step).__name__} {step!r}")
    step = int(step.__index__())
    if step < 0:
        raise CheckpointError(f"step must be a non-negative integer, got {step}")
    return step


# --- when to save -------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """When `save()` writes: on multiples of `every_n_steps`, or once `every_seconds`
    have passed since the last save; with neither, every call writes."""

    every_n_steps: Optional[int] = None
    every_seconds: Optional[float] = None

    def __post_init__(self) -> None:
        _check_count("every_n_steps", self.every_n_steps, minimum=1)
        if self.every_seconds is not None:
            if isinstance(self.every_seconds, bool) or not isinstance(self.every_seconds, (int, float)) \
                    or not self.every_seconds > 0 or math.isinf(self.every_seconds):
                raise CheckpointError(
                    f"every_seconds must be a positive number of seconds or None, got {self.every_seconds!r}")


def should_save(schedule: Schedule, step: int, now: float, last_save_time: float,
                last_saved_step: Optional[int] = None, force: bool = False) -> bool:
    """Whether `step` saves now. `last_save_time` is the start of the previous save
    (or of the manager); a step already saved by this run does not save again
    unless forced.

    >>> should_save(Schedule(every_n_steps=100), 300, now=0.0, last_save_time=0.0)
    True
    """
    if force:
        return True
    if step == last_saved_step:
        return False
    if schedule.every_n_steps is None and schedule.every_seconds is None:
        return True
    if schedule.every_n_steps is not None and step % schedule.every_n_steps == 0:
        return True
    return schedule.every_seconds is not None and now - last_save_time >= schedule.every_seconds


# --- what to keep -------------------------------------------------------------------

@dataclass(frozen=True)
class Retention:
    """Which checkpoints survive pruning; a checkpoint kept by any rule is kept.

    `keep_last=None` keeps every checkpoint (nothing is ever deleted by age).
    """

    keep_last: Optional[int] = 3
    keep_best: Optional[int] = None
    monitor: Optional[str] = None
    mode: str = "min"
    keep_every_n_steps: Optional[int] = None

    def __post_init__(self) -> None:
        _check_count("keep_last", self.keep_last, minimum=0)
        _check_count("keep_best", self.keep_best, minimum=1)
        _check_count("keep_every_n_steps", self.keep_every_n_steps, minimum=1)
        if self.mode not in MODES:
            raise CheckpointError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.monitor is not None and not isinstance(self.monitor, str):
            raise CheckpointError(f"monitor must be a metric name (str), got {self.monitor!r}")
        if self.keep_best is not None and self.monitor is None:
            raise CheckpointError(
                f"keep_best={self.keep_best} needs the metric to rank by: pass monitor='val_loss' "
                "(or the name you give in save(..., metrics=...)) and mode='min' or 'max'")


def to_keep(infos: Sequence[CheckpointInfo], retention: Retention,
            protected: Collection[str] = ()) -> set[str]:
    """Paths of the checkpoints that `retention` keeps (`protected` paths always are)."""
    ordered = by_step(infos)
    keep = {info.path for info in ordered if info.path in protected}
    if retention.keep_last is None:
        keep.update(info.path for info in ordered)
    elif retention.keep_last > 0:
        keep.update(info.path for info in ordered[-retention.keep_last:])
    if retention.keep_best is not None:
        keep.update(info.path for info in ranked_best(ordered, retention.monitor, retention.mode)
                    [:retention.keep_best])
    if retention.keep_every_n_steps is not None:
        keep.update(info.path for info in ordered if info.step % retention.keep_every_n_steps == 0)
    return keep


def to_delete(infos: Sequence[CheckpointInfo], retention: Retention,
              protected: Collection[str] = ()) -> list[CheckpointInfo]:
    """The committed checkpoints `retention` lets go, oldest first.

    >>> [i.step for i in to_delete([CheckpointInfo(s, 0.0, path=str(s)) for s in (999, 1000, 1001)],
    ...                             Retention(keep_last=2))]
    [999]
    """
    keep = to_keep(infos, retention, protected)
    return [info for info in by_step(infos) if info.path not in keep]


# --- leftovers of a crash -------------------------------------------------------------

def temporaries_to_remove(names: Iterable[str]) -> list[str]:
    """Names of our uncommitted temporaries (``.tmp-step-00001200-<hex>``): a save
    that crashed before its rename. Nothing else matches.
    """
    return sorted(name for name in names if is_temporary_name(name))


def partials_to_remove(partials: Mapping[str, Collection[str]], newest_committed_step: Optional[int],
                       is_ours: Callable[[str], bool]) -> list[str]:
    """Checkpoint directories left without a manifest (a crashed save on an object
    store, or an interrupted delete) that are safe to remove: named like ours,
    holding only files we write, and older than the newest committed step (a
    newer one may be a save still in progress).

    `partials` maps a directory name to the file names in it; `is_ours` tells the files a
    save writes.
    """
    if newest_committed_step is None:
        return []
    chosen = []
    for name, files in partials.items():
        step = step_from_name(name)
        if step is None or step >= newest_committed_step:
            continue
        if files and all(is_ours(name) for name in files):
            chosen.append(name)
    return sorted(chosen)


def _check_count(name: str, value, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointError(f"{name} must be an integer >= {minimum} or None, got {value!r}")
