"""How bad a global named by a pickle is: the tables that grade severity for `scan`.

The allowlist (`sources.pickle_vm.ALLOWLIST`) decides what is safe; these tables
only decide whether something not on it is merely unknown ("suspicious": a
user's own class) or known to be dangerous ("malicious"). In order:

1. `DENYLIST` (by dotted prefix), `DANGEROUS_ATTRIBUTES` and `EXPLOIT_DUNDERS`, also
   through every step of a dotted name, and EXT codes: known-dangerous names.
2. `MODULE_ALIASES`: a dangerous module reached under another name, through an
   attribute (``random._os``, ``("somepkg.util", "os")``) or a re-exporting submodule.
3. The standard library (`STDLIB_MODULES`, from ``stdlib_table.json``, which
   ``scripts/make_stdlib_table.py`` writes): real checkpoints call no standard-library
   function but the rebuild helpers that plain data needs, and the allowlist has
   those, so any other is malicious; only its plain data classes (`STDLIB_DATA_CLASSES`)
   are merely suspicious.
4. A third-party function named for what it does (`DANGEROUS_ATTRIBUTES`: ``open_file``,
   ``save_file``, ``system``, ``loads``, ...): malicious.
5. Anything else is a third-party name, most likely a user's own class: suspicious.
"""

from __future__ import annotations

import json
import sys
from importlib import resources

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
_INSTALL = "installs packages, which runs their build and setup code"
_FETCH = "downloads files from addresses of the file's choosing and loads them"
_READ = "reads local files or fetches URLs of the file's choosing"
_TEMPLATE = "compiles template text into Python code and runs it"
_REMOTE_CODE = "downloads code from a model hub and imports it"
_SHIM = "re-exports standard-library modules (os, pickle, builtins, ...) under other names"

