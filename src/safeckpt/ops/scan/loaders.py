"""How numpy.load and torch.load find the pickles in npy files and legacy tar archives.

Each helper answers with the loader's own code where the loader uses a standard
library or numpy function, so that the scan cannot read the bytes differently:

* `npy_header`: ``numpy.lib.format`` reads the header (``ast.literal_eval`` of a
  dict, nothing evaluated), through `sources.npz.numpy_header`, the one reader of npy
  headers our sources use too; an object dtype means ``numpy.load(allow_pickle=True)``
  unpickles everything after it. With pickles allowed numpy reads a header of any
  length, so a longer one than `MAX_NPY_HEADER` is reported as not followed.
* `open_tar` / `torch_tar_member`: ``torch.load`` tries every file that does not
  start with ``PK\\x03\\x04`` as a tar archive (``tarfile.open(mode="r:")``, which
  needs no ``ustar`` magic, only a first header with a valid checksum), then
  extracts ``storages`` and ``tensors`` and unpickles ``pickle``: the last member
  of each name, a link (hard or symbolic) followed to the member it names.
"""

from __future__ import annotations

import tarfile
from typing import Any, Optional

import numpy as np

from ...sources.npz import is_npy, numpy_header
from ...sources.base import ReadTooLarge, ViewFile

__all__ = ["npy_header", "NpyHeaderTooLong", "is_tar", "open_tar", "torch_tar_member", "TORCH_TAR_MEMBERS",
           "MAX_NPY_HEADER", "MAX_TAR_MEMBERS", "MAX_LINK_HOPS"]

# An npy header numpy reads when pickles are allowed has no length limit; real ones
# are under 10 kB (numpy's own default limit), structured dtypes with many fields a bit more.
MAX_NPY_HEADER = 1 << 20
# Tar members listed: torch reads every header before it extracts anything.
MAX_TAR_MEMBERS = 10_000
# Links followed from one tar member to the next (tarfile itself would recurse forever).
MAX_LINK_HOPS = 8
# The members torch's legacy tar format is read from, in the order torch reads them.
TORCH_TAR_MEMBERS = ("storages", "tensors", "pickle")



class NpyHeaderTooLong(ValueError):
    """An npy header longer than `MAX_NPY_HEADER`: numpy would read it, the scan does not."""


def npy_header(view: memoryview) -> tuple[np.dtype, int]:
    """(dtype, offset of the data) of the npy array at the start of `view`, read by numpy.

    Raises ValueError (numpy refuses it too) or `NpyHeaderTooLong`.
    """
    if not is_npy(bytes(view[:6])) or len(view) < 10:
        raise ValueError("not an npy array")
    version = (view[6], view[7])
    width = 2 if version == (1, 0) else 4
    length = int.from_bytes(view[8:8 + width], "little")
    if length > MAX_NPY_HEADER:
        raise NpyHeaderTooLong(f"an npy header of {length} bytes (the scan reads {MAX_NPY_HEADER})")
    try:
        header = numpy_header(view, max_header_size=MAX_NPY_HEADER)
    except ValueError as exc:
        raise ValueError(f"numpy refuses its header: {exc}") from None
    return header.dtype, header.data_offset


# What a checksum field can start with: an octal digit, a space or NUL, or base-256's marker.
_CHECKSUM_START = frozenset(b"01234567 \x00\x80\xff")


def is_tar(head: bytes) -> bool:
    """Whether tarfile accepts `head` (a file's first 512 bytes or more) as a tar header:
    its checksum field matches, as tarfile checks (no "ustar" magic needed)."""
    if len(head) < tarfile.BLOCKSIZE or head[148] not in _CHECKSUM_START \
            or head[:tarfile.BLOCKSIZE].count(0) == tarfile.BLOCKSIZE:
        return False
    try:
        return tarfile.nti(head[148:156]) in tarfile.calc_chksums(head[:tarfile.BLOCKSIZE])
    except (tarfile.InvalidHeaderError, ValueError):
        return False


def open_tar(view: memoryview) -> Optional[tarfile.TarFile]:
    """The archive as torch.load's ``tarfile.open(fileobj=f, mode="r:")`` sees it, its
    members listed (at most `MAX_TAR_MEMBERS`), or None where tarfile refuses the bytes.

    Raises OverflowError past `MAX_TAR_MEMBERS` (a scan cannot follow it).
    """
    if not is_tar(bytes(view[:tarfile.BLOCKSIZE])):
        return None
    try:
        tar = tarfile.open(fileobj=ViewFile(view), mode="r:", format=tarfile.PAX_FORMAT)
        if tar.firstmember is None:
            return None  # an empty archive (a first block of zeros): nothing to extract
        for count, _ in enumerate(iter(tar.next, None)):
            if count >= MAX_TAR_MEMBERS:
                raise OverflowError(f"more than {MAX_TAR_MEMBERS} tar members")
    except OverflowError:
        raise
    except ReadTooLarge as exc:
        raise OverflowError(str(exc)) from None
    except Exception:  # noqa: BLE001 - tarfile on untrusted bytes: any failure means "not a tar"
        return None
    return tar


def torch_tar_member(tar: tarfile.TarFile, name: str) -> tuple[Optional[tarfile.TarInfo], list[str]]:
    """The member whose bytes torch reads as `name`, and the links followed to reach it.

    None when there is no such member or a link leads outside the archive (torch would
    then read a file of the loading machine, or fail).
    """
    try:
        member: Any = tar.getmember(name)
    except KeyError:
        return None, []
    hops: list[str] = []
    while member.islnk() or member.issym():
        hops.append(f"{member.name} -> {member.linkname}")
        if len(hops) > MAX_LINK_HOPS:
            return None, hops
        try:
            member = tar._find_link_target(member)  # tarfile's own resolution, as extractfile does
        except (KeyError, RecursionError):
            return None, hops
    return member, hops
