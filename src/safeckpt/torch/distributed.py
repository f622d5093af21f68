"""torch.distributed.checkpoint (DCP) without pickle: every rank's shards in safetensors, the metadata in JSON.

    >>> import torch.distributed.checkpoint as dcp
    >>> from safeckpt.torch.distributed import SafeStorageWriter, SafeStorageReader
    >>> dcp.save(state_dict, storage_writer=SafeStorageWriter("ckpt/step-100"))
    >>> dcp.load(state_dict, storage_reader=SafeStorageReader("ckpt/step-100"))   # any world size
    >>> consolidate("ckpt/step-100", "hf-model/")                                  # one model, no process group

The storage classes, the directory format and `read_state` are `safeckpt.training.dcp`'s
(`CheckpointManager` saves through them under a process group); this module is their
public home beside the rest of the torch API, plus `consolidate`.
"""

from __future__ import annotations

import os
from typing import Any

from ..training.dcp import SafeStorageReader, SafeStorageWriter, read_state

__all__ = ["SafeStorageWriter", "SafeStorageReader", "consolidate", "read_state"]


def consolidate(path: "str | os.PathLike[str]", out: "str | os.PathLike[str]", *,
                shard_size: "int | str | None" = "5GB", **options: Any) -> Any:
    """One Hugging Face-style model (``format: pt``; shards of `shard_size` + index when larger) from a
    distributed checkpoint, each tensor assembled from its chunks; no process group needed.

    `options` are `safeckpt.ops.convert.convert`'s (``dtype``, ``select``, ``overwrite``, ...);
    ``safeckpt convert CKPT_DIR OUT/`` does the same.

    >>> consolidate("ckpt/step-100", "hf-model/")
    """
    from ..ops.convert import convert

    return convert(os.fspath(path), os.fspath(out), shard_size=shard_size, extract=None, **options)