# "module" or "module.qualname" prefix -> what it would do if a loader reached it.
DENYLIST: dict[str, str] = {
    **dict.fromkeys(["os", "posix", "nt", "subprocess", "_posixsubprocess", "pty", "commands",
                     "popen2", "platform.popen", "_winapi", "asyncio"], _SHELL),
    **dict.fromkeys(["builtins.eval", "builtins.exec", "builtins.compile", "builtins.breakpoint",
                     "builtins.__build_class__", "runpy", "code", "codeop", "timeit", "pdb", "bdb",
                     "cProfile", "profile", "trace", "doctest", "IPython", "idlelib",
                     "logging.config", "numpy.testing", "numpy.f2py", "numpy.distutils",
                     "torch.jit", "torch.fx", "torch.package", "torch.compile", "torch._dynamo",
                     "torch._inductor", "distutils", "setuptools",
                     "torch.utils.benchmark",         # Timer runs statements given as strings
                     "torch.testing._internal",       # test helpers: shell(), run_tests(), ...
                     "sympy.sympify", "sympy.core.sympify", "sympy.S", "sympy.core.singleton.S",
                     "sympy.parsing", "sympy.parse_expr", "sympy.lambdify",
                     "sympy.utilities.lambdify",      # strings go through eval()
                     "pandas.eval", "pandas.core.computation",  # pandas documents eval as unsafe
                     "numexpr.evaluate", "numexpr.re_evaluate",
                     "numexpr.necompiler",            # eval() before 2.8.5 (CVE-2023-39631)
                     "Cython", "pyximport", "past.builtins"], _CODE),
    **dict.fromkeys(["jinja2", "mako"], _TEMPLATE),
    **dict.fromkeys(["pip"], _INSTALL),
    **dict.fromkeys(["builtins.__import__", "importlib", "imp", "pkgutil", "zipimport", "pydoc",
                     "site", "sys", "torch.hub", "pkg_resources", "importlib_metadata"], _IMPORT),
    **dict.fromkeys(["six.moves", "future.moves", "future.standard_library"], _SHIM),
    **dict.fromkeys(["transformers.dynamic_module_utils"], _REMOTE_CODE),
    **dict.fromkeys(["builtins.getattr", "builtins.setattr", "builtins.delattr", "builtins.globals",
                     "builtins.locals", "builtins.vars", "builtins.dir", "gc", "inspect"], _ATTR),
    **dict.fromkeys(["builtins.open", "builtins.input", "io.open", "io.open_code", "io.FileIO",
                     "_io.open", "_io.FileIO", "shutil", "tempfile", "glob", "fileinput",
                     "linecache", "mmap", "zipfile", "tarfile", "gzip.open", "bz2.open",
                     "lzma.open", "sqlite3", "dbm", "torch.save", "torch.from_file",
                     "numpy.fromfile", "numpy.memmap", "numpy.save", "numpy.savez",
                     "numpy.savetxt", "numpy.loadtxt", "numpy.genfromtxt", "resource",
                     "atexit", "signal", "multiprocessing", "torch.multiprocessing",
                     "torch.utils.tensorboard", "tensorboardX", "torch.utils.hipify",
                     "torch.export.save", "tensorflow.io", "tensorflow.python.lib.io",
                     "tensorflow.python.platform.gfile", "tensorflow.python.ops.io_ops",
                     "tensorflow.python.ops.gen_io_ops"], _FILES),
    **dict.fromkeys(["pandas.io", "numpy.DataSource", "numpy.lib.DataSource",
                     "numpy.lib._datasource"]
                    + [f"pandas.read_{kind}" for kind in (
                        "csv", "table", "fwf", "json", "html", "xml", "excel", "parquet", "feather",
                        "orc", "hdf", "sql", "sql_query", "sql_table", "stata", "sas", "spss",
                        "clipboard")], _READ),
    **dict.fromkeys(["torch.utils.model_zoo", "keras.utils.get_file", "keras.src.utils.file_utils",
                     "tensorflow.keras.utils.get_file",
                     "tensorflow.python.keras.utils.data_utils.get_file",
                     "huggingface_hub"], _FETCH),
    **dict.fromkeys(["socket", "_socket", "ssl", "http", "urllib", "urllib3", "requests", "httpx",
                     "aiohttp", "ftplib", "smtplib", "poplib", "imaplib", "nntplib", "telnetlib",
                     "xmlrpc", "socketserver", "webbrowser", "torch.distributed.rpc",
                     "paramiko"], _NET),
    **dict.fromkeys(["pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal",
                     "shelve", "copyreg.add_extension", "copyreg.pickle", "copyreg.dispatch_table",
                     "copyreg._extension_registry", "copyreg._inverted_registry",
                     "yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.unsafe_load_all",
                     "yaml.full_load", "yaml.full_load_all", "yaml.Loader", "yaml.UnsafeLoader",
                     "yaml.FullLoader", "torch.load", "torch.serialization",
                     "torch.storage._load_from_bytes", "numpy.load", "numpy.loads",
                     "numpy.lib.npyio", "numpy.lib._npyio_impl", "numpy.lib.format",
                     "numpy.lib._format_impl", "pandas.read_pickle", "pandas.io.pickle",
                     "pickle5", "jsonpickle", "srsly.pickle_loads", "srsly.cloudpickle",
                     "torch.utils.show_pickle", "torch.export.load",
                     # Keras: whole models from embedded archives or saved files; the
                     # pickle path (KerasSaveable._unpickle_model) turns safe_mode off
                     "keras.src.saving", "keras.saving", "keras.models.load_model",
                     "tensorflow.keras.models.load_model", "tensorflow.python.keras.saving",
                     "tensorflow.saved_model.load", "tensorflow.python.saved_model.load",
                     "tensorflow.python.saved_model.loader_impl"], _NESTED),
    **dict.fromkeys(["keras.config.enable_unsafe_deserialization",
                     "keras.utils.generic_utils.func_load", "keras.src.utils.generic_utils.func_load",
                     "keras.src.utils.python_utils.func_load",
                     "tensorflow.python.keras.utils.generic_utils.func_load",
                     "tf_keras.src.utils.generic_utils.func_load"], _FUNC),
    **dict.fromkeys(["torch.utils.collect_env", "torch.distributed.run", "torch.distributed.launch",
                     "torch.distributed.launcher", "torch.distributed.elastic", "pexpect",
                     "ptyprocess", "sh", "plumbum", "invoke", "fabric", "psutil.Popen"], _SHELL),
    **dict.fromkeys(["ctypes", "_ctypes", "cffi", "numpy.ctypeslib", "torch._C", "torch.ops",
                     "torch._ops", "torch.classes", "torch.library", "torch.utils.cpp_extension"],
                    _NATIVE),
    **dict.fromkeys(["builtins.exit", "builtins.quit", "_thread", "threading", "psutil"],
                    _PROCESS),
    **dict.fromkeys(["functools.partial", "functools.partialmethod", "functools.reduce",
                     "_functools", "operator.attrgetter", "operator.itemgetter",
                     "operator.methodcaller", "operator.call", "_operator.attrgetter",
                     "_operator.itemgetter", "_operator.methodcaller", "_operator.call",
                     "tensorflow.py_function", "tensorflow.numpy_function",
                     "tensorflow.python.ops.script_ops"], _WRAP),
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
                     "rmdir", "symlink_to", "hardlink_to", "rmtree", "tofile", "dump", "save",
                     "savefig", "to_pickle", "to_csv", "to_parquet", "to_hdf", "to_sql", "open_file",
                     "save_file", "save_model", "from_file"], _FILES),
    **dict.fromkeys(["loads", "_load_from_bytes"], _NESTED),
    **dict.fromkeys(["from_pretrained", "urlopen", "urlretrieve", "download_url"], _FETCH),
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


