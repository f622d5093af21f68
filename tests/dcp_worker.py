"""A rank of a gloo process group on the CPU, for the distributed checkpoint tests.

`run(world_size, task, *args)` starts `world_size` processes (forkserver) that join one gloo
group and call `task(rank, world_size, *args)`; each task returns something picklable, and
`run` returns the list in rank order (a failed rank's error is raised in the parent).
"""

from __future__ import annotations

import datetime
import os
import queue as queue_module
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = int(os.environ.get("DCP_WORKER_TIMEOUT", "120"))
COLLECTIVE_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, task, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        # a collective waiting for a rank that died fails after this, not after gloo's 30 minutes
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        try:
            queue.put((rank, "ok", task(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run(world_size: int, task, *args, dies: tuple = ()) -> list:
    """`dies`: ranks expected to kill themselves (their result is None); any other death fails."""
    ctx = mp.get_context("forkserver")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, task, args, queue))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    results: dict = {}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(results) < world_size:
            for r in dies:
                if r not in results and procs[r].exitcode is not None:
                    results[r] = None
            if len(results) == world_size:
                break
            try:
                rank, status, value = queue.get(timeout=1)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and r not in results and r not in dies]
                if dead:
                    raise AssertionError(f"rank {dead[0]} died (exit code {procs[dead[0]].exitcode})") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"no answer from ranks {sorted(set(range(world_size)) - set(results))} "
                                         f"in {TIMEOUT_S} s") from None
                continue
            if status == "error":
                raise AssertionError(f"rank {rank} failed: {value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
