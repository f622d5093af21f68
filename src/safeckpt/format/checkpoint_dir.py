"""The training checkpoint directory: one directory per step, three files, a commit marked by the manifest.

A checkpoint directory (what `CheckpointManager` writes, ``safeckpt ls`` lists and
``safeckpt verify`` checks) holds one directory per saved step, named after it::

    checkpoints/
      step-00001200/
        tensors.safetensors   the state's tensors (any safetensors reader opens it);
                              __metadata__ {"step": "1200"}
        state.json            the tree's skeleton and scalars, step, time, metrics, versions
        manifest.json         written last: sizes and BLAKE3 hashes (per file, per tensor)
      step-00001300/          saved under a process group (`safeckpt.training.dcp`): each
        rank-00000.safetensors   rank's chunks, dcp.json (the layout) and the same manifest.json
      .tmp-step-00001300-<hex>/   a save not yet committed (local directories; never listed)
      .safeckpt.lock              the writer's lock (local directories)

Names: ``step-`` and the step, zero-padded to `STEP_DIGITS` digits (wider steps
keep all their digits); `step_from_name` reads any ``step-<digits>`` back. Nothing
else in the directory is ours.

``state.json`` is standard JSON (UTF-8, no NaN)::

    {"format": "safeckpt-state", "schema_version": 1, "step": 1200, "time": 1732400000.5,
     "metrics": {"val_loss": 0.25, "grad_norm": "NaN"}, "versions": {"safeckpt": "0.1.0", ...},
     "state": <the document of `safeckpt.training.state.split_state`>}

``manifest.json`` is a manifest as `safeckpt.format.integrity` encodes it (ending with
its own hash), with ``"format": "safeckpt-checkpoint"``, the same ``step``, ``time``,
``metrics`` and ``versions``, the ``monitor`` (``{"name", "mode"}`` or null) the run
ranked by, ``"hash": "blake3"``, and ``files``: the size and hash of ``state.json``,
and of ``tensors.safetensors`` range by range (its header, then each tensor).

Metrics are numbers; NaN and the infinities are stored as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"``, so that both JSON files stay standard JSON.

The commit: a step is a checkpoint once its manifest is complete and intact; a
step directory without one is a partial save (listed apart, never restored), one
whose manifest is damaged is `Damaged` (listed apart, never deleted). Ordering is by
the step inside the manifest, never by the name. How bytes reach the directory (a
local rename, an object store's put) is `safeckpt.format.checkpoint_storage`'s; every
function here reads through such a storage, and `safeckpt.sinks.checkpoint` writes through one.

>>> listing = inspect_directory("checkpoints")
>>> [info.step for info in listing.checkpoints], [bad.step for bad in listing.damaged]
([100, 200], [])
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from ..errors import CheckpointError, IntegrityError, SafeckptError
from .checkpoint_storage import TEMP_PREFIX, Storage, open_directory
from .dtypes import DTYPES, storage_dtype
from .integrity import HASH, check_file, decode_manifest
from .reader import parse_bytes_header, to_logical

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
# The layout of a checkpoint saved by several ranks (see `safeckpt.training.dcp`).
LAYOUT_FILE = "dcp.json"
# The manifest first: removing it un-commits the checkpoint before its data goes.
OUR_FILES = (MANIFEST_FILE, TENSORS_FILE, STATE_FILE)
# The files each rank writes in a checkpoint saved by several ranks: rank-00003.safetensors,
# or rank-00003-001.safetensors when a rank writes with several threads.
_RANK_FILE = re.compile(r"rank-[0-9]{5,}(?:-[0-9]{3,})?\.safetensors")
STATE_FORMAT = "safeckpt-state"
STATE_SCHEMA_VERSION = 1
CHECKPOINT_PREFIX = "step-"
# Zero-padding keeps names readable in `ls`; ordering never relies on it.
STEP_DIGITS = 8
# Non-finite metrics are stored as these strings, so that both JSON files stay standard JSON.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

_COMMITTED_NAME = re.compile(re.escape(CHECKPOINT_PREFIX) + r"([0-9]+)")
_TEMPORARY_NAME = re.compile(re.escape(TEMP_PREFIX + CHECKPOINT_PREFIX) + r"([0-9]+)-[0-9a-f]{8,64}")


# --- names ------------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    """The directory name of a step: ``checkpoint_name(1200) == "step-00001200"``."""
    return f"{CHECKPOINT_PREFIX}{step:0{STEP_DIGITS}d}"


def step_from_name(name: str) -> Optional[int]:
    """The step a checkpoint directory name stands for, or None for any other name.

    >>> step_from_name("step-00001200"), step_from_name("step-final")
    (1200, None)
    """
    match = _COMMITTED_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def is_temporary_name(name: str) -> bool:
    """Whether `name` is a checkpoint being written or deleted (``.tmp-step-00001200-<hex>``).

    >>> is_temporary_name(".tmp-step-00001200-0123456789ab"), is_temporary_name(".tmp-mine")
    (True, False)
    """
    return _TEMPORARY_NAME.fullmatch(name) is not None


def rank_file(rank: int, part: Optional[int] = None) -> str:
    """The file rank `rank` writes its chunks to (`part`: one of several a rank writes at once).

    >>> rank_file(3), rank_file(3, 1)
    ('rank-00003.safetensors', 'rank-00003-001.safetensors')
    """
    return f"rank-{rank:05d}.safetensors" if part is None else f"rank-{rank:05d}-{part:03d}.safetensors"


def is_our_file(name: str) -> bool:
    """Whether a file of a checkpoint directory is one a save writes (anything else is left alone)."""
    return name in OUR_FILES or name == LAYOUT_FILE or _RANK_FILE.fullmatch(name) is not None


def our_files(names: Iterable[str]) -> tuple[str, ...]:
    """The files of `names` a save writes, the manifest first (the order removal goes in).

    >>> our_files(["notes.txt", "rank-00000.safetensors", "dcp.json", "manifest.json"])
    ('manifest.json', 'dcp.json', 'rank-00000.safetensors')
    """
    mine = sorted(name for name in names if is_our_file(name) and name != MANIFEST_FILE)
    return (MANIFEST_FILE, *mine)


def directory_name(path: str) -> str:
    """The step directory's name in a checkpoint's path (a local path or a URL).

    >>> directory_name("s3://bucket/run/step-00001200")
    'step-00001200'
    """
    return path.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]


# --- records ------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint: what its manifest says, and where it is."""

    step: int
    time: float  # seconds since the epoch, when the save started
    metrics: Mapping[str, float] = field(default_factory=dict)
    path: str = ""  # the directory (a local path or a URL)
    size: int = 0  # bytes of all its files, manifest included

    def score(self, monitor: str) -> Optional[float]:
        """The monitored metric as a float; None when missing or NaN (never best)."""
        value = self.metrics.get(monitor)
        if value is None or isinstance(value, bool):
            return None
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        return None if math.isnan(value) else value


