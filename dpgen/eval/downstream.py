"""Downstream utility: train classifiers on labelled images, test them once on held-out real images.

Training and testing are separate functions on purpose. :func:`train_classifiers` receives the
training images only; early stopping and the choice of epoch use a validation split carved
from *those* images (the synthetic samples, for a generator's utility). The held-out real
split reaches :func:`final_accuracy` alone, which reads it in one pass for the final numbers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from dpgen.models.classifiers import build_classifier


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    val_fraction: float = 0.1
    patience: int | None = None  # epochs without validation gain before stopping; None = never
    width: int | None = None  # the family's width (models/classifiers.py); None = its default
    augment: bool = False  # random shifts of up to MAX_SHIFT pixels during training
    device: str = "cpu"  # where the classifier trains (a run's GPU: dpgen.distributed.sampling_device)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], device: str = "cpu") -> TrainSettings:
        return cls(**{k: cfg[k] for k in ("epochs", "batch_size", "lr", "val_fraction", "patience")}, device=device)


MAX_SHIFT = 2


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int = MAX_SHIFT) -> Tensor:
    """Each image translated by a whole number of pixels in [-max_shift, max_shift] per axis,
    borders repeated (so the background stays the background)."""
    n, _, h, w = x.shape
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).float()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2], theta[:, 1, 2] = 2 * shift[:, 0] / w, 2 * shift[:, 1] / h
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False).to(x.device)
    return nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)


@dataclass
class TrainedClassifier:
    name: str
    model: nn.Module
    val_accuracy: float  # on the validation split carved from the training images
    best_epoch: int
    epochs_run: int


def _accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    return correct / max(total, 1)


def validation_size(n: int, val_fraction: float) -> int:
    """How many of ``n`` training images :func:`train_classifier` holds out for validation."""
    return max(1, int(round(val_fraction * n)))


def train_classifier(images: Tensor, labels: Tensor, num_classes: int, name: str,
                     settings: TrainSettings, seed: int = 0, progress: bool = True) -> TrainedClassifier:
    """The model at its best epoch on a validation split of ``images`` (no other data is seen)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    n_val = validation_size(len(images), settings.val_fraction)
    val, tr = perm[:n_val], perm[n_val:]
    torch.manual_seed(seed)
    model = build_classifier(name, images.shape[1], num_classes, images.shape[-1], settings.width).to(settings.device)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    # drop_last: a final batch of one example would break BatchNorm's training statistics.
    train_loader = DataLoader(TensorDataset(images[tr], labels[tr]), batch_size=settings.batch_size,
                              shuffle=True, generator=g, drop_last=len(tr) > settings.batch_size)
    val_loader = DataLoader(TensorDataset(images[val], labels[val]), batch_size=256)
    best_acc, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    bar = tqdm(range(settings.epochs), desc=f"downstream {name}", disable=not progress, leave=False)
    epoch = 0
    for epoch in bar:
        model.train()
        for x, y in train_loader:
            x, y = x.to(settings.device), y.to(settings.device)
            if settings.augment:
                x = random_shift(x, g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        val_acc = _accuracy(model, val_loader)
        bar.set_postfix(val_acc=f"{val_acc:.3f}")
        if val_acc > best_acc:
            best_acc, best_epoch, best_state = val_acc, epoch, copy.deepcopy(model.state_dict())
        elif settings.patience is not None and epoch - best_epoch >= settings.patience:
            break
    model.load_state_dict(best_state)
    model.cpu().eval()  # its readers (held-out accuracy, the utility study) run on the CPU
    return TrainedClassifier(name, model, best_acc, best_epoch, epoch + 1)


def train_classifiers(images: Tensor, labels: Tensor, num_classes: int, names: Sequence[str],
                      settings: TrainSettings, seed: int = 0, progress: bool = True) -> list[TrainedClassifier]:
    return [train_classifier(images, labels, num_classes, n, settings, seed, progress) for n in names]


def final_accuracy(classifiers: Sequence[TrainedClassifier], test_set: Dataset) -> dict[str, float]:
    """Accuracy of each classifier on ``test_set`` and their ``mean``, in a single pass over it."""
    correct = dict.fromkeys((c.name for c in classifiers), 0)
    total = 0
    with torch.no_grad():
        for x, y in DataLoader(test_set, batch_size=256):
            for c in classifiers:
                correct[c.name] += (c.model(x).argmax(1) == y).sum().item()
            total += len(y)
    acc = {name: n / max(total, 1) for name, n in correct.items()}
    if acc:
        acc["mean"] = sum(acc.values()) / len(acc)
    return acc
