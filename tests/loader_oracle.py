"""The real loaders as an oracle: which globals would they reach in this file?

The scanner must agree with what ``torch.load(f, weights_only=False)``,
``pickle.load`` and ``numpy.load(f, allow_pickle=True)`` would actually do.
This module runs those loaders on a file in a worker subprocess (never in the
caller's process) and reports every global they ask the unpickler for, without
letting them import or call anything outside an allowlist:

- The worker installs ``sys.addaudithook`` on the ``pickle.find_class`` audit
  event, which CPython raises with ``(module, name)`` in ``Unpickler.find_class``
  before it imports anything. The hook records ``(loader, module, name)`` and
  raises `OracleRefused` for every name not in the allowlist (by default the
  keys of ``safeckpt.sources.pickle_vm.ALLOWLIST``, with Python-2 names mapped
  through ``_compat_pickle`` first), so nothing else is ever imported or called.
  torch's own ``find_class`` answers names containing "Storage" itself (no
  event: harmless) and maps module ``torch.tensor`` to ``torch._tensor`` before
  the event.
- ``torch.load`` on a TorchScript zip would hand it to ``torch.jit.load``; the
  worker replaces that with a stub that records ``torch.jit.load`` (never
  allowed) and refuses, so no TorchScript runs either.
- The worker is started once and reused; it runs each file in a fresh temporary
  working directory (torch's legacy loader may write ``.patch`` files there),
  under ``RLIMIT_AS`` and a per-file timeout, and is restarted when it crashes or
  times out.

Loaders: ``"torch"`` = ``torch.load(path, weights_only=False, map_location="cpu")``;
``"pickle"`` = ``pickle.load`` on one open file, repeated until EOF or an error
(apps that read a stream of pickles); ``"numpy"`` = ``np.load(path,
allow_pickle=True)`` and, for an npz, reading every member.

    >>> with LoaderOracle() as oracle:
    ...     [r.qualname for r in oracle.globals_reached("evil.pkl") if not r.allowed]
    ['os.system']

`run_for_real` is the other mode: the real loader WITHOUT the hook, for canary
files whose payload is a harmless ``touch`` of a file in a temporary directory;
it says per file whether loading raised.

Run as a script, this file is the worker (``--worker``) or the real runner
(``--real LOADER``); it imports only the standard library at the top so the
worker starts clean.
"""

from __future__ import annotations

import _compat_pickle
import ast
import functools
import importlib.machinery
import importlib.util
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

LOADERS = ("torch", "pickle", "numpy")
MEMORY_LIMIT = 4 << 30      # RLIMIT_AS of the worker: a hostile length must not take the machine
FILE_TIMEOUT = 30.0         # seconds per file and loader before the worker is killed and restarted
MAX_PICKLES = 10_000        # pickle.load calls on one stream before giving up (each eats >= 1 byte)


class Reached(NamedTuple):
    """A global that `loader` asked the unpickler for; `allowed`: in the allowlist (it was imported).

    `resolvable`: whether CPython's find_class would have returned an object for a refused
    name (see `resolvable`); mutated bytes often name ``"os.systemo fuzz'"`` or
    ``torch.FloatStosage``, which fail before anything of them runs.
    """

    loader: str
    module: str
    name: str
    allowed: bool
    resolvable: bool = True

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def resolvable(module: str, name: str) -> bool:
    """Would find_class find (module, name)? Dotted identifiers after the Python-2 mapping;
    for a module already imported, the attributes must exist; for any other, the module must
    exist and its source may define the first part of the name (found without importing
    anything, so where it cannot tell the answer is yes)."""
    module, name = effective(module, name)
    if _DOTTED.fullmatch(module) is None or _DOTTED.fullmatch(name) is None:
        return False
    loaded = sys.modules.get(module)
    if loaded is None:
        spec = _spec_without_import(module)
        return spec is not None and _may_define(spec, name.split(".")[0])
    try:
        obj = loaded
        for part in name.split("."):
            obj = getattr(obj, part)
    except Exception:  # noqa: BLE001 - a module's __getattr__ may raise anything
        return False
    return True


def _spec_without_import(module: str):
    """The module's spec, its parent packages searched on disk rather than imported."""
    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])  # a top-level name is found without importing it
        for part in parts[1:]:
            if spec is None or not spec.submodule_search_locations:
                return None
            spec = importlib.machinery.PathFinder.find_spec(f"{spec.name}.{part}",
                                                            list(spec.submodule_search_locations))
    except (ImportError, ValueError):
        return None
    return spec


