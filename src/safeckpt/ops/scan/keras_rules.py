"""What loading a Keras model would run: the config of a ``.keras`` archive or legacy ``.h5`` model.

``keras.models.load_model`` rebuilds a model from its config (``config.json`` in a
``.keras`` archive, the ``model_config`` attribute of a legacy HDF5 model): every
``{"module", "class_name", "config", "registered_name"}`` entry names a class or
function that Keras imports and calls with the entry's arguments. Two ways this
runs code of the file's choosing:

- a ``Lambda`` layer (or any ``__lambda__`` object) carries its function as
  base64 of ``marshal``-ed bytecode (Keras 3: ``{"class_name": "__lambda__",
  "config": {"code": ...}}``; Keras 2: ``"function": ["<base64>", ...]`` with
  ``"function_type": "lambda"``), which Keras turns back into a function when
  ``safe_mode`` is off (and a safe_mode bypass makes it run anyway);
- a ``module`` outside Keras: ``{"module": "os", "class_name": "system"}``,
  ``builtins.eval``, ``subprocess.Popen``, ``functools.partial`` wrapping one of
  them (CVE-2024-3660 and its successors were such configs).

Each entry is graded with the pickle scanner's table (`rules.grade_global`), so a
name is dangerous here exactly when it is in a pickle: malicious when known to run
code, and otherwise, outside the Keras packages (`KERAS_MODULES`), suspicious (a
class of your own code that loading would import). Weights files (``.weights.h5``)
have no config and name nothing.

    >>> [f.kind for f in keras_findings("lambda.keras")]
    ['keras-lambda']
"""

from __future__ import annotations

import os
from typing import Any, Optional

from ...errors import SafeckptError, SourceError
from ...sources.base import mapped
from ...sources.hdf5_reader import H5File, is_hdf5
from ...sources.keras_file import (
    CONFIG_MEMBER,
    MAX_JSON_BYTES,
    is_keras_zip,
    parse_json,
)
from ...sources.zip_archive import ZipArchive, is_zip
from .report import Finding
from .rules import MALICIOUS, SUSPICIOUS, grade_global

__all__ = ["keras_findings", "archive_findings", "hdf5_findings", "config_findings", "KERAS_MODULES",
           "MAX_CONFIG_NODES", "MAX_KERAS_FINDINGS"]

# Packages whose classes a Keras config names in normal use: Keras itself and the
# libraries built on it. Their names are still graded first (keras.src.saving,
# keras.utils.get_file and the like are malicious whatever the package).
KERAS_MODULES = ("keras", "tf_keras", "keras_hub", "keras_nlp", "keras_cv", "keras_rs")
# JSON values walked in one config (it is at most sources.keras_file.MAX_JSON_BYTES long,
# so this only bounds a config of millions of tiny values).
MAX_CONFIG_NODES = 10_000_000
# Findings listed for one config; the scanner merges repeats of the same name.
MAX_KERAS_FINDINGS = 1000
# Root attributes of a legacy HDF5 model that hold configs Keras deserializes.
_LEGACY_CONFIG_ATTRIBUTES = ("model_config", "training_config")

_LAMBDA_WHY = ("a Lambda function stored as marshalled Python bytecode: Keras rebuilds and runs it "
               "when the model is loaded with safe_mode=False (or through a safe_mode bypass) and "
               "called")


def keras_findings(path: "os.PathLike | str") -> list[Finding]:
    """What loading a Keras file would run, graded: findings in the scanner's shape.

    A ``.keras`` archive's config.json and a legacy ``.h5`` model's model_config are
    checked; a ``.weights.h5`` file names no code (no findings). Raises `SourceError`
    for a file that is neither a zip nor HDF5.

    >>> [(f.severity, f.what) for f in keras_findings("os_system.keras")]
    [('malicious', 'os.system')]
    """
    path = os.fspath(path)
    with mapped(path) as data:
        head = bytes(data[:4096])
        if is_zip(head):
            return archive_findings(ZipArchive(data, path), None)
        if is_hdf5(head):
            with memoryview(data) as view:
                return hdf5_findings(view, path, None)
    raise SourceError("not a Keras file: neither a zip archive nor HDF5", path=path)


