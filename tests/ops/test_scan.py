"""The security scan: every hostile pattern is flagged where it is, nothing ever runs,
files made by the real libraries are safe, and hostile structure never breaks the scan."""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import safeckpt
from safeckpt.errors import SafeckptError
from safeckpt.ops.scan import (
    MAX_DEPTH, Finding, ScanReport, grade_global, scan, scan_bytes,
)
from safeckpt.sources.pickle_vm import ALLOWLIST

from tests.cli.runner import invoke
from tests.ops.scan_checks import assert_safe
from tests.ops.malicious_corpus import (
    Call, G, benign_pickle, program, torch_zip,
)


def malicious_whats(report: ScanReport) -> list[str]:
    return [f.what for f in report.findings if f.severity == "malicious"]


# --- the hostile corpus --------------------------------------------------------------

def test_corpus_is_broad(malicious_corpus):
    names = [item.name for item in malicious_corpus]
    assert len(names) >= 30 and len(set(names)) == len(names)
    assert {item.protocol for item in malicious_corpus} >= {0, 1, 2, 3, 4, 5}
    for item in malicious_corpus:
        data = item.path.read_bytes()
        if item.name == "npz_member":  # deflated: look inside
            with zipfile.ZipFile(item.path) as z:
                data = b"".join(z.read(n) for n in z.namelist())
        assert item.canary.name.encode() in data, f"{item.name} carries no canary"
        assert not item.canary.exists()


def test_every_corpus_item_is_malicious_and_located(malicious_corpus):
    failures = []
    for item in malicious_corpus:
        report = scan(item.path)
        hits = [f for f in report.findings if f.severity == "malicious" and f.what == item.expect]
        if report.verdict != "malicious" or report.exit_code() != 1 or not hits:
            found = [(f.severity, f.what) for f in report.findings]
            failures.append(f"{item.name}: {report.verdict}, {found}")
            continue
        if hits[0].member != item.member or hits[0].offset != item.offset:
            failures.append(f"{item.name}: {item.expect} at {hits[0].member}@{hits[0].offset}, "
                            f"expected {item.member}@{item.offset}")
        assert item.expect in report.globals or item.expect.startswith("copyreg.extension")
        assert json.loads(json.dumps(report.to_dict()))["verdict"] == "malicious"
        assert scan_bytes(item.path.read_bytes(), path=str(item.path)).findings == report.findings
    assert not failures, "\n".join(failures)
    assert not any(item.canary.exists() for item in malicious_corpus)


def test_opening_and_converting_the_corpus_never_runs_it(malicious_corpus, tmp_path):
    from safeckpt.errors import UnsafeFileError
    from safeckpt.ops.convert import convert
    from safeckpt.sources.detect import open_source

    def read_all(path):
        with open_source(path) as src:
            for name in src.keys():
                src.read(name)

    from safeckpt.ops.inspect import describe

    steps = {"open_source": read_all, "inspect": describe,
             "convert": lambda path: convert(path, tmp_path / "out.safetensors", overwrite=True),
             "convert --allow-unsafe-structure": lambda path: convert(
                 path, tmp_path / "out.safetensors", allow_unsafe_structure=True, overwrite=True)}
    crashed, converted = [], []
    for item in malicious_corpus:
        for step, run in steps.items():
            try:
                run(item.path)
                if step == "convert":
                    converted.append(item.name)
            except UnsafeFileError as exc:
                assert exc.report.verdict == "malicious"
            except SafeckptError:
                if step == "convert":  # the scan refuses before anything is opened
                    converted.append(item.name)
            except Exception as exc:  # noqa: BLE001 - listed below: a hostile file must get a clear error
                crashed.append(f"{step} {item.name}: {type(exc).__name__}: {exc}")
            assert not item.canary.exists(), (step, item.name)
    assert not converted, f"not refused as unsafe: {converted}"
    assert not crashed, "crashed instead of refusing:\n" + "\n".join(crashed)


@pytest.mark.parametrize("name, where, expect_kind", [
    ("p4_pickle_loads_nested", "[pickle.loads call at ", "dangerous-global"),
    ("p4_discarded_loads", "[bytes at ", "dangerous-global"),
    ("p2_torch_load_from_bytes", "[torch.storage._load_from_bytes call at ", "dangerous-global"),
    ("p3_torch_load_bytesio", "[torch.load call at ", "dangerous-global"),
])
def test_nested_payloads_are_scanned_with_their_path(malicious_corpus, name, where, expect_kind):
    item = next(i for i in malicious_corpus if i.name == name)
    report = scan(item.path)
    nested = [f for f in report.findings if f.kind == "nested-pickle"]
    assert nested and nested[0].severity == "malicious"
    inner = [f for f in report.findings if f.member and f.member.startswith(where) and f.what == "os.system"]
    assert inner and inner[0].kind == expect_kind, report.findings
    if name == "p2_torch_load_from_bytes":
        assert inner[0].member.endswith("] > archive/data.pkl")


