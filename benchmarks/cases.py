"""What each benchmark case does, run inside its own subprocess (see `child`).

A case is a function of the run's configuration that does all its untimed
preparation (imports, building tensors, warming the page cache) and returns
the operation to time. The operation's return value is kept alive until the
peak RSS has been read, so a lazy load is not unmapped inside the timing; a
`Measured` return value also carries numbers to report (bytes read, pages).

Case names are `group.variant.library`: the runner pairs ours with each peer
of the same group and variant.
"""

from __future__ import annotations

import filecmp
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict

import numpy as np

from . import probes
from .statedict import model_spec, numpy_state_dict, slice_tensor, spec_bytes, torch_state_dict

Op = Callable[[], Any]
CASES: Dict[str, Callable[[dict], Op]] = {}

# Files of a run, in its directory.
MODEL = "model.safetensors"
MODEL_PT = "model.pt"
MODEL_NPZ = "model.npz"
SLICE = "slice4096.safetensors"
# Two more models of the same layout with other values: diffed against MODEL and merged with it.
MODEL_B = "model_b.safetensors"
MODEL_C = "model_c.safetensors"
READ_BUFFER_BYTES = 64 * 1024 * 1024
SLICE_NAME = "weight"
SLICE_ROW = 1234
SLICE_SHAPE = (4096, 4096)
ROW_BYTES = SLICE_SHAPE[1] * 4
PAGE = 4096
# A header that lists many one-byte tensors (a million at --size 1GiB, fewer below): how long
# opening and inspecting take grows with the entries, not the bytes.
MANY = "many_tensors.safetensors"
MAX_MANY_TENSORS = 1_000_000


