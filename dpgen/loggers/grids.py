"""Sample grids (one row per class): the final ``samples.png`` and previews during training."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from torchvision.utils import save_image

from dpgen.io import atomic_write


def save_grid(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
              per_row: int = 10) -> None:
    """A PNG grid of images in [-1, 1]: row c holds the first ``per_row`` images of class c."""
    rows = []
    for c in range(num_classes):
        picked = images[labels == c][:per_row]
        pad = torch.full((per_row - len(picked), *images.shape[1:]), -1.0)
        rows.append(torch.cat([picked, pad]))
    grid = torch.cat(rows)

    atomic_write(path, lambda f: save_image((grid + 1) / 2, f, nrow=per_row, padding=1, format="png"))


class SampleGridCallback(Callback):
    """Every ``every_n_steps`` optimizer steps, a grid sampled from the current weights.

    Written as ``<out_dir>/step_<n>.png`` and logged to W&B when a WandbLogger is attached.
    Cheap by design (few images, few DDIM steps, no guidance): it is a preview, not a metric.
    Under DP-SGD every intermediate model is covered by the guarantee (the accountant composes
    all steps), so sampling it is post-processing and costs no privacy.
    """

    def __init__(self, out_dir: str | os.PathLike, every_n_steps: int, num_classes: int,
                 per_class: int = 4, steps: int = 10) -> None:
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.num_classes = num_classes
        self.per_class = per_class
        self.steps = steps
        self._last_step = -1

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        labels = torch.arange(self.num_classes).repeat_interleave(self.per_class)
        # A fixed seed: successive grids differ only because the model changed.
        images = pl_module.sample(labels, self.steps, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                                  batch_size=len(labels), progress=False)
        path = self.out_dir / f"step_{step:06d}.png"
        save_grid(path, images, labels, self.num_classes, per_row=self.per_class)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [str(path)], step=step, caption=[f"step {step}"])
