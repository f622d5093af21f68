"""A tiny deterministic training run, split in two: the resume test's shared code and its child.

As a script it is the second half of an interrupted run, in a fresh process::

    python resume_child.py CONFIG CHECKPOINT_DIR OUT_DIR

It builds fresh objects (from another seed, so only the restore can make them
right), restores the checkpoint the test saved in CHECKPOINT_DIR, trains
STEPS - STEPS // 2 steps, and writes to OUT_DIR ``losses.json``,
``weights.safetensors`` and its final training state (``state.safetensors`` +
``state.json``), all without pickle.

Every RNG is drawn from each step: torch (batch indices, dropout), numpy's
legacy generator (input noise) and Python's `random` (target scale), so a
resume that restores any of them wrongly diverges.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

import safeckpt
from safeckpt.torch import restore_training_state, training_state
from safeckpt.training import join_state, split_state

CONFIGS = ("sgd_momentum", "adam", "adamw_cosine", "sgd_scaler")
STEPS = 20
BATCH, FEATURES, HIDDEN = 8, 6, 16


def settle() -> None:
    """The same arithmetic in every process: one thread, deterministic kernels."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed synthetic regression data, from a private generator (no global RNG drawn)."""
    rng = np.random.default_rng(7)
    inputs = rng.standard_normal((64, FEATURES)).astype(np.float32)
    targets = (inputs @ rng.standard_normal((FEATURES, 1)) + 0.1).astype(np.float32)
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def build(config: str):
    """(model, optimizer, scheduler, scaler) for a config; the model's weights come from torch's RNG."""
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(0.25),
                                torch.nn.Linear(HIDDEN, 1))
    scheduler = scaler = None
    if config in ("sgd_momentum", "sgd_scaler"):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    elif config == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.99))
    elif config == "adamw_cosine":
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.05, amsgrad=True)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS, eta_min=1e-4)
    else:
        raise ValueError(f"unknown config {config!r}")
    if config == "sgd_scaler":
        # Grows the scale every 3 clean steps, so its growth tracker matters across the resume.
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    return model, optimizer, scheduler, scaler


def train(parts, data, steps: int) -> list[float]:
    model, optimizer, scheduler, scaler = parts
    inputs, targets = data
    model.train(True)
    losses = []
    for _ in range(steps):
        index = torch.randint(0, len(inputs), (BATCH,))
        noise = torch.from_numpy(np.random.normal(0.0, 0.05, (BATCH, FEATURES)).astype(np.float32))
        scale = 1.0 + 0.1 * random.random()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(inputs[index] + noise), targets[index] * scale)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def save_state(state, directory: Path) -> None:
    tensors, document = split_state(state)
    safeckpt.save_file(tensors, directory / "state.safetensors")
    (directory / "state.json").write_text(json.dumps(document, allow_nan=False))


def load_state(directory: Path):
    tensors = safeckpt.load_file(directory / "state.safetensors")
    return join_state(tensors, json.loads((directory / "state.json").read_text()))


def main(config: str, checkpoint: Path, out: Path) -> None:
    settle()
    seed_everything(999)
    parts = build(config)
    extra = restore_training_state(load_state(checkpoint), *parts)
    losses = train(parts, make_data(), STEPS - extra["done"])
    (out / "losses.json").write_text(json.dumps(losses))
    safeckpt.save_file(parts[0].state_dict(), out / "weights.safetensors")
    save_state(training_state(*parts, extra={"done": STEPS}), out)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