def many_tensor_count(size: int) -> int:
    return max(1000, min(MAX_MANY_TENSORS, size // 1024))


def write_many_tensors(filename: str, n: int) -> None:
    """A safetensors file of `n` U8 tensors of shape [1], its header written as text (seconds, not minutes)."""
    import struct

    entries = ",".join(f'"model.layers.{i // 100}.block.{i % 100}.w":{{"dtype":"U8","shape":[1],'
                       f'"data_offsets":[{i},{i + 1}]}}' for i in range(n))
    header = ("{" + entries + "}").encode()
    header += b" " * (-len(header) % 8)
    with open(filename, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bytes(n))


@dataclass
class Measured:
    keep: Any = None
    extras: Dict[str, Any] = field(default_factory=dict)


def case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


def path(cfg: dict, name: str) -> str:
    return os.path.join(cfg["dir"], name)


def warm(cfg: dict, filename: str) -> None:
    """Read a file once so that it is in the page cache (a no-op on tmpfs, where it always is)."""
    if cfg.get("tmpfs"):
        return
    buffer = bytearray(16 << 20)
    with open(filename, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def touch_pages_torch(tensors) -> int:
    """Read one byte of every 4 KiB page of every tensor: the same full read for every library."""
    import torch

    total = 0
    for tensor in tensors:
        total += int(tensor.reshape(-1).view(torch.uint8)[::PAGE].sum())
    return total


def numpy_views(tensors) -> dict:
    """Zero-copy numpy views of torch tensors (bf16 through int16, as ml_dtypes.bfloat16)."""
    import ml_dtypes
    import torch

    out = {}
    for name, tensor in tensors.items():
        if tensor.dtype == torch.bfloat16:
            out[name] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[name] = tensor.numpy()
    return out


# --- the files every read case uses ---------------------------------------------------

@case("setup")
def setup(cfg: dict) -> Op:
    """Write the model in each format (safetensors by `safetensors`), check ours writes the same bytes."""
    import safetensors.torch
    import torch

    import safeckpt.torch

    spec = model_spec(cfg["size"])
    tensors = torch_state_dict(spec)

    def op():
        safetensors.torch.save_file(tensors, path(cfg, MODEL))
        torch.save(tensors, path(cfg, MODEL_PT))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            np.savez(path(cfg, MODEL_NPZ), **numpy_views(tensors))
        safetensors.torch.save_file({SLICE_NAME: torch.from_numpy(slice_tensor(*SLICE_SHAPE))}, path(cfg, SLICE))
        for seed, name in ((1, MODEL_B), (2, MODEL_C)):
            safeckpt.save_file(numpy_state_dict(spec, seed), path(cfg, name))
        write_many_tensors(path(cfg, MANY), many_tensor_count(cfg["size"]))
        ours = path(cfg, "ours-check.safetensors")
        safeckpt.torch.save_file(tensors, ours)
        same = filecmp.cmp(ours, path(cfg, MODEL), shallow=False)
        os.unlink(ours)
        return Measured(extras={"identical_bytes": same, "tensors": len(spec), **spec_bytes(spec)})
    return op


# --- save ---------------------------------------------------------------------------

def _saver(kind: str, library: str) -> Callable[[dict], Op]:
    def prepare(cfg: dict) -> Op:
        spec = model_spec(cfg["size"])
        out = cfg["out"]
        if kind == "torch":
            import torch

            tensors = torch_state_dict(spec)
            if library == "ours":
                from safeckpt.torch import save_file
            elif library == "safetensors":
                from safetensors.torch import save_file
            else:  # torch.save
                def save_file(tensors, out):
                    torch.save(tensors, out)
        else:
            tensors = numpy_state_dict(spec)
            if library == "ours":
                from safeckpt.numpy import save_file
            elif library == "safetensors":
                from safetensors.numpy import save_file
            else:  # numpy.savez
                def save_file(tensors, out):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # ml_dtypes bf16 is stored as raw V2
                        with open(out, "wb") as f:
                            np.savez(f, **tensors)
        return lambda: save_file(tensors, out)
    return prepare


for _kind, _peers in (("torch", ("ours", "safetensors", "torch_save")),
                      ("numpy", ("ours", "safetensors", "savez"))):
    for _library in _peers:
        case(f"save.{_kind}.{_library}")(_saver(_kind, _library))


# --- load with torch: lazy, and full (touching every page) -----------------------------

def _torch_loader(library: str) -> Callable[[dict], Any]:
    import safetensors.torch
    import torch

    import safeckpt.torch

    if library in ("ours", "safetensors"):
        module = safeckpt.torch if library == "ours" else safetensors.torch
        return lambda cfg: module.load_file(path(cfg, MODEL))
    mmap = library == "torch_mmap"
    return lambda cfg: torch.load(path(cfg, MODEL_PT), weights_only=True, mmap=mmap)


def _torch_load_case(full: bool, library: str) -> Callable[[dict], Op]:
    def prepare(cfg: dict) -> Op:
        load = _torch_loader(library)
        warm(cfg, path(cfg, MODEL_PT if library.startswith("torch") else MODEL))
        if not full:
            return lambda: load(cfg)

        def op():
            tensors = load(cfg)
            touch_pages_torch(tensors.values())
            return tensors
        return op
    return prepare


for _library in ("ours", "safetensors", "torch_mmap"):
    case(f"load.lazy.{_library}")(_torch_load_case(False, _library))
for _library in ("ours", "safetensors", "torch_mmap", "torch_nommap"):
    case(f"load.full.{_library}")(_torch_load_case(True, _library))


# --- a safe torch.load of the torch.save file: safe_load vs torch.load(weights_only=True) --

def _safe_load_case(full: bool, mmap: bool) -> Callable[[dict], Op]:
    def prepare(cfg: dict) -> Op:
        from safeckpt.torch import safe_load

        warm(cfg, path(cfg, MODEL_PT))

        def op():
            tensors = safe_load(path(cfg, MODEL_PT), mmap=mmap)
            if full:
                touch_pages_torch(tensors.values())
            return tensors
        return op
    return prepare


case("safe_load.lazy.ours")(_safe_load_case(False, True))
case("safe_load.full.ours")(_safe_load_case(True, True))
case("safe_load.full.ours_nommap")(_safe_load_case(True, False))


# --- load with numpy ---------------------------------------------------------------

@case("load.numpy.ours")
def load_numpy_ours(cfg: dict) -> Op:
    from safeckpt.numpy import load_file

    warm(cfg, path(cfg, MODEL))
    return lambda: load_file(path(cfg, MODEL))


@case("load.numpy.safetensors")
def load_numpy_safetensors(cfg: dict) -> Op:
    from safetensors.numpy import load_file

    warm(cfg, path(cfg, MODEL))
    return lambda: load_file(path(cfg, MODEL))


@case("load.numpy.npz")
def load_numpy_npz(cfg: dict) -> Op:
    warm(cfg, path(cfg, MODEL_NPZ))

    def op():
        with np.load(path(cfg, MODEL_NPZ)) as npz:  # NpzFile is lazy: read every array
            return {name: npz[name] for name in npz.files}
    return op


# --- copy=True against memcpy ---------------------------------------------------------

@case("copy.ours")
def copy_ours(cfg: dict) -> Op:
    import safeckpt

    warm(cfg, path(cfg, MODEL))

    def op():
        tensors = safeckpt.load_file(path(cfg, MODEL), framework="numpy", copy=True)
        return Measured(tensors, {"bytes": sum(a.nbytes for a in tensors.values())})
    return op


@case("copy.memcpy")
def copy_memcpy(cfg: dict) -> Op:
    """The machine's memcpy: an in-memory array of the model's size into a fresh array."""
    from .statedict import fill

    nbytes = spec_bytes(model_spec(cfg["size"]))["total"]
    source = np.empty(nbytes, dtype=np.uint8)
    fill(source, "F32")

    def op():
        target = np.empty_like(source)
        np.copyto(target, source)
        return Measured((source, target), {"bytes": nbytes})
    return op


# --- get_slice of one row: bytes read (pread) and pages mapped (mmap) ---------------------

@case("slice.pread_row.ours")
def slice_pread_row(cfg: dict) -> Op:
    from safeckpt.format.reader import SafetensorsFile

    f = SafetensorsFile(path(cfg, SLICE), backend="pread")

    def op():
        row = f.slice(SLICE_NAME, SLICE_ROW)
        return Measured((f, row), {"bytes": f.bytes_read, "result_bytes": row.nbytes})
    return op


@case("slice.pread_whole.ours")
def slice_pread_whole(cfg: dict) -> Op:
    from safeckpt.format.reader import SafetensorsFile

    f = SafetensorsFile(path(cfg, SLICE), backend="pread")

    def op():
        whole = f.array(SLICE_NAME, copy=True)
        return Measured((f, whole), {"bytes": f.bytes_read, "result_bytes": whole.nbytes})
    return op


def _mmap_slice_case(library: str, whole: bool) -> Callable[[dict], Op]:
    def prepare(cfg: dict) -> Op:
        filename = path(cfg, SLICE)
        warm(cfg, filename)
        if library == "ours":
            from safeckpt import safe_open
        else:
            from safetensors import safe_open
        f = safe_open(filename, framework="numpy")

        def op():
            before, faults = probes.mapped_rss(filename), probes.minor_faults()
            if whole:
                result = np.array(f.get_tensor(SLICE_NAME), copy=True)
            else:
                result = np.array(f.get_slice(SLICE_NAME)[SLICE_ROW], copy=True)
            return Measured((f, result), {"bytes": probes.mapped_rss(filename) - before,
                                          "minor_faults": probes.minor_faults() - faults,
                                          "result_bytes": result.nbytes})
        return op
    return prepare


for _library in ("ours", "safetensors"):
    case(f"slice.mmap_row.{_library}")(_mmap_slice_case(_library, False))
    case(f"slice.mmap_whole.{_library}")(_mmap_slice_case(_library, True))


# --- pickle-based checkpoints: list, scan, convert ---------------------------------------

@case("list.ours")
def list_ours(cfg: dict) -> Op:
    """Open a torch.save file and list every tensor's name, dtype and shape."""
    from safeckpt import open_source

    warm(cfg, path(cfg, MODEL_PT))

    def op():
        with open_source(path(cfg, MODEL_PT)) as source:
            return Measured(extras={"tensors": len(dict(source.infos))})
    return op


@case("list.torch")
def list_torch(cfg: dict) -> Op:
    import torch

    warm(cfg, path(cfg, MODEL_PT))

    def op():
        tensors = torch.load(path(cfg, MODEL_PT), weights_only=True)
        return Measured(tensors, {"tensors": len({n: (t.dtype, t.shape) for n, t in tensors.items()})})
    return op


@case("scan.ours")
def scan_ours(cfg: dict) -> Op:
    import safeckpt.ops.scan

    warm(cfg, path(cfg, MODEL_PT))

    def op():
        report = safeckpt.ops.scan.scan(path(cfg, MODEL_PT))
        assert report.verdict == "safe", report.to_dict()
        return report
    return op


def _convert_ours(source_hash: bool) -> Callable[[dict], Op]:
    def prepare(cfg: dict) -> Op:
        from safeckpt.ops.convert import convert

        warm(cfg, path(cfg, MODEL_PT))
        return lambda: convert(path(cfg, MODEL_PT), cfg["out"], source_hash=source_hash)
    return prepare


# with the source's sha256 in the metadata (the default), and without (--no-source-hash)
case("convert.ours")(_convert_ours(True))
case("convert.ours_nohash")(_convert_ours(False))


@case("convert.torch_safetensors")
def convert_peer(cfg: dict) -> Op:
    """The usual recipe: torch.load, then safetensors.torch.save_file."""
    import safetensors.torch
    import torch

    warm(cfg, path(cfg, MODEL_PT))

    def op():
        tensors = torch.load(path(cfg, MODEL_PT), weights_only=True)
        safetensors.torch.save_file(tensors, cfg["out"], metadata={"format": "pt"})
    return op


# --- a header of many tensors: list the names, inspect ------------------------------------

@case("header.keys.ours")
def header_keys_ours(cfg: dict) -> Op:
    """safe_open and keys(): the header read, parsed and every rule checked."""
    import safeckpt

    warm(cfg, path(cfg, MANY))

    def op():
        with safeckpt.safe_open(path(cfg, MANY)) as f:
            return Measured(extras={"tensors": len(f.keys())})
    return op


@case("header.keys.safetensors")
def header_keys_safetensors(cfg: dict) -> Op:
    import safetensors

    warm(cfg, path(cfg, MANY))

    def op():
        with safetensors.safe_open(path(cfg, MANY), framework="np") as f:
            return Measured(extras={"tensors": len(f.keys())})
    return op


def _inspect_ours(as_json: bool) -> Callable[[dict], Op]:
    def prepare(cfg: dict) -> Op:
        """What `safeckpt inspect [--json] FILE` does, the output written to /dev/null."""
        from rich.console import Console

        from safeckpt.cli import output
        from safeckpt.cli.inspect import presented, print_description
        from safeckpt.ops.inspect import describe

        warm(cfg, path(cfg, MANY))

        def op():
            report = presented(describe(path(cfg, MANY), tensors=as_json))
            with open(os.devnull, "w") as sink:
                if as_json:
                    output.write_json(report, sink)
                else:
                    console = Console(file=sink, highlight=False, emoji=False, width=100_000)
                    print_description(console, report)
            return Measured(extras={"tensors": report["totals"]["tensors"]})
        return op
    return prepare


case("header.inspect.ours")(_inspect_ours(False))
case("header.inspect_json.ours")(_inspect_ours(True))


# --- process start-up: what a user waits for before the command does anything ---------------

TINY = "tiny.safetensors"


def _safeckpt_command() -> list:
    """The installed `safeckpt` script next to this interpreter, else the same entry point via -c."""
    import sys

    script = os.path.join(os.path.dirname(sys.executable), "safeckpt")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "import sys; from safeckpt.cli import main; sys.exit(main())"]


def _process(argv_of: Callable[[dict], list]) -> Callable[[dict], Op]:
    def prepare(cfg: dict) -> Op:
        """A fresh process from exec to exit, its output thrown away (a cold page cache is not timed)."""
        import subprocess

        tiny = path(cfg, TINY)
        if not os.path.exists(tiny):
            import safeckpt
            safeckpt.save_file({f"layer.{k}.weight": np.ones((4, 4), np.float32) for k in range(8)}, tiny)
        argv = argv_of(cfg)
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)  # warm: files read, bytecode cached

        def op():
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        return op
    return prepare


case("startup.version.ours")(_process(lambda cfg: _safeckpt_command() + ["--version"]))
case("startup.help.ours")(_process(lambda cfg: _safeckpt_command() + ["--help"]))
case("startup.inspect.ours")(_process(lambda cfg: _safeckpt_command() + ["inspect", path(cfg, TINY)]))
case("startup.python.interpreter")(_process(lambda cfg: [__import__("sys").executable, "-c", "pass"]))
case("startup.inspect.safetensors")(_process(lambda cfg: [
    __import__("sys").executable, "-c",
    "import sys; from safetensors import safe_open; f = safe_open(sys.argv[1], 'np'); print(sorted(f.keys()))",
    path(cfg, TINY)]))


# --- training checkpoints: CheckpointManager against plain writes, torch.save and torch.load ---

CKPT_DIR = "checkpoints"


def _fresh_directory(cfg: dict, name: str) -> str:
    import shutil

    directory = path(cfg, name)
    shutil.rmtree(directory, ignore_errors=True)
    return directory


def _training_state(cfg: dict) -> dict:
    """A 1 GiB-class state: the model-like tensors plus the scalars a training state carries."""
    spec = model_spec(cfg["size"])
    return {"model": torch_state_dict(spec), "step": 1000, "epoch": 3, "lr": 3e-4}


@case("ckpt.save.ours")
def ckpt_save_ours(cfg: dict) -> Op:
    from safeckpt import CheckpointManager

    state = _training_state(cfg)
    manager = CheckpointManager(_fresh_directory(cfg, CKPT_DIR), keep_last=1)

    def op():
        assert manager.save(1000, state, force=True)
        return Measured(manager, {"bytes": spec_bytes(model_spec(cfg["size"]))["total"]})
    return op


@case("ckpt.save.plain_write")
def ckpt_save_plain(cfg: dict) -> Op:
    """The same bytes in one buffer, written with sequential write() calls and fsynced: the floor."""
    state = _training_state(cfg)
    import torch

    views = [t.reshape(-1).view(torch.uint8).numpy() for t in state["model"].values()]
    out = cfg["out"]

    def op():
        with open(out, "wb", buffering=0) as f:
            for view in views:
                f.write(view)
            os.fsync(f.fileno())
        return Measured(extras={"bytes": sum(v.nbytes for v in views)})
    return op


@case("ckpt.save.torch_save")
def ckpt_save_torch(cfg: dict) -> Op:
    import torch

    state = _training_state(cfg)
    out = cfg["out"]

    def op():
        torch.save(state, out)
        with open(out, "rb") as f:
            os.fsync(f.fileno())
    return op


@case("ckpt.async.ours")
def ckpt_async_ours(cfg: dict) -> Op:
    """Time the caller is blocked by save(async_save=True): the snapshot; the write goes on behind."""
    from safeckpt import CheckpointManager

    state = _training_state(cfg)
    manager = CheckpointManager(_fresh_directory(cfg, CKPT_DIR), keep_last=1, async_save=True)

    def op():
        manager.save(1000, state, force=True)
        return Measured(manager, {"bytes": spec_bytes(model_spec(cfg["size"]))["total"]})
    return op


# --- torch.distributed.checkpoint: 2 ranks save, one process loads (a 2 -> 1 reshard) -------

DCP_DIR = "dcp-checkpoint"


def _dcp_save_case(kind: str) -> Callable[[dict], Op]:
    def prepare(cfg: dict) -> Op:
        from .distributed import RankPool

        pool = RankPool(cfg["size"])
        directory = _fresh_directory(cfg, DCP_DIR)

        def op():
            pool.save(kind, directory)
            return Measured(pool, {"bytes": spec_bytes(model_spec(cfg["size"]))["total"]})
        return op
    return prepare


def _dcp_load_case(kind: str) -> Callable[[dict], Op]:
    def prepare(cfg: dict) -> Op:
        import torch.distributed.checkpoint as dcp

        from safeckpt.torch.distributed import SafeStorageReader

        from .distributed import RankPool, full_state_template

        directory = _fresh_directory(cfg, DCP_DIR)
        pool = RankPool(cfg["size"])
        pool.save(kind, directory)
        pool.close()
        warm_tree(cfg, directory)
        state = full_state_template(cfg["size"])

        def op():
            reader = SafeStorageReader(directory) if kind == "ours" else dcp.FileSystemReader(directory)
            dcp.load(state, storage_reader=reader)
            return state
        return op
    return prepare


for _kind in ("ours", "dcp"):
    case(f"dcp.save.{_kind}")(_dcp_save_case(_kind))
    case(f"dcp.load.{_kind}")(_dcp_load_case(_kind))


def _saved_checkpoint(cfg: dict):
    from safeckpt import CheckpointManager

    directory = _fresh_directory(cfg, CKPT_DIR)
    with CheckpointManager(directory, keep_last=1) as manager:
        manager.save(1000, _training_state(cfg), force=True)
    warm_tree(cfg, directory)
    return CheckpointManager(directory, keep_last=1)


def warm_tree(cfg: dict, directory: str) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            warm(cfg, os.path.join(root, name))


def _restore_case(verify: bool) -> Callable[[dict], Op]:
    """Restore the state, then read one byte of every page (training reads every weight)."""
    def prepare(cfg: dict) -> Op:
        manager = _saved_checkpoint(cfg)

        def op():
            state = manager.restore("latest", verify=verify)
            touch_pages_torch(state["model"].values())
            return state
        return op
    return prepare


case("ckpt.restore.ours")(_restore_case(False))
case("ckpt.restore_verify.ours")(_restore_case(True))


@case("ckpt.restore.torch_load")
def ckpt_restore_torch(cfg: dict) -> Op:
    import torch

    filename = path(cfg, "state.pt")
    torch.save(_training_state(cfg), filename)
    warm(cfg, filename)

    def op():
        state = torch.load(filename, weights_only=True)
        touch_pages_torch(state["model"].values())
        return state
    return op


# --- Lightning: the checkpoint a Trainer writes, through each CheckpointIO ----------------

LIGHTNING_DIR = "lightning"


def _lightning_checkpoint(cfg: dict) -> dict:
    """The dict a Trainer saves for a module of a quarter of --size (256 MiB at 1 GiB): one real
    training step with AdamW and StepLR (so the optimizer holds its two moments), then
    `dump_checkpoint`, as ModelCheckpoint would save it."""
    import torch
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    width = 1024
    layers = max(1, cfg["size"] // 4 // (width * width * 4))

    class Module(LightningModule):
        def __init__(self, layers: int = 1, lr: float = 1e-3):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])

        def training_step(self, batch, _):
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 10)}

    trainer = Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Module(layers), DataLoader(TensorDataset(torch.ones(2, width)), batch_size=2))
    return trainer._checkpoint_connector.dump_checkpoint()


