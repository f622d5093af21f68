"""Grading what a pickle names: the standard library is malicious unless it is plain data,
dangerous modules are found under other names, and a user's own classes stay suspicious."""

from __future__ import annotations

import argparse
import collections
import datetime
import decimal
import fractions
import importlib.util
import ipaddress
import json
import pickle
import sys
import types
import uuid
from pathlib import Path, PurePosixPath

import pytest

from safeckpt.ops.scan import grade_global, scan_bytes
from safeckpt.ops.scan.rules import (
    DENYLIST,
    MODULE_ALIASES,
    STDLIB_DATA_CLASSES,
    STDLIB_MODULES,
)
from safeckpt.sources.pickle_vm import ALLOWLIST

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "src" / "safeckpt" / "ops" / "scan" / "stdlib_table.json"


@pytest.mark.parametrize("module, name, kind", [
    # what the denylist missed: the standard library reached by other names
    ("random", "_os", "module-alias"),
    ("uuid", "_get_command_stdout", "stdlib-global"),
    ("_osx_support", "_read_output", "stdlib-global"),
    ("_pyio", "open", "stdlib-global"),
    ("codecs", "open", "stdlib-global"),
    ("bz2", "BZ2File", "stdlib-global"),
    ("gzip", "GzipFile", "stdlib-global"),
    ("logging", "FileHandler", "stdlib-global"),
    ("ensurepip", "bootstrap", "stdlib-global"),
    ("ensurepip", "_run_pip", "stdlib-global"),
    ("test.support", "script_helper", "stdlib-global"),
    ("test.support.script_helper", "assert_python_ok", "stdlib-global"),
    ("torch.utils.collect_env", "run", "dangerous-global"),
    ("torch.utils.model_zoo", "load_url", "dangerous-global"),
    # a dangerous module as an attribute or a re-exporting submodule
    ("somepkg.util", "os", "module-alias"),
    ("somepkg", "_subprocess", "module-alias"),
    ("somepkg", "_os.getcwd", "module-alias"),
    ("posixpath", "os", "module-alias"),
    ("somepkg", "builtins", "module-alias"),
    ("vendored.six.moves.cPickle", "loads", "module-alias"),
    ("torch.serialization", "os.system", "dotted-global"),
    ("six.moves.cPickle", "loads", "dangerous-global"),
    # the standard library of every version, test modules and Python 2 names
    ("tomllib", "loads", "stdlib-global"),
    ("_pylong", "int_to_decimal_string", "stdlib-global"),  # 3.12+
    ("compression.zstd", "ZstdFile", "stdlib-global"),      # 3.14
    ("distutils.spawn", "spawn", "dangerous-global"),       # gone in 3.12, still denied
    ("_testcapi", "raise_exception", "stdlib-global"),
    ("Queue", "Queue", "stdlib-global"),                    # pickle maps it to queue
    ("__builtin__", "eval", "stdlib-global"),
    # functions and classes that are no plain data
    ("operator", "attrgetter", "dangerous-global"),
    ("builtins", "memoryview", "stdlib-global"),
    ("enum", "Enum", "stdlib-global"),
    ("zoneinfo", "ZoneInfo", "stdlib-global"),               # reads the time-zone files
    ("collections", "namedtuple", "stdlib-global"),          # builds classes with exec
    ("collections", "Counter.fromkeys", "stdlib-global"),
    # third-party code that runs code, commands, templates or nested loads
    ("pip._internal.cli.main", "main", "dangerous-global"),
    ("pkg_resources", "load_entry_point", "dangerous-global"),
    ("pexpect.pty_spawn", "spawn", "dangerous-global"),
    ("sympy.core.sympify", "sympify", "dangerous-global"),
    ("sympy.parsing.sympy_parser", "parse_expr", "dangerous-global"),
    ("pandas", "eval", "dangerous-global"),
    ("pandas.io.parsers.readers", "read_csv", "dangerous-global"),
    ("jinja2.environment", "Template", "dangerous-global"),
    ("mako.template", "Template", "dangerous-global"),
    ("keras.src.saving.keras_saveable", "KerasSaveable._unpickle_model", "dangerous-global"),
    ("keras.src.utils.python_utils", "func_load", "dangerous-global"),
    ("transformers.dynamic_module_utils", "get_class_from_dynamic_module", "dangerous-global"),
    ("numpy", "ndarray.tofile", "dotted-global"),
])
def test_dangerous_names_are_malicious(module, name, kind):
    assert f"{module}.{name}" not in ALLOWLIST  # the scanner grades only names it lacks
    severity, got_kind, why = grade_global(module, name)
    assert (severity, got_kind) == ("malicious", kind), why
    assert f"{module}.{name}" in why


