"""How bad a global named by a pickle is: the denylist that grades severity for `scan`.

The allowlist (`sources.pickle_vm.ALLOWLIST`) decides what is safe; these tables
only decide whether something not on it is merely unknown ("suspicious": a
user's own class) or known to be dangerous ("malicious").
"""

from __future__ import annotations

from typing import Optional

SAFE, INFO, SUSPICIOUS, MALICIOUS = "safe", "info", "suspicious", "malicious"

# --- how bad a global is ---------------------------------------------------------------

_SHELL = "runs shell commands or programs of the file's choosing"
_CODE = "runs Python code of the file's choosing"
_IMPORT = "imports any module the file names, reaching everything in it"
_ATTR = "reaches any attribute of any object (the building block of import chains)"
_FILES = "reads, writes or deletes files"
_NET = "opens network connections or servers"
_NESTED = "deserializes further embedded data, which can itself run code"
_NATIVE = "loads and calls native code"
_PROCESS = "controls the interpreter or its processes"
_WRAP = "wraps a callable so that another call runs it with the file's arguments"
_FUNC = "builds functions or code objects from raw data, which then run"

# "module" or "module.qualname" prefix -> what it would do if a loader reached it.
DENYLIST: dict[str, str] = {
    **dict.fromkeys(["os", "posix", "nt", "subprocess", "_posixsubprocess", "pty", "commands",
                     "popen2", "platform.popen", "_winapi", "asyncio"], _SHELL),
    **dict.fromkeys(["builtins.eval", "builtins.exec", "builtins.compile", "builtins.breakpoint",
                     "builtins.__build_class__", "runpy", "code", "codeop", "timeit", "pdb", "bdb",
                     "cProfile", "profile", "trace", "doctest", "IPython", "idlelib",
                     "logging.config", "numpy.testing", "numpy.f2py", "numpy.distutils",
                     "torch.jit", "torch.fx", "torch.package", "torch.compile", "torch._dynamo",
                     "torch._inductor", "distutils", "setuptools"], _CODE),
    **dict.fromkeys(["builtins.__import__", "importlib", "imp", "pkgutil", "zipimport", "pydoc",
                     "site", "sys", "torch.hub"], _IMPORT),
    **dict.fromkeys(["builtins.getattr", "builtins.setattr", "builtins.delattr", "builtins.globals",
                     "builtins.locals", "builtins.vars", "builtins.dir", "gc", "inspect"], _ATTR),
    **dict.fromkeys(["builtins.open", "builtins.input", "io.open", "io.open_code", "io.FileIO",
                     "_io.open", "_io.FileIO", "shutil", "tempfile", "glob", "fileinput",
                     "linecache", "mmap", "zipfile", "tarfile", "gzip.open", "bz2.open",
                     "lzma.open", "sqlite3", "dbm", "torch.save", "torch.from_file",
                     "numpy.fromfile", "numpy.memmap", "numpy.save", "numpy.savez",
                     "numpy.savetxt", "numpy.loadtxt", "numpy.genfromtxt", "resource",
                     "atexit", "signal", "multiprocessing", "torch.multiprocessing"], _FILES),
    **dict.fromkeys(["socket", "_socket", "ssl", "http", "urllib", "urllib3", "requests", "httpx",
                     "aiohttp", "ftplib", "smtplib", "poplib", "imaplib", "nntplib", "telnetlib",
                     "xmlrpc", "socketserver", "webbrowser", "torch.distributed.rpc"], _NET),
    **dict.fromkeys(["pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal",
                     "shelve", "copyreg.add_extension", "copyreg.pickle", "copyreg.dispatch_table",
                     "copyreg._extension_registry", "copyreg._inverted_registry",
                     "yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.unsafe_load_all",
                     "yaml.full_load", "yaml.full_load_all", "yaml.Loader", "yaml.UnsafeLoader",
                     "yaml.FullLoader", "torch.load", "torch.serialization",
                     "torch.storage._load_from_bytes", "numpy.load", "numpy.loads",
                     "numpy.lib.npyio", "numpy.lib._npyio_impl", "numpy.lib.format",
                     "numpy.lib._format_impl", "pandas.read_pickle", "pandas.io.pickle"], _NESTED),
    **dict.fromkeys(["ctypes", "_ctypes", "cffi", "numpy.ctypeslib", "torch._C", "torch.ops",
                     "torch._ops", "torch.classes", "torch.library", "torch.utils.cpp_extension"],
                    _NATIVE),
    **dict.fromkeys(["builtins.exit", "builtins.quit", "_thread", "threading"], _PROCESS),
    **dict.fromkeys(["functools.partial", "functools.partialmethod", "functools.reduce",
                     "_functools", "operator.attrgetter", "operator.itemgetter",
                     "operator.methodcaller", "operator.call", "_operator.attrgetter",
                     "_operator.itemgetter", "_operator.methodcaller", "_operator.call"], _WRAP),
    **dict.fromkeys([f"types.{n}" for n in (
        "FunctionType", "LambdaType", "CodeType", "MethodType", "ModuleType", "new_class",
        "BuiltinFunctionType", "BuiltinMethodType", "CellType", "coroutine", "GeneratorType")],
        _FUNC),
}

