"""Files and bytes for the tests: made byte by byte or with the real libraries, and damaged on purpose.

    >>> path.write_bytes(safetensors_bytes({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"x"))
    >>> flip_byte(path, -1)  # the one data byte, damaged
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Union


def safetensors_bytes(header: Union[str, bytes, dict], data: bytes = b"") -> bytes:
    """A file made byte by byte: 8-byte length, header (dict -> compact JSON), data."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode("utf-8")
    return struct.pack("<Q", len(header)) + header + data


def torch_save_bytes(obj, **kwargs) -> bytes:
    """What ``torch.save(obj, f, **kwargs)`` writes (a zip; a legacy file with
    ``_use_new_zipfile_serialization=False``)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def tensor_bytes(tensor) -> bytes:
    """A torch tensor's bytes in C order, as a safetensors file holds them (bf16, fp8 and bool too),
    so that comparing them is bit-exact and NaN-safe."""
    import torch

    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    """XOR the byte at `offset` (negative: from the end) of the file with `mask`; flipping twice undoes it."""
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= mask
    Path(path).write_bytes(bytes(data))


def lfs_pointer_text(oid: str, size: int) -> str:
    """A Git LFS pointer file, as `git lfs` leaves in place of a file it has not pulled."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
