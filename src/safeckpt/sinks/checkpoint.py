"""A training checkpoint written: ``tensors.safetensors``, ``state.json``, then ``manifest.json``.

The layout, names and the meaning of each file are `safeckpt.format.checkpoint_dir`'s;
this module writes one step into a staging directory of a
`safeckpt.format.checkpoint_storage` storage (local or fsspec), the tensors through
the one safetensors writer (`sinks.safetensors.write_stream`), hashed range by range
as they are written. Committing the staging directory is the caller's.
"""

from __future__ import annotations

import json
import platform
import sys
from typing import Any, Mapping, Optional

import numpy as np

from .._version import __version__
from ..format import integrity
from ..format.checkpoint_dir import (MANIFEST_FILE, STATE_FILE, STATE_FORMAT, STATE_SCHEMA_VERSION, TENSORS_FILE,
                                     CheckpointInfo, decode_metrics)
from ..format.checkpoint_storage import Staging
from ..format.integrity import HASH, encode_manifest, hash_bytes
from ..format.writer import prepare
from .safetensors import from_prepared, write_stream


def library_versions() -> dict[str, str]:
    """Versions recorded with each checkpoint: safeckpt, Python, numpy, and torch/jax when loaded."""
    versions = {"safeckpt": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for module in ("torch", "jax"):
        if module in sys.modules:
            versions[module] = str(getattr(sys.modules[module], "__version__", "unknown"))
    return versions


def manifest_entry(written: Any) -> dict:
    """The manifest's entry for a safetensors file `write_stream(..., hashed=True)` wrote: its size and
    BLAKE3, and the hash of its header and of each tensor's byte range."""
    (_, _, header_end), hashes = written.ranges[0], written.range_hashes
    return {"size": written.size, HASH: written.file_hash, "hashed": integrity.RANGES,
            "header": {"range": [0, header_end], HASH: hashes[0]},
            "tensors": {name: {"range": [begin, end], HASH: digest}
                        for (name, begin, end), digest in zip(written.ranges[1:], hashes[1:])}}


def write_checkpoint(staging: Staging, step: int, now: float, metrics: dict, tensors: Mapping[str, Any],
                     document: dict, monitor: Optional[str] = None, mode: str = "min") -> CheckpointInfo:
    """Write tensors.safetensors, state.json, then manifest.json into `staging` (not committed
    here: the caller commits or aborts it). `metrics` come from `clean_metrics`; `monitor` and
    `mode` are recorded for ranking "best" later. The tensors' bytes are hashed while written.

    >>> staging = storage.begin(checkpoint_name(1200))
    >>> info = write_checkpoint(staging, 1200, time.time(), {}, {"w": np.zeros(3)}, document)
    >>> staging.commit()
    """
    where = staging.where(TENSORS_FILE)
    outputs = [from_prepared(prepare(name, array, where)) for name, array in tensors.items()]
    with staging.open(TENSORS_FILE) as out:
        written = write_stream(outputs, out, {"step": str(step)}, hashed=True, where=where)
    tensors_entry = manifest_entry(written)
    versions = library_versions()
    state_bytes = json.dumps({"format": STATE_FORMAT, "schema_version": STATE_SCHEMA_VERSION, "step": step,
                              "time": now, "metrics": metrics, "versions": versions, "state": document},
                             ensure_ascii=False, allow_nan=False).encode("utf-8")
    with staging.open(STATE_FILE) as out:
        out.write(state_bytes)
    files = {TENSORS_FILE: tensors_entry, STATE_FILE: {"size": len(state_bytes), HASH: hash_bytes(state_bytes)}}
    manifest = encode_manifest({
        "format": integrity.MANIFEST_FORMAT, "schema_version": integrity.MANIFEST_SCHEMA_VERSION,
        "step": step, "time": now, "metrics": metrics,
        "monitor": {"name": monitor, "mode": mode} if monitor else None, "versions": versions, "hash": HASH,
        "files": files})
    with staging.open(MANIFEST_FILE) as out:
        out.write(manifest)
    size = len(manifest) + sum(entry["size"] for entry in files.values())
    return CheckpointInfo(step, now, decode_metrics(metrics), staging.final, size)


__all__ = ["write_checkpoint", "library_versions", "manifest_entry"]
