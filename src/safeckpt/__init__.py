"""safeckpt: safe, fast, portable model weights and training checkpoints.

>>> import numpy as np, safeckpt
>>> safeckpt.save_file({"w": np.ones((2, 2), np.float32)}, "model.safetensors")
>>> safeckpt.load_file("model.safetensors")["w"]
"""

from .api import load, load_file, safe_open, save, save_file
from .errors import HeaderError, SafeckptError, SourceError, UnsafeFileError
from .format import RawTensor, SafetensorsFile, TensorInfo
from .ops.cast import cast
from .ops.convert import ConvertReport, convert
from .ops.diff import DiffReport, diff
from .ops.merge import MergeReport, merge
from .ops.scan import ScanReport, scan
from .ops.verify import VerifyReport, verify
from .sources import TensorSource, open_source
from .training.manager import CheckpointInfo, CheckpointManager

__version__ = "0.1.0"

__all__ = [
    "save_file", "load_file", "save", "load", "safe_open",
    "SafeckptError", "HeaderError", "SourceError", "UnsafeFileError",
    "RawTensor", "SafetensorsFile", "TensorInfo", "open_source", "TensorSource",
    "scan", "ScanReport", "convert", "ConvertReport", "cast", "verify", "VerifyReport",
    "diff", "DiffReport", "merge", "MergeReport",
    "CheckpointManager", "CheckpointInfo",
]