def test_zip_tricks_are_graded(malicious_corpus):
    by_name = {i.name: scan(i.path) for i in malicious_corpus if i.name.startswith(("torch_zip", "polyglot", "nested"))}
    kinds = {name: {(f.kind, f.severity) for f in r.findings} for name, r in by_name.items()}
    assert ("zip-duplicate-name", "malicious") in kinds["torch_zip_duplicate_data_pkl"]
    assert ("zip-name-mismatch", "malicious") in kinds["torch_zip_name_mismatch"]
    assert ("polyglot", "malicious") in kinds["polyglot_before_zip"]
    assert ("zip-prepended-data", "suspicious") in kinds["polyglot_before_zip"]
    assert ("zip-nested-archive", "info") in kinds["nested_zip_in_zip"]
    assert by_name["polyglot_before_zip"].format == "torch-zip"


# --- grading ------------------------------------------------------------------------

@pytest.mark.parametrize("module, name, severity, kind", [
    ("os", "system", "malicious", "dangerous-global"),
    ("nt", "system", "malicious", "dangerous-global"),
    ("builtins", "getattr", "malicious", "dangerous-global"),
    ("torch.storage", "_load_from_bytes", "malicious", "dangerous-global"),
    ("torch", "load", "malicious", "dangerous-global"),
    ("torch.jit._script", "RecursiveScriptModule", "malicious", "dangerous-global"),
    ("numpy", "load", "malicious", "dangerous-global"),
    ("marshal", "loads", "malicious", "dangerous-global"),
    ("types", "CodeType", "malicious", "dangerous-global"),
    ("functools", "reduce", "malicious", "dangerous-global"),
    ("pathlib", "os.system", "malicious", "dotted-global"),
    ("torch", "serialization.os.system", "malicious", "dotted-global"),
    ("torch", "nn.modules.os.path.join", "malicious", "dotted-global"),
    ("pathlib", "PosixPath.unlink", "malicious", "dotted-global"),
    ("mymodel", "Net.__init__.__globals__", "malicious", "dotted-global"),
    ("copyreg.extension", "7", "malicious", "ext-opcode"),
    ("mymodel", "Net", "suspicious", "unknown-global"),
    ("mymodel", "Outer.Inner", "suspicious", "unknown-global"),
    ("torch.nn.modules.linear", "Linear", "suspicious", "unknown-global"),
    ("types", "SimpleNamespace", "suspicious", "stdlib-data-class"),
    ("collections", "Counter", "suspicious", "stdlib-data-class"),
])
def test_grading(module, name, severity, kind):
    got = grade_global(module, name)
    assert got[:2] == (severity, kind)
    assert f"{module}.{name}" in got[2]


def test_allowlist_and_denylist_do_not_overlap():
    # the standard-library rule grades every stdlib name it is asked about ("not on the
    # allowlist"); the scanner never asks it about allowlisted ones, the denylist never names them
    # one deliberate exception: _get_layout looks a layout up by name (DCP's .metadata);
    # the rest of torch.serialization loads files, so the module stays denied
    deliberate = {"torch.serialization._get_layout"}
    graded = {q: grade_global(*q.rsplit(".", 1))[:2] for q in ALLOWLIST if q not in deliberate}
    assert not [q for q, (severity, kind) in graded.items()
                if severity == "malicious" and kind != "stdlib-global"]


# --- benign files made by the real libraries ----------------------------------------------

# assert_safe (scan_checks.py): safe, strictly too, every global in the allowlist.

