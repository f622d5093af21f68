"""Training checkpoints without pickle: state trees stored as safetensors + JSON.

>>> from safeckpt.training import split_state, join_state
>>> tensors, document = split_state({"model": model.state_dict(), "step": 10})
>>> state = join_state(tensors, document)
"""

from .manager import CheckpointInfo, CheckpointManager
from .state import SCHEMA_VERSION, join_state, snapshot, split_state

__all__ = [
    "CheckpointManager",
    "CheckpointInfo",
    "SCHEMA_VERSION",
    "split_state",
    "join_state",
    "snapshot",
]