def by_step(infos: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
    """Oldest first, by the step number (ties by save time, then path)."""
    return sorted(infos, key=lambda info: (info.step, info.time, info.path))


def ranked_best(infos: Iterable[CheckpointInfo], monitor: str, mode: str = "min") -> list[CheckpointInfo]:
    """Checkpoints with a (non-NaN) value of `monitor`, best first; ties go to the later step."""
    scored = [(info.score(monitor), info) for info in infos]
    scored = [(value, info) for value, info in scored if value is not None]
    sign = 1.0 if mode == "min" else -1.0
    scored.sort(key=lambda pair: (sign * pair[0], -pair[1].step, -pair[1].time))
    return [info for _, info in scored]


def best(infos: Iterable[CheckpointInfo], monitor: str, mode: str = "min") -> Optional[CheckpointInfo]:
    """The best checkpoint by `monitor` (NaN and missing values never count), or None.

    >>> best([CheckpointInfo(1, 0.0, {"loss": 0.5}), CheckpointInfo(2, 0.0, {"loss": float("nan")})], "loss").step
    1
    """
    ranked = ranked_best(infos, monitor, mode)
    return ranked[0] if ranked else None


@dataclass(frozen=True)
class Damaged:
    """A directory named like a checkpoint whose manifest is damaged: never listed, never deleted."""

    step: int
    path: str
    error: IntegrityError


@dataclass(frozen=True)
class Listing:
    """What a checkpoint directory holds."""

    checkpoints: list[CheckpointInfo]  # committed and intact manifests, by step
    damaged: list[Damaged] = field(default_factory=list)
    partials: dict[str, list[str]] = field(default_factory=dict)  # step-* without a manifest -> files
    manifests: dict[str, dict] = field(default_factory=dict)  # path -> parsed manifest
    monitor: Optional[str] = None  # recorded by the newest checkpoint
    mode: str = "min"


@dataclass(frozen=True)
class CheckpointCheck:
    """The verdict on one checkpoint; `file` and `tensor` say where a mismatch is."""

    step: int
    path: str
    ok: bool
    error: Optional[str] = None
    error_type: Optional[str] = None
    file: Optional[str] = None
    tensor: Optional[str] = None


# --- metrics and versions ----------------------------------------------------------------

def clean_metrics(metrics: Optional[Mapping[str, Any]]) -> dict:
    """Metrics as JSON: str keys, int or float values (numpy and torch scalars too);
    NaN and infinities as the strings "NaN", "Infinity", "-Infinity".

    >>> clean_metrics({"loss": float("nan"), "step_time": np.float32(0.5)})
    {'loss': 'NaN', 'step_time': 0.5}
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise CheckpointError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
    cleaned = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise CheckpointError(f"metric names must be strings, got {key!r}")
        if hasattr(value, "item") and not isinstance(value, (int, float)):  # numpy and torch scalars
            try:
                value = value.item()
            except (TypeError, ValueError, RuntimeError) as exc:  # more than one value
                raise CheckpointError(f"metric {key!r} must be a single number ({exc})") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"metric {key!r} must be a number, got {type(value).__name__} {value!r}; "
                                  "pass float(value)")
        if isinstance(value, int):
            cleaned[key] = value
            continue
        number = float(value)
        if math.isnan(number):
            cleaned[key] = "NaN"
        elif math.isinf(number):
            cleaned[key] = "Infinity" if number > 0 else "-Infinity"
        else:
            cleaned[key] = number
    return cleaned


def decode_metrics(metrics: Mapping[str, Any]) -> dict:
    """The inverse of `clean_metrics`: the strings for non-finite values become floats again."""
    return {key: _NON_FINITE[value] if isinstance(value, str) and value in _NON_FINITE else value
            for key, value in metrics.items()}


# --- listing ------------------------------------------------------------------------------

def open_checkpoint(path, storage_options: Optional[Mapping[str, Any]] = None
                    ) -> tuple[Storage, CheckpointInfo, Mapping[str, Any]]:
    """One committed checkpoint directory, whatever its name (``step-00001200`` in a manager's
    directory, ``epoch=3-step=120.ckpt`` written by Lightning): its storage (the folder
    holding it), its info and its manifest, for `read_checkpoint` and `check_checkpoint`.

    A directory without a manifest is not a committed checkpoint (`CheckpointError`); a
    damaged manifest is an `IntegrityError`.

    >>> storage, info, manifest = open_checkpoint("lightning_logs/version_0/checkpoints/last.ckpt")
    >>> tensors, document = read_checkpoint(storage, info, manifest)
    """
    storage, name = holder(path, storage_options)
    manifest_path = storage.display(name, MANIFEST_FILE)
    if MANIFEST_FILE not in storage.files(name):
        raise CheckpointError(f"is not a committed safeckpt checkpoint: it has no {MANIFEST_FILE}",
                              path=storage.display(name))
    raw = storage.read_bytes(name, MANIFEST_FILE)
    manifest = decode_manifest(raw, manifest_path)
    return storage, _info_from_manifest(manifest, storage.display(name), len(raw), manifest_path), manifest


def is_checkpoint(path, storage_options: Optional[Mapping[str, Any]] = None) -> bool:
    """Whether `path` is a directory holding a checkpoint's manifest (its name does not matter)."""
    try:
        storage, name = holder(path, storage_options)
        return MANIFEST_FILE in storage.files(name)
    except (OSError, CheckpointError):
        return False


def holder(path, storage_options: Optional[Mapping[str, Any]] = None, *, create: bool = False
           ) -> tuple[Storage, str]:
    """The storage of the folder that holds checkpoint directory `path` (local or a URL), and its name.

    >>> holder("s3://bucket/run/last.ckpt")[1]
    'last.ckpt'
    """
    text = os.fspath(path).rstrip("/")
    parent, _, name = text.rpartition("/")
    folder = parent or ("/" if text.startswith("/") else ".")
    return open_directory(folder, storage_options, create=create, missing_ok=not create), name


def list_directory(storage: Storage) -> Listing:
    """Read the manifests of a checkpoint directory: committed, damaged, partial.

    >>> [info.step for info in list_directory(open_directory("checkpoints", create=False)).checkpoints]
    [100, 200]
    """
    committed, damaged, partials, manifests = [], [], {}, {}
    for name, is_dir in storage.entries().items():
        step = step_from_name(name) if is_dir else None
        if step is None:
            continue
        files = storage.files(name)
        path = storage.display(name)
        if MANIFEST_FILE not in files:
            partials[name] = files
            continue
        manifest_path = storage.display(name, MANIFEST_FILE)
        try:
            raw = storage.read_bytes(name, MANIFEST_FILE)
            manifest = decode_manifest(raw, manifest_path)
            info = _info_from_manifest(manifest, path, len(raw), manifest_path)
            if info.step != step:
                raise IntegrityError(f"records step {info.step} but its directory is named for step {step}; "
                                     "directories must keep their names: rename it back", path=manifest_path)
        except FileNotFoundError:  # deleted meanwhile (pruned by another thread)
            continue
        except IntegrityError as exc:
            damaged.append(Damaged(step, path, exc))
            continue
        committed.append(info)
        manifests[path] = manifest
    committed = by_step(committed)
    monitor, mode = None, "min"
    if committed:
        recorded = manifests[committed[-1].path].get("monitor") or {}
        monitor, mode = recorded.get("name"), recorded.get("mode", "min")
    return Listing(committed, sorted(damaged, key=lambda d: (d.step, d.path)), partials, manifests, monitor, mode)


def inspect_directory(directory, storage_options: Optional[Mapping[str, Any]] = None) -> Listing:
    """List a checkpoint directory (a local path or an fsspec URL) without opening a manager:
    no lock, nothing cleaned or created.

    >>> [info.step for info in inspect_directory("checkpoints").checkpoints]
    [100, 200]
    """
    return list_directory(open_directory(directory, storage_options, create=False))


def is_committed(storage: Storage, name: str) -> bool:
    """Whether step directory `name` holds a manifest (which a removal deletes first)."""
    return MANIFEST_FILE in storage.files(name)


def _info_from_manifest(manifest: Mapping[str, Any], path: str, manifest_size: int,
                        manifest_path: str) -> CheckpointInfo:
    try:
        step = manifest["step"]
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step is {step!r}")
        files = manifest["files"]
        if not (LAYOUT_FILE in files or (TENSORS_FILE in files and STATE_FILE in files)):
            raise KeyError(f"{TENSORS_FILE} and {STATE_FILE}, or {LAYOUT_FILE}")
        for name, entry in files.items():
            if not is_our_file(name) or name == MANIFEST_FILE:
                raise ValueError(f"a file {name[:80]!r} no save writes")
            if not isinstance(entry[HASH], str) or type(entry["size"]) is not int:
                raise TypeError(f"{name} has no size and hash")
        size = manifest_size + sum(entry["size"] for entry in files.values())
        return CheckpointInfo(step, float(manifest["time"]), decode_metrics(manifest.get("metrics") or {}),
                              path, size)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IntegrityError(f"lacks what a manifest records ({exc}); move this directory away",
                             path=manifest_path) from None


def is_distributed(manifest: Mapping[str, Any]) -> bool:
    """Whether a (listed) checkpoint was saved by several ranks: rank files and a layout."""
    return LAYOUT_FILE in manifest["files"]


# --- reading and checking -------------------------------------------------------------------

def read_checkpoint(storage: Storage, info: CheckpointInfo, manifest: Mapping[str, Any],
                    verify: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """A checkpoint's tensors (numpy arrays sharing one owned buffer) and state document,
    each file checked against `manifest` first unless `verify=False`.

    >>> listing = list_directory(storage)
    >>> info = listing.checkpoints[-1]
    >>> tensors, document = read_checkpoint(storage, info, listing.manifests[info.path])
    """
    name = directory_name(info.path)
    files = manifest["files"]
    if is_distributed(manifest):
        raise CheckpointError("was saved by several ranks: read it with safeckpt.training.dcp.read_state",
                              path=info.path)
    state_path, tensors_path = storage.display(name, STATE_FILE), storage.display(name, TENSORS_FILE)
    raw_state = _read(storage.read_bytes, name, STATE_FILE, state_path)
    if verify:
        check_file(raw_state, files[STATE_FILE], state_path)
    buffer = _read(storage.read_array, name, TENSORS_FILE, tensors_path)
    if verify:
        check_file(buffer, files[TENSORS_FILE], tensors_path)
    try:
        stored = json.loads(raw_state.decode("utf-8"))
        document = stored["state"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"is not a safeckpt state file ({exc}); restore with verify=True to find the "
                              "damage", path=state_path) from None
    header = parse_bytes_header(buffer, tensors_path)
    tensors = {}
    for tensor, entry, where in header.places():
        dtype = DTYPES[entry.dtype]
        tensors[tensor] = to_logical(buffer[where].view(storage_dtype(dtype)), dtype, entry.shape)
    return tensors, document


def check_checkpoint(storage: Storage, info: CheckpointInfo, manifest: Mapping[str, Any]) -> CheckpointCheck:
    """Compare every file of a checkpoint with its manifest; never raises for damage.

    >>> check_checkpoint(storage, info, listing.manifests[info.path]).ok
    True
    """
    name = directory_name(info.path)
    try:
        for filename in sorted(manifest["files"]):
            path = storage.display(name, filename)
            try:
                with storage.mapped(name, filename) as data:
                    check_file(data, manifest["files"][filename], path)
            except FileNotFoundError:
                raise missing_file(path) from None
    except (SafeckptError, OSError) as exc:
        return CheckpointCheck(info.step, info.path, False, str(exc), type(exc).__name__,
                               getattr(exc, "path", None) or getattr(exc, "filename", None),
                               getattr(exc, "tensor", None))
    return CheckpointCheck(info.step, info.path, True)


def missing_file(path: str) -> IntegrityError:
    """The error for a file the manifest records that is gone from the checkpoint."""
    return IntegrityError("is missing; the checkpoint is incomplete: restore another step", path=path)


def _read(read, name: str, filename: str, path: str):
    try:
        return read(name, filename)
    except FileNotFoundError:
        raise missing_file(path) from None


__all__ = ["TENSORS_FILE", "STATE_FILE", "MANIFEST_FILE", "OUR_FILES", "LAYOUT_FILE", "rank_file", "is_our_file",
           "our_files", "is_distributed", "STATE_FORMAT", "STATE_SCHEMA_VERSION",
           "CHECKPOINT_PREFIX", "STEP_DIGITS", "checkpoint_name", "step_from_name", "is_temporary_name",
           "directory_name", "CheckpointInfo", "by_step", "Damaged", "Listing", "CheckpointCheck", "clean_metrics",
           "decode_metrics", "ranked_best", "best", "list_directory", "inspect_directory",
           "is_committed", "holder", "open_checkpoint", "is_checkpoint", "read_checkpoint", "check_checkpoint", "missing_file"]
