"""Where a checkpoint directory's bytes go: a local directory, or any fsspec URL (``s3://``, ``memory://``, ...).

`safeckpt.format.checkpoint_dir` says what a checkpoint directory holds; this
module moves its bytes. Both storages offer the same small interface: list
the entries of the root, read a file (small ones as bytes, tensor files into
one owned numpy buffer), map a file for hashing, stage a new checkpoint and
commit it, remove a checkpoint, and lock the directory for one writer.

How a commit works differs, because object stores have no rename:

- local: files go into a temporary sibling (``.tmp-step-00001200-<hex>``),
  each fsynced, the manifest last; the temporary directory is fsynced,
  renamed into place, and the parent fsynced. A crash leaves either the old
  state or the new one (plus a temporary that the next manager removes).
- fsspec: the data files are written into the final prefix, then the
  manifest; an object store's put is atomic, so a checkpoint becomes visible
  whole when its manifest appears, and a crash leaves a prefix without one,
  which listings ignore.

Removal is the commit in reverse: the manifest goes first, so a crash while
deleting never leaves a listed checkpoint with missing files.

A reader (a read-only manager, ``safeckpt verify``, ``safeckpt ls``) uses
only the listing and reading half: it never stages, removes or locks, so it
can follow a directory a writer owns.

>>> storage = open_directory("checkpoints", create=False)
>>> sorted(name for name, is_dir in storage.entries().items() if is_dir)
['step-00000100', 'step-00000200']
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator, Mapping, Optional, Union

import numpy as np

from ..errors import CheckpointError, LockedError
from .storage import PreadStorage, open_storage as open_file_storage
from .atomic import fsync_directory

LOCK_FILE = ".safeckpt.lock"
# A checkpoint is written (and deleted) under a temporary sibling name: ``.tmp-<name>-<hex>``.
TEMP_PREFIX = ".tmp-"


def temporary_name(name: str, token: str) -> str:
    """The name checkpoint directory `name` is written (or deleted) under before its rename
    (`token` is random hex): ``temporary_name("step-00001200", "0123456789ab") ==
    ".tmp-step-00001200-0123456789ab"``."""
    return f"{TEMP_PREFIX}{name}-{token}"


# The random part of a temporary name: secrets.token_hex(6).
_TOKEN = re.compile(r"[0-9a-f]{12}")


def stale_temporaries(storage: "Storage", name: str) -> list[str]:
    """The temporary directories of saves of `name` that never committed (their process died):
    ``.tmp-<name>-<hex>``. Callers that save one name at a time remove them before saving it again."""
    prefix = temporary_name(name, "")
    return sorted(entry for entry, is_dir in storage.entries().items()
                  if is_dir and entry.startswith(prefix) and _TOKEN.fullmatch(entry[len(prefix):]))


def is_url(directory) -> bool:
    """True for fsspec URLs ("s3://bucket/run"); False for local paths (and file:// URLs)."""
    text = os.fspath(directory) if not isinstance(directory, str) else directory
    return "://" in text and not text.startswith("file://")


def open_directory(directory, storage_options: Optional[Mapping[str, Any]] = None, *, create: bool = True,
                   missing_ok: bool = False) -> "Storage":
    """The storage of a checkpoint directory: a local path or an fsspec URL.

    `create=False` never creates the directory; a missing local one is then
    FileNotFoundError, or, with `missing_ok=True`, an empty directory until
    someone creates it (a reader that starts before its writer).

    >>> open_directory("s3://bucket/run", {"anon": False}).url
    's3://bucket/run'
    """
    if is_url(directory):
        return FsspecStorage(directory, storage_options or {}, create=create)
    if storage_options:
        raise CheckpointError(f"storage_options apply to fsspec URLs such as s3://bucket/run, not to the local "
                              f"path {os.fspath(directory)!r}: leave them out", path=directory)
    path = os.fspath(directory)
    return LocalStorage(path[len("file://"):] if path.startswith("file://") else path, create=create,
                        missing_ok=missing_ok)


# --- local ------------------------------------------------------------------------------

class LocalStorage:
    """A checkpoint directory on the local filesystem."""

    remote = False

    def __init__(self, root: str, *, create: bool = True, missing_ok: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.url = self.root
        if create:
            os.makedirs(self.root, exist_ok=True)
        elif not os.path.isdir(self.root):
            if not missing_ok:
                raise FileNotFoundError(2, "no such checkpoint directory", self.root)
            if os.path.lexists(self.root):
                raise CheckpointError("is not a directory: pass the directory a CheckpointManager saves into",
                                      path=self.root)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def entries(self) -> dict[str, bool]:
        """Names in the root -> whether each is a directory (symlinks are not followed);
        none while the root does not exist."""
        try:
            with os.scandir(self.root) as found:
                return {entry.name: entry.is_dir(follow_symlinks=False) for entry in found}
        except FileNotFoundError:
            return {}

    def files(self, name: str) -> list[str]:
        """Names of the plain files in the child directory `name`."""
        try:
            with os.scandir(self.path(name)) as found:
                return [entry.name for entry in found if entry.is_file(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.path(name))

    def read_bytes(self, *parts: str) -> bytes:
        with open(self.path(*parts), "rb") as file:
            return file.read()

    def read_array(self, *parts: str) -> np.ndarray:
        """The whole file in one owned, writable uint8 array (read by parallel preads)."""
        path = self.path(*parts)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        storage = PreadStorage(fd, os.fstat(fd).st_size, path)
        try:
            return storage.read(0, storage.size)
        finally:
            storage.close()

    @contextmanager
    def mapped(self, *parts: str) -> Iterator[Any]:
        """The file's bytes, mapped (nothing is copied; the reader's own mmap backend)."""
        storage = open_file_storage(self.path(*parts), "mmap")
        try:
            yield storage.view(0, storage.size)
        finally:
            storage.close()

    def begin(self, name: str) -> "LocalStaging":
        return LocalStaging(self, name)

    def remove_checkpoint(self, name: str, our_files: tuple[str, ...]) -> None:
        """Delete checkpoint `name`: renamed to a temporary first (one atomic step out of
        the listing; a crash leaves a temporary the next manager removes), then its files.

        A checkpoint holding files we did not write is not renamed: our files go
        from where it is, manifest first, and the directory stays with the rest.
        """
        directory = self.path(name)
        if set(self.files(name)) - set(our_files) or not os.path.isdir(directory):
            _unlink_all(directory, our_files, fsync_after_first=True)
            return
        temp = self.path(temporary_name(name, secrets.token_hex(6)))
        os.rename(directory, temp)
        fsync_directory(self.root)
        self.remove_temporary(os.path.basename(temp), our_files)

    def remove_temporary(self, name: str, our_files: tuple[str, ...]) -> None:
        """Delete an uncommitted checkpoint: our files, then the directory if nothing else is in it."""
        _unlink_all(self.path(name), our_files)
        try:
            os.rmdir(self.path(name))
        except OSError:  # something we did not write is inside: it stays
            pass

    def display(self, *parts: str) -> str:
        return self.path(*parts)

    def lock(self) -> "DirectoryLock":
        return DirectoryLock(self.path(LOCK_FILE))


class LocalStaging:
    """A checkpoint being written into a temporary sibling, renamed into place by `commit`."""

    def __init__(self, storage: LocalStorage, name: str) -> None:
        self.storage = storage
        self.name = name
        self.final = storage.path(name)
        self.temp = storage.path(temporary_name(name, secrets.token_hex(6)))
        os.mkdir(self.temp)

    def where(self, filename: str) -> str:
        """The path a file will have once committed (for messages)."""
        return os.path.join(self.final, filename)

    @contextmanager
    def open(self, filename: str) -> Iterator[BinaryIO]:
        """A new file in the checkpoint; flushed and fsynced when the block ends."""
        with open(os.path.join(self.temp, filename), "xb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())

    def commit(self, replace: bool = False) -> None:
        """Rename the finished checkpoint into place. What is there already is refused, or with
        `replace` (Lightning saves ``last.ckpt`` again and again) moved out of the way first and
        deleted once the new one is in place: a reader sees the old one, then the new one."""
        fsync_directory(self.temp)
        old = None
        if os.path.lexists(self.final):
            if not replace:
                raise CheckpointError("already exists (committed meanwhile by someone else?); checkpoints are "
                                      "never overwritten: save under a new step", path=self.final)
            old = self.storage.path(temporary_name(self.name, secrets.token_hex(6)))
            os.rename(self.final, old)
        os.rename(self.temp, self.final)
        fsync_directory(self.storage.root)
        if old is not None:
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.unlink(old)

    def abort(self) -> None:
        shutil.rmtree(self.temp, ignore_errors=True)


def _unlink_all(directory: str, names: tuple[str, ...], fsync_after_first: bool = False) -> None:
    for index, filename in enumerate(names):
        try:
            os.unlink(os.path.join(directory, filename))
        except FileNotFoundError:
            continue
        if index == 0 and fsync_after_first:
            fsync_directory(directory)  # the manifest is gone for good before the data goes


class DirectoryLock:
    """An exclusive flock on the directory's lock file, held until `release`.

    The lock file holds the holder's pid and host, for the error a second
    manager gets. The kernel drops the lock when the process dies, so a crash
    never leaves the directory locked.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        try:
            import fcntl
        except ImportError:  # Windows: no flock; one writer per directory is then up to the user
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            os.close(fd)
            who = f"process {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
            raise LockedError(f"is locked by {who}: another CheckpointManager is writing this directory. "
                              "Close that one first (or give this run its own directory)",
                              path=os.path.dirname(path)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1


# --- fsspec -------------------------------------------------------------------------------

def _fsspec():
    try:
        import fsspec
    except ImportError:
        raise CheckpointError("remote checkpoint directories need fsspec: pip install fsspec "
                              "(and s3fs for s3://, gcsfs for gs://, adlfs for az://)") from None
    return fsspec


class FsspecStorage:
    """A checkpoint directory behind an fsspec URL. Object stores have no rename and
    no locks: commits are "data, then manifest", and one writer per prefix is up to you."""

    remote = True

    def __init__(self, url: str, storage_options: Mapping[str, Any], *, create: bool = True) -> None:
        fsspec = _fsspec()
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except ImportError as exc:
            raise CheckpointError(f"cannot open {url}: {exc}", path=url) from None
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")
        if create:
            self.fs.makedirs(self.root, exist_ok=True)

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def display(self, *parts: str) -> str:
        return "/".join((self.url, *parts))

    def _refresh(self, path: str) -> None:
        # fsspec caches listings; another writer (or our own background save) changes them.
        self.fs.invalidate_cache(path)

    def entries(self) -> dict[str, bool]:
        self._refresh(self.root)
        try:
            found = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return {}
        return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry["type"] == "directory" for entry in found}

    def files(self, name: str) -> list[str]:
        directory = self.path(name)
        self._refresh(directory)
        try:
            found = self.fs.ls(directory, detail=True)
        except FileNotFoundError:
            return []
        return [entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in found if entry["type"] == "file"]

    def exists(self, name: str) -> bool:
        return bool(self.files(name)) or self.fs.exists(self.path(name))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def read_array(self, *parts: str) -> np.ndarray:
        """The whole object in one owned, writable uint8 array (no second copy)."""
        path = self.path(*parts)
        size = self.fs.size(path)
        buffer = np.empty(size, dtype=np.uint8)
        view, done = memoryview(buffer), 0
        with self.fs.open(path, "rb") as file:
            while done < size:
                count = file.readinto(view[done:])
                if not count:
                    raise CheckpointError(f"ended after {done} of {size} bytes while reading", path=self.display(*parts))
                done += count
        return buffer

    @contextmanager
    def mapped(self, *parts: str) -> Iterator[Any]:
        yield self.read_bytes(*parts)

    def begin(self, name: str) -> "FsspecStaging":
        return FsspecStaging(self, name)

    def remove_checkpoint(self, name: str, our_files: tuple[str, ...]) -> None:
        present = set(self.files(name))
        for filename in our_files:  # the manifest first: un-commit before the data goes
            if filename in present:
                self.fs.rm_file(self.path(name, filename))
        self._refresh(self.path(name))

    def remove_temporary(self, name: str, our_files: tuple[str, ...]) -> None:
        pass  # object stores never hold temporaries of ours

    def lock(self) -> None:
        return None


class FsspecStaging:
    """A checkpoint written straight into its final prefix; the manifest, last, commits it."""

    def __init__(self, storage: FsspecStorage, name: str) -> None:
        self.storage = storage
        self.name = name
        self.final = storage.display(name)
        self.written: list[str] = []

    def where(self, filename: str) -> str:
        return self.storage.display(self.name, filename)

    @contextmanager
    def open(self, filename: str) -> Iterator[BinaryIO]:
        path = self.storage.path(self.name, filename)
        self.written.append(path)
        with self.storage.fs.open(path, "wb") as file:
            yield file

    def commit(self, replace: bool = False) -> None:
        """Nothing to rename: the manifest, written last, committed the files where they are (a
        replaced checkpoint's manifest was removed before its files were written again)."""
        self.storage._refresh(self.storage.path(self.name))

    def abort(self) -> None:
        for path in reversed(self.written):
            try:
                self.storage.fs.rm_file(path)
            except (FileNotFoundError, OSError):
                pass
        self.storage._refresh(self.storage.path(self.name))


# Either storage, for type hints: both have the same methods.
Storage = Union[LocalStorage, FsspecStorage]
Staging = Union[LocalStaging, FsspecStaging]
