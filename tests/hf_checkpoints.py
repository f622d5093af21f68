"""Real Hugging Face checkpoint folders, made on the CPU in a few seconds, for the tests that turn them pickle-free.

``trainer_checkpoint`` runs ``transformers.Trainer`` on a two-layer BERT with a 32-word vocabulary and returns the
``checkpoint-N/`` folder it saved: ``model.safetensors`` and ``config.json`` beside ``optimizer.pt``,
``scheduler.pt``, ``rng_state.pth`` (torch zips), ``training_args.bin`` (a torch zip holding a pickled
``TrainingArguments``) and ``trainer_state.json``. ``scaler.pt`` is written only by fp16 runs on a GPU.

``accelerate_state`` runs ``accelerate.Accelerator(cpu=True)`` on a tiny MLP and returns the ``save_state`` folder:
``model.safetensors``, ``optimizer.bin``, ``scheduler.bin`` (torch zips), ``random_states_0.pkl`` and
``custom_checkpoint_0.pkl`` (torch zips too, despite the name). accelerate writes ``sampler.bin`` only for an
``IterableDatasetShard`` with a seedable sampler, so not here.

Nothing is downloaded (no ``from_pretrained``, no hub calls): models are built from configs, data are tensors in
memory, so no ``HF_HUB_OFFLINE`` is needed.

    >>> sorted(p.name for p in trainer_checkpoint(tmp_path).iterdir())
    ['config.json', 'model.safetensors', 'optimizer.pt', 'rng_state.pth', 'scheduler.pt', 'trainer_state.json',
     'training_args.bin']
"""

from __future__ import annotations

from pathlib import Path

import pytest


class StepCounter:
    """A custom object registered for checkpointing: accelerate pickles its state_dict to custom_checkpoint_0.pkl."""

    def __init__(self):
        self.steps = 0

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


def trainer_checkpoint(tmp_path: Path) -> Path:
    """Train a tiny BERT classifier for 4 steps with ``save_steps=4``; return ``tmp_path/run/checkpoint-4``.

        >>> sorted(p.name for p in trainer_checkpoint(tmp_path).iterdir())
        ['config.json', 'model.safetensors', 'optimizer.pt', 'rng_state.pth', 'scheduler.pt', ...]
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer requires it
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", max_steps=4, save_steps=4,
        per_device_train_batch_size=4, learning_rate=1e-3, logging_strategy="no", dataloader_num_workers=0,
        seed=0, disable_tqdm=True)
    sentences = torch.randint(0, 32, (16, 8))  # labelled by the parity of their first token
    dataset = [{"input_ids": ids, "labels": ids[0] % 2} for ids in sentences]
    transformers.Trainer(model=model, args=args, train_dataset=dataset).train()
    return tmp_path / "run" / "checkpoint-4"


def accelerate_state(tmp_path: Path) -> Path:
    """Take 2 AdamW steps under ``Accelerator(cpu=True)`` with a StepLR and a registered ``StepCounter``;
    return the ``save_state`` folder ``tmp_path/state``.

        >>> sorted(p.name for p in accelerate_state(tmp_path).iterdir())
        ['custom_checkpoint_0.pkl', 'model.safetensors', 'optimizer.bin', 'random_states_0.pkl', ...]
    """
    torch = pytest.importorskip("torch")
    accelerate = pytest.importorskip("accelerate")
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.randn(16, 4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)
    accelerator = accelerate.Accelerator(cpu=True)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    counter = StepCounter()
    accelerator.register_for_checkpointing(counter)
    for inputs, targets in loader:
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        counter.steps += 1
    folder = tmp_path / "state"
    accelerator.save_state(str(folder))
    return folder
