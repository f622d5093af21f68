"""Distributed checkpoint cases: two gloo ranks on the CPU, each holding half of the model state.

`RankPool` starts the ranks once, in `prepare` (process start-up, torch import and the
process group are not timed); the timed operation sends each rank a command and waits
for both to finish it. Each rank holds every tensor as a ``Shard(0)`` DTensor of the
1 GiB-class model state, so a checkpoint holds each byte once, half written by each rank.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
from typing import Any

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_state(size: int) -> dict:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from .statedict import model_spec, torch_state_dict

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    state = {name: distribute_tensor(tensor, mesh, [Shard(0)])
             for name, tensor in torch_state_dict(model_spec(size)).items()}
    state["step"] = torch.tensor(1000)  # DCP stores scalars beside the tensors, as a training state does
    return state


def _rank_loop(rank: int, port: int, size: int, conn: Any) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from safeckpt.torch.distributed import SafeStorageWriter

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(minutes=10))
    state = _sharded_state(size)
    conn.send("ready")
    while True:
        command = conn.recv()
        if command is None:
            break
        kind, directory = command
        writer = SafeStorageWriter(directory) if kind == "ours" else \
            dcp.FileSystemWriter(directory, sync_files=True)
        dcp.save(state, storage_writer=writer)
        dist.barrier()
        conn.send("done")
    dist.destroy_process_group()


class RankPool:
    """Two ranks waiting for commands; `save(kind, directory)` has both save their shards."""

    def __init__(self, size: int) -> None:
        import multiprocessing

        context = multiprocessing.get_context("forkserver")
        port = _free_port()
        self.conns, self.procs = [], []
        for rank in range(WORLD_SIZE):
            parent, child = context.Pipe()
            proc = context.Process(target=_rank_loop, args=(rank, port, size, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            if conn.recv() != "ready":
                raise RuntimeError("a rank failed to start")
        atexit.register(self.close)

    def save(self, kind: str, directory: str) -> None:
        for conn in self.conns:
            conn.send((kind, directory))
        for conn in self.conns:
            if conn.recv() != "done":
                raise RuntimeError("a rank failed to save")

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if proc.is_alive():
                conn.send(None)
                proc.join(30)


def full_state_template(size: int) -> dict:
    """What a single process loads a 2-rank checkpoint into (world size 1: every tensor whole)."""
    import torch

    from .statedict import model_spec

    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16}
    state = {name: torch.empty(shape, dtype=dtypes[dtype]) for name, shape, dtype in model_spec(size)}
    state["step"] = torch.tensor(0)
    return state
