"""diff: compare two checkpoints tensor by tensor, streaming, in float64.

`compare` matches the names and streams the pairs; `sums` holds the float64 sums
of one part of a pair (numpy only); `plot` draws a report's per-layer change.

    >>> from safeckpt.ops.diff import diff
    >>> diff("base.safetensors", "tuned.safetensors").identical
    False
"""

from .compare import STATUSES, DiffEntry, DiffReport, diff

__all__ = ["diff", "DiffReport", "DiffEntry", "STATUSES"]
