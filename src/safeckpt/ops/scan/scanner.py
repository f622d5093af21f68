"""Read a file the way every loader would, and grade what each reading would run.

A verdict is a promise about what ``torch.load(f, weights_only=False)``,
``pickle.load`` and ``numpy.load(f, allow_pickle=True)`` do with the file, so the
file is read as *every* format a loader would accept it as, never by its first
bytes alone, and the verdict is the worst of all readings (`scan_bytes`):

* a pickle stream from the first byte: ``pickle.load`` (again and again, as apps
  that store a stream do), ``numpy.load``'s fallback, and torch's legacy format
  (five pickles, then storages), which ``torch.load`` reads from any file that
  does not start with ``PK\\x03\\x04`` and that tarfile refuses. Each pickle is read
  the two ways CPython reads frames (`pickle_vm.READERS`); where they differ, both
  readings and both places where the next pickle starts are scanned;
* a zip archive: as torch.load's miniz sees it (``<prefix>/data.pkl`` looked up
  case-insensitively, end record and offsets as miniz finds them), as numpy.load's
  zipfile sees it (npy members with object arrays), and as our own reader sees it
  (every member, any name or first byte, read as stored whatever its flags or
  CRC; tricks such as duplicate names or a pickle in front of the archive);
* a tar archive whenever tarfile accepts the bytes (no ``ustar`` magic needed):
  ``storages``, ``tensors`` and ``pickle`` as torch's legacy_load reads them,
  links followed, then every other member;
* an npy array: its header read by numpy itself; an object array's pickle;
* safetensors and GGUF files hold no code: they are checked structurally.

Bytes that a loader would unpickle are scanned in full (a failure there is an
error). Bytes that some loader *might* unpickle (a file that is not a pickle by its
first bytes, archive members, pickles after the stream) count when they read to
a STOP, or when they name a dangerous global before they break (a loader would
have run it by then); otherwise they are not a pickle. Where the restricted
machine cannot follow what CPython would do (one of its limits), the file is
``suspicious`` and the scan fails (`rules.BLOCKING_KINDS`), never silent.
Every byte range is scanned once, however many directory entries point at it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from ... import errors
from ...format.reader import parse_bytes_header
from ...sources import npz, pickle_vm, torch_legacy, zip_archive
from ...sources.detect import sniff
from ...sources.hdf5_reader import is_hdf5
from ...sources.keras_file import is_keras_zip
from ...sources.tf_checkpoint import tf_checkpoint_prefix
from ...sources.pickle_vm import GlobalUse, PickleError, PickleResult
from . import keras_rules, loaders, zip_readers
from .payloads import loader_calls, sweep
from .report import SEVERITIES, Finding, ScanReport
from .rules import INFO, MALICIOUS, NESTED_LOADERS, SAFE, SUSPICIOUS, grade_global

__all__ = ["scan_bytes", "MAX_DEPTH", "NOT_A_CHECKPOINT"]

# --- limits: each bounds work a hostile file could otherwise make unbounded -------------

# Levels of nesting followed (an archive in an archive, a pickle in a pickle's bytes):
# real files nest one level at most (npz members, torch.storage payloads).
MAX_DEPTH = 4
# Pickles read back to back in one stream: the legacy format has five.
MAX_PICKLES_PER_STREAM = 256
# Embedded payloads and nested members scanned per file (each may be a full scan).
MAX_NESTED_SCANS = 256
# Findings listed per report; past this one finding says how many were left out.
MAX_FINDINGS = 1000
# Members at most this big get their CRC checked; data records of a torch file are
# not (a 1 GiB file must scan in well under a second), pickles always are.
MAX_CRC_CHECK_BYTES = 1 << 20
# CRC-32 work per archive beyond the pickles (small members only, smallest first).
MAX_CRC_BYTES = 16 << 20
# Bytes of a member that are decompressed to be scanned; a pickle a loader would read
# that is longer is reported as not followed.
MAX_INFLATED_MEMBER = 64 << 20
# Records torch's legacy tar format lists in its 'storages' and 'tensors' members.
MAX_TAR_RECORDS = 1 << 20
# Archives back to back in front of a zip's last one (a .distcp file's items), and EOCD
# signatures tried for each (a stored tensor may hold those four bytes by chance).
MAX_STACKED_ARCHIVES = 1 << 20
MAX_EOCD_TRIES = 64
# The largest data.pkl whose reading is kept for a reader that asked (`scan_bytes(keep=...)`).
MAX_KEPT_PICKLE = 256 << 20
# Set to see the traceback of an unexpected error instead of an error in the report.
TRACEBACK_ENV = "SAFECKPT_TRACEBACK"
# Bytes read to recognise a format (a tar header ends at 512) or an archive member.
_HEAD_BYTES = 4096
# JSON documents (a checkpoint's state.json and manifest.json, configs) up to this size are
# parsed to be recognised; a larger text file is "not a checkpoint format" like any other.
MAX_JSON_BYTES = 64 << 20
# Pickle streams up to this size are copied out of the mmap before they are read: the
# machine searches newline-terminated arguments much faster in bytes than in a view.
MAX_COPIED_PICKLE = 64 << 20

NOT_A_CHECKPOINT = "not a checkpoint format the scan reads"
_LEGACY_ROLES = ("magic number", "protocol version", "sys_info", "main", "storage keys")
# First bytes of torch's magic-number pickle at any protocol (PROTO, LONG, INT).
_LEGACY_STARTS = (b"\x80", b"L", b"I", b"\x8a")

# Severity of each zip_archive finding kind, and why (see zip_archive.FINDING_KINDS for what).
_ZIP_SEVERITY = {
    "duplicate-name": SUSPICIOUS,       # malicious when the name is a pickle (see zip_finding)
    "name-mismatch": MALICIOUS,         # streaming and central-directory readers see other files
    "header-mismatch": SUSPICIOUS,
    "encrypted": SUSPICIOUS,            # read as stored: what it holds is graded too
    "unsupported-method": SUSPICIOUS,
    "prepended-data": SUSPICIOUS,       # a pickle there is graded "polyglot" (malicious) too
    "trailing-data": INFO,              # scanned for pickles too
    "hidden-data": SUSPICIOUS,
    "overlapping-members": SUSPICIOUS,
    "size-mismatch": SUSPICIOUS,
    "nested-archive": INFO,             # its content is scanned and graded
    "unsafe-name": SUSPICIOUS,          # extraction would write outside the target directory
    "bad-crc": SUSPICIOUS,              # read anyway (torch does): what it holds is graded
    "unreadable": SUSPICIOUS,
}

_IDENTIFIER_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

# How sure the scan is that a loader unpickles some bytes:
LOADED = "loaded"      # a loader does, and they must be a pickle (data.pkl, an object array's data)
READ = "read"          # pickle.load reads them (a whole file's first bytes) but they may be data
AFTER = "after"        # a program reading a stream might: the bytes right after a pickle
POSSIBLE = "possible"  # some program might (archive members, bytes after an archive)


def scan_bytes(data: Any, *, path: str = "<bytes>", member: Optional[str] = None,
               keep: Optional[dict] = None) -> ScanReport:
    """Scan a file held in memory (bytes, bytearray, mmap or memoryview).

    `member` names where the bytes came from (an archive member); findings carry it.
    `keep`, a dict, receives each top-level ``data.pkl``'s bytes -> the pickle machine's
    reading of them (`PickleResult`) where loading would read it the same way, so that a
    reader that loads the file after the scan need not run the pickle a second time.

    >>> scan_bytes(b"cos\\nsystem\\n(S'echo hi'\\ntR.").verdict
    'malicious'
    """
    scanner = _Scanner(path)
    scanner.keep = keep
    view = memoryview(data).cast("B")
    fmt = "unknown"
    try:
        fmt = scanner.data(view, member, 0)
    except Exception as exc:  # noqa: BLE001 - a scan gives a verdict, never a traceback
        if os.environ.get(TRACEBACK_ENV):
            raise
        scanner.fail(f"internal error {type(exc).__name__}: {str(exc)[:200]} (a bug in safeckpt: "
                     f"please report it; set {TRACEBACK_ENV}=1 to see the traceback)", member)
    finally:
        try:
            view.release()
        except BufferError:  # still referenced by a traceback; freed with it
            pass
    return scanner.report(fmt)


def _join(outer: Optional[str], inner: Optional[str]) -> Optional[str]:
    if outer is None:
        return inner
    if inner is None:
        return outer
    return f"{outer} > {inner}"


@dataclass
class _Pickle:
    """One pickle as the scan read it: its value, where each reader leaves the file, and
    whether it read to its STOP."""

    value: Any = None
    ends: list[int] = field(default_factory=list)     # "bytes" reader first, then "file"
    complete: bool = False
    flagged: bool = False                             # named a global that is not allowlisted
    result: Optional[PickleResult] = None             # the first reading, as the machine gave it

    @property
    def file_end(self) -> Optional[int]:
        return self.ends[-1] if self.ends else None


class _Scanner:
    """Collects the findings of one file, through every reading and nesting level."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.found: dict[tuple, list] = {}  # (kind, what, member) -> [finding, count]
        self.globals: dict[str, None] = {}
        self.errors: list[str] = []
        self.nested_scans = 0
        self.scanned: set[tuple] = set()    # (member, start) of every pickle already read
        # data.pkl bytes -> the machine's reading of them, for a reader that asked (`scan_bytes(keep=...)`)
        self.keep: Optional[dict[bytes, PickleResult]] = None

    # -- recording
    def add(self, severity: str, kind: str, what: str, why: str, member: Optional[str],
            offset: int) -> None:
        key = (kind, what, member)
        entry = self.found.get(key)
        if entry is not None:
            entry[1] += 1
            if SEVERITIES[severity] > SEVERITIES[entry[0].severity]:
                entry[0] = Finding(severity, kind, what, why, member, offset)
            return
        self.found[key] = [Finding(severity, kind, what, why, member, offset), 1]

    def fail(self, detail: str, member: Optional[str] = None) -> None:
        self.errors.append(f"{member}: {detail}" if member else detail)

    def unfollowed(self, what: str, why: str, member: Optional[str], offset: int = -1) -> None:
        """Something a loader would read that the scan could not follow: never silent."""
        self.add(SUSPICIOUS, "unfollowed", what, why + ": the scan could not see what loading it "
                 "would do, so the file is not known to be safe", member, offset)

    def report(self, fmt: str) -> ScanReport:
        findings = []
        for finding, count in self.found.values():
            if count > 1 and finding.severity != INFO:
                finding = Finding(finding.severity, finding.kind, finding.what,
                                  f"{finding.why} ({count} times)", finding.member, finding.offset)
            findings.append(finding)
        findings.sort(key=lambda f: -SEVERITIES[f.severity])  # stable: file order within a severity
        if len(findings) > MAX_FINDINGS:
            left = len(findings) - MAX_FINDINGS
            findings = findings[:MAX_FINDINGS] + [Finding(INFO, "more-findings", f"{left} more",
                                                          "findings not listed", None, -1)]
        worst = max((SEVERITIES[f.severity] for f in findings), default=0)
        verdict = {2: MALICIOUS, 1: SUSPICIOUS}.get(worst, SAFE)
        error = "; ".join(self.errors[:5]) if self.errors else None
        if error is not None and verdict == SAFE:
            verdict = SUSPICIOUS  # what could not be read may hold anything
        return ScanReport(self.path, fmt, verdict, findings, list(self.globals), error)

    # -- every reading of some bytes
    def data(self, view: memoryview, member: Optional[str], depth: int) -> str:
        """Scan `view` as every format a loader would read it as; returns the main format."""
        head = bytes(view[:_HEAD_BYTES])
        formats: list[str] = []
        if sniff(head) == "safetensors":
            formats.append(self.safetensors(view, member))
        if head[:4] == b"GGUF":
            formats.append(self.gguf(head, member))
        if is_hdf5(head):
            formats.append(self.hdf5(view, member))
        if member is None and tf_checkpoint_prefix(self.path) is not None:
            formats.append(self.tf_checkpoint())
        if npz.is_npy(head):
            formats.append(self.npy(view, member, depth))
        archive = _our_zip(view, self.path) if zip_archive.is_zip(head) or _ends_like_zip(view) else None
        if zip_archive.is_zip(head) or archive is not None:
            formats.append(self.zip(view, member, depth, archive))
        tar_format = self.tar(view, member, depth)
        if tar_format is not None:
            formats.append(tar_format)
        # a PROTO header says "pickle"; anything else may be text that only reads like one
        protocol = head[:1] == b"\x80" and 2 <= head[1:2][0] <= 5 if len(head) > 1 else False
        stream, first = self.stream(view, member, depth, trust=LOADED if not formats and protocol else READ,
                                    first_persistent=False)
        if stream is not None and formats and first.complete and first.flagged:
            self.add(MALICIOUS, "polyglot", f"{formats[0]} and {stream}",
                     f"the file is a {formats[0]} file and also a {stream} that pickle.load and "
                     "torch.load run: scanners and loaders see different files", member, 0)
        if formats:
            return formats[0]
        if stream is not None:
            return stream
        if _is_json_document(view):
            self.add(INFO, "json", "a JSON document", "no loader runs code from it: pickle.load and torch.load "
                     "stop at its first byte, which is no pickle opcode", member, 0)
            return "json"
        self.fail(f"{NOT_A_CHECKPOINT} (it starts with {head[:16]!r})", member)
        return "unknown"

    def nested(self, view: memoryview, member: Optional[str], depth: int) -> None:
        """Scan bytes found inside the file (a member, an embedded payload) as a file of their own."""
        if depth + 1 > MAX_DEPTH or self.nested_scans >= MAX_NESTED_SCANS:
            self.unfollowed(member or "nested data", f"nested more than {MAX_DEPTH} levels (or more "
                            f"than {MAX_NESTED_SCANS} nested parts)", member)
            return
        self.nested_scans += 1
        self.data(view, member, depth + 1)

    # -- formats without code
    def safetensors(self, view: memoryview, member: Optional[str]) -> str:
        try:
            parse_bytes_header(view, self.path if member is None else f"{self.path} > {member}")
        except errors.SafeckptError as exc:
            self.fail(f"invalid safetensors file: {exc.detail}", member)
        return "safetensors"

    def gguf(self, head: bytes, member: Optional[str]) -> str:
        version = struct.unpack_from("<I", head, 4)[0] if len(head) >= 8 else None
        if version not in (1, 2, 3):
            self.fail(f"GGUF version {version} is not one of 1, 2, 3 (or the file is truncated)", member)
        return "gguf"

    def hdf5(self, view: memoryview, member: Optional[str]) -> str:
        """HDF5 holds no code; a legacy Keras model's config names what loading it would build."""
        for f in keras_rules.hdf5_findings(view, self.path, member):
            self.add(f.severity, f.kind, f.what, f.why, f.member, f.offset)
        return "hdf5"

    def tf_checkpoint(self) -> str:
        """A TensorFlow checkpoint's index or data shard: a table and raw numbers, no code."""
        self.add(INFO, "tf-checkpoint", "TensorFlow checkpoint file", "an index table or raw tensor bytes: "
                 "tf.train.load_checkpoint reads them as numbers and runs nothing", None, 0)
        return "tf-checkpoint"

    # -- npy: numpy.load reads the header, then unpickles an object array's data
    def npy(self, view: memoryview, member: Optional[str], depth: int) -> str:
        try:
            dtype, data_offset = loaders.npy_header(view)
        except loaders.NpyHeaderTooLong as exc:
            self.unfollowed("npy header", str(exc), member, 8)
            return "npy"
        except ValueError as exc:
            self.fail(f"invalid npy header: {exc}", member)
            return "npy"
        if dtype.hasobject:
            self.add(INFO, "object-array", "npy object array",
                     "an object array: numpy.load(allow_pickle=True) unpickles its data (scanned "
                     "here as a pickle)", member, data_offset)
            self.stream(view, member, depth, trust=LOADED, start=data_offset, first_persistent=False,
                        key=None if member is None else ("npy", member))
        return "npy"

    # -- zip: torch's miniz, numpy's zipfile, and every member as our reader finds it
    def zip(self, view: memoryview, member: Optional[str], depth: int,
            archive: Optional[zip_archive.ZipArchive]) -> str:
        # our reading of every member covers a loader's reading of the same directory
        ours = archive if archive is not None and not any(f.kind == "hidden-data" for f in archive.findings) \
            else None
        torch = self.zip_for_torch(view, member, depth, ours) if view[:4] == b"PK\x03\x04" else False
        if ours is None or zip_readers.zipfile_directory(view) != ours.directory[:2]:
            self.zip_for_numpy(view, member, depth)
        if archive is None:
            if not torch:
                self.fail("unreadable zip archive: no reader opens it", member)
            return "torch-zip" if torch else "zip"
        names = archive.names()
        files = [n for n in names if not n.endswith("/")]
        has_data_pkl = any(n.lower() == "data.pkl" or n.lower().endswith("/data.pkl") for n in names)
        for f in keras_rules.archive_findings(archive, member):  # a .keras file's config: what loading builds
            self.add(f.severity, f.kind, f.what, f.why, f.member, f.offset)
        fmt = "torch-zip" if torch or has_data_pkl else \
            "npz" if files and all(n.endswith(".npy") for n in files) else \
            "keras" if is_keras_zip(names) else "zip"
        stacked = _stacked_archives(view, archive.start, member or self.path) if archive.start > 0 else None
        if archive.start > 0 and stacked is None:
            self.prefix(view[:archive.start], member)
        if has_data_pkl and names:
            self.torch_layout(names, member)
        archive.check_crcs(_crc_members(archive.members))
        for f in archive.findings:
            if not (stacked is not None and f.kind == "prepended-data"):
                self.zip_finding(f, member, view, depth, archive)
        for begin, end in stacked or ():
            # a torch.distributed checkpoint's .distcp file: torch.save zips back to back, each one
            # loaded by torch.load where the metadata points: each is scanned as a file of its own
            self.data(view[begin:end], _join(member, f"<archive at {begin}>"), depth + 1)
        storages = names[0].split("/", 1)[0] + "/data/" if has_data_pkl and "/" in names[0] else None
        seen: set[tuple] = set()
        for record in archive.members:
            span = (record.data_offset, record.compressed_size, record.method)
            if record.name.endswith("/") or span in seen:
                continue  # a byte range many entries point at is read once
            seen.add(span)
            raw = storages is not None and record.name.startswith(storages) \
                and not record.name.lower().endswith(".pkl")
            self.zip_member(view, record, member, depth, archive, raw)
        return fmt

    def zip_for_torch(self, view: memoryview, member: Optional[str], depth: int,
                      ours: Optional[zip_archive.ZipArchive]) -> bool:
        """What torch.load unpickles: ``<prefix>/data.pkl`` (and TorchScript's constants.pkl).

        Where miniz finds the central directory our reader read (`ours`) and the first name
        holds no NUL, our reading of every member covers it: every entry a case-insensitive
        lookup of a ``.pkl`` name can return is read in full there.
        """
        directory = zip_readers.miniz_directory(view)
        if directory is None:
            return False  # torch.load refuses the archive: it runs nothing
        if ours is not None and directory == ours.directory and ours.members \
                and "\0" not in ours.members[0].name:
            return "/" in ours.members[0].name
        try:
            miniz = zip_readers.MinizArchive(view)
        except (ValueError, struct.error):
            return False
        if miniz.prefix is None:
            return False
        records: Optional[dict[str, int]] = None
        for record_name in (b"data.pkl", b"constants.pkl"):
            for index in miniz.matching(miniz.prefix + b"/" + record_name):
                entry = miniz.entries[index]
                start = zip_readers.data_offset(view, entry)
                key = ("zip", start, entry.compressed_size, entry.method)
                if start is None or key in self.scanned:
                    continue  # torch cannot read it, or many entries point at one byte range
                content = zip_readers.member_bytes(view, start, entry.compressed_size, entry.size,
                                                   entry.method, MAX_INFLATED_MEMBER + 1)
                name = _join(member, entry.name)
                if content is None:
                    continue  # torch cannot read it either
                if len(content) > MAX_INFLATED_MEMBER:
                    self.unfollowed(entry.name, f"a compressed pickle of more than {MAX_INFLATED_MEMBER} "
                                    "bytes torch would unpickle", name)
                    continue
                if record_name == b"data.pkl" and records is None:
                    records = _miniz_records(miniz, entry)
                _, first = self.stream(content, name, depth, trust=LOADED, key=key,
                                       records=records if record_name == b"data.pkl" else None)
                if record_name == b"data.pkl" and depth == 0:
                    self.kept(content, first)
        return True

    def zip_for_numpy(self, view: memoryview, member: Optional[str], depth: int) -> None:
        """What numpy.load unpickles: the object arrays among an npz's members."""
        if bytes(view[:4]) not in (b"PK\x03\x04", b"PK\x05\x06"):
            return
        try:
            archive = zip_readers.zipfile_archive(view)
        except OverflowError as exc:
            self.unfollowed("zip directory", f"{exc}: numpy.load would list it", member)
            return
        for info in zip_readers.zipfile_members(archive) if archive is not None else ():
            if not npz.is_npy(zip_readers.zipfile_head(view, archive, info, len(npz.MAGIC)) or b""):
                continue  # numpy.load returns the member's bytes, unpickled by nothing
            content = zip_readers.zipfile_read(archive, info, MAX_INFLATED_MEMBER + 1) or b""
            name = _join(member, info.filename)
            if len(content) > MAX_INFLATED_MEMBER:
                self.unfollowed(info.filename, f"an npy member of more than {MAX_INFLATED_MEMBER} bytes",
                                name)
                continue
            self.npy(memoryview(content), name, depth)

    def zip_member(self, view: memoryview, record: zip_archive.ZipMember, member: Optional[str],
                   depth: int, archive: zip_archive.ZipArchive, raw: bool) -> None:
        """Any member, read as stored (flags and CRC ignored): a pickle by name (any case) is
        read in full; any other member may be an archive, an array or a pickle, except a
        torch storage record (`raw`), which torch copies as bytes and nothing unpickles."""
        name = _join(member, record.name)
        content = zip_readers.member_bytes(view, record.data_offset, record.compressed_size,
                                           record.size, record.method, MAX_INFLATED_MEMBER + 1)
        if content is None:
            return  # undecodable: zip_archive reported how (method, corrupt data, bounds)
        if len(content) > MAX_INFLATED_MEMBER:
            head = bytes(content[:_HEAD_BYTES])
            if record.name.lower().endswith(".pkl") or sniff(head) in ("pickle", "zip", "npy", "tar"):
                self.unfollowed(record.name, f"a compressed member of more than {MAX_INFLATED_MEMBER} "
                                "bytes that starts like a pickle or an archive", name)
            return
        if record.name.lower().endswith(".pkl"):
            records = _storage_records(archive, record) if record.name.lower().endswith("data.pkl") else None
            _, first = self.stream(content, name, depth, trust=LOADED, records=records,
                                   key=("zip", record.data_offset, record.compressed_size, record.method))
            if records is not None and depth == 0:
                self.kept(content, first)
            return
        self.nested_member(content, name, depth, raw)

    def kept(self, content: memoryview, first: _Pickle) -> None:
        """Keep a data.pkl's reading for the caller that will load it, when loading reads it alike:
        to its STOP, with no refusal and no frame anomaly (a strict reading would raise on those)."""
        result = first.result
        if self.keep is not None and result is not None and not result.refusals and not result.anomalies \
                and len(content) <= MAX_KEPT_PICKLE:
            self.keep[bytes(content)] = result

    def nested_member(self, content: memoryview, name: Optional[str], depth: int,
                      raw: bool = False) -> None:
        """An archive member or tar member no loader reads by name: whatever it is (raw
        bytes may still hide an archive or an array, never a pickle anything runs)."""
        head = bytes(content[:512])  # enough for every signature below (a tar header's is 512)
        if zip_archive.is_zip(head) or npz.is_npy(head) or loaders.is_tar(head) \
                or (head[:1] in _LEGACY_STARTS and torch_legacy.is_legacy(head)):
            self.nested(content, name, depth)
        elif not raw or head[:1] == b"\x80":  # storage bytes that plainly start a pickle too
            self.stream(content, name, depth, trust=POSSIBLE, max_count=1)

    def torch_layout(self, names: list[str], member: Optional[str]) -> None:
        prefix = names[0].split("/", 1)[0] + "/" if "/" in names[0] else ""
        for name in names:
            if not name.startswith(prefix):
                self.add(SUSPICIOUS, "zip-outside-prefix", name,
                         f"member {name!r} lies outside the archive prefix {prefix!r}: torch never "
                         "reads it, other tools might", _join(member, name), -1)
            if name.startswith(prefix + "code/") and name.endswith(".py"):
                self.add(SUSPICIOUS, "torchscript", name,
                         "TorchScript source: torch.load hands such archives to torch.jit.load, "
                         "which compiles and runs this code", _join(member, name), -1)

    def zip_finding(self, f: zip_archive.ZipFinding, member: Optional[str], view: memoryview,
                    depth: int, archive: zip_archive.ZipArchive) -> None:
        severity = _ZIP_SEVERITY.get(f.kind, SUSPICIOUS)
        if f.kind == "duplicate-name" and f.member and f.member.lower().endswith(".pkl"):
            severity = MALICIOUS  # two readers would load two different pickles
        if f.kind == "unsupported-method" and f.member and _method_of(archive, f.member) in \
                zip_readers.ZIPFILE_METHODS:
            severity = INFO  # bzip2 and LZMA: zipfile (numpy.load) reads them, and so did the scan
        self.add(severity, f"zip-{f.kind}", f.member or f.kind, f.detail,
                 _join(member, f.member) if f.member else member, f.offset)
        if f.kind == "trailing-data" and 0 <= f.offset < len(view):
            self.stream(view[f.offset:], _join(member, f"<after the archive, offset {f.offset}>"),
                        depth, trust=POSSIBLE)

    def prefix(self, view: memoryview, member: Optional[str]) -> None:
        """Bytes in front of an archive: a pickle there is what torch.load reads first (the
        stream from byte 0 scans it)."""
        if sniff(bytes(view[:_HEAD_BYTES])) == "pickle":
            self.add(MALICIOUS, "polyglot", "pickle before zip",
                     "a pickle hides in front of the zip archive: torch.load and pickle readers run "
                     "it, zip readers (and scanners) see only the archive", member, 0)

    # -- tar: torch's legacy_load, then every member
    def tar(self, view: memoryview, member: Optional[str], depth: int) -> Optional[str]:
        try:
            tar = loaders.open_tar(view)
        except OverflowError as exc:
            self.unfollowed("tar archive", f"{exc}: torch.load would read them all", member)
            return "tar"
        if tar is None:
            return None
        members = tar.getmembers()
        torch_names = [n for n in loaders.TORCH_TAR_MEMBERS if any(m.name == n for m in members)]
        read_by_torch: set[int] = set()
        for name in torch_names:
            target, hops = loaders.torch_tar_member(tar, name)
            label = _join(member, name)
            if hops:
                self.add(SUSPICIOUS if target is not None else MALICIOUS, "tar-link", name,
                         f"tar member {name!r} is a link ({'; '.join(hops)[:200]}): "
                         + ("torch.load reads the member it names" if target is not None else
                            "it leads outside the archive, to a file of the loading machine"),
                         label, -1)
            if target is None:
                continue
            if target.issparse():
                self.unfollowed(name, "a sparse tar member torch would read", label)
                continue
            content = view[target.offset_data:target.offset_data + target.size]
            read_by_torch.add(target.offset_data)
            if name == "pickle":
                self.stream(content, label, depth, trust=LOADED, max_count=1,
                            key=("tar", target.offset_data))
            else:
                self.torch_tar_records(content, label, depth, name)
        for info in members:
            if info.isfile() and not info.issparse() and info.offset_data not in read_by_torch \
                    and info.offset_data + info.size <= len(view):
                read_by_torch.add(info.offset_data)
                self.nested_member(view[info.offset_data:info.offset_data + info.size],
                                   _join(member, info.name), depth)
        return "torch-tar" if torch_names else "tar"

    def torch_tar_records(self, content: memoryview, label: Optional[str], depth: int, name: str) -> None:
        """'storages' and 'tensors' as torch reads them from an unbuffered file: a count pickle,
        then per record a pickle and raw bytes whose length the record decides, then (storages)
        a pickle of views."""
        view = _compact(content)
        first = self.pickle_at(view, 0, label, depth, trust=LOADED)
        count = first.value if first is not None else None
        pos = first.file_end if first is not None else None
        if type(count) not in (int, bool) or pos is None:
            return  # torch's range(count) fails: nothing more is unpickled
        for _ in range(min(int(count), MAX_TAR_RECORDS)):
            record = self.pickle_at(view, pos, label, depth, trust=LOADED)
            if record is None or record.file_end is None:
                return
            pos = record.file_end
            if name == "storages":
                storage_type = record.value[2] if isinstance(record.value, tuple) and len(record.value) == 3 \
                    else None
                if not isinstance(storage_type, pickle_vm.TorchStorageType):
                    if record.flagged:
                        self.unfollowed(name, "a storage record whose type decides how many bytes torch "
                                        "reads next, and the scan cannot tell", label, pos)
                    return
                if pos + 8 > len(view):
                    return
                numel = int.from_bytes(view[pos:pos + 8], "little", signed=True)
                pos += 8 + numel * storage_type.dtype.itemsize
            else:
                if pos + 8 > len(view):
                    return
                ndim = int.from_bytes(view[pos:pos + 4], "little", signed=True)
                if ndim < 0:
                    return
                pos += 8 + 16 * ndim + 8
            if not 0 <= pos <= len(view):
                return
        if name == "storages":
            self.pickle_at(view, pos, label, depth, trust=LOADED)

    # -- pickles
    def stream(self, view: memoryview, member: Optional[str], depth: int, *, trust: str,
               start: int = 0, max_count: int = MAX_PICKLES_PER_STREAM, first_persistent: bool = True,
               records: Optional[dict[str, int]] = None,
               key: Optional[tuple] = None) -> tuple[Optional[str], _Pickle]:
        """Pickles back to back from `start`, each followed from every place a reader leaves
        the file: (kind of stream, or None when not even the first pickle reads; the first).

        The first pickle is read with `trust`; a legacy torch file's next four are loaded
        too, any later one only possible. `first_persistent` is whether the loader of the
        first pickle has a persistent_load (torch's data.pkl has; pickle.load has not).
        """
        if key is not None:
            if key in self.scanned:
                return "pickle", _Pickle()
            self.scanned.add(key)
        if trust == LOADED:
            view = _compact(view)
        pending, seen, count = [(start, 0)], set(), 0
        kind: Optional[str] = None
        first = _Pickle()
        skip_storages: Optional[int] = None
        while pending:
            pos, index = pending.pop(0)
            if pos in seen or pos >= len(view):
                continue
            seen.add(pos)
            if count >= max_count:
                if max_count == MAX_PICKLES_PER_STREAM:
                    self.unfollowed(f"{count} pickles", "the rest of the stream was not scanned",
                                    member, pos)
                break
            count += 1
            legacy = kind == "torch-legacy"
            result = self.pickle_at(
                view, pos, member, depth,
                trust=trust if index == 0 else LOADED if legacy and index < 5 else AFTER,
                role=_LEGACY_ROLES[index] if legacy and index < 5 else None,
                persistent_ids=index > 0 or first_persistent, records=records if index == 0 else None)
            if result is None:
                if index > 0 and trust != POSSIBLE:
                    self.add(INFO, "trailing-data", "trailing bytes",
                             f"{len(view) - pos} bytes after the last pickle are not a pickle",
                             member, pos)
                continue
            if index == 0:
                first = result
                kind = "torch-legacy" if type(result.value) is int and \
                    result.value == torch_legacy.MAGIC_NUMBER else "pickle"
                if kind == "torch-legacy" and start == 0:
                    skip_storages = _legacy_storage_end(view, self.path)
            ends = result.ends
            if legacy and index == 4 and skip_storages is not None:
                ends = [max(end, skip_storages) for end in ends]
            pending.extend((end, index + 1) for end in dict.fromkeys(ends))
        return kind, first

    def pickle_at(self, view: memoryview, start: int, member: Optional[str], depth: int, *,
                  trust: str, role: Optional[str] = None, persistent_ids: bool = True,
                  records: Optional[dict[str, int]] = None) -> Optional[_Pickle]:
        """One pickle, read both ways CPython reads frames; None when neither reads it.

        The second reading is needed only where the first met a frame anomaly or broke.
        """
        where = f" ({role} pickle)" if role else ""
        if start < len(view) and pickle_vm.OPCODE_TABLE.get(view[start]) is None and trust != LOADED:
            return None  # not an opcode: every reader stops at the first byte, having run nothing
        out = _Pickle()
        failures: list[PickleError] = []
        for reader in pickle_vm.READERS:
            try:
                result = pickle_vm.load(view, start=start, reader=reader, strict=False,
                                        persistent_ids=persistent_ids)
            except PickleError as exc:
                exc.with_traceback(None)  # the traceback holds the machine's view of the file
                failures.append(exc)
                if not exc.framed:
                    break  # no frame before the break: the other reader breaks there too
                continue
            self.graded(result, view, start, member, depth, where, out, records)
            if not result.anomalies:
                break  # the other reader reads it the same way
        if not out.ends:
            self.broken(max(failures, key=lambda e: len(e.globals)), view, start, member, depth,
                        trust, where)
            return None
        for exc in failures:  # a reader that breaks after another read to STOP: what it ran counts
            self.grade([g for g in exc.globals if _deliberate(g)], member, where)
        return out

    def graded(self, result: PickleResult, view: memoryview, start: int, member: Optional[str],
               depth: int, where: str, out: _Pickle, records: Optional[dict[str, int]]) -> None:
        """A pickle that read to its STOP: everything it names, refuses and hides."""
        if not out.ends:
            out.value, out.complete, out.result = result.value, True, result
        out.ends.append(result.end)
        self.grade(result.globals, member, where)
        out.flagged = out.flagged or any(not g.allowed for g in result.globals)
        for text in result.anomalies[:1]:
            self.add(MALICIOUS, "frame-desync", "pickle frames",
                     f"{text}: pickle.loads and a file reader read this pickle differently (no "
                     "pickler writes such frames); both readings were scanned", member, _offset(text))
        for text in result.findings:
            if "extension code" in text:
                continue  # EXT opcodes are graded with the globals
            if "numpy." in text and "was not built" in text:
                self.add(INFO, "object-array", "numpy object array",
                         "an object array or scalar: its items are pickled objects (scanned with the "
                         "rest); the reader keeps it inert", member, _offset(text))
            else:
                self.add(INFO, "refused-object", text.split(": ", 1)[-1][:120],
                         "an object the reader kept inert: " + text, member, _offset(text))
        for text in result.refusals[:20]:
            self.add(SUSPICIOUS, "malformed-object", text.split(": ", 2)[1][:120],
                     "an allowlisted rebuild is called with arguments no real file holds (" + text
                     + "); the loader's own function would run with them", member, _offset(text))
        if out.flagged:
            self.embedded(view, start, result.end, result.value, result.globals, member, depth)
        if records is not None:
            self.storage_sizes(result.storages, records, member)

    def broken(self, exc: PickleError, view: memoryview, start: int, member: Optional[str],
               depth: int, trust: str, where: str) -> None:
        """A pickle that reads to no STOP. What CPython would have run before the break
        counts (all of it where a loader reads these bytes as a pickle, names spelled out
        as dangerous where they may be data); a break at one of our own limits is never
        silent where a loader reads the bytes."""
        uses = exc.globals
        if trust != LOADED:
            # after a pickle any name counts; at the start of a file that may be text (whose
            # first lines can read as GLOBAL) a name of a module that exists here or a dangerous
            # one spelled out; in an archive member no loader reads, a dangerous one only
            counts = {AFTER: lambda g: _plausible(g) and not g.allowed,
                      READ: lambda g: _deliberate(g) or (_plausible(g) and not g.allowed
                                                         and _importable(g.module)),
                      POSSIBLE: _deliberate}[trust]
            deliberate = [g for g in uses if counts(g)]
            for g in uses:
                if not g.allowed and g not in deliberate and _plausible(g):
                    self.add(INFO, "pickle-like-bytes", f"{g.module}.{g.name}"[:120],
                             f"bytes that could start a pickle name {g.module}.{g.name} and then "
                             f"break ({exc.detail[:160]}): no loader reads them as a pickle",
                             member, g.offset)
            uses = deliberate
        self.grade(uses, member, where)
        if any(not g.allowed for g in uses):
            self.embedded(view, start, exc.offset, None, uses, member, depth)
        if exc.bounded and (trust != POSSIBLE):
            self.unfollowed("pickle", f"the reader stopped at one of its limits ({exc.detail}) where "
                            "CPython may read on", member, exc.offset)
        elif exc.bounded:
            self.add(INFO, "pickle-like-bytes", "long pickle-like bytes",
                     f"bytes no loader reads as a pickle run past a limit of the reader ({exc.detail})",
                     member, exc.offset)
        elif trust == LOADED:
            self.fail(f"unreadable pickle{where}: {exc.detail}", member)

    def storage_sizes(self, storages: list, records: dict[str, int], member: Optional[str]) -> None:
        """Each storage the pickle names against its data/<key> record in the archive."""
        for ref in storages:
            size = records.get(ref.key)
            declared = ref.numel * ref.dtype.itemsize
            if size is None:
                self.add(SUSPICIOUS, "missing-storage", f"storage {ref.key!r:.60}",
                         "the pickle names a storage the archive does not hold: loading fails",
                         member, -1)
            elif size < declared:
                self.add(MALICIOUS, "storage-overrun", f"storage {ref.key!r:.60}",
                         f"declared as {ref.numel} x {ref.dtype.itemsize} bytes but its record holds "
                         f"{size}: a loader that trusts the declared size reads or writes past the "
                         "record's buffer (the CVE-2026-24747 pattern)", member, -1)

    def grade(self, uses: list[GlobalUse], member: Optional[str], where: str) -> None:
        for g in uses:
            qual = f"{g.module}.{g.name}"
            self.globals.setdefault(qual)
            if g.allowed:
                continue
            severity, kind, why = grade_global(g.module, g.name)
            self.add(severity, kind, qual, why + where, member, g.offset)

    def embedded(self, view: memoryview, start: int, end: int, value: Any, uses: list[GlobalUse],
                 member: Optional[str], depth: int) -> None:
        """Payloads a nested loader would deserialize: found by walking the value (loader calls
        with their arguments) and by sweeping the opcodes (results that were discarded)."""
        called = loader_calls(value)
        loaders_named = sorted({f"{g.module}.{g.name}" for g in uses} & set(NESTED_LOADERS))
        seen: set[bytes] = set()
        for qual, offset, payload in called:
            if payload in seen:
                continue
            seen.add(payload)
            label = _join(member, f"[{qual} call at {offset}]")
            self.add(MALICIOUS, "nested-pickle", qual,
                     f"deserializes {len(payload)} embedded bytes ({NESTED_LOADERS[qual]}) when "
                     f"loaded; they are scanned under member {label!r}", member, offset)
            if qual.startswith("marshal."):
                continue  # a code object: nothing to scan, the call is the finding
            self.nested(memoryview(payload), label, depth)
        for offset, payload in sweep(view, start, end):
            kind = None if payload in seen else _payload_kind(payload)
            if kind is None:
                continue
            seen.add(payload)
            label = _join(member, f"[bytes at {offset}]")
            severity = MALICIOUS if loaders_named else INFO
            self.add(severity, "nested-pickle", ", ".join(loaders_named) or "embedded payload",
                     f"{len(payload)} embedded bytes are a {kind}"
                     + (f" that {', '.join(loaders_named)} would deserialize" if loaders_named else "")
                     + f"; scanned under member {label!r}", member, offset)
            self.nested(memoryview(payload), label, depth)


