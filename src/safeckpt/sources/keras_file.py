"""Keras files as a TensorSource: ``.keras`` archives, ``.weights.h5`` and legacy ``.h5`` models.

Nothing of Keras (or TensorFlow) is imported; the config is read as JSON and never
deserialized, and HDF5 is parsed by the pure-Python `hdf5_reader` (pyfive).

The formats (Keras 3, ``keras/src/saving/saving_lib.py``)
--------------------------------------------------------
A ``.keras`` file is a zip archive (members stored, not compressed)::

    metadata.json       {"keras_version": "3.15.1", "date_saved": "..."}
    config.json         the model's serialized config: {"module", "class_name", "config",
                        "registered_name", ...}, layers under config["layers"]
    model.weights.h5    the variables (or model.weights.npz, written on request)
    assets/...          optional files of layers (vocabularies)

``model.weights.h5`` (and a file from ``model.save_weights("x.weights.h5")``) holds
one HDF5 group per object that has state, at the path of attributes Keras walks
from the model: the layers of a Sequential or Functional model come first, as
``layers/<snake_case(class name)>`` made unique with ``_1``, ``_2``, ... in the order
of ``model.layers`` (a Sequential's InputLayer is not among them), then other
attributes in sorted order (``optimizer``, an RNN's ``cell``, ...). Each such group
has a ``vars`` group whose attribute ``name`` is the object's name (Keras 3.10+)
and whose datasets ``0``, ``1``, ... are its variables in the order of
``layer._trainable_variables + layer._non_trainable_variables``::

    /vars                                     {"name": "model"} (the model's own variables)
    /layers/dense/vars/0, /layers/dense/vars/1  {"name": "dense_7"}: kernel, bias
    /layers/sequential/layers/dense/vars/0    a layer of a nested model
    /optimizer/vars/0 ...                     iterations, learning rate, then slots

Variables are stored with their own HDF5 type, except bfloat16, which h5py can only
store as the opaque type ``|V2``: Keras then sets the dataset's attribute
``dtype = "bfloat16"``.

A legacy (Keras 2, or ``model.save("x.h5")``) HDF5 model has the root attribute
``model_config`` (JSON) and a group ``model_weights`` whose attribute ``layer_names``
lists the layers; each layer's group lists its datasets in ``weight_names``
(``dense/kernel`` or ``dense/kernel:0``), the optimizer's in ``optimizer_weights``.
A Keras 2 ``save_weights("x.h5")`` file is the same ``model_weights`` group at the root.

Tensor names
------------
Variables are named ``<layer name>.<variable name>`` (``dense_7.kernel``), nested
models adding their own name (``block.inner_a.kernel``); the layer name comes from
the ``vars`` group's ``name`` attribute, else from the config by Keras' own rule of
position and class, else from the HDF5 group. Variable names come from
`VARIABLE_NAMES` where the layer's class and config say what they are (a layer
whose variable count or types differ, a quantized one, a class of your own:
``vars.N``). Optimizer variables are ``optimizer.vars.N``. ``raw_names=True``
gives the HDF5 paths instead (``layers.dense.vars.0``).

    >>> with KerasSource("model.keras") as src:
    ...     src.keys()[:2], src.tree["metadata"]["keras_version"]
    (['dense.kernel', 'dense.bias'], '3.15.1')
"""

from __future__ import annotations

import itertools
import json
import os
import re
from typing import Any, Optional

import numpy as np

from .. import errors
from ..format.dtypes import DTYPES, DType, dtype_for_numpy
from .base import MAX_NAME_CHARS, FileSpan, TensorInfo, TensorSource, map_file, unique_name, unmap
from .hdf5_reader import H5Dataset, H5File, is_hdf5
from .zip_archive import STORED, ZipArchive, is_zip

__all__ = ["KerasSource", "is_keras_zip", "is_hdf5", "VARIABLE_NAMES", "CONFIG_MEMBER",
           "METADATA_MEMBER", "WEIGHTS_MEMBERS", "MAX_JSON_BYTES", "MAX_CONFIG_DEPTH"]

CONFIG_MEMBER = "config.json"
METADATA_MEMBER = "metadata.json"
WEIGHTS_MEMBERS = ("model.weights.h5", "model.weights.npz")

