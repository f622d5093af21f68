"""Scan a checkpoint for what loading it would do; nothing in it is ever executed.

What a scan reads
-----------------
A file is recognised by its content, never its name, and every place a loader
could find a pickle is read through the restricted machine (`pickle_vm`):

* a plain pickle file, and every pickle after the first STOP while the bytes
  keep parsing as pickles (``pickle.load`` on the same file object reads them);
* a PyTorch zip: every ``.pkl`` member (``data.pkl``, TorchScript's
  ``constants.pkl``) and every other member that parses as a pickle; CRCs of
  pickles and small members (never of multi-GB data records, so a 1 GiB
  checkpoint scans in milliseconds); nested archives, recursively; bytes in
  front of the archive (a pickle there is what ``torch.load`` reads: a polyglot);
  every trick `zip_archive` reports (duplicate names, local/central name
  mismatch, encryption, overlaps, ...), and members outside the torch prefix;
* a legacy torch file (all five pickles) and a legacy torch tar (every member);
* npy object arrays (the data after the header is a pickle) and npz members;
* bytes embedded in a pickle that a nested loader would deserialize
  (``torch.storage._load_from_bytes``, ``pickle.loads``, ``marshal``, ...):
  they are scanned in turn, to `MAX_DEPTH` levels, and their findings carry the
  path of nesting in `Finding.member` (``archive/data.pkl > [pickle.loads call at 57]``).

safetensors and GGUF files hold no code: they are checked structurally.

Verdicts
--------
The allowlist decides safety: a global is safe only if `pickle_vm.ALLOWLIST`
has it. Every other global is at least ``suspicious`` (a user's own class);
`DENYLIST` (and the dotted-name, dunder and EXT rules in `grade_global`) only
raises the severity to ``malicious``: code execution, imports, file and
network access, nested deserialization, function/code object construction.
A file that could not be fully read is never ``safe``.

Example::

    >>> report = scan("pytorch_model.bin")
    >>> report.verdict, [f.what for f in report.findings if f.severity == "malicious"]
    ('safe', [])
"""

from __future__ import annotations

import io
import os
import pickletools
import re
import struct
import tarfile
import zlib
from typing import Any, Iterator, Optional

from ... import errors
from ...format.reader import parse_bytes_header
from ...sources import npz, pickle_vm, torch_legacy, zip_archive
from ...sources.detect import sniff
from ...sources.pickle_vm import GlobalUse, PickleError, Placeholder, PlaceholderCall
from .report import SEVERITIES, Finding, ScanReport
from .rules import INFO, MALICIOUS, NESTED_LOADERS, SAFE, SUSPICIOUS, grade_global


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
# Objects visited when walking a pickle's value for nested loader calls (a pickle
# can describe a DAG whose tree is exponential; the walk de-duplicates by identity too).
MAX_WALK_NODES = 1_000_000
# Opcodes disassembled when sweeping a suspicious pickle for embedded payloads.
MAX_SWEEP_OPCODES = 2_000_000
# Members at most this big get their CRC checked; data records of a torch file are
# not (a 1 GiB file must scan in well under a second), pickles always are.
MAX_CRC_CHECK_BYTES = 1 << 20
# Compressed members are inflated (for a pickle test) only up to this size.
MAX_INFLATED_MEMBER = 64 << 20
# Set to see the traceback of an unexpected error instead of an error in the report.
TRACEBACK_ENV = "SAFECKPT_TRACEBACK"
# Bounds of the trial parse that decides whether bytes are a pickle at all.
_SNIFF_LIMITS = pickle_vm.Limits(max_opcodes=4096, max_stack=4096, max_memo=4096)
_TRIAL_BOUNDS = ("max_opcodes", "max_stack", "max_memo")  # what running past them means: "long"
# Bytes read to recognise a format (a tar header ends at 512) or an archive member.
_HEAD_BYTES = 4096
# Bytes of a whole file a trial parse reads to decide whether it is a pickle.
_TRIAL_BYTES = 64 << 10
# Pickle streams up to this size are copied out of the mmap before they are read: the
# machine searches newline-terminated arguments much faster in bytes than in a view.
MAX_COPIED_PICKLE = 64 << 20

def scan_bytes(data: Any, *, path: str = "<bytes>", member: Optional[str] = None) -> ScanReport:
    """Scan a file held in memory (bytes, bytearray, mmap or memoryview).

    `member` names where the bytes came from (an archive member); findings carry it.

    >>> scan_bytes(b"cos\\nsystem\\n(S'echo hi'\\ntR.").verdict
    'malicious'
    """
    scanner = _Scanner(path)
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


