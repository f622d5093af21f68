"""The tiny LightningModule and data the Lightning tests train on the CPU (imports Lightning and torch)."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, TensorDataset


class TinyModel(LightningModule):
    """Linear-ReLU-Linear on 4 inputs; AdamW (betas a tuple) and StepLR, as real runs configure them."""

    def __init__(self, width: int = 8, lr: float = 0.01, dropout: float = 0.0, namespace=None, config=None):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Dropout(dropout), torch.nn.ReLU(),
                                       torch.nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, betas=(0.8, 0.95))
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5)}


def data(batch_size: int = 8) -> DataLoader:
    """64 fixed samples of y = sum(x), in order."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size)