def test_torch_files_are_safe(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    base = torch.randn(10, 10)
    objects = {
        "state_dict": model.state_dict(),
        "optimizer": {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
                      "lr_history": [1e-3, 5e-4]},
        "parameters": {"w": torch.nn.Parameter(torch.randn(3, 3)),
                       "frozen": torch.nn.Parameter(torch.zeros(3), requires_grad=False)},
        "dtypes": {"bf16": torch.randn(4, 4).to(torch.bfloat16), "fp16": torch.randn(4).half(),
                   "i64": torch.arange(4), "bool": torch.ones(2, dtype=torch.bool),
                   "c64": torch.randn(2, dtype=torch.complex64)},
        "views": {"base": base, "t": base.t(), "row": base[2], "cols": base[:, 3:5]},
        "shared": {"a": base, "b": base, "flat": base.view(100)[10:20]},
    }
    for name, obj in objects.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        assert assert_safe(tmp_path / f"{name}.pt").format == "torch-zip"
    torch.save(objects["optimizer"], tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert assert_safe(tmp_path / "legacy.pt").format == "torch-legacy"
    assert torch.load(tmp_path / "legacy.pt", weights_only=True)["epoch"] == 3  # the oracle reads it too


def test_numpy_and_safetensors_files_are_safe(tmp_path, model_like):
    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    np.savez(tmp_path / "b.npz", x=np.ones(3), y=np.zeros((2, 2), np.int64))
    np.savez_compressed(tmp_path / "c.npz", x=np.ones(3), y=np.arange(6).reshape(2, 3))
    np.save(tmp_path / "obj.npy", np.array([1, "a", None, 2.5], dtype=object), allow_pickle=True)
    safeckpt.save_file(model_like, tmp_path / "m.safetensors")
    formats = {p.name: assert_safe(p).format for p in sorted(tmp_path.iterdir())}
    assert formats == {"a.npy": "npy", "b.npz": "npz", "c.npz": "npz", "obj.npy": "npy",
                       "m.safetensors": "safetensors"}
    assert [f.kind for f in scan(tmp_path / "obj.npy").findings][0] == "object-array"


class UserThing:
    def __init__(self) -> None:
        self.weights = np.ones(2, np.float32)
        self.name = "mine"


def test_a_user_class_is_suspicious_not_malicious(tmp_path):
    path = tmp_path / "user.pkl"
    path.write_bytes(pickle.dumps({"thing": UserThing(), "step": 7}, protocol=4))
    report = scan(path)
    assert report.verdict == "suspicious" and report.error is None
    qual = f"{UserThing.__module__}.UserThing"
    assert [(f.kind, f.what) for f in report.findings] == [("unknown-global", qual)]
    assert report.exit_code() == 0 and report.exit_code(strict=True) == 1


# --- hostile or broken structure: a clear verdict, never a crash, never "safe" ------------

def test_unreadable_inputs_are_errors_never_safe(tmp_path):
    good = pickle.dumps({"a": np.arange(3)}, protocol=2)
    cases = {
        "truncated.pkl": good[: len(good) // 2],
        "truncated.pt": torch_zip(good)[:-30],
        "empty.bin": b"",
        "random.bin": bytes(range(7, 200)),
        "bad.safetensors": struct.pack("<Q", 20) + b'{"w": {"dtype": 1}}  ',
        "bad.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': 3}    \n",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        report = scan(tmp_path / name)
        assert report.error and report.verdict == "suspicious" and report.exit_code() == 2, (name, report)
    assert scan(tmp_path / "missing.pt").error.startswith("cannot read")


def test_error_after_a_dangerous_call_is_still_malicious():
    data, _ = program(2, Call(G("os", "system"), ("true",)))
    report = scan_bytes(data[:-1] + b"\xff")  # broken after the REDUCE a loader would run
    assert report.verdict == "malicious" and report.error and report.exit_code() == 1


def test_trailing_bytes_and_pickles():
    first = benign_pickle()
    assert scan_bytes(first + bytes(16)).verdict == "safe"
    assert [f.kind for f in scan_bytes(first + bytes(16)).findings] == ["trailing-data"]
    user, _ = program(2, Call(G("mymodel", "Net"), ()))
    assert scan_bytes(first + user + first).verdict == "suspicious"


def test_zip_structure_findings():
    body = benign_pickle()
    # a member outside the prefix, TorchScript code, a corrupt small member, an encrypted one
    data = bytearray(torch_zip(body, extra=(("archive/code/__torch__.py", b"def forward(self): pass"),
                                            ("elsewhere/notes.pkl", benign_pickle()),
                                            ("archive/secret", b"sealed"))))
    at = data.index(b"little", data.index(b"archive/byteorder"))
    data[at] = ord("L")  # its CRC no longer matches
    flags_at = data.index(b"archive/secret") - 30 + 6  # local header flags
    central = data.rindex(b"archive/secret") - 46 + 8  # central directory flags
    data[flags_at] |= 1
    data[central] |= 1
    report = scan_bytes(bytes(data))
    kinds = {f.kind: f for f in report.findings}
    assert kinds["zip-outside-prefix"].member == "elsewhere/notes.pkl"
    assert kinds["torchscript"].severity == "suspicious"
    assert kinds["zip-bad-crc"].member == "archive/byteorder"
    assert kinds["zip-encrypted"].member == "archive/secret"
    assert report.verdict == "suspicious" and report.format == "torch-zip"


def test_pickle_after_a_zip_and_in_a_data_record_are_found():
    evil, marks = program(3, Call(G("os", "system"), ("true",)))
    report = scan_bytes(torch_zip(benign_pickle()) + evil)
    assert "os.system" in malicious_whats(report)
    report = scan_bytes(torch_zip(benign_pickle(), extra=(("archive/data/0", evil),)))
    hit = [f for f in report.findings if f.what == "os.system"][0]
    assert (hit.member, hit.offset) == ("archive/data/0", marks["os.system"])


def test_nesting_is_bounded():
    inner, _ = program(0, Call(G("os", "system"), ("true",)))
    for _ in range(MAX_DEPTH + 3):
        inner, _ = program(4, Call(G("pickle", "loads"), (inner,)))
    report = scan_bytes(inner)
    assert report.verdict == "malicious"
    assert any(f.kind == "unfollowed" for f in report.findings) and report.exit_code() == 1


def test_shared_reference_bomb_is_walked_once():
    # 2**80 paths through 80 tuples that each hold the previous one twice
    p = b"\x80\x02cmymodel\nX\n)\x81q\x00" + b"h\x00h\x00\x86q\x00" * 80 + b"."
    start = time.perf_counter()
    report = scan_bytes(p)
    assert report.verdict == "suspicious" and time.perf_counter() - start < 20  # 2**80 if walked as a tree


def test_many_findings_are_capped():
    p = b"\x80\x02(" + b"".join(b"cmod%d\nC\n" % i for i in range(1500)) + b"l."
    report = scan_bytes(p)
    assert len(report.findings) == 1001 and report.findings[-1].kind == "more-findings"


def test_random_bytes_inside_archives_are_not_pickles():
    rng = np.random.default_rng(0)
    starts = list(b"\x80c(i]})")
    members = [(f"archive/data/{i}", bytes([starts[i % len(starts)], i % 6]) + rng.bytes(200))
               for i in range(3000)]
    report = scan_bytes(torch_zip(benign_pickle(), extra=tuple(members)))
    assert report.verdict == "safe", report.findings[:5]


# --- directories ---------------------------------------------------------------------

def test_directory_is_scanned_recursively(tmp_path, malicious_corpus):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "README.md").write_text("cats\nand dogs\n")
    (tmp_path / "a" / "b" / "w.pkl").write_bytes(pickle.dumps({"w": np.ones(2)}))
    (tmp_path / "a" / "b" / "evil.bin").write_bytes(malicious_corpus[0].path.read_bytes())
    report = scan(tmp_path)
    assert report.format == "directory" and report.verdict == "malicious" and report.exit_code() == 1
    assert sorted(os.path.relpath(r.path, tmp_path) for r in report.files) == ["a/b/evil.bin", "a/b/w.pkl"]
    assert [f.kind for f in report.findings] == ["skipped-files", "pickled-files"]
    explained = report.findings[1]
    assert explained.what == "2 pickles: a/b/evil.bin, a/b/w.pkl"
    assert "a/b/evil.bin would import and call" in explained.why and "w.pkl would" not in explained.why
    (tmp_path / "a" / "b" / "evil.bin").unlink()
    assert "all name only data" in scan(tmp_path).findings[1].why
    assert scan(tmp_path).verdict == "safe"
    os.symlink(tmp_path / "gone.pt", tmp_path / "broken.pt")
    assert scan(tmp_path).exit_code() == 2


def test_report_round_trips_as_json(malicious_corpus):
    report = scan(malicious_corpus[0].path)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["findings"][0] == {"severity": "malicious", "kind": "dangerous-global", "what": "os.system",
                                "why": report.findings[0].why, "member": None,
                                "offset": malicious_corpus[0].offset}
    assert Finding(**d["findings"][0]) == report.findings[0]


@pytest.mark.parametrize("padding", [
    b"N0" * 6000,  # harmless opcodes past the trial's opcode budget, and no PROTO or GLOBAL first
    b"X" + struct.pack("<I", 200_000) + b"a" * 200_000 + b"0",  # a string longer than the trial reads
])
def test_padding_does_not_hide_a_pickle(tmp_path, padding):
    evil = padding + b"cos\nsystem\n(S'true'\ntR."
    assert scan_bytes(evil).verdict == "malicious"
    (tmp_path / "notes.txt").write_bytes(evil)
    (tmp_path / "notes.md").write_bytes(b"N0tes on the model\n")
    report = scan(tmp_path)
    assert [Path(r.path).name for r in report.files] == ["notes.txt"] and report.verdict == "malicious"


def test_special_files_are_reported_never_read(tmp_path):
    os.mkfifo(tmp_path / "pipe")  # reading it would block forever
    (tmp_path / "w.pkl").write_bytes(benign_pickle())
    report = scan(tmp_path)
    by_name = {Path(r.path).name: r for r in report.files}
    assert by_name["w.pkl"].verdict == "safe"
    assert by_name["pipe"].verdict != "safe" and "a FIFO" in by_name["pipe"].error
    assert report.exit_code() == 2  # a file that was not read is not known to be safe
    alone = scan(tmp_path / "pipe")
    assert alone.exit_code() == 2 and "not a regular file" in alone.error


def test_directory_links_are_followed_inside_and_reported_outside(tmp_path):
    inside = tmp_path / "top" / "real"
    inside.mkdir(parents=True)
    (inside / "w.pkl").write_bytes(benign_pickle())
    (tmp_path / "top" / "alias").symlink_to(inside)                 # the same folder again
    (tmp_path / "top" / "loop").symlink_to(tmp_path / "top")        # a loop
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "evil.pkl").write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    (tmp_path / "top" / "out").symlink_to(tmp_path / "outside")     # out of the tree
    report = scan(tmp_path / "top")
    # the folder is scanned once, under the first of its names; the other is reported
    assert [os.path.relpath(r.path, tmp_path / "top") for r in report.files] == ["alias/w.pkl"]
    links = next(f for f in report.findings if f.kind == "skipped-links")
    assert "3 folders" == links.what and "loop" in links.why and "out of the directory" in links.why


def test_the_commands_never_run_the_corpus(malicious_corpus, tmp_path):
    """The same through the command line, where a user meets these files."""
    for item in malicious_corpus:
        for args in (["inspect", item.path], ["scan", item.path], ["convert", item.path, tmp_path / "out.safetensors"]):
            result = invoke(*args)
            assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.output)
            assert "Traceback" not in result.output
            assert not item.canary.exists(), (args, item.name)
        assert result.exit_code == 2 and not (tmp_path / "out.safetensors").exists()


def test_storage_larger_than_its_record_is_flagged(tmp_path):
    """The CVE-2026-24747 pattern: data.pkl declares more bytes than data/<key> holds."""
    import zipfile

    torch = pytest.importorskip("torch")
    path = tmp_path / "overrun.pt"
    torch.save({"t": torch.arange(100, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    prefix = next(iter(members)).split("/")[0]
    members[f"{prefix}/data/0"] = members[f"{prefix}/data/0"][:40]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    report = scan(path)
    assert report.verdict == "malicious"
    finding = next(f for f in report.findings if f.kind == "storage-overrun")
    assert "400" not in finding.what and "holds 40" in finding.why and finding.member.endswith("data.pkl")
    del members[f"{prefix}/data/0"]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    assert any(f.kind == "missing-storage" for f in scan(path).findings)


def test_an_npy_header_numpy_cannot_tokenize_is_invalid_not_an_internal_error():
    text = b"{'descr': '<f4"  # an unclosed literal: numpy's tokenizer raises TokenError
    text += b" " * (118 - len(text)) + b"\n"
    report = scan_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + bytes(8))
    assert report.error is not None and report.error.startswith("invalid npy header: numpy refuses its header")
    assert "internal error" not in report.error


def test_a_json_document_is_safe_and_text_that_is_not_json_is_not_known_to_be(tmp_path):
    (tmp_path / "state.json").write_text('{"format": "safeckpt-state", "state": [1, 2.5, null]}')
    report = scan(tmp_path / "state.json")
    assert (report.format, report.verdict) == ("json", "safe")
    for name, text in [("broken.json", '{"a": 1'), ("words.txt", "hello"), ("list.json", "[" * 100_000)]:
        (tmp_path / name).write_text(text)
        assert scan(tmp_path / name).verdict == "suspicious", name  # a loader's view is not known
    (tmp_path / "pickle_after_brace").write_bytes(b"{" + pickle.dumps(print))
    assert scan(tmp_path / "pickle_after_brace").verdict != "safe"