def _lightning_io(library: str):
    if library == "ours":
        from safeckpt.lightning import SafeCheckpointIO

        return SafeCheckpointIO()
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    return TorchCheckpointIO()


def _lightning_save_case(library: str) -> Callable[[dict], Op]:
    """CheckpointIO.save_checkpoint of the Trainer's checkpoint; torch's file is fsynced as ours are."""
    def prepare(cfg: dict) -> Op:
        checkpoint, io = _lightning_checkpoint(cfg), _lightning_io(library)
        target = os.path.join(_fresh_directory(cfg, LIGHTNING_DIR), "epoch=0-step=1.ckpt")
        os.makedirs(os.path.dirname(target))

        def op():
            io.save_checkpoint(checkpoint, target)
            if library != "ours":
                with open(target, "rb") as f:
                    os.fsync(f.fileno())
        return op
    return prepare


def _lightning_load_case(library: str) -> Callable[[dict], Op]:
    """CheckpointIO.load_checkpoint (ours checks every hash), then one byte of every page of the weights."""
    def prepare(cfg: dict) -> Op:
        io = _lightning_io(library)
        target = os.path.join(_fresh_directory(cfg, LIGHTNING_DIR), "epoch=0-step=1.ckpt")
        os.makedirs(os.path.dirname(target))
        io.save_checkpoint(_lightning_checkpoint(cfg), target)
        warm_tree(cfg, os.path.dirname(target)) if library == "ours" else warm(cfg, target)

        def op():
            checkpoint = io.load_checkpoint(target)
            touch_pages_torch(checkpoint["state_dict"].values())
            return checkpoint
        return op
    return prepare


