"""safeckpt inside PyTorch Lightning: `SafeCheckpointIO`, checkpoints that hold no pickle.

    >>> from lightning.pytorch import Trainer
    >>> from lightning.pytorch.callbacks import ModelCheckpoint
    >>> from safeckpt.lightning import SafeCheckpointIO
    >>> trainer = Trainer(plugins=[SafeCheckpointIO()], callbacks=[ModelCheckpoint(save_top_k=2, save_last=True)])
    >>> trainer.fit(model)                        # epoch=0-step=50.ckpt/, last.ckpt/: no pickle anywhere
    >>> trainer.fit(model, ckpt_path="last")      # resumes from last.ckpt/

Every checkpoint Lightning writes through its CheckpointIO -- `ModelCheckpoint`'s top-k,
``last``, every-n-steps/epochs and ``save_weights_only`` ones, and
``trainer.save_checkpoint(path)`` -- becomes a directory under the name Lightning chose
(``epoch=3-step=120.ckpt/``), in the format `CheckpointManager` writes
(`safeckpt.format.checkpoint_dir`): the tensors in ``tensors.safetensors``, everything else
of the checkpoint dict as JSON in ``state.json`` (`safeckpt.training.state`: tuples stay
tuples, int keys ints, OrderedDicts, ``argparse.Namespace``, ``AttributeDict`` and OmegaConf
configs come back as themselves), and the BLAKE3 ``manifest.json`` written last. It is
written under a temporary name and renamed into place, so a crash never leaves half a
checkpoint under the real name; saving again under a name that exists (``last.ckpt``)
replaces the old one only once the new one is complete. `load_checkpoint` checks every file
against the manifest before anything is handed to Lightning.

`load_from_checkpoint(MyModule, path)` does what ``MyModule.load_from_checkpoint(path)`` does
(which calls ``torch.load`` itself, around any CheckpointIO) for these directories and for
pickled ``.ckpt`` files, whose code it never runs.

With ``capture_rng=True`` each checkpoint also holds the global random generators (Python,
numpy, torch, CUDA once used; `safeckpt.torch.rng_state`), and loading it sets them back, so
a resumed run draws what an uninterrupted one would have.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional, Union

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from . import errors
from .format.checkpoint_dir import OUR_FILES, holder, is_checkpoint, open_checkpoint, read_checkpoint
from .format.checkpoint_storage import is_url, stale_temporaries
from .sinks.checkpoint import write_checkpoint
from .training.state import join_state, split_state

#: the key under which ``capture_rng=True`` keeps the random generators in a checkpoint
RNG_KEY = "safeckpt_rng_state"

MapLocation = Union[None, str, Any, dict, Callable]  # as torch.load's: a function takes (storage, location)


class SafeCheckpointIO(CheckpointIO):
    """A Lightning `CheckpointIO` that writes checkpoints as safetensors + JSON directories, never a pickle.

    `verify` checks each file against its BLAKE3 manifest when loading; `capture_rng` saves
    and restores the global random generators with every checkpoint.

    >>> Trainer(plugins=[SafeCheckpointIO()])
    >>> Fabric(plugins=[SafeCheckpointIO()])
    """

    def __init__(self, *, verify: bool = True, capture_rng: bool = False) -> None:
        self.verify = verify
        self.capture_rng = capture_rng

    def save_checkpoint(self, checkpoint: dict[str, Any], path: "os.PathLike | str",
                        storage_options: Optional[Any] = None) -> None:
        """Write `checkpoint` as the directory `path` (the name Lightning chose), atomically."""
        if storage_options is not None:
            raise TypeError(f"`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg is not "
                            f"supported for `{type(self).__name__}`: leave it out")
        if self.capture_rng:
            from .torch import rng_state

            checkpoint = {**checkpoint, RNG_KEY: rng_state()}
        path = os.fspath(path)
        tensors, document = split_state(checkpoint)
        step = checkpoint.get("global_step", 0)
        storage, name = holder(path, create=True)
        if storage.remote and storage.exists(name):
            storage.remove_checkpoint(name, OUR_FILES)  # object stores: un-commit the old one before rewriting
        if not storage.remote:  # what a killed save of this name left (Lightning saves a name at a time)
            for stale in stale_temporaries(storage, name):
                storage.remove_temporary(stale, OUR_FILES)
        staging = storage.begin(name)
        try:
            write_checkpoint(staging, step if isinstance(step, int) and not isinstance(step, bool) else 0,
                             time.time(), {}, tensors, document)
            staging.commit(replace=True)
        except BaseException:
            staging.abort()
            raise

    def load_checkpoint(self, path: "os.PathLike | str", map_location: MapLocation = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """The checkpoint dict saved at `path`, each file checked against its manifest first.

        A pickled ``.ckpt`` (from Lightning's default ``TorchCheckpointIO``) is read with
        `safeckpt.torch.safe_load`: nothing in it is run, and a malicious one raises
        `UnsafeFileError`. `map_location` moves the tensors as torch.load would (a device, a
        device name, a dict from saved to new device names, or a function of
        ``(storage, location)``); `weights_only` changes nothing: nothing here can run code.
        """
        from .torch.unpickle import map_tensors, safe_load

        path = os.fspath(path)
        if is_checkpoint(path):
            storage, info, manifest = open_checkpoint(path)
            tensors, document = read_checkpoint(storage, info, manifest, verify=self.verify)
            checkpoint = map_tensors(join_state(tensors, document), map_location)
        elif is_url(path):
            raise errors.CheckpointError("is not a safeckpt checkpoint directory (a pickled .ckpt is read from "
                                         "local files only)", path=path)
        elif not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        else:  # a .ckpt saved by TorchCheckpointIO: read by the restricted pickle machine, never run
            checkpoint = safe_load(path, map_location=map_location)
            if not isinstance(checkpoint, dict):
                raise errors.CheckpointError(f"holds a {type(checkpoint).__name__}, not a checkpoint dict", path=path)
        rng = checkpoint.pop(RNG_KEY, None) if isinstance(checkpoint, dict) else None
        if rng is not None and self.capture_rng:
            from .torch import set_rng_state

            set_rng_state(rng)
        return checkpoint

    def remove_checkpoint(self, path: "os.PathLike | str") -> None:
        """Delete the checkpoint at `path`: the manifest first (it stops being a checkpoint), then the rest."""
        path = os.fspath(path)
        storage, name = holder(path)
        if is_checkpoint(path):
            storage.remove_checkpoint(name, OUR_FILES)
        elif storage.remote or not os.path.lexists(path):
            return
        elif os.path.isdir(path) and not os.path.islink(path):
            storage.remove_temporary(name, OUR_FILES)  # only files we write; a folder of anything else stays
        else:
            os.unlink(path)  # a file Lightning saved itself (an old pickled .ckpt) or its last.ckpt link

    def teardown(self) -> None:
        """Nothing is held between calls."""


def load_from_checkpoint(cls: type, checkpoint_path: "os.PathLike | str", map_location: MapLocation = None,
                         strict: Optional[bool] = None, **kwargs: Any) -> Any:
    """What ``cls.load_from_checkpoint(path)`` does, without running anything from the file.

    `checkpoint_path` is a checkpoint `SafeCheckpointIO` wrote or a pickled ``.ckpt``
    (read by the restricted pickle machine: a malicious one raises `UnsafeFileError`).

    (Lightning's own ``load_from_checkpoint`` bypasses the CheckpointIO and calls ``torch.load``.)
    The module (or data module) is built from the saved hyperparameters, updated with
    `kwargs`, and given the saved state; files are checked against the manifest first. A
    checkpoint whose hyperparameters name an ``_instantiator`` (LightningCLI's) is refused:
    safeckpt never imports a name read from a file; build the module yourself and load its
    ``state_dict`` instead.

    >>> model = load_from_checkpoint(MyModule, "checkpoints/last.ckpt", map_location="cpu", lr=0.01)
    """
    from lightning.pytorch import LightningModule
    from lightning.pytorch.core.saving import _load_state

    checkpoint = SafeCheckpointIO().load_checkpoint(checkpoint_path, map_location=map_location)
    hparams = checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})
    if "_instantiator" in hparams or "_instantiator" in kwargs:
        raise errors.UnsafeFileError(
            "the hyperparameters ask for the module to be built by an instantiator named in the file "
            f"({hparams.get('_instantiator', kwargs.get('_instantiator'))!r}); safeckpt never imports a name read "
            "from a file: build the module yourself and load checkpoint['state_dict'] into it",
            path=os.fspath(checkpoint_path))
    hparams.update(kwargs)
    if not issubclass(cls, LightningModule):
        return _load_state(cls, checkpoint, **kwargs)
    model = _load_state(cls, checkpoint, strict=strict, **kwargs)
    tensors = [value for value in checkpoint.get("state_dict", {}).values() if hasattr(value, "device")]
    return model.to(tensors[0].device) if tensors else model


__all__ = ["SafeCheckpointIO", "load_from_checkpoint", "RNG_KEY"]