# Dangerous modules that other modules hold as attributes (``random._os``, ``posixpath.os``)
# or re-export as submodules (``six.moves.cPickle``): reached that way, each is as bad as
# itself. In the name they match with or without leading underscores (``_os`` is how a
# module keeps an import private); in the module path only public names match, because
# a package's private submodule is its own code (``numpy.random._pickle`` rebuilds RNGs).
MODULE_ALIASES: dict[str, str] = {
    **{module: DENYLIST[module] for module in (
        "os", "posix", "nt", "subprocess", "_posixsubprocess", "pty", "commands", "_winapi", "runpy", "importlib", "imp", "pkgutil", "zipimport", "sys", "shutil", "socket",
        "_socket", "webbrowser", "pickle", "_pickle", "cPickle", "marshal", "ctypes", "_ctypes",
        "_thread")},
    "builtins": "holds eval, exec, open and __import__",
}
_ALIAS_STEMS = {module.lstrip("_"): module for module in MODULE_ALIASES}


def _stdlib_table() -> dict:
    return json.loads(resources.files(__package__).joinpath("stdlib_table.json").read_text("utf-8"))


_STDLIB = _stdlib_table()
# Top-level names of the standard library: the committed table (every Python from 3.10
# on, test modules and the Python 2 names pickle maps into it) and this interpreter's.
STDLIB_MODULES: frozenset[str] = frozenset(_STDLIB["modules"]) | frozenset(sys.stdlib_module_names)
# "module.qualname" -> what it holds: standard-library classes that every route a pickle
# can take builds without side effects (see scripts/make_stdlib_table.py).
STDLIB_DATA_CLASSES: dict[str, str] = _STDLIB["data_classes"]


