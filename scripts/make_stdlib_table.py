"""Write ``src/safeckpt/ops/scan/stdlib_table.json``: what `safeckpt.ops.scan.rules` knows
of the Python standard library.

Run by hand, offline, when a new Python comes out, with every interpreter at hand
(the table is their union), and commit the result::

    python scripts/make_stdlib_table.py --python python3.10 --python python3.11 \\
        --python python3.12 --python python3.13

The table holds:

* ``modules``: every top-level name of the standard library, the union of
  - ``sys.stdlib_module_names`` of each interpreter;
  - the modules installed with it but left out of that list (its stdlib directory,
    ``lib-dynload`` and built-ins: ``test``, ``_testcapi``, ``xxsubtype``, ...);
  - the Python 2 names pickle maps into it for protocols 0-2 (``_compat_pickle``);
  - `PYTHON_3_14`, written out below since no 3.14 interpreter was at hand, and `ALWAYS`;
* ``data_classes``: `DATA_CLASSES`, the plain data classes, each checked in every
  interpreter: present under the name pickle records, with no ``__del__``,
  ``__getattr__`` or Python ``__getattribute__``; one that fails anywhere is dropped
  (and reported on stderr);
* provenance: the interpreters' versions, and the names not every one of them has.

The same inputs give the same bytes (sorted keys and lists, no dates or paths).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[1] / "src" / "safeckpt" / "ops" / "scan" / "stdlib_table.json"

# Top-level names new in Python 3.14's sys.stdlib_module_names: CPython's
# Python/stdlib_module_names.h on the 3.14 branch less 3.13's (cross-checked with
# isort's stdlibs/py314.py). Written out because no 3.14 interpreter was at hand;
# a 3.14 run (--python python3.14) supersedes it.
PYTHON_3_14 = ("_apple_support", "_ast_unparse", "_hmac", "_py_warnings", "_remote_debugging",
               "_types", "_zstd", "annotationlib", "compression")
# CPython's own test package: shipped with it, excluded from sys.stdlib_module_names by
# design, and absent where a distribution splits it off (Debian's libpython3-testsuite).
ALWAYS = ("test",)

# Plain data classes: built by every route a pickle can take (REDUCE calling cls(*args),
# NEWOBJ calling cls.__new__, copyreg._reconstructor then BUILD through __setstate__ or
# __dict__, and later __hash__/__eq__/__del__) with no side effect: no files, processes,
# network, imports or code run. What they hold is graded on its own.
DATA_CLASSES = {
    "builtins.range": "three integers; the sequence is computed on demand",
    "collections.ChainMap": "a list of mappings that it only reads from",
    "collections.Counter": "a dict of counts, built by counting the items given",
    "collections.UserDict": "a dict wrapper whose state is the dict",
    "collections.UserList": "a list wrapper whose state is the list",
    "collections.UserString": "a str wrapper whose state is the string",
    "collections.deque": "a sequence of items and a maximum length",
    "datetime.date": "a date built from integers or packed bytes",
    "datetime.datetime": "a timestamp built from integers or packed bytes and a tzinfo",
    "datetime.time": "a time of day built from integers or packed bytes and a tzinfo",
    "datetime.timedelta": "a duration of days, seconds and microseconds",
    "datetime.timezone": "a fixed offset from UTC and a name",
    "datetime.tzinfo": "the abstract time-zone base class: an empty object",
    "decimal.Decimal": "a decimal number parsed from a string, an integer or a tuple",
    "fractions.Fraction": "a ratio of two integers or a number parsed from a string",
    "ipaddress.IPv4Address": "an address parsed from an integer, bytes or a string",
    "ipaddress.IPv4Interface": "an address and netmask parsed from a string or a tuple",
    "ipaddress.IPv4Network": "a network parsed from a string or a tuple; never enumerated",
    "ipaddress.IPv6Address": "an address parsed from an integer, bytes or a string",
    "ipaddress.IPv6Interface": "an address and netmask parsed from a string or a tuple",
    "ipaddress.IPv6Network": "a network parsed from a string or a tuple; never enumerated",
    "types.SimpleNamespace": "an object whose attributes are the keywords or mapping given",
    "uuid.UUID": "a 128-bit integer parsed from hex, bytes or fields",
}


def probe() -> dict:
    """What this interpreter says (run in each interpreter with --probe)."""
    import _compat_pickle

    stdlib = sysconfig.get_paths()["stdlib"]
    installed = {m.name for m in pkgutil.iter_modules([stdlib, os.path.join(stdlib, "lib-dynload")])}
    installed |= set(sys.builtin_module_names)
    python2 = {name.split(".")[0] for name in _compat_pickle.IMPORT_MAPPING}
    return {"version": ".".join(map(str, sys.version_info[:3])),
            "stdlib_module_names": sorted(sys.stdlib_module_names),
            "installed": sorted(n for n in installed if n.isidentifier()),
            "python2": sorted(python2),
            "data_class_problems": {q: p for q in DATA_CLASSES if (p := data_class_problem(q))}}


def data_class_problem(qual: str) -> str | None:
    """Why `qual` cannot be listed as a plain data class here, or None."""
    module, _, name = qual.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        return f"missing: {exc}"
    if not isinstance(cls, type) or (cls.__module__, cls.__qualname__) != (module, name):
        return f"pickle names it {getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', '?')}"
    hooks = [h for h in ("__del__", "__getattr__") if hasattr(cls, h)]
    if isinstance(getattr(cls, "__getattribute__", None), types.FunctionType):
        hooks.append("__getattribute__")
    return f"defines {', '.join(hooks)}" if hooks else None


def combine(probes: list[dict]) -> dict:
    """The table from the probes of one or more interpreters, in any order."""
    probes = sorted(probes, key=lambda p: tuple(map(int, p["version"].split("."))))
    versions = [p["version"] for p in probes]
    names = {p["version"]: set(p["stdlib_module_names"]) for p in probes}
    stdlib_names = set().union(*names.values())
    installed = set().union(*(p["installed"] for p in probes)) - stdlib_names
    python2 = set().union(*(p["python2"] for p in probes))
    modules = stdlib_names | installed | python2 | set(PYTHON_3_14) | set(ALWAYS)
    dropped = {q: f"{p['version']}: {p['data_class_problems'][q]}"
               for p in probes for q in DATA_CLASSES if q in p["data_class_problems"]}
    partial = {n: [v for v in versions if n in names[v]] for n in sorted(stdlib_names)
               if any(n not in names[v] for v in versions)}
    return {
        "about": "The Python standard library for safeckpt's scan rules; written by "
                 "scripts/make_stdlib_table.py (see there), not by hand.",
        "interpreters": versions,
        "modules": sorted(modules),
        "data_classes": {q: why for q, why in sorted(DATA_CLASSES.items()) if q not in dropped},
        "provenance": {
            "stdlib_module_names_not_in_every_interpreter": partial,
            "installed_not_in_stdlib_module_names": sorted(installed),
            "python2_names_pickle_maps_into_the_stdlib": sorted(python2),
            "python_3_14_additions_written_in_the_script": sorted(set(PYTHON_3_14) - stdlib_names),
            "always": sorted(ALWAYS),
            "data_classes_dropped": dict(sorted(dropped.items())),
        },
    }


def render(table: dict) -> str:
    return json.dumps(table, indent=1, sort_keys=True, ensure_ascii=True) + "\n"


def run_probe(python: str) -> dict:
    # -I: isolated, so neither the environment nor this script's directory shadows a module
    out = subprocess.run([python, "-I", str(Path(__file__).resolve()), "--probe"], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", help="an interpreter to ask (repeat); "
                        "default: this one")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return 0
    table = combine([run_probe(p) for p in args.python or [sys.executable]])
    for qual, why in table["provenance"]["data_classes_dropped"].items():
        print(f"dropped {qual}: {why}", file=sys.stderr)
    args.output.write_text(render(table), encoding="utf-8")
    print(f"{args.output}: {len(table['modules'])} modules, {len(table['data_classes'])} data "
          f"classes, from Python {', '.join(table['interpreters'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