@pytest.mark.parametrize("module, name", [
    ("mymodel", "Net"),
    ("mymodel", "Outer.Inner"),
    ("__main__", "Net"),
    ("__mp_main__", "Net"),
    ("torch.nn.modules.linear", "Linear"),
    ("numpy.random._pickle", "__generator_ctor"),    # numpy's own _pickle: RNG rebuilds
    ("numpy.random._pcg64", "PCG64"),
    ("myproject.signal.filters", "Butterworth"),     # shares a name, not a module, with the stdlib
    ("myproject.code.model", "Net"),
    ("tests.helpers", "Net"),
    ("sympy.core.symbol", "Symbol"),
    ("opyright notice", "x"),                        # text read as a GLOBAL: never the stdlib
    ("collections", "Counter x"),
])
def test_third_party_names_are_suspicious(module, name):
    severity, kind, why = grade_global(module, name)
    assert (severity, kind) == ("suspicious", "unknown-global"), why


def test_plain_data_classes_are_suspicious():
    assert {"collections.Counter", "collections.deque", "types.SimpleNamespace", "datetime.datetime",
            "decimal.Decimal", "fractions.Fraction", "uuid.UUID", "ipaddress.IPv4Address"} \
        <= set(STDLIB_DATA_CLASSES)
    for qual in STDLIB_DATA_CLASSES:
        module, name = qual.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        assert isinstance(cls, type) and f"{cls.__module__}.{cls.__qualname__}" == qual
        severity, kind, why = grade_global(module, name)
        assert (severity, kind) == ("suspicious", "stdlib-data-class"), why


# one of each plain data class, as a checkpoint would hold it
SAMPLES = {
    "builtins.range": range(3, 9, 2), "collections.ChainMap": collections.ChainMap({"a": 1}, {"b": 2}),
    "collections.Counter": collections.Counter("abca"),
    "collections.UserDict": collections.UserDict(lr=0.1),
    "collections.UserList": collections.UserList([1, 2]),
    "collections.UserString": collections.UserString("run"),
    "collections.deque": collections.deque([1, 2], maxlen=5),
    "datetime.date": datetime.date(2024, 5, 1), "datetime.time": datetime.time(12, 30),
    "datetime.datetime": datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.timezone.utc),
    "datetime.timedelta": datetime.timedelta(hours=3), "datetime.tzinfo": datetime.tzinfo(),
    "datetime.timezone": datetime.timezone(datetime.timedelta(hours=2), "CEST"),
    "decimal.Decimal": decimal.Decimal("0.001"), "fractions.Fraction": fractions.Fraction(1, 3),
    "ipaddress.IPv4Address": ipaddress.IPv4Address("10.0.0.1"),
    "ipaddress.IPv4Interface": ipaddress.IPv4Interface("10.0.0.1/8"),
    "ipaddress.IPv4Network": ipaddress.IPv4Network("10.0.0.0/8"),
    "ipaddress.IPv6Address": ipaddress.IPv6Address("::1"),
    "ipaddress.IPv6Interface": ipaddress.IPv6Interface("::1/64"),
    "ipaddress.IPv6Network": ipaddress.IPv6Network("fe80::/64"),
    "types.SimpleNamespace": types.SimpleNamespace(lr=0.1), "uuid.UUID": uuid.UUID(int=7),
}


@pytest.mark.parametrize("qual", sorted(SAMPLES))
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_real_pickles_of_plain_data_are_never_malicious(qual, protocol):
    report = scan_bytes(pickle.dumps({"value": SAMPLES[qual]}, protocol=protocol))
    if qual in ALLOWLIST:  # rebuilt by pickle_vm: never graded
        assert report.verdict == "safe", report.findings
    else:
        assert report.verdict == "suspicious", report.findings
        assert qual in [f.what for f in report.findings if f.kind == "stdlib-data-class"]
        assert {f.kind for f in report.findings} == {"stdlib-data-class"}