# --- limits -------------------------------------------------------------------------
# config.json and metadata.json are parsed whole: a large model's config is a few MB.
MAX_JSON_BYTES = 64 << 20
# Levels of nested models followed in a config to name layers (each level is a model
# inside a model); deeper configs keep HDF5 names.
MAX_CONFIG_DEPTH = 32
# The weights member of a .keras archive inflated when it is compressed (Keras stores it
# uncompressed: read in place, no copy); raise it to read a larger compressed one.
MAX_INFLATED_WEIGHTS = 16 << 30

_KERNEL_BIAS = (("kernel", None), ("bias", "use_bias"))
_NORM = (("gamma", "scale"), ("beta", "center"))
_CELL = (("kernel", None), ("recurrent_kernel", None), ("bias", "use_bias"))
# snake_case(class name) -> its variables in the order Keras saves them, each with the
# config flag that must be true for it to exist (None: always there).
VARIABLE_NAMES: dict[str, tuple[tuple[str, Optional[str]], ...]] = {
    **dict.fromkeys(["dense", "conv1d", "conv2d", "conv3d", "conv1d_transpose", "conv2d_transpose",
                     "conv3d_transpose", "depthwise_conv1d", "depthwise_conv2d"], _KERNEL_BIAS),
    **dict.fromkeys(["separable_conv1d", "separable_conv2d"],
                    (("depthwise_kernel", None), ("pointwise_kernel", None), ("bias", "use_bias"))),
    "einsum_dense": (("kernel", None), ("bias", "bias_axes")),
    "embedding": (("embeddings", None),),
    "batch_normalization": _NORM + (("moving_mean", None), ("moving_variance", None)),
    **dict.fromkeys(["layer_normalization", "group_normalization"], _NORM),
    "rms_normalization": (("scale", None),),
    "p_re_lu": (("alpha", None),),
    **dict.fromkeys(["lstm_cell", "gru_cell", "simple_rnn_cell"], _CELL),
}
# (snake_case class of a layer, attribute) -> class of the object Keras saves there.
CHILD_CLASSES: dict[tuple[str, str], str] = {
    ("lstm", "cell"): "lstm_cell", ("gru", "cell"): "gru_cell", ("simple_rnn", "cell"): "simple_rnn_cell",
    **{("multi_head_attention", f"{private}{part}_dense"): "einsum_dense"
       for part in ("query", "key", "value", "output") for private in ("", "_")},
}
# Config classes that hold layers of their own, saved under ``layers/``.
_MODEL_CLASSES = frozenset(["Sequential", "Functional", "Model"])
_FLOAT_KINDS = "fV"  # floats, and bfloat16 stored opaque
_UNIQUE_SUFFIX = re.compile(r"_[0-9]+$")
# A variable index longer than this is no index Keras wrote (and int() of thousands of
# digits is refused by Python): such a dataset keeps its HDF5 name.
_MAX_INDEX_DIGITS = 9


def is_keras_zip(names: list[str]) -> bool:
    """Whether zip member names are those of a Keras 3 ``.keras`` archive.

    >>> is_keras_zip(["metadata.json", "config.json", "model.weights.h5"])
    True
    """
    present = set(names)
    return {CONFIG_MEMBER, METADATA_MEMBER} <= present and any(m in present for m in WEIGHTS_MEMBERS)


