"""merge: several checkpoints -> one safetensors model, streamed one tensor at a time.

`merger` opens the inputs, plans each output tensor and streams it to the sink;
`methods` holds the math (linear, EMA, SLERP, task arithmetic, TIES, DARE) as pure
numpy functions.

    >>> from safeckpt.ops.merge import merge
    >>> merge(["a.safetensors", "b.safetensors"], "avg.safetensors").tensors
    291
"""

from .merger import DEFAULT_DENSITY, METHODS, MergeReport, merge

__all__ = ["merge", "MergeReport", "METHODS", "DEFAULT_DENSITY"]
