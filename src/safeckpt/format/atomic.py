"""Atomic local writes: a file replaced whole or not at all, and made durable.

`atomic_output(path)` gives a file descriptor of a temporary sibling of `path`
(created with mode 0666 & ~umask, like any ordinary file); on success it is
fsynced, renamed over `path` and the directory fsynced, so a crash or error
leaves the old file untouched. `write_all` continues short writes.
"""

from __future__ import annotations

import os
import secrets

from .. import errors


def write_all(fd: int, data: memoryview) -> None:
    """Write all of `data` to `fd` (os.write may write less than asked)."""
    data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while data:
        written = os.write(fd, data)
        data = data[written:]


class atomic_output:
    """Context manager giving a file descriptor whose content replaces `path` on success."""

    def __init__(self, path: str) -> None:
        self.path = path
        directory, base = os.path.split(os.path.abspath(path))
        self.directory = directory
        self.temp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        self.fd = -1

    def __enter__(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(self.temp, flags, 0o666)  # the kernel applies the umask
        except OSError as exc:  # name the folder the user chose, never our temporary name
            raise errors.OutputNotWritableError(_reason(exc), path=self.directory) from None
        return self.fd

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                os.fsync(self.fd)
            os.close(self.fd)
            if exc_type is None:
                try:
                    os.replace(self.temp, self.path)
                except OSError as exc:
                    raise errors.OutputNotWritableError(_reason(exc), path=self.path) from None
                fsync_directory(self.directory)
        finally:
            if os.path.exists(self.temp):
                os.unlink(self.temp)


def _reason(exc: OSError) -> str:
    """"permission denied", "read-only file system", ...: the OS's words without the paths."""
    return (exc.strerror or str(exc)).lower()


def fsync_directory(directory: str) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)