case("lightning.save.ours")(_lightning_save_case("ours"))
case("lightning.save.torch_io")(_lightning_save_case("torch_io"))
case("lightning.load.ours")(_lightning_load_case("ours"))
case("lightning.load.torch_io")(_lightning_load_case("torch_io"))


# --- the tools: diff, merge, verify, against the I/O they cannot avoid -----------------

def read_files(names: list, cfg: dict, out: "str | None" = None) -> int:
    """Read files through one buffer (page cache -> user space), copying the last one to `out`."""
    buffer = bytearray(READ_BUFFER_BYTES)
    view = memoryview(buffer)
    total = 0
    sink = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if out else None
    try:
        for i, name in enumerate(names):
            with open(path(cfg, name), "rb", buffering=0) as f:
                while True:
                    n = f.readinto(buffer)
                    if not n:
                        break
                    total += n
                    if sink is not None and i == len(names) - 1:
                        os.write(sink, view[:n])
        if sink is not None:
            os.fsync(sink)
    finally:
        if sink is not None:
            os.close(sink)
    return total


def _sizes(cfg: dict, names: list) -> int:
    return sum(os.path.getsize(path(cfg, name)) for name in names)


@case("diff.ours")
def diff_ours(cfg: dict) -> Op:
    from safeckpt.ops.diff import diff

    for name in (MODEL, MODEL_B):
        warm(cfg, path(cfg, name))

    def op():
        report = diff(path(cfg, MODEL), path(cfg, MODEL_B))
        assert not report.identical
        return Measured(report, {"bytes": _sizes(cfg, [MODEL, MODEL_B])})
    return op