@functools.lru_cache(maxsize=256)
def _source_names(origin: str) -> "frozenset | None":
    """Every name a Python source binds anywhere (None: it may bind any name)."""
    try:
        tree = ast.parse(Path(origin).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return None
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    return None
                names.add(alias.asname or alias.name.split(".")[0])
    return None if "__getattr__" in names else frozenset(names)


def _may_define(spec, attr: str) -> bool:
    locations = spec.submodule_search_locations
    if locations and importlib.machinery.PathFinder.find_spec(f"{spec.name}.{attr}", list(locations)):
        return True  # a submodule
    if not (spec.origin or "").endswith(".py"):
        return True  # compiled or built in: cannot tell
    names = _source_names(spec.origin)
    return names is None or attr in names


class OracleResult(NamedTuple):
    """What the loaders did with one file: the globals reached, in order, and how each loader ended."""

    reached: list
    outcomes: dict  # loader -> "ok", "refused: <global>", "error: <Type>: <msg>", "timeout", "crashed"

    @property
    def refused(self) -> list:
        return [r for r in self.reached if not r.allowed]


class RealRun(NamedTuple):
    """One file through the real loader, no hook: whether it raised (and what)."""

    raised: bool
    error: Optional[str]


class OracleRefused(Exception):
    """Raised by the worker's audit hook for a global outside the allowlist."""


def default_allowlist() -> frozenset:
    from safeckpt.sources.pickle_vm import ALLOWLIST
    return frozenset(ALLOWLIST)


def effective(module: str, name: str) -> tuple:
    """(module, name) as CPython imports it: Python-2 names mapped as `_compat_pickle` does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def effective_name(module: str, name: str) -> str:
    module, name = effective(module, name)
    return f"{module}.{name}"


# --- the parent side --------------------------------------------------------------------

class _Child:
    """A subprocess speaking JSON lines: requests on stdin, replies on a pipe read with a deadline."""

    def __init__(self, args: list, first_line: dict) -> None:
        env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        self.proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                     cwd=tempfile.gettempdir())
        self.buf = b""
        self.send(first_line)

    def send(self, message: dict) -> None:
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def read(self, timeout: float) -> Optional[dict]:
        """The next reply, or None when the child died or `timeout` passed."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class LoaderOracle:
    """The real loaders in a reusable, hooked worker subprocess; use as a context manager."""

    def __init__(self, allowlist: Optional[Iterable[str]] = None, *, timeout: float = FILE_TIMEOUT,
                 memory: int = MEMORY_LIMIT) -> None:
        self.allowlist = frozenset(allowlist) if allowlist is not None else default_allowlist()
        self.timeout = timeout
        self.memory = memory
        self.worker: Optional[_Child] = None

    def __enter__(self) -> "LoaderOracle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.kill()
            self.worker = None

    def _start(self) -> _Child:
        if self.worker is None or self.worker.proc.poll() is not None:
            self.close()
            self.worker = _Child(["--worker"], {"allow": sorted(self.allowlist), "memory": self.memory})
            ready = self.worker.read(120)
            if ready != {"ready": True}:
                self.close()
                raise RuntimeError(f"the oracle worker did not start: {ready}")
        return self.worker

    def run(self, path: "str | os.PathLike", loaders: Iterable[str] = LOADERS) -> OracleResult:
        """Every global each loader reaches in `path`, and how each loader ended."""
        reached: list = []
        outcomes: dict = {}
        for loader in loaders:
            worker = self._start()
            worker.send({"path": os.path.abspath(path), "loader": loader})
            while True:
                reply = worker.read(self.timeout)
                if reply is None:
                    outcomes[loader] = "timeout" if worker.proc.poll() is None else "crashed"
                    self.close()
                    break
                if "reached" in reply:
                    reached.append(Reached(loader, *reply["reached"]))
                else:
                    outcomes[loader] = reply["outcome"]
                    break
        return OracleResult(reached, outcomes)

    def globals_reached(self, path: "str | os.PathLike", loaders: Iterable[str] = LOADERS) -> list:
        """`run(...).reached`: [Reached(loader, module, name, allowed, resolvable), ...] in order."""
        return self.run(path, loaders).reached

    def run_for_real(self, paths: Iterable["str | os.PathLike"], loader: str, *,
                     timeout: Optional[float] = None) -> dict:
        """Load each file with the real `loader` and NO hook, in one subprocess: {path: RealRun}.

        Only for files whose payloads are harmless canaries. A file that hangs past
        `timeout` is killed and reported as raised ("timeout"); the rest go on in a
        fresh subprocess.
        """
        paths = [Path(p) for p in paths]
        results: dict = {}
        while len(results) < len(paths):
            todo = [p for p in paths if p not in results]
            child = _Child(["--real", loader], {"paths": [os.path.abspath(p) for p in todo],
                                                 "memory": self.memory})
            try:
                for path in todo:
                    reply = child.read((timeout or self.timeout) + 60 * (path is todo[0]))  # + start-up
                    if reply is None:
                        results[path] = RealRun(True, "timeout" if child.proc.poll() is None else "crashed")
                        break
                    results[path] = RealRun(reply["error"] is not None, reply["error"])
            finally:
                child.kill()
        return results


# --- the worker side (runs in the subprocess) -------------------------------------------------

def _describe(exc: BaseException) -> str:
    seen = exc
    while seen is not None:  # loaders wrap errors (numpy: UnpicklingError from e)
        if isinstance(seen, OracleRefused):
            return f"refused: {seen}"
        seen = seen.__cause__ or seen.__context__
    return f"error: {type(exc).__name__}: {str(exc)[:300]}"


def _load(loader: str, path: str) -> str:
    """Run one real loader on `path`; the outcome as a string."""
    if loader == "torch":
        import torch
        torch.load(path, weights_only=False, map_location="cpu")
        return "ok"
    if loader == "pickle":
        import pickle
        with open(path, "rb") as f:
            for count in range(MAX_PICKLES):
                try:
                    pickle.load(f)
                except EOFError:
                    return f"ok ({count} pickles)" if count else "error: EOFError: empty"
        return f"ok ({MAX_PICKLES} pickles, stopped)"
    if loader == "numpy":
        import numpy as np
        result = np.load(path, allow_pickle=True)
        if isinstance(result, np.lib.npyio.NpzFile):
            with result:
                for key in dict.fromkeys([*result.files, *result._files]):  # what apps read, then the rest
                    result[key]
        return "ok"
    raise ValueError(f"unknown loader {loader!r}")


def _serve(mode: str) -> None:
    import resource
    import threading

    out = os.fdopen(os.dup(1), "w")  # our replies; the loaders' own prints go to stderr
    os.dup2(2, 1)

    def reply(message: dict) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    first = json.loads(sys.stdin.readline())
    import numpy  # noqa: F401 - imported before the limit and the hook, as an app would have
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        torch = None
    resource.setrlimit(resource.RLIMIT_AS, (first["memory"], first["memory"]))
    home = os.getcwd()

    def in_fresh_directory(loader: str, path: str) -> str:
        with tempfile.TemporaryDirectory() as cwd:
            os.chdir(cwd)
            try:
                return _load(loader, path)
            finally:
                os.chdir(home)

    if mode == "--real":
        loader = sys.argv[2]
        for path in first["paths"]:
            try:
                in_fresh_directory(loader, path)
                reply({"path": path, "error": None})
            except BaseException as exc:  # noqa: BLE001 - any failure is a result here
                reply({"path": path, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        return

    allow = frozenset(first["allow"])
    state = {"loader": None}
    lock = threading.Lock()

    def hook(event: str, args: tuple) -> None:
        if event != "pickle.find_class" or state["loader"] is None:
            return
        module, name = args
        allowed = effective_name(str(module), str(name)) in allow
        found = allowed or resolvable(str(module), str(name))
        with lock:
            reply({"reached": [str(module), str(name), allowed, found]})
        if not allowed:
            raise OracleRefused(f"{module}.{name}")

    if torch is not None:
        def jit_load(*args: object, **kwargs: object) -> None:  # TorchScript runs code: refuse it too
            reply({"reached": ["torch.jit", "load", "torch.jit.load" in allow, True]})
            raise OracleRefused("torch.jit.load")
        torch.jit.load = jit_load

    sys.addaudithook(hook)
    reply({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        state["loader"] = request["loader"]
        try:
            outcome = in_fresh_directory(request["loader"], request["path"])
        except BaseException as exc:  # noqa: BLE001 - any failure is a result here
            outcome = _describe(exc)
        state["loader"] = None
        reply({"outcome": outcome})


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] in ("--worker", "--real"):
    _serve(sys.argv[1])
