"""Every error safeckpt raises on bad input is a `SafeckptError`.

Each problem has its own class so that callers (and tests) can tell faults
apart without parsing messages. Messages name the file, the tensor and what is
wrong, and end with what to do where there is something to do.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence


# A tensor name longer than this is cut in messages (it is kept whole in `.tensor`),
# so that a hostile file cannot make every message megabytes long.
_MAX_NAME_IN_MESSAGE = 200


class SafeckptError(Exception):
    """Base class of every error safeckpt raises on bad input or misuse."""

    def __init__(self, detail: str, *, path: "Optional[os.PathLike | str]" = None,
                 tensor: Optional[str] = None) -> None:
        self.detail = detail
        self.path = os.fspath(path) if path is not None else None
        self.tensor = tensor
        super().__init__(self._compose())

    def _compose(self) -> str:
        where = []
        if self.path is not None:
            where.append(f"{self.path}")
        if self.tensor is not None:
            name = repr(self.tensor)
            if len(name) > _MAX_NAME_IN_MESSAGE:
                name = name[:_MAX_NAME_IN_MESSAGE] + "..."
            where.append(f"tensor {name}")
        return (": ".join(where) + ": " if where else "") + self.detail


# safetensors' name for its one exception class: `except SafetensorError` catches every error we raise.
SafetensorError = SafeckptError


# --- reading: the header and layout of a safetensors file -------------------

class HeaderError(SafeckptError, ValueError):
    """The file is not a valid safetensors file."""


class FileTooSmallError(HeaderError):
    """Fewer than the 8 bytes of the header-length prefix."""


class HeaderTooLargeError(HeaderError):
    """The declared header length exceeds the format's 100 MB limit."""


class HeaderLengthError(HeaderError):
    """The declared header length runs past the end of the file."""


class HeaderEncodingError(HeaderError):
    """The header is not valid UTF-8 (or holds a lone surrogate escape)."""


class HeaderJSONError(HeaderError):
    """The header is not valid JSON."""


class HeaderNotObjectError(HeaderError):
    """The header (or a tensor entry) is JSON but not an object."""


class DuplicateKeyError(HeaderError):
    """A tensor name, a metadata key or a field appears twice."""


class MissingFieldError(HeaderError):
    """A tensor entry lacks `dtype`, `shape` or `data_offsets`."""


class UnexpectedFieldError(HeaderError):
    """A tensor entry has a field the format does not define."""


class FieldTypeError(HeaderError):
    """A field has the wrong JSON type (e.g. a string where a list is due)."""


class UnknownDTypeError(HeaderError):
    """The dtype string is not one of the format's dtypes."""


class InvalidShapeError(HeaderError):
    """A shape entry is negative, not an integer, or absurdly large."""


class SizeOverflowError(HeaderError):
    """shape × dtype size does not fit in 64 bits."""


class SubByteSizeError(HeaderError):
    """A sub-byte dtype tensor whose total bits are not a multiple of 8."""


class InvalidOffsetsError(HeaderError):
    """`data_offsets` is not a pair of non-negative integers."""


class OffsetOutOfBoundsError(HeaderError):
    """A tensor's bytes run past the end of the data buffer."""


class ReversedOffsetsError(HeaderError):
    """A tensor's end offset is before its start."""


class OverlapError(HeaderError):
    """Two tensors claim the same bytes."""


class GapError(HeaderError):
    """Bytes between two tensors belong to none of them."""


class TrailingBytesError(HeaderError):
    """Bytes after the last tensor belong to none of them."""


class SizeMismatchError(HeaderError):
    """A tensor's byte span differs from shape × dtype size."""


class MetadataError(HeaderError):
    """`__metadata__` is not a mapping of strings to strings."""


class WrongFormatError(HeaderError):
    """The file is something else entirely: a pickle, a zip, an LFS pointer, HTML, GGUF."""

    def __init__(self, detail: str, *, detected: str, **kwargs) -> None:
        self.detected = detected
        super().__init__(detail, **kwargs)


# --- reading: asking for something that is not there -----------------------