# --- the scanner ---------------------------------------------------------------------

def _join(outer: Optional[str], inner: Optional[str]) -> Optional[str]:
    if outer is None:
        return inner
    if inner is None:
        return outer
    return f"{outer} > {inner}"


_PICKLE_VM_OFFSET = re.compile(r" at offset (\d+)")
NOT_A_CHECKPOINT = "not a checkpoint format the scan reads"


class _Scanner:
    """Collects the findings of one file, through every format and nesting level."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.found: dict[tuple, list] = {}  # (kind, what, member) -> [finding, count]
        self.globals: dict[str, None] = {}
        self.errors: list[str] = []
        self.nested_scans = 0

    # -- recording
    def add(self, severity: str, kind: str, what: str, why: str, member: Optional[str],
            offset: int) -> None:
        key = (kind, what, member)
        entry = self.found.get(key)
        if entry is not None:
            entry[1] += 1
            return
        self.found[key] = [Finding(severity, kind, what, why, member, offset), 1]

    def fail(self, detail: str, member: Optional[str] = None) -> None:
        self.errors.append(f"{member}: {detail}" if member else detail)

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

    # -- formats
    def data(self, view: memoryview, member: Optional[str], depth: int) -> str:
        """Recognise `view` by content and scan it; returns the format name."""
        head = bytes(view[:_HEAD_BYTES])
        if sniff(head) == "safetensors":
            return self.safetensors(view, member)
        if npz.is_npy(head):
            return self.npy(view, member, depth)
        if head[:4] == b"GGUF":
            return self.gguf(head, member)
        if zip_archive.is_zip(head):
            return self.zip(view, member, depth)
        if torch_legacy.is_legacy(head):
            return self.legacy(view, member, depth)
        if torch_legacy.is_legacy_tar(head):
            return self.legacy_tar(view, member, depth)
        archive = _try_zip(view, self.path)
        if archive is not None:  # something in front of an archive
            return self.zip(view, member, depth, archive)
        if _looks_like_pickle(view):
            self.pickles(view, member, depth, required=True)
            return "pickle"
        if head[257:262] == b"ustar":
            return self.tar(view, member, depth)
        self.fail(f"{NOT_A_CHECKPOINT} (it starts with {head[:16]!r})", member)
        return "unknown"

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

    def npy(self, view: memoryview, member: Optional[str], depth: int) -> str:
        try:
            header = npz.read_npy_header(view, 0, self.path, member or "")
        except errors.SafeckptError as exc:
            self.fail(f"invalid npy header: {exc.detail}", member)
            return "npy"
        if header.dtype.hasobject:
            self.add(INFO, "object-array", "npy object array",
                     "an object array: numpy.load(allow_pickle=True) unpickles its data (scanned "
                     "here as a pickle)", member, header.data_offset)
            self.pickles(view, member, depth, start=header.data_offset, required=True)
        return "npy"

    def zip(self, view: memoryview, member: Optional[str], depth: int,
            archive: Optional[zip_archive.ZipArchive] = None) -> str:
        if archive is None:
            try:
                archive = zip_archive.ZipArchive(view, self.path)
            except errors.SafeckptError as exc:
                self.fail(exc.detail, member)
                return "zip"
        names = archive.names()
        files = [n for n in names if not n.endswith("/")]
        torch = any(n == "data.pkl" or n.endswith("/data.pkl") for n in names)
        fmt = "torch-zip" if torch else "npz" if files and all(n.endswith(".npy") for n in files) \
            else "zip"
        if archive.start > 0:
            self.prefix(view[:archive.start], member, depth)
        if torch and names:
            self.torch_layout(names, member)
        archive.check_crcs(_crc_members(archive.members))
        unreadable = {f.member for f in archive.findings if f.kind in _UNREADABLE_KINDS}
        for f in archive.findings:
            self.zip_finding(f, member, view, depth)
        for record in archive.members:
            if not record.name.endswith("/") and record.name not in unreadable:
                self.zip_member(archive, view, record, member, depth)
        return fmt

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
                    depth: int) -> None:
        severity = _ZIP_SEVERITY.get(f.kind, SUSPICIOUS)
        if f.kind == "duplicate-name" and f.member and f.member.endswith(".pkl"):
            severity = MALICIOUS  # two readers would load two different pickles
        self.add(severity, f"zip-{f.kind}", f.member or f.kind, f.detail,
                 _join(member, f.member) if f.member else member, f.offset)
        if f.kind == "trailing-data" and 0 <= f.offset < len(view):
            self.pickles(view[f.offset:], _join(member, f"<after the archive, offset {f.offset}>"),
                         depth, required=False)

    def zip_member(self, archive: zip_archive.ZipArchive, view: memoryview,
                   record: zip_archive.ZipMember, member: Optional[str], depth: int) -> None:
        """A member is scanned when it is a .pkl, or its first bytes may start a pickle, an
        archive or an object array; numeric data records are recognised from their head alone."""
        name = _join(member, record.name)
        is_pickle = record.name.endswith(".pkl")
        if not is_pickle:
            head = _member_head(view, record)
            if head is None or not _worth_reading(head):
                return
            if record.method != zip_archive.STORED and record.size > MAX_INFLATED_MEMBER:
                self.add(INFO, "unscanned-member", record.name,
                         f"a compressed member of {record.size} bytes starting like a pickle or an "
                         "archive was not inflated", name, -1)
                return
        try:
            content = archive.read(record, max_size=max(record.size, 1))
        except errors.SafeckptError as exc:
            self.fail(exc.detail, name)
            return
        try:
            if is_pickle:
                records = _storage_records(archive, record) if record.name.endswith("data.pkl") else None
                self.pickles(content, name, depth, required=True, records=records)
            else:
                self.nested_member(content, name, depth)
        finally:
            content.release()

    def nested_member(self, content: memoryview, name: Optional[str], depth: int) -> None:
        head = bytes(content[:_HEAD_BYTES])
        if zip_archive.is_zip(head) or npz.is_npy(head) or head[257:262] == b"ustar" \
                or torch_legacy.is_legacy(head):
            self.nested(content, name, depth)
        elif _looks_like_pickle(content, strict=True):
            # a member no loader reads as a pickle: its first pickle is what a crafted one holds
            self.pickles(content, name, depth, required=False, max_count=1)

    def prefix(self, view: memoryview, member: Optional[str], depth: int) -> None:
        """Bytes in front of an archive: a pickle there is what torch.load reads first."""
        if _looks_like_pickle(view):
            self.add(MALICIOUS, "polyglot", "pickle before zip",
                     "a pickle hides in front of the zip archive: torch.load and pickle readers run "
                     "it, zip readers (and scanners) see only the archive", member, 0)
            self.pickles(view, member, depth, required=False)

    def legacy(self, view: memoryview, member: Optional[str], depth: int) -> str:
        try:
            layout = torch_legacy.read_legacy(view, self.path)
        except errors.SafeckptError as exc:
            self.fail(exc.detail, member)
            self.pickles(view, member, depth, required=True, max_count=5, roles=_LEGACY_ROLES)
            return "torch-legacy"
        compact = _compact(view)
        for role, span in zip(_LEGACY_ROLES, layout.pickles):
            self.pickle_at(compact, span.start, member, depth, role)
        end = max([s.end for s in layout.pickles] + [o + n for o, n in layout.storages.values()])
        if end < len(view):
            self.pickles(view[end:], _join(member, f"<after the storages, offset {end}>"), depth,
                         required=False)
        return "torch-legacy"

    def legacy_tar(self, view: memoryview, member: Optional[str], depth: int) -> str:
        try:
            layout = torch_legacy.read_legacy_tar(view, self.path)
        except errors.SafeckptError as exc:
            self.fail(exc.detail, member)
            self.tar(view, member, depth)
            return "torch-tar"
        bases: dict[str, int] = {}
        for span in layout.pickles:  # each member starts with a pickle
            bases[span.member] = min(bases.get(span.member, span.start), span.start)
        for span in layout.pickles:
            base = bases[span.member]
            self.pickle_at(view[base:], span.start - base, _join(member, span.member), depth, None)
        return "torch-tar"

    def tar(self, view: memoryview, member: Optional[str], depth: int) -> str:
        """A tar archive that torch_legacy could not read: every member, scanned as it comes."""
        try:
            with tarfile.open(fileobj=io.BytesIO(view), mode="r:") as tar:
                for count, info in enumerate(iter(tar.next, None)):
                    if count >= torch_legacy.MAX_TAR_MEMBERS:
                        self.fail(f"more than {torch_legacy.MAX_TAR_MEMBERS} tar members", member)
                        break
                    if not info.isfile() or info.offset_data + info.size > len(view):
                        continue
                    content = view[info.offset_data:info.offset_data + info.size]
                    name = _join(member, info.name)
                    if info.name in torch_legacy.TAR_MEMBERS:
                        self.pickles(content, name, depth, required=False)
                    else:
                        self.nested_member(content, name, depth)
        except Exception as exc:  # noqa: BLE001 - tarfile on untrusted bytes
            self.fail(f"unreadable tar archive ({type(exc).__name__}: {str(exc)[:200]})", member)
        return "tar"

    def nested(self, view: memoryview, member: Optional[str], depth: int) -> None:
        """Scan bytes found inside the file (a member, an embedded payload) as a file of their own."""
        if depth + 1 > MAX_DEPTH or self.nested_scans >= MAX_NESTED_SCANS:
            self.add(SUSPICIOUS, "too-deep", member or "nested data",
                     f"nested more than {MAX_DEPTH} levels (or more than {MAX_NESTED_SCANS} nested "
                     "parts): not scanned", member, -1)
            self.fail("nested data was not scanned (too deep or too many parts)", member)
            return
        self.nested_scans += 1
        self.data(view, member, depth + 1)

    # -- pickles
    def pickles(self, view: memoryview, member: Optional[str], depth: int, *, start: int = 0,
                required: bool, max_count: int = MAX_PICKLES_PER_STREAM,
                roles: tuple = (), records: Optional[dict[str, int]] = None) -> None:
        """Every pickle from `start`, back to back, while the bytes parse as pickles."""
        view = _compact(view)
        pos, count = start, 0
        while pos < len(view):
            if count >= max_count:
                if max_count == MAX_PICKLES_PER_STREAM:
                    self.add(SUSPICIOUS, "too-many-pickles", f"{count} pickles",
                             "the rest of the stream was not scanned", member, pos)
                return
            end = self.pickle_at(view, pos, member, depth, roles[count] if count < len(roles) else None,
                                 required=required and count == 0, records=records)
            if end is None:
                return
            pos, count = end, count + 1

    def pickle_at(self, view: memoryview, start: int, member: Optional[str], depth: int,
                  role: Optional[str], *, required: bool = True,
                  records: Optional[dict[str, int]] = None) -> Optional[int]:
        """Scan one pickle; its end, or None when the bytes there are not (all) a pickle."""
        where = f" ({role} pickle)" if role else ""
        try:
            result = pickle_vm.load(view, start=start)
        except PickleError as exc:
            exc.with_traceback(None)  # the traceback holds the machine's view of the file
            self.grade(exc.globals, member, where)
            if exc.globals and any(not g.allowed for g in exc.globals):
                self.embedded(view, start, exc.offset, None, exc.globals, member, depth)
            if required:
                self.fail(f"unreadable pickle{where}: {exc.detail}", member)
            elif exc.offset == start:
                self.add(INFO, "trailing-data", "trailing bytes",
                         f"{len(view) - start} bytes that are not a pickle", member, start)
            else:
                self.add(SUSPICIOUS, "pickle-error", "malformed pickle",
                         f"bytes that start like a pickle but break at offset {exc.offset}: "
                         f"{exc.detail}", member, start)
            return None
        self.grade(result.globals, member, where)
        for text in result.findings:
            if "extension code" in text:
                continue  # EXT opcodes are graded with the globals
            match = _PICKLE_VM_OFFSET.search(text)
            offset = int(match.group(1)) if match else -1
            if "numpy." in text:
                self.add(INFO, "object-array", "numpy object array",
                         "an object array or scalar: its items are pickled objects (scanned with the "
                         "rest); the reader keeps it inert", member, offset)
            else:
                self.add(INFO, "refused-object", text.split(": ", 1)[-1][:120],
                         "an object the reader declined to build (kept inert): " + text, member, offset)
        if any(not g.allowed for g in result.globals):
            self.embedded(view, start, result.end, result.value, result.globals, member, depth)
        if records is not None:
            self.storage_sizes(result.storages, records, member)
        return result.end

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
        called = _loader_calls(value)
        loaders = sorted({f"{g.module}.{g.name}" for g in uses} & set(NESTED_LOADERS))
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
        for offset, payload in _sweep(view, start, end):
            kind = None if payload in seen else _payload_kind(payload)
            if kind is None:
                continue
            seen.add(payload)
            label = _join(member, f"[bytes at {offset}]")
            severity = MALICIOUS if loaders else INFO
            self.add(severity, "nested-pickle", ", ".join(loaders) or "embedded payload",
                     f"{len(payload)} embedded bytes are a {kind}"
                     + (f" that {', '.join(loaders)} would deserialize" if loaders else "")
                     + f"; scanned under member {label!r}", member, offset)
            self.nested(memoryview(payload), label, depth)


_LEGACY_ROLES = ("magic number", "protocol version", "sys_info", "main", "storage keys")

# Severity of each zip_archive finding kind, and why (see zip_archive.FINDING_KINDS for what).
_ZIP_SEVERITY = {
    "duplicate-name": SUSPICIOUS,       # malicious when the name is a pickle (see zip_finding)
    "name-mismatch": MALICIOUS,         # streaming and central-directory readers see other files
    "header-mismatch": SUSPICIOUS,
    "encrypted": SUSPICIOUS,            # cannot be scanned (nor loaded by torch)
    "unsupported-method": SUSPICIOUS,
    "prepended-data": SUSPICIOUS,       # a pickle there is graded "polyglot" (malicious) too
    "trailing-data": INFO,              # scanned for pickles too
    "hidden-data": SUSPICIOUS,
    "overlapping-members": SUSPICIOUS,
    "size-mismatch": SUSPICIOUS,
    "nested-archive": INFO,             # its content is scanned and graded
    "unsafe-name": SUSPICIOUS,          # extraction would write outside the target directory
    "bad-crc": SUSPICIOUS,
    "unreadable": SUSPICIOUS,
}


# zip_archive findings after which a member cannot be read at all.
_UNREADABLE_KINDS = frozenset(["encrypted", "unsupported-method"])
# CRC-32 work per archive beyond the pickles (small members only, smallest first).
MAX_CRC_BYTES = 16 << 20


def _compact(view: memoryview) -> memoryview:
    """`view`, copied into bytes when it is small enough (see `MAX_COPIED_PICKLE`)."""
    if len(view) <= MAX_COPIED_PICKLE and not isinstance(view.obj, bytes):
        return memoryview(bytes(view))
    return view


def _crc_members(members: list) -> list:
    """Pickles, then small members while the byte budget lasts (never the big data records)."""
    chosen = [m for m in members if m.name.endswith(".pkl")]
    budget = MAX_CRC_BYTES
    for m in sorted((m for m in members if not m.name.endswith(".pkl")), key=lambda m: m.size):
        if m.size > MAX_CRC_CHECK_BYTES or m.size > budget:
            break
        budget -= m.size
        chosen.append(m)
    return chosen


def _member_head(view: memoryview, record: zip_archive.ZipMember) -> Optional[bytes]:
    """The first bytes of a member's content, without reading (or inflating) the rest."""
    start = record.data_offset
    if not 0 <= start <= start + record.compressed_size <= len(view):
        return None  # zip_archive has refused or reported it
    raw = view[start:start + min(record.compressed_size, _HEAD_BYTES)]
    if record.method == zip_archive.STORED:
        return bytes(raw)
    try:
        return zlib.decompressobj(-15).decompress(raw, _HEAD_BYTES)
    except zlib.error:
        return None  # corrupt: the CRC check or the read reports it