def grade_global(module: str, name: str) -> tuple[str, str, str]:
    """(severity, kind, why) of one global a pickle names; allowlisted names are not graded here.

    The whole dotted path counts: every component of a dotted name is resolved, so
    ``("pathlib", "os.system")`` and ``("torch", "serialization.os.system")`` are
    ``os.system``. The checks run in the order the module docstring lists.

    >>> [grade_global(*g)[1] for g in [("os", "system"), ("random", "_os"), ("codecs", "open"),
    ...                                ("collections", "Counter"), ("mymodel", "Net")]]
    ['dangerous-global', 'module-alias', 'stdlib-global', 'stdlib-data-class', 'unknown-global']
    """
    qual = f"{module}.{name}"
    if module == "copyreg.extension":
        return (MALICIOUS, "ext-opcode", (f"{qual}: an EXT opcode names a global by the code {name}, "
                "which the loading process's copyreg registry resolves: what it calls is decided "
                "outside the file"))
    parts = qual.split(".")
    name_parts = name.split(".")
    for part in name_parts:
        if part in EXPLOIT_DUNDERS:
            return (MALICIOUS, "dotted-global", (f"{qual} reaches {part}, which leads from any object "
                    "to its globals, builtins or classes (a sandbox-escape step)"))
    if len(name_parts) > 1:
        base = len(parts) - len(name_parts)
        for i in range(base, len(parts)):  # each attribute lookup may land in another module
            why = _lookup(parts[i:])
            if why is not None:
                return (MALICIOUS, "dotted-global", (f"{qual} is a dotted name that resolves through "
                        f"{'.'.join(parts[i:])}, which {why}"))
        for part in name_parts[1:]:
            if part in DANGEROUS_ATTRIBUTES:
                return (MALICIOUS, "dotted-global", (f"{qual} is a dotted name ending in the method "
                        f"{part}, which {DANGEROUS_ATTRIBUTES[part]}"))
        if module == "pathlib":
            return (MALICIOUS, "dotted-global", (f"{qual} is a method of a pathlib path reached "
                    f"through a dotted name, which {_FILES}"))
    why = _lookup(parts)
    if why is not None:
        return MALICIOUS, "dangerous-global", f"{qual} {why}"
    alias = _module_alias(parts, len(parts) - len(name_parts))
    if alias is not None:
        via, target = alias
        return (MALICIOUS, "module-alias", (f"{qual} reaches the module {target} under another name "
                f"({via}), which {MODULE_ALIASES[target]}"))
    if parts[0] in STDLIB_MODULES and all(part.isidentifier() for part in parts):
        if qual in STDLIB_DATA_CLASSES:
            return (SUSPICIOUS, "stdlib-data-class", (f"{qual} is a plain data class of the standard "
                    f"library ({STDLIB_DATA_CLASSES[qual]}): building it has no side effects, but it "
                    "is not on the allowlist, so loaders that only take listed names refuse it"))
        return (MALICIOUS, "stdlib-global", (f"{qual} is part of the standard library but not on "
                "the allowlist, which holds every standard-library rebuild helper real checkpoints "
                "use: loading would import it and call it with the file's arguments"))
    if name_parts[-1] in DANGEROUS_ATTRIBUTES:  # click.open_file, safetensors.numpy.save_file
        return (MALICIOUS, "dangerous-name", f"{qual} is named for what it does: "
                f"{name_parts[-1]} {DANGEROUS_ATTRIBUTES[name_parts[-1]]}")
    return (SUSPICIOUS, "unknown-global", (f"{qual} is not on the allowlist: loading would import it "
            "and call or build it with the file's arguments (not known to be dangerous: a class of "
            "your own code?)"))


def _lookup(parts: list[str]) -> str | None:
    for i in range(len(parts), 0, -1):
        why = DENYLIST.get(".".join(parts[:i]))
        if why is not None:
            return why
    return None


def _module_alias(parts: list[str], first_name_part: int) -> tuple[str, str] | None:
    """(the path that reaches it, the module) for a `MODULE_ALIASES` module named past the
    first component of ``parts``, whose name starts at ``parts[first_name_part]``."""
    for i in range(1, len(parts)):
        if i >= first_name_part:  # an attribute: `_os` is os kept private
            target = _ALIAS_STEMS.get(parts[i].lstrip("_"))
        else:  # a submodule: a re-export keeps the public name (six.moves.cPickle)
            target = parts[i] if parts[i] in MODULE_ALIASES and parts[i][0] != "_" else None
        if target is not None:
            return ".".join(parts[:i + 1]), target
    return None
