"""The save schedule and the retention rules, on their own: plain records in, decisions out."""

from __future__ import annotations

import math

import numpy as np
import pytest

from safeckpt.errors import CheckpointError
from safeckpt.format.checkpoint_dir import CheckpointInfo, by_step, checkpoint_name, step_from_name
from safeckpt.format.checkpoint_dir import best, ranked_best
from safeckpt.format.checkpoint_storage import temporary_name
from safeckpt.training.policy import (Retention, Schedule, check_step, partials_to_remove, should_save,
                                      temporaries_to_remove, to_delete, to_keep)

OUR_FILES = ("tensors.safetensors", "state.json")


def info(step: int, loss=None, time: float = 0.0, **metrics) -> CheckpointInfo:
    if loss is not None:
        metrics["loss"] = loss
    return CheckpointInfo(step, time or float(step), metrics, f"/run/{checkpoint_name(step)}", 100)


def steps(infos) -> list[int]:
    return [i.step for i in infos]


# --- names and steps ---------------------------------------------------------------

def test_names_are_zero_padded_and_read_back():
    assert checkpoint_name(1200) == "step-00001200"
    assert checkpoint_name(123_456_789_012) == "step-123456789012"  # wider than the padding
    assert step_from_name("step-00001200") == 1200
    assert step_from_name("step-123456789012") == 123_456_789_012
    assert step_from_name("step-7") == 7


@pytest.mark.parametrize("name", ["step-", "step-final", "step-12a", "Step-1", "step-1.bak", "my-step-1",
                                  ".tmp-step-00000001-abcdef12", "step-00000001/", " step-1", "step--1"])
def test_other_names_are_not_steps(name):
    assert step_from_name(name) is None


def test_steps_must_be_non_negative_integers():
    assert check_step(np.int64(5)) == 5
    for bad in (-1, 1.5, "10", True, None):
        with pytest.raises(CheckpointError, match="step must be"):
            check_step(bad)


def test_order_is_by_step_not_by_name():
    infos = [info(s) for s in (1000, 9, 100, 999, 10)]
    assert steps(by_step(infos)) == [9, 10, 100, 999, 1000]
    # The classic bug: names of unpadded steps sort as strings.
    assert sorted(f"step-{s}" for s in (1000, 999)) == ["step-1000", "step-999"]


# --- when to save --------------------------------------------------------------------

def test_without_a_schedule_every_call_saves():
    assert should_save(Schedule(), 1, now=0.0, last_save_time=0.0)
    assert should_save(Schedule(), 2, now=0.0, last_save_time=0.0, last_saved_step=1)


def test_every_n_steps_saves_on_multiples():
    schedule = Schedule(every_n_steps=100)
    chosen = [s for s in range(0, 450) if should_save(schedule, s, now=0.0, last_save_time=0.0)]
    assert chosen == [0, 100, 200, 300, 400]


def test_every_seconds_counts_from_the_last_save():
    schedule = Schedule(every_seconds=60)
    assert not should_save(schedule, 5, now=1059.0, last_save_time=1000.0)
    assert should_save(schedule, 5, now=1060.0, last_save_time=1000.0)


def test_schedules_compose_with_or_and_force_overrides():
    schedule = Schedule(every_n_steps=100, every_seconds=60)
    assert should_save(schedule, 100, now=0.0, last_save_time=0.0)  # by steps
    assert should_save(schedule, 101, now=61.0, last_save_time=0.0)  # by time
    assert not should_save(schedule, 101, now=30.0, last_save_time=0.0)
    assert should_save(schedule, 101, now=30.0, last_save_time=0.0, force=True)


def test_a_step_already_saved_does_not_save_twice_unless_forced():
    # Lightning calls its hooks twice at one step (after training and after validation).
    schedule = Schedule(every_n_steps=100)
    assert not should_save(schedule, 100, now=0.0, last_save_time=0.0, last_saved_step=100)
    assert should_save(schedule, 100, now=0.0, last_save_time=0.0, last_saved_step=100, force=True)


@pytest.mark.parametrize("kwargs", [{"every_n_steps": 0}, {"every_n_steps": 2.5}, {"every_n_steps": True},
                                    {"every_seconds": 0}, {"every_seconds": -1}, {"every_seconds": math.inf},
                                    {"every_seconds": "60"}])
def test_bad_schedules_are_refused(kwargs):
    with pytest.raises(CheckpointError):
        Schedule(**kwargs)


# --- best -----------------------------------------------------------------------------

def test_nan_and_missing_metrics_are_never_best():
    infos = [info(1, loss=math.nan), info(2, loss=0.9), info(3), info(4, loss=float("nan")), info(5, loss=1.5)]
    assert best(infos, "loss", "min").step == 2
    assert best(infos, "loss", "max").step == 5
    assert steps(ranked_best(infos, "loss", "min")) == [2, 5]
    assert best([info(1, loss=math.nan)], "loss") is None
    assert best(infos, "accuracy") is None


