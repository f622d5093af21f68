"""Fixtures of the training tests: child processes that write checkpoints, to be killed or raced."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def fault_child():
    """fault_child(target, *args, **kwargs) -> (conn, child): run a child function of fault_child.py
    (`hold_child`, `open_child`, `efbig_child`) in a forkserver process, given its end of a pipe first;
    `fault_child.receive(conn, child)` reads what it says. Children still alive at teardown are killed.

        conn, child = fault_child(fc.open_child, str(directory), step=9)
        assert fc.receive(conn, child)["raised"] == "LockedError"
    """
    from tests.training import fault_child as fc  # imports torch: only where a test asks for a child

    started = []

    def start(target, *args, **kwargs):
        ctx = fc.context()
        conn, end = ctx.Pipe()
        child = ctx.Process(target=target, args=(end, *args), kwargs=kwargs)
        child.start()
        started.append(child)
        return conn, child

    yield start
    for child in started:
        if child.is_alive():
            child.kill()
        child.join(fc.CHILD_TIMEOUT_S)


@pytest.fixture
def paused_writer(fault_child):
    """paused_writer(directory) -> (conn, child): a writer that committed step 1 and stopped inside save(2),
    before its commit: its temporary exists and it holds the lock. Send "go" to let it finish, or kill it
    (`child.kill()`) to leave what a writer killed mid-write leaves."""
    from tests.training import fault_child as fc

    def start(directory: Path):
        conn, child = fault_child(fc.hold_child, str(directory))
        assert fc.receive(conn, child) == "saved 1"
        assert fc.receive(conn, child) == "paused"
        return conn, child

    return start