class TensorNotFoundError(SafeckptError, KeyError):
    """The requested tensor name is not in the file."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class SliceError(SafeckptError, IndexError):
    """An index that numpy basic indexing would refuse for this shape."""


class FileClosedError(SafeckptError, ValueError):
    """A `safe_open` handle (or a slice taken from it) used after its `with` block or `close()`."""


class DTypeConversionError(SafeckptError, TypeError):
    """A dtype that the target framework (or numpy) cannot represent."""


class NotRegularFileError(SafeckptError, OSError):
    """A path that is a FIFO, a socket or a device: refused before it is opened, since opening
    one can wait for a writer forever and reading one may never end.

    An OSError too (the file cannot be read: the CLI exits 2), with `filename` and `strerror`.
    """

    def __init__(self, detail: str, **kwargs) -> None:
        super().__init__(detail, **kwargs)
        self.filename, self.strerror = self.path, detail

    def __str__(self) -> str:  # OSError would print "[Errno None] ..."
        return self.args[0]


# --- writing ----------------------------------------------------------------

class OutputError(SafeckptError, OSError):
    """An output that cannot be written where asked (the CLI exits 2); nothing was written.

    An OSError too, with `filename` set to the path at fault.
    """

    def __init__(self, detail: str, **kwargs) -> None:
        super().__init__(detail, **kwargs)
        self.filename = self.path

    def __str__(self) -> str:  # OSError would print "[Errno None] ..." once filename is set
        return self.args[0]


class OutputIsInputError(OutputError):
    """The output path is one of the inputs (or an input's shard or index), whatever its spelling."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and replacing it was not asked for (``overwrite=True``, ``--force``)."""


class OutputNotWritableError(OutputError):
    """The output's folder refuses writes (permission denied, a read-only filesystem, no space).

    The message reads "cannot write FOLDER: permission denied"; temporary file names never appear.
    """

    def _compose(self) -> str:
        return f"cannot write {self.path}: {self.detail}"


class UnsupportedTensorError(SafeckptError, ValueError):
    """A value that cannot be saved: not a tensor, an unsupported dtype, sparse, ..."""


class SharedTensorsError(SafeckptError, RuntimeError):
    """Several names share memory; safetensors stores each tensor once (use save_model)."""


class InvalidNameError(SafeckptError, ValueError):
    """A tensor name that is not a string, or is the reserved `__metadata__`."""


class InvalidMetadataError(SafeckptError, ValueError):
    """Metadata to write that is not a mapping of strings to strings."""


class FrameworkError(SafeckptError, ValueError):
    """An unknown framework name, or a framework that is not installed."""


# --- foreign formats (sources/) --------------------------------------------

class SourceError(SafeckptError, ValueError):
    """A checkpoint in a foreign format (torch, npz, GGUF, ...) that is malformed or unreadable."""


class UnknownFormatError(SourceError):
    """The content matches no format we read (the extension is never trusted)."""


class UnsafeFileError(SafeckptError, ValueError):
    """A file whose scan found code execution or other hostile content; nothing was run.

    `report` holds the scan report with the findings.
    """

    def __init__(self, detail: str, *, report=None, **kwargs) -> None:
        self.report = report
        super().__init__(detail, **kwargs)


# --- merging (ops/merge.py) --------------------------------------------------

class IncompatibleInputsError(SafeckptError, ValueError):
    """The inputs cannot be merged: tensors with different shapes, or missing from some inputs.

    `offenders` lists every tensor at fault, one line each.
    """

    def __init__(self, detail: str, *, offenders: Sequence[str] = (), **kwargs) -> None:
        self.offenders = list(offenders)
        super().__init__(detail, **kwargs)


# --- training checkpoints (training/) ----------------------------------------

class CheckpointError(SafeckptError, RuntimeError):
    """A training checkpoint cannot be saved, found or restored (the message says which and why)."""


class IntegrityError(CheckpointError):
    """A committed checkpoint's bytes differ from its manifest: `path` names the file, `tensor` the tensor."""


class LockedError(CheckpointError):
    """Another CheckpointManager (the message names its pid) is writing this directory."""


class CheckpointNotFoundError(CheckpointError, LookupError):
    """No committed checkpoint matches the request ("latest", "best" or a step)."""


# --- training state trees (training/state.py, torch.training_state) --------

class UnsupportedStateError(SafeckptError, TypeError):
    """A value in a state tree that cannot be stored without pickle: a function, a set, an object."""


class StateFormatError(SafeckptError, ValueError):
    """A state document or training state that does not describe a state: malformed, newer, incomplete."""