def test_best_ties_go_to_the_later_step_and_infinities_count():
    assert best([info(1, loss=0.5), info(2, loss=0.5)], "loss").step == 2
    assert best([info(1, loss=0.5), info(2, loss=-math.inf)], "loss").step == 2


def test_metric_values_that_are_not_numbers_do_not_rank():
    infos = [info(1, loss="low"), info(2, loss=True), info(3, loss=0.7)]
    assert steps(ranked_best(infos, "loss")) == [3]


# --- retention ---------------------------------------------------------------------------

def test_keep_last_keeps_the_highest_steps_not_the_last_names():
    infos = [info(s) for s in (1000, 9, 100, 999, 10)]
    assert steps(to_delete(infos, Retention(keep_last=2))) == [9, 10, 100]


def test_keep_last_none_keeps_everything_and_zero_keeps_only_other_rules():
    infos = [info(s, loss=1.0 / s) for s in (1, 2, 3)]
    assert to_delete(infos, Retention(keep_last=None)) == []
    assert steps(to_delete(infos, Retention(keep_last=0, keep_best=1, monitor="loss"))) == [1, 2]


def test_keep_best_adds_to_keep_last_and_nan_is_never_kept_as_best():
    infos = [info(1, loss=0.1), info(2, loss=math.nan), info(3, loss=0.5), info(4, loss=0.9), info(5, loss=0.8)]
    retention = Retention(keep_last=1, keep_best=2, monitor="loss", mode="min")
    assert steps(to_delete(infos, retention)) == [2, 4]
    assert to_keep(infos, retention) == {infos[0].path, infos[2].path, infos[4].path}
    maximize = Retention(keep_last=1, keep_best=1, monitor="loss", mode="max")
    assert steps(to_delete(infos, maximize)) == [1, 2, 3]


def test_keep_every_n_steps_is_kept_forever_outside_keep_last():
    infos = [info(s) for s in range(100, 1100, 100)]
    retention = Retention(keep_last=2, keep_every_n_steps=500)
    assert steps(to_delete(infos, retention)) == [100, 200, 300, 400, 600, 700, 800]


def test_the_resumed_from_checkpoint_is_never_deleted():
    infos = [info(s) for s in (100, 200, 300, 400)]
    resumed = infos[0].path
    assert steps(to_delete(infos, Retention(keep_last=1), protected={resumed})) == [200, 300]
    assert steps(to_delete(infos, Retention(keep_last=0), protected={resumed})) == [200, 300, 400]


def test_two_directories_of_one_step_are_told_apart_by_path():
    twin = CheckpointInfo(5, 6.0, {}, "/run/step-5", 1)
    infos = [info(5), twin, info(6)]
    assert [i.path for i in to_delete(infos, Retention(keep_last=2))] == ["/run/step-00000005"]


@pytest.mark.parametrize("kwargs", [{"keep_last": -1}, {"keep_last": 1.0}, {"keep_best": 0},
                                    {"keep_best": 1}, {"keep_best": 1, "monitor": "loss", "mode": "lowest"},
                                    {"keep_every_n_steps": 0}, {"monitor": 3}])
def test_bad_retention_is_refused(kwargs):
    with pytest.raises(CheckpointError):
        Retention(**kwargs)


def test_keep_best_without_monitor_says_how_to_fix_it():
    with pytest.raises(CheckpointError, match="monitor='val_loss'"):
        Retention(keep_best=2)


# --- leftovers of a crash ------------------------------------------------------------------

def test_only_our_temporaries_are_chosen_for_cleaning():
    ours = temporary_name(checkpoint_name(1200), "0123456789ab")
    assert ours == ".tmp-step-00001200-0123456789ab"
    foreign = [".tmp", ".tmp-", ".tmp-mine", ".tmp-step-1", ".tmp-step-00001200-XYZ", "tmp-step-00001200-abcdef12",
               ".tmp-step-00001200-0123456789ab.bak", "step-00001200", ".safeckpt.lock", "notes.txt",
               ".tmp-step-00001200-abc"]
    assert temporaries_to_remove([ours, *foreign]) == [ours]


def test_partials_are_ours_only_when_named_like_a_step_holding_only_our_files_and_older():
    partials = {
        "step-00000005": ["tensors.safetensors"],               # a crashed save: cleaned
        "step-00000006": ["tensors.safetensors", "state.json"],  # cleaned
        "step-00000007": ["tensors.safetensors", "notes.txt"],   # a file we never write: kept
        "step-00000008": [],                                     # nothing of ours in it: kept
        "step-00000020": ["tensors.safetensors"],                # newer than the newest commit: maybe in flight
        "step-final": ["tensors.safetensors"],                   # not a step name
        "backup": ["state.json"],
    }
    assert partials_to_remove(partials, newest_committed_step=10, is_ours=OUR_FILES.__contains__) == \
        ["step-00000005", "step-00000006"]
    assert partials_to_remove(partials, newest_committed_step=None, is_ours=OUR_FILES.__contains__) == []
