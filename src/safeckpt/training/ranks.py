"""The ranks of a torch process group, as `CheckpointManager` sees them: who decides, how all agree.

Under an initialized process group every rank runs the same program and calls the
manager alike; rank 0 alone decides what touches the directory (whether a step is
saved, what is pruned, which checkpoint a restore takes, what `list()` shows) and the
others take its answer, so that no two ranks act on different views of a shared
file system. Answers travel as JSON bytes in tensors over a gloo group of the
manager's own (never as pickles, and never interleaved with the training's
collectives); an error on rank 0 is raised on every rank with the same message.

torch is imported only when a process group is already initialized.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Optional

from .. import errors
from ..errors import CheckpointError, SafeckptError


def process_group_active() -> bool:
    """Whether this process is a rank of an initialized torch process group (torch not imported otherwise)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


class Ranks:
    """This process's place in the default process group, and the manager's own gloo groups:
    `control` for the answers the main thread agrees on, `saving` for the collectives of a
    save (its own group when saves run in the background, so the two never interleave).

    Creating one is a collective: every rank creates its manager at the same point."""

    def __init__(self, background_saves: bool) -> None:
        import torch.distributed as dist

        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.control = dist.new_group(backend="gloo")
        self.saving = dist.new_group(backend="gloo") if background_saves else self.control

    @property
    def decides(self) -> bool:
        """Whether this is the rank that decides (rank 0)."""
        return self.rank == 0

    def agree(self, decide: Callable[[], Any]) -> Any:
        """Rank 0's ``decide()`` (a JSON value), on every rank. Its SafeckptError or OSError is raised
        on every rank: the same error class (CheckpointError for an OSError) with the same message."""
        if not self.decides:
            answer = self._broadcast(None)
            if "error" in answer:
                kind = getattr(errors, str(answer.get("type")), None)
                if not (isinstance(kind, type) and issubclass(kind, SafeckptError)):
                    kind = CheckpointError
                raise kind(answer["error"], path=answer.get("path"), tensor=answer.get("tensor"))
            return answer["value"]
        try:
            value = decide()
        except (SafeckptError, OSError) as exc:
            if isinstance(exc, SafeckptError):
                self._broadcast({"error": exc.detail, "type": type(exc).__name__, "path": exc.path,
                                 "tensor": exc.tensor})
            else:
                self._broadcast({"error": str(exc), "type": "CheckpointError", "path": None, "tensor": None})
            raise
        self._broadcast({"value": value})
        return value

    def barrier(self) -> None:
        """Wait until every rank is here (rank 0's changes to the directory are then visible to all)."""
        import torch.distributed as dist

        dist.barrier(group=self.control)

    def _broadcast(self, payload: Optional[dict]) -> dict:
        import torch
        import torch.distributed as dist

        if payload is not None:
            raw = json.dumps(payload, allow_nan=False, ensure_ascii=False).encode("utf-8")
            size = torch.tensor([len(raw)], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, src=self._global(0), group=self.control)
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if payload is not None else \
            torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, src=self._global(0), group=self.control)
        return payload if payload is not None else json.loads(bytes(data.numpy()).decode("utf-8"))

    def _global(self, rank: int) -> int:
        import torch.distributed as dist

        return dist.get_global_rank(self.control, rank)


def failures_text(exc: BaseException) -> str:
    """What DCP's CheckpointException says failed, rank by rank, in one line."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return f"{type(exc).__name__}: {exc}"
    parts = []
    for rank, failure in sorted(failures.items()):
        error = failure[0] if isinstance(failure, tuple) and failure else failure
        parts.append(f"rank {rank}: {_one_line(error)}")
    return "; ".join(parts)


def _one_line(error: Any) -> str:
    import errno

    if isinstance(error, OSError) and error.errno:
        return f"{error.strerror or error} ({errno.errorcode.get(error.errno, error.errno)})"
    return f"{type(error).__name__}: {error}" if not isinstance(error, SafeckptError) else str(error)