def to_snake_case(name: str) -> str:
    """Keras' ``naming.to_snake_case``: the HDF5 group name of a layer of class `name`."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


class KerasSource(TensorSource):
    """A Keras ``.keras`` archive, a ``.weights.h5`` file or a legacy ``.h5`` model; read only.

    `tree` holds ``metadata`` and ``config`` (the JSON documents, as data) and the
    HDF5 groups' ``attributes``; each tensor is a zero-copy view of the file (bf16 as
    ml_dtypes.bfloat16).

    >>> with KerasSource("model.weights.h5") as src:
    ...     src["dense.kernel"]
    TensorInfo(dtype='F32', shape=(19, 16), nbytes=1216)
    """

    format = "keras"

    def __init__(self, path: "os.PathLike | str", *, raw_names: bool = False) -> None:
        super().__init__(os.fspath(path))
        self.raw_names = raw_names
        self._map = map_file(self.path)
        self._h5: Optional[H5File] = None
        self._buffer: Optional[memoryview] = None   # the HDF5 bytes: the file, or the archive's member
        self._infos: dict[str, TensorInfo] = {}
        self._repeats: dict[str, int] = {}  # for unique_name
        self._entries: dict[str, tuple[H5Dataset, DType]] = {}
        self._span_base: Optional[int] = 0   # where the HDF5 bytes start in the file; None: not in place
        #: what the zip reader noticed about a .keras archive (duplicate names, ...), for the scan
        self.zip_findings: list = []
        try:
            head = bytes(self._map[:4096])
            if is_zip(head):
                config, metadata, buffer, label = self._open_archive()
            elif is_hdf5(head):
                config, metadata, buffer, label = None, None, memoryview(self._map), self.path
            else:
                raise errors.SourceError(f"not a Keras file: neither a zip archive nor HDF5 (it starts "
                                         f"with {head[:8]!r})", path=self.path)
            self._buffer = buffer
            self._h5 = H5File(buffer, label)
            for text in self._h5.notes:
                self.note(text)
            self._read_layout(config, metadata)
        except BaseException:
            self.close()
            raise

    # -- opening
    def _open_archive(self) -> tuple[Any, Any, memoryview, str]:
        archive = ZipArchive(self._map, self.path)
        self.zip_findings = list(archive.findings)
        names = archive.names()
        if not is_keras_zip(names):
            raise errors.SourceError(f"a zip archive but not a Keras .keras file: it lacks "
                                     f"{CONFIG_MEMBER}, {METADATA_MEMBER} or model.weights.h5 "
                                     f"({len(names)} members)", path=self.path)
        config, metadata = (self._document(bytes(archive.read(name, max_size=MAX_JSON_BYTES)), name)
                            for name in (CONFIG_MEMBER, METADATA_MEMBER))
        if WEIGHTS_MEMBERS[0] not in names:
            raise errors.SourceError("the .keras archive stores its weights as model.weights.npz, which "
                                     "is not read yet: re-save the model with model.save('x.keras') "
                                     "(HDF5 weights)", path=self.path)
        member = archive.member(WEIGHTS_MEMBERS[0])
        self.format = "keras-zip"
        self._span_base = member.data_offset if member.method == STORED else None
        return config, metadata, archive.read(member, max_size=MAX_INFLATED_WEIGHTS), \
            f"{self.path} > {member.name}"

    def _document(self, data: bytes, what: str) -> Any:
        """A JSON document of the file; one that does not parse is noted (the weights need none)."""
        try:
            return parse_json(data, self.path, what)
        except errors.SourceError as exc:
            self.note(f"{exc.detail}; the tensors are named without it")
            return None

    # -- naming
    def _read_layout(self, config: Any, metadata: Any) -> None:
        h5 = self._h5
        assert h5 is not None
        root = h5.groups.get("/", {})
        if "model_config" in root:  # a legacy full model keeps its config in an attribute
            config = self._document(str(root["model_config"]).encode(), "the model_config attribute")
        legacy = "/model_weights" in h5.groups or "layer_names" in root
        if self.format == "keras":
            self.format = "keras-legacy-h5" if legacy else "keras-h5"
        names = {} if self.raw_names else (
            _legacy_names(h5) if legacy else _keras3_names(h5, _config_layers(config)))
        missing = [path for path in names if path not in h5.datasets]
        if missing:
            self.note(f"{len(missing)} weights listed in the file's attributes are not in it "
                      f"(the first: {missing[0][:200]!r})")
        ordered = [path for path in names if path in h5.datasets] + \
            [path for path in h5.datasets if path not in names]
        for path in ordered:
            dataset = h5.datasets[path]
            dtype = self._dtype_of(dataset)
            if dtype is None:
                continue
            name = self._unique(names.get(path) or _raw_name(path))
            self._entries[name] = (dataset, dtype)
            self._infos[name] = TensorInfo(dtype.name, dataset.shape, dataset.nbytes)
        attributes = {path: attrs for path, attrs in h5.groups.items() if attrs and path != "/"}
        root_attrs = {k: v for k, v in root.items() if k != "model_config"}
        self.tree = {"metadata": metadata, "config": config, "attributes": attributes,
                     **({"root_attributes": root_attrs} if root_attrs else {}),
                     "tensors": {name: {"__tensor__": name} for name in self._infos}}

    def _dtype_of(self, dataset: H5Dataset) -> Optional[DType]:
        if dataset.dtype.kind == "V" and dataset.dtype.itemsize == 2 and dataset.dtype.names is None \
                and dataset.attrs.get("dtype") == "bfloat16":
            return DTYPES["BF16"]
        dtype = None if dataset.dtype.kind in "VSUOM" else dtype_for_numpy(dataset.dtype)
        if dtype is None:
            self.note(f"HDF5: the dataset {dataset.path!r} holds {dataset.dtype} values, which are no "
                      "tensor; left out")
        return dtype

    def _unique(self, name: str) -> str:
        name = name[-MAX_NAME_CHARS:]
        unique = unique_name(name, self._infos, self._repeats)
        if unique != name:
            self.note(f"two tensors are both named {name[:200]!r}; the second is {unique[-200:]}")
        return unique

    # -- the mapping and the data
    @property
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> np.ndarray:
        info = self[name]
        if self._h5 is None:
            raise errors.SourceError("the source is closed", path=self.path, tensor=name)
        dataset, dtype = self._entries[name]
        try:
            array = self._h5.read(dataset)
        except errors.SourceError as exc:  # named by our name, not the HDF5 path
            raise errors.SourceError(f"{exc.detail} (the HDF5 dataset {dataset.path})", path=exc.path,
                                     tensor=name) from None
        if dtype.name == "BF16" and array.dtype.kind == "V":
            array = array.view(dtype.numpy)
        return array.reshape(info.shape)

    def file_span(self, name: str) -> Optional[FileSpan]:
        info = self[name]
        dataset, dtype = self._entries[name]
        little = dataset.dtype.kind == "V" or dataset.dtype.byteorder in "<=|"
        if self._span_base is None or dataset.offset is None or not little or dtype.packed:
            return None
        return FileSpan(self.path, self._span_base + dataset.offset, info.nbytes)

    def describe(self) -> str:
        kind = {"keras-zip": "Keras .keras archive", "keras-h5": "Keras 3 weights (HDF5)",
                "keras-legacy-h5": "legacy Keras HDF5 model"}.get(self.format, "Keras file")
        return f"{kind}, {len(self)} tensors"

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
        if self._buffer is not None:
            try:
                self._buffer.release()
            except BufferError:  # arrays read from it are still alive: unmapped when they go
                pass
            self._buffer = None
        unmap(self._map)
        self._map = None


def parse_json(data: bytes, path: str, what: str) -> Any:
    """A JSON document of a Keras file (config.json, metadata.json, model_config), as data."""
    if len(data) > MAX_JSON_BYTES:
        raise errors.SourceError(f"{what} is {len(data)} bytes, more than the limit of {MAX_JSON_BYTES}",
                                 path=path)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise errors.SourceError(f"{what} is not valid JSON: {str(exc)[:200]}", path=path) from None


# --- Keras 3: names from the HDF5 layout ------------------------------------------------------

def _config_layers(config: Any) -> dict[str, dict]:
    """HDF5 group path of each layer -> its config, by Keras' rule: in each model, the
    layers in order, named snake_case(class) made unique with ``_1``, ``_2``, ...
    (a Sequential's InputLayer is not saved)."""
    found: dict[str, dict] = {}

    def walk(model: Any, prefix: str, depth: int) -> None:
        inner = model.get("config") if isinstance(model, dict) else None
        layers = inner.get("layers") if isinstance(inner, dict) else None
        if depth > MAX_CONFIG_DEPTH or not isinstance(layers, list):
            return
        used: dict[str, int] = {}
        for layer in layers:
            if not isinstance(layer, dict) or not isinstance(layer.get("class_name"), str):
                continue
            if model.get("class_name") == "Sequential" and layer["class_name"] == "InputLayer":
                continue
            key = to_snake_case(layer["class_name"])
            used[key] = used.get(key, -1) + 1
            path = f"{prefix}/layers/{key}" + (f"_{used[key]}" if used[key] else "")
            found[path] = layer
            walk(layer, path, depth + 1)

    walk(config, "", 0)
    return found


def _keras3_names(h5: H5File, configs: dict[str, dict]) -> dict[str, str]:
    """Dataset path -> tensor name, for the ``.../vars/N`` datasets of a Keras 3 file."""
    by_owner: dict[str, list[H5Dataset]] = {}
    for path, dataset in h5.datasets.items():
        owner, _, leaf = path.rpartition("/vars/")
        if leaf.isascii() and leaf.isdigit() and len(leaf) <= _MAX_INDEX_DIGITS and "/" not in leaf:
            by_owner.setdefault(owner, []).append(dataset)
    order = {path: i for i, path in enumerate(configs)}  # the model's layer order
    names: dict[str, str] = {}
    for owner, datasets in sorted(by_owner.items(), key=lambda item: _position(item[0], order)):
        datasets.sort(key=lambda d: int(d.path.rpartition("/")[2]))
        prefix, cls, config = _owner_name(h5, owner, configs)
        variables = _variable_names(cls, config, datasets)
        for dataset, variable in zip(datasets, variables):
            names[dataset.path] = f"{prefix}.{variable}" if prefix else variable
    return names


def _position(owner: str, order: dict[str, int]) -> int:
    """Where the layer that holds `owner` comes in the config (`order`: path -> position);
    objects of no layer (the optimizer) come after all layers, in HDF5 order."""
    while owner:
        if owner in order:
            return order[owner]
        owner = owner.rpartition("/")[0]
    return len(order)


def _owner_name(h5: H5File, owner: str,
                configs: dict[str, dict]) -> tuple[str, Optional[str], Optional[dict]]:
    """(dotted name, snake_case class or None, config or None) of the object whose variables
    are under `owner`. An object held in a layer's attribute (an RNN's cell) has its class
    from `CHILD_CLASSES` and its layer's config (the cell follows the LSTM's use_bias)."""
    parts = [p for p in owner.split("/") if p]
    names: list[str] = []
    cls: Optional[str] = None
    config: Optional[dict] = None
    i = 0
    while i < len(parts):
        if parts[i] == "layers" and i + 1 < len(parts):
            node = "/" + "/".join(parts[:i + 2])
            cls = _UNIQUE_SUFFIX.sub("", parts[i + 1])
            stored = h5.groups.get(f"{node}/vars", {}).get("name")
            config = _matching_config(configs.get(node), cls, stored)
            configured = config["config"].get("name") if config else None
            names.append(next((n for n in (stored, configured) if isinstance(n, str) and n), parts[i + 1]))
            i += 2
        else:
            cls = CHILD_CLASSES.get((cls or "", parts[i]))
            names.append(parts[i].lstrip("_") if cls else parts[i])
            i += 1
    return ".".join(names), cls, config


def _matching_config(config: Optional[dict], cls: str, stored: Any) -> Optional[dict]:
    """The config matched to a layer's group by position, if it agrees with the group: same
    class, and the same name where the file stores one (else it describes another layer)."""
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict) \
            or to_snake_case(str(config.get("class_name"))) != cls:
        return None
    if isinstance(stored, str) and config["config"].get("name") not in (None, stored):
        return None
    return config