def test_samples_cover_the_table():
    assert set(SAMPLES) == set(STDLIB_DATA_CLASSES)


def test_a_real_pickle_calling_the_stdlib_is_malicious():
    opener = b"\x80\x02ccodecs\nopen\nX\x0b\x00\x00\x00/tmp/canaryX\x01\x00\x00\x00w\x86R."
    report = scan_bytes(opener)
    assert report.verdict == "malicious"
    assert [(f.kind, f.what) for f in report.findings] == [("stdlib-global", "codecs.open")]


def test_allowlisted_stdlib_names_never_reach_the_grading():
    data = {"od": collections.OrderedDict(a=1), "dd": collections.defaultdict(int, {"x": 1}),
            "s": {1, 2}, "fs": frozenset({3}), "ba": bytearray(b"ab"), "c": 1 + 2j,
            "sl": slice(1, 5, 2), "ns": argparse.Namespace(lr=0.1), "p": PurePosixPath("a/b"),
            "b": b"raw"}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        report = scan_bytes(pickle.dumps(data, protocol=protocol))
        assert report.verdict == "safe", (protocol, report.findings)
        assert all(g in ALLOWLIST for g in report.globals)


def test_module_aliases_are_dangerous_modules():
    assert all(module in DENYLIST for module in MODULE_ALIASES if module != "builtins")
    assert set(MODULE_ALIASES) <= STDLIB_MODULES


# --- the committed table -----------------------------------------------------------

def test_the_table_is_the_standard_library_of_every_version():
    table = json.loads(TABLE.read_text("utf-8"))
    modules = table["modules"]
    assert modules == sorted(set(modules)) and all(m.isidentifier() for m in modules)
    assert {"os", "sys", "_osx_support", "test", "ensurepip", "tomllib", "idlelib", "_pylong",
            "distutils", "asyncore", "__future__", "annotationlib", "_testcapi", "cPickle"} <= set(modules)
    assert "__main__" not in modules and "numpy" not in modules
    assert table["provenance"]["stdlib_module_names_not_in_every_interpreter"]["_pylong"][0].startswith("3.12")
    versions = [tuple(map(int, v.split("."))) for v in table["interpreters"]]
    assert versions == sorted(versions) and versions[0][:2] == (3, 10) and versions[-1][:2] >= (3, 13)
    assert table["data_classes"] == STDLIB_DATA_CLASSES
    assert STDLIB_MODULES >= set(modules) | set(sys.stdlib_module_names)


def _load_script():
    spec = importlib.util.spec_from_file_location("make_stdlib_table", ROOT / "scripts" / "make_stdlib_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_script_is_deterministic_and_agrees_with_the_table(tmp_path):
    script = _load_script()
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert script.main(["--output", str(first)]) == 0
    assert script.main(["--output", str(second)]) == 0
    assert first.read_bytes() == second.read_bytes()
    mine, committed = json.loads(first.read_text()), json.loads(TABLE.read_text())
    assert set(mine["modules"]) <= set(committed["modules"])
    assert mine["data_classes"] == committed["data_classes"]


def test_the_script_combines_interpreters():
    script = _load_script()
    probe = {"version": "3.11.0", "stdlib_module_names": ["os", "asyncore"], "installed": ["os", "test"],
             "python2": ["cPickle"], "data_class_problems": {}}
    newer = {**probe, "version": "3.13.0", "stdlib_module_names": ["os", "_pyrepl"],
             "data_class_problems": {"uuid.UUID": "missing: made up"}}
    table = script.combine([newer, probe])
    assert table["interpreters"] == ["3.11.0", "3.13.0"]
    assert {"os", "asyncore", "_pyrepl", "test", "cPickle", "compression"} <= set(table["modules"])
    assert table["provenance"]["stdlib_module_names_not_in_every_interpreter"] == {
        "_pyrepl": ["3.13.0"], "asyncore": ["3.11.0"]}
    assert "uuid.UUID" not in table["data_classes"]
    assert table["provenance"]["data_classes_dropped"] == {"uuid.UUID": "3.13.0: missing: made up"}
    assert script.render(table) == script.render(script.combine([probe, newer]))
