"""The safetensors file format: dtypes, header, reader, writer. Depends on nothing else of ours."""

from .dtypes import DTYPES, DType
from .header import Header, HeaderEntry
from .reader import SafetensorsFile
from .writer import RawTensor

__all__ = ["DTYPES", "DType", "Header", "HeaderEntry", "SafetensorsFile", "RawTensor"]