def _worth_reading(head: bytes) -> bool:
    """Whether a member's head may start something that holds code: a pickle, an archive,
    a legacy torch file, or an npy array whose header is not plainly numeric."""
    if not head:
        return False
    if zip_archive.is_zip(head) or head[257:262] == b"ustar":
        return True
    if npz.is_npy(head):
        try:
            return npz.read_npy_header(head, 0, "<head>", "").dtype.hasobject
        except errors.SafeckptError:
            return True  # a header cut short by the head (or a bad one): read it all
    return head[0] in _PICKLE_STARTS


def _try_zip(view: memoryview, path: str) -> Optional[zip_archive.ZipArchive]:
    try:
        return zip_archive.ZipArchive(view, path)
    except errors.SafeckptError:
        return None


def _has_proto(view: Any) -> bool:
    """A PROTO header of protocol 2 to 5: how every pickle written since Python 2.3 starts."""
    return len(view) >= 2 and view[0] == 0x80 and 2 <= view[1] <= 5


# First bytes of a pickle that can name a global: PROTO, or for protocols 0-1 GLOBAL,
# INST, MARK or an empty container (what Python's pickler starts with).
_PICKLE_STARTS = frozenset(b"\x80c(i]})")


def _looks_like_pickle(view: Any, strict: bool = False) -> bool:
    """Whether bytes are a pickle, from a trial parse of their head: it ends at STOP, or
    names a dangerous global before it breaks (a loader would already have run it), or
    runs past the trial (a long pickle: its header must be PROTO when `strict`).

    Without `strict` (whole files: a broken pickle is an error to report) a PROTO
    header is enough. `strict` is for bytes no loader reads as a pickle unless they are
    one (archive members, embedded bytes): random data must not pass for a pickle.
    """
    if not len(view) or (strict and view[0] not in _PICKLE_STARTS):
        return False  # whole files get no such shortcut: "N0" (None, POP) can start any pickle
    if _has_proto(view) and not strict:
        return True
    window = bytes(view[:_HEAD_BYTES if strict else _TRIAL_BYTES])
    try:
        pickle_vm.load(window, limits=_SNIFF_LIMITS)
        return True
    except PickleError as exc:
        exc.with_traceback(None)
        if any(_deliberate(g) for g in exc.globals):
            return True
        long = any(f"raise Limits.{name})" in exc.detail for name in _TRIAL_BOUNDS) or (
            len(window) < len(view) and "truncated data" in exc.detail)
        return long and (_has_proto(view) or not strict)