# Attributes that turn a dotted name (STACK_GLOBAL "pathlib" / "Path.write_text") into
# an action whatever object they hang on.
DANGEROUS_ATTRIBUTES: dict[str, str] = {
    **dict.fromkeys(["system", "popen", "spawnv", "spawnve", "spawnl", "spawnlp", "execv", "execve",
                     "execl", "execlp", "check_call", "check_output", "Popen", "getoutput",
                     "getstatusoutput"], _SHELL),
    **dict.fromkeys(["eval", "exec", "compile", "load_library", "LoadLibrary"], _CODE),
    **dict.fromkeys(["__import__", "import_module"], _IMPORT),
    **dict.fromkeys(["write_text", "write_bytes", "read_text", "read_bytes", "touch", "unlink",
                     "rmdir", "symlink_to", "hardlink_to", "rmtree"], _FILES),
    **dict.fromkeys(["loads", "_load_from_bytes"], _NESTED),
}
# Dunder attributes that lead from any object to its globals, builtins or classes:
# the steps of sandbox escapes; no data class is pickled through them.
EXPLOIT_DUNDERS = frozenset([
    "__globals__", "__builtins__", "__subclasses__", "__class__", "__base__", "__bases__",
    "__mro__", "__dict__", "__code__", "__closure__", "__func__", "__self__", "__getattribute__",
    "__getattr__", "__setattr__", "__delattr__", "__import__", "__loader__", "__spec__",
    "__reduce__", "__reduce_ex__", "__setstate__", "__init_subclass__", "__call__"])

# Calls whose argument is deserialized in turn -> what the embedded payload is.
NESTED_LOADERS: dict[str, str] = {
    **dict.fromkeys(["pickle.loads", "pickle.load", "_pickle.loads", "_pickle.load",
                     "cPickle.loads", "cPickle.load", "dill.loads", "dill.load", "cloudpickle.loads",
                     "cloudpickle.load", "joblib.load", "pandas.read_pickle", "numpy.loads"],
                    "a pickle"),
    **dict.fromkeys(["torch.load", "torch.serialization.load", "torch.storage._load_from_bytes",
                     "numpy.load"], "a torch.save or numpy.save payload"),
    **{f"marshal.{name}": "a marshalled code object" for name in ("load", "loads")},
    **dict.fromkeys(["yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all",
                     "yaml.unsafe_load_all"], "a YAML document with Python tags"),
}


def grade_global(module: str, name: str) -> tuple[str, str, str]:
    """(severity, kind, why) of one global a pickle names; allowlisted names are not graded here.

    The whole dotted path counts: every component of a dotted name is resolved, so
    ``("pathlib", "os.system")`` and ``("torch", "serialization.os.system")`` are
    ``os.system``.

    >>> grade_global("os", "system")[0], grade_global("mymodel", "Net")[0]
    ('malicious', 'suspicious')
    """
    qual = f"{module}.{name}"
    if module == "copyreg.extension":
        return (MALICIOUS, "ext-opcode", f"{qual}: an EXT opcode names a global by the code {name}, "
                "which the loading process's copyreg registry resolves: what it calls is decided "
                "outside the file")
    parts = qual.split(".")
    name_parts = name.split(".")
    for part in name_parts:
        if part in EXPLOIT_DUNDERS:
            return (MALICIOUS, "dotted-global", f"{qual} reaches {part}, which leads from any object "
                    "to its globals, builtins or classes (a sandbox-escape step)")
    if len(name_parts) > 1:
        base = len(parts) - len(name_parts)
        for i in range(base, len(parts)):  # each attribute lookup may land in another module
            why = _lookup(parts[i:])
            if why is not None:
                return (MALICIOUS, "dotted-global", f"{qual} is a dotted name that resolves through "
                        f"{'.'.join(parts[i:])}, which {why}")
        for part in name_parts[1:]:
            if part in DANGEROUS_ATTRIBUTES:
                return (MALICIOUS, "dotted-global", f"{qual} is a dotted name ending in the method "
                        f"{part}, which {DANGEROUS_ATTRIBUTES[part]}")
        if module == "pathlib":
            return (MALICIOUS, "dotted-global", f"{qual} is a method of a pathlib path reached "
                    f"through a dotted name, which {_FILES}")
    why = _lookup(parts)
    if why is not None:
        return MALICIOUS, "dangerous-global", f"{qual} {why}"
    return (SUSPICIOUS, "unknown-global", f"{qual} is not on the allowlist: loading would import it "
            "and call or build it with the file's arguments (not known to be dangerous: a class of "
            "your own code?)")


def _lookup(parts: list[str]) -> Optional[str]:
    for i in range(len(parts), 0, -1):
        why = DENYLIST.get(".".join(parts[:i]))
        if why is not None:
            return why
    return None
