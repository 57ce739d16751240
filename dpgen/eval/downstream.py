"""Downstream utility: train on labelled synthetic images, test once on held-out real images.

Model choice (early stopping) uses a validation split carved from the *synthetic* data only;
the real held-out split is read exactly once, for the final number.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from dpgen.models.classifiers import build_classifier


@dataclass
class DownstreamResult:
    accuracy: float
    val_accuracy: float
    best_epoch: int


def _accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / max(total, 1)


def train_classifier(
    images: Tensor, labels: Tensor, num_classes: int, classifier: str = "cnn", epochs: int = 8,
    batch_size: int = 64, lr: float = 1e-3, val_fraction: float = 0.1, seed: int = 0,
    progress: bool = True,
) -> tuple[nn.Module, float, int]:
    """Returns (model at the best synthetic-validation epoch, that accuracy, the epoch)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    n_val = max(1, int(round(val_fraction * len(images))))
    val, tr = perm[:n_val], perm[n_val:]
    torch.manual_seed(seed)
    model = build_classifier(classifier, images.shape[1], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train_loader = DataLoader(TensorDataset(images[tr], labels[tr]), batch_size=batch_size,
                              shuffle=True, generator=g)
    val_loader = DataLoader(TensorDataset(images[val], labels[val]), batch_size=256)
    best = (-1.0, 0, copy.deepcopy(model.state_dict()))
    for epoch in tqdm(range(epochs), desc=f"downstream {classifier}", disable=not progress):
        model.train()
        for x, y in train_loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        val_acc = _accuracy(model, val_loader)
        if val_acc > best[0]:
            best = (val_acc, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    return model, best[0], best[1]


def downstream_accuracy(
    images: Tensor, labels: Tensor, test_set: Dataset, num_classes: int, **kwargs,
) -> DownstreamResult:
    """Train on (images, labels); report accuracy on ``test_set`` (read once, at the end)."""
    model, val_acc, epoch = train_classifier(images, labels, num_classes, **kwargs)
    test_acc = _accuracy(model, DataLoader(test_set, batch_size=256))
    return DownstreamResult(accuracy=test_acc, val_accuracy=val_acc, best_epoch=epoch)