_IDENTIFIER_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _deliberate(g: GlobalUse) -> bool:
    """A dangerous global spelled out by name: random bytes never do that (an EXT opcode
    is one byte and a code, which random data is full of)."""
    return (not g.allowed and g.module != "copyreg.extension"
            and _IDENTIFIER_PATH.fullmatch(g.module) is not None
            and _IDENTIFIER_PATH.fullmatch(g.name) is not None
            and grade_global(g.module, g.name)[0] == MALICIOUS)


def _payload_kind(payload: bytes) -> Optional[str]:
    """What embedded bytes are, if they are something a loader would deserialize."""
    head = payload[:_HEAD_BYTES]
    if zip_archive.is_zip(head):
        return "zip archive"
    if npz.is_npy(head):
        return "npy array"
    if torch_legacy.is_legacy(head):
        return "legacy torch file"
    if _looks_like_pickle(payload, strict=True):
        return "pickle"
    return None


def _as_payload(x: Any) -> Optional[bytes]:
    if isinstance(x, (bytes, bytearray)):
        return bytes(x)
    if isinstance(x, str):  # Python 2 strings, protocol 0 STRING arguments
        try:
            return x.encode("latin-1")
        except UnicodeEncodeError:
            return None
    return None


def _storage_records(archive: zip_archive.ZipArchive, pickle: zip_archive.ZipMember) -> dict[str, int]:
    """Key -> size of the torch storage records beside a data.pkl (``<prefix>/data/<key>``)."""
    prefix = pickle.name[:-len("data.pkl")] + "data/"
    return {m.name[len(prefix):]: m.size for m in archive.members if m.name.startswith(prefix)}