@case("diff.read")
def diff_read(cfg: dict) -> Op:
    """The read bandwidth of the two files: every byte copied from the page cache once."""
    for name in (MODEL, MODEL_B):
        warm(cfg, path(cfg, name))
    return lambda: Measured(extras={"bytes": read_files([MODEL, MODEL_B], cfg)})


@case("merge.ours")
def merge_ours(cfg: dict) -> Op:
    from safeckpt.ops.merge import merge

    inputs = [MODEL, MODEL_B, MODEL_C]
    for name in inputs:
        warm(cfg, path(cfg, name))
    largest = max(math.prod(shape) * (4 if dtype == "F32" else 2) for _, shape, dtype in model_spec(cfg["size"]))

    def op():
        merge([path(cfg, name) for name in inputs], cfg["out"], method="linear")
        return Measured(extras={"bytes": _sizes(cfg, inputs) + os.path.getsize(cfg["out"]),
                                "memory_floor": 256 * 1024 * 1024 + 4 * largest})
    return op


@case("merge.io")
def merge_io(cfg: dict) -> Op:
    """Read the three files and write one of them, fsynced: the I/O a merge cannot avoid."""
    inputs = [MODEL, MODEL_B, MODEL_C]
    for name in inputs:
        warm(cfg, path(cfg, name))

    def op():
        read_files(inputs, cfg, out=cfg["out"])
        return Measured(extras={"bytes": _sizes(cfg, inputs) + os.path.getsize(cfg["out"])})
    return op


@case("verify.ours")
def verify_ours(cfg: dict) -> Op:
    """Check a file against its blake3 manifest (written, untimed, just before)."""
    from safeckpt.ops.verify import verify

    verify(path(cfg, MODEL), write=True)
    warm(cfg, path(cfg, MODEL))

    def op():
        report = verify(path(cfg, MODEL))
        assert report.ok, report
        return Measured(extras={"bytes": os.path.getsize(path(cfg, MODEL))})
    return op


@case("verify.sha256")
def verify_sha256(cfg: dict) -> Op:
    """hashlib's sha256 of the same file (the Hub's LFS oid), for reference."""
    import hashlib
    import mmap

    warm(cfg, path(cfg, MODEL))

    def op():
        with open(path(cfg, MODEL), "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            hashlib.sha256(mapped).hexdigest()
        return Measured(extras={"bytes": os.path.getsize(path(cfg, MODEL))})
    return op