# --- helpers ---------------------------------------------------------------------------

_OFFSET = re.compile(r" at offset (\d+)")


def _offset(text: str) -> int:
    match = _OFFSET.search(text)
    return int(match.group(1)) if match else -1


def _compact(view: memoryview) -> memoryview:
    """`view`, copied into bytes when it is small enough (see `MAX_COPIED_PICKLE`)."""
    if len(view) <= MAX_COPIED_PICKLE and not isinstance(view.obj, bytes):
        return memoryview(bytes(view))
    return view


# Where zip readers look for the end record: the comment's maximum length and the record.
_ZIP_TAIL = 0xFFFF + 22 + 4096


def _stacked_archives(view: memoryview, end: int, label: str) -> Optional[list[tuple[int, int]]]:
    """The spans of complete zip archives that fill `view[:end]` back to back (a .distcp file's
    items before its last one), or None when those bytes are anything else."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while pos < end:
        if len(spans) >= MAX_STACKED_ARCHIVES or bytes(view[pos:pos + 4]) != b"PK\x03\x04":
            return None
        found = None
        for eocd in _signatures_from(view, pos, end, b"PK\x05\x06", MAX_EOCD_TRIES):
            if eocd + 22 > end:
                break
            stop = eocd + 22 + int.from_bytes(view[eocd + 20:eocd + 22], "little")
            if stop > end:
                continue
            try:
                candidate = zip_archive.ZipArchive(view[pos:stop], label)
            except (errors.SafeckptError, ValueError, struct.error):
                continue
            if candidate.start == 0 and not any(f.kind in ("prepended-data", "trailing-data")
                                                for f in candidate.findings):
                found = stop
                break
        if found is None:
            return None
        spans.append((pos, found))
        pos = found
    return spans


def _signatures_from(view: memoryview, start: int, end: int, signature: bytes, limit: int):
    """Offsets of `signature` in view[start:end], in order (at most `limit`), read a window at a time."""
    window, count, pos = 1 << 20, 0, start
    while pos < end and count < limit:
        chunk = bytes(view[pos:min(end, pos + window + len(signature) - 1)])
        at = chunk.find(signature)
        while at != -1 and count < limit:
            yield pos + at
            count += 1
            at = chunk.find(signature, at + 1)
        pos += window


def _ends_like_zip(view: memoryview) -> bool:
    """An end-of-central-directory signature where zip readers look for one."""
    return b"PK\x05\x06" in bytes(view[max(0, len(view) - _ZIP_TAIL):])


def _is_json_document(view: memoryview) -> bool:
    """A UTF-8 JSON object or array (what pickle.load and torch.load refuse at byte 0: neither
    whitespace, "{" nor "[" is a pickle opcode), small enough to parse."""
    if view.nbytes > MAX_JSON_BYTES or bytes(view[:_HEAD_BYTES]).lstrip(b" \t\r\n")[:1] not in (b"{", b"["):
        return False
    try:
        json.loads(bytes(view).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return True


def _our_zip(view: memoryview, path: str) -> Optional[zip_archive.ZipArchive]:
    try:
        return zip_archive.ZipArchive(view, path)
    except errors.SafeckptError:
        return None


def _method_of(archive: zip_archive.ZipArchive, name: str) -> Optional[int]:
    try:
        return archive.member(name).method
    except errors.SafeckptError:
        return None


def _crc_members(members: list) -> list:
    """Pickles, then small members while the byte budget lasts (never the big data records);
    a byte range many entries point at is checked once."""
    members = list({(m.data_offset, m.compressed_size, m.method): m for m in members}.values())
    chosen = [m for m in members if m.name.lower().endswith(".pkl")]
    budget = MAX_CRC_BYTES
    for m in sorted((m for m in members if not m.name.lower().endswith(".pkl")), key=lambda m: m.size):
        if m.size > MAX_CRC_CHECK_BYTES or m.size > budget:
            break
        budget -= m.size
        chosen.append(m)
    return chosen


def _plausible(g: GlobalUse) -> bool:
    """A global whose module and name could be imported (dotted identifiers)."""
    return (g.module != "copyreg.extension" and _IDENTIFIER_PATH.fullmatch(g.module) is not None
            and _IDENTIFIER_PATH.fullmatch(g.name) is not None)


@functools.lru_cache(maxsize=4096)
def _importable(module: str) -> bool:
    """Whether the top-level package of `module` exists here (found, never imported)."""
    top = module.split(".", 1)[0]
    if top in sys.stdlib_module_names:
        return True
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _deliberate(g: GlobalUse) -> bool:
    """A dangerous global spelled out by name: random bytes never do that (an EXT opcode
    is one byte and a code, which random data is full of)."""
    return not g.allowed and _plausible(g) and grade_global(g.module, g.name)[0] == MALICIOUS


def _payload_kind(payload: bytes) -> Optional[str]:
    """What embedded bytes are, if they are something a loader would deserialize."""
    head = payload[:_HEAD_BYTES]
    if zip_archive.is_zip(head):
        return "zip archive"
    if npz.is_npy(head):
        return "npy array"
    if torch_legacy.is_legacy(head):
        return "legacy torch file"
    try:
        pickle_vm.load(payload, strict=False, persistent_ids=False,
                       limits=pickle_vm.Limits(max_opcodes=1_000_000))
        return "pickle"
    except PickleError as exc:
        return "pickle" if any(_deliberate(g) for g in exc.globals) else None


def _storage_records(archive: zip_archive.ZipArchive, pickle: zip_archive.ZipMember) -> dict[str, int]:
    """Key -> size of the torch storage records beside a data.pkl (``<prefix>/data/<key>``)."""
    prefix = pickle.name[:-len("data.pkl")] + "data/"
    return {m.name[len(prefix):]: m.size for m in archive.members if m.name.startswith(prefix)}


def _miniz_records(miniz: zip_readers.MinizArchive, pickle: zip_readers.LoaderMember) -> dict[str, int]:
    """The same for torch's reader: ``<prefix>/data/<key>`` as miniz lists them."""
    prefix = pickle.raw_name[:-len(b"data.pkl")] + b"data/"
    return {e.raw_name[len(prefix):].decode("utf-8", "replace"): e.size for e in miniz.entries
            if e.raw_name.startswith(prefix)}


def _legacy_storage_end(view: memoryview, path: str) -> Optional[int]:
    """Where the storages of a well-formed legacy torch file end (None when they cannot be
    located: the pickles after the fifth are then read from where it ends)."""
    try:
        layout = torch_legacy.read_legacy(view, path)
    except errors.SafeckptError:
        return None
    return max([s.end for s in layout.pickles] + [o + n for o, n in layout.storages.values()])