def _loader_calls(value: Any) -> list[tuple[str, int, bytes]]:
    """(loader, offset, payload) of every nested-loader call reachable from `value`."""
    out = []
    stack, seen, visited = [value], set(), 0
    while stack and visited < MAX_WALK_NODES:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        visited += 1
        if isinstance(x, PlaceholderCall):
            qual = x.func.qualname if isinstance(x.func, Placeholder) else None
            if qual in NESTED_LOADERS:
                for payload in _payloads(list(x.args) + list(x.kwargs.values())):
                    out.append((qual, x.offset, payload))
            stack.extend([x.func, *x.args, *x.kwargs.values(), *x.state, *x.items])
            stack.extend(v for pair in x.setitems for v in pair)
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
    return out


def _payloads(args: list, depth: int = 0) -> Iterator[bytes]:
    """Bytes among call arguments, through wrappers such as io.BytesIO(b"...")."""
    for a in args:
        payload = _as_payload(a)
        if payload is not None:
            yield payload
        elif depth < 3 and isinstance(a, PlaceholderCall):
            yield from _payloads(list(a.args) + list(a.kwargs.values()), depth + 1)
        elif depth < 3 and isinstance(a, (list, tuple)):
            yield from _payloads(list(a)[:64], depth + 1)


def _sweep(view: memoryview, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of every string or bytes argument in the opcodes of `view[start:end]`."""
    ops = pickletools.genops(bytes(view[start:end]))
    for count in range(MAX_SWEEP_OPCODES):
        try:
            op, arg, pos = next(ops)
        except StopIteration:
            return
        except Exception:  # noqa: BLE001 - a malformed stream ends the sweep where it breaks
            return
        payload = _as_payload(arg) if isinstance(arg, (bytes, bytearray, str)) else None
        if payload is not None and len(payload) >= 2:
            yield start + pos, payload