def _variable_names(cls: Optional[str], config: Optional[dict], datasets: list[H5Dataset]) -> list[str]:
    """The variables' names from `VARIABLE_NAMES`, where the class and config say what they
    are; else ``vars.N``.

    Without a config, the variables may still be named when only one choice of the
    optional ones gives their number (a Dense of one variable has no bias).
    """
    fallback = [f"vars.{d.path.rpartition('/')[2]}" for d in datasets]
    table = VARIABLE_NAMES.get(cls or "")
    if table is None or any(d.dtype.kind not in _FLOAT_KINDS for d in datasets):
        return fallback  # an unknown class, or integer variables (a quantized layer)
    options = config.get("config") if isinstance(config, dict) else None
    if isinstance(options, dict):
        if isinstance(options.get("dtype"), dict) and "Quantized" in str(options["dtype"].get("class_name")):
            return fallback
        flags = {flag: options.get(flag, True) not in (False, None) for _, flag in table if flag}
        choices = [flags]
    else:
        optional = sorted({flag for _, flag in table if flag})
        choices = [dict(zip(optional, bits))
                   for bits in itertools.product((False, True), repeat=len(optional))]
    fits = {tuple(name for name, flag in table if flag is None or chosen[flag]) for chosen in choices}
    fits = {names for names in fits if len(names) == len(datasets)}
    return list(fits.pop()) if len(fits) == 1 else fallback


def _raw_name(path: str) -> str:
    return path.strip("/").replace("/", ".")


# --- legacy HDF5 models: names listed in attributes -----------------------------------------

def _legacy_names(h5: H5File) -> dict[str, str]:
    """Dataset path -> tensor name, from the ``layer_names`` / ``weight_names`` attributes."""
    names: dict[str, str] = {}
    root = "/model_weights" if "/model_weights" in h5.groups else ""
    for layer in _strings(h5.groups.get(root or "/", {}).get("layer_names")):
        group = f"{root}/{layer}"
        for weight in _strings(h5.groups.get(group, {}).get("weight_names")):
            names[f"{group}/{weight}"] = _legacy_name(weight)
    for weight in _strings(h5.groups.get("/optimizer_weights", {}).get("weight_names")):
        names[f"/optimizer_weights/{weight}"] = "optimizer." + _legacy_name(weight)
    return names


def _legacy_name(weight: str) -> str:
    return _raw_name(weight.removesuffix(":0"))


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