def archive_findings(archive: ZipArchive, member: Optional[str]) -> list[Finding]:
    """Findings for a zip archive that is a ``.keras`` file (none for any other archive).

    `member` is where the archive itself lies (a nesting path), None for the file.
    """
    if not is_keras_zip(archive.names()):
        return []
    where = _join(member, CONFIG_MEMBER)
    try:
        config = parse_json(bytes(archive.read(CONFIG_MEMBER, max_size=MAX_JSON_BYTES)), archive.path,
                            CONFIG_MEMBER)
    except SafeckptError as exc:
        return [_unreadable(exc, where)]
    return config_findings(config, where)


def hdf5_findings(data: memoryview, path: str, member: Optional[str]) -> list[Finding]:
    """Findings for an HDF5 file: a legacy Keras model's configs (none for weights only).

    An HDF5 file that cannot be parsed is one suspicious finding: Keras might read it.
    """
    try:
        h5 = H5File(data, path if member is None else f"{path} > {member}")
    except SafeckptError as exc:
        return [_unreadable(exc, member)]
    try:
        root = h5.groups.get("/", {})
        found: list[Finding] = []
        for attribute in _LEGACY_CONFIG_ATTRIBUTES:
            if attribute not in root:
                continue
            where = _join(member, f"<{attribute} attribute>")
            try:
                config = parse_json(str(root[attribute]).encode(), path, f"the {attribute} attribute")
            except SafeckptError as exc:
                found.append(_unreadable(exc, where))
                continue
            found.extend(config_findings(config, where))
        return found
    finally:
        h5.close()


def config_findings(config: Any, member: Optional[str] = None) -> list[Finding]:
    """Grade every class, function and Lambda a Keras config (parsed JSON) names.

    >>> config_findings({"module": "os", "class_name": "system", "config": {}}, "config.json")[0].kind
    'dangerous-global'
    """
    found: list[Finding] = []
    stack: list[tuple[Any, tuple]] = [(config, ())]
    nodes = 0
    while stack and len(found) < MAX_KERAS_FINDINGS:
        value, at = stack.pop()
        nodes += 1
        if nodes > MAX_CONFIG_NODES:
            found.append(Finding(SUSPICIOUS, "unfollowed", "config", f"more than {MAX_CONFIG_NODES} values "
                                 "in the config: the rest was not checked, so the file is not known to be "
                                 "safe", member, -1))
            break
        if isinstance(value, dict):
            found.extend(_entry_findings(value, at, member))
            stack.extend((v, at + (str(k),)) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend((v, at + (i,)) for i, v in reversed(list(enumerate(value))))
    return found[:MAX_KERAS_FINDINGS]


def _entry_findings(entry: dict, at: tuple, member: Optional[str]) -> list[Finding]:
    """Findings for one JSON object of the config: a Lambda, or a module + name to import."""
    where = _location(at)
    found = []
    if entry.get("class_name") == "__lambda__":
        found.append(Finding(MALICIOUS, "keras-lambda", f"Lambda function at {where}", _LAMBDA_WHY,
                             member, -1))
    function = entry.get("function")
    if entry.get("function_type") == "lambda" and isinstance(function, list) and function \
            and isinstance(function[0], str):
        found.append(Finding(MALICIOUS, "keras-lambda", f"Lambda function at {where}",
                             _LAMBDA_WHY + " (the Keras 2 form)", member, -1))
    module = entry.get("module")
    name = entry.get("config") if entry.get("class_name") == "function" else entry.get("class_name")
    if isinstance(module, str) and isinstance(name, str) and module and name:
        severity, kind, why = grade_global(module, name)
        inside_keras = module.split(".", 1)[0] in KERAS_MODULES
        if severity == MALICIOUS or not inside_keras:
            found.append(Finding(severity, kind, f"{module}.{name}",
                                 f"{why} (named by the Keras config at {where}: load_model imports it)",
                                 member, -1))
    return found


def _unreadable(exc: SafeckptError, member: Optional[str]) -> Finding:
    return Finding(SUSPICIOUS, "keras-config-unreadable", "Keras config", f"{exc.detail}: what loading "
                   "it would do is not known", member, -1)


def _location(at: tuple) -> str:
    """A JSON path as text: ``config.layers[1].config.function``."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in at).lstrip(".")
    return (text or "the top") if len(text) <= 300 else "..." + text[-300:]


def _join(outer: Optional[str], inner: str) -> str:
    return inner if outer is None else f"{outer} > {inner}"
