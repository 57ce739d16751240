"""Small image classifiers for downstream-utility evaluation (GroupNorm-free plain nets)."""

from __future__ import annotations

from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head; works at any input size >= 8."""

    def __init__(self, channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * width * 16, 128),
                                  nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


CLASSIFIERS = {"cnn": SmallCNN}


def build_classifier(name: str, channels: int, num_classes: int) -> nn.Module:
    if name not in CLASSIFIERS:
        raise ValueError(f"eval.classifier={name!r}: unknown; choose from {sorted(CLASSIFIERS)}")
    return CLASSIFIERS[name](channels, num_classes)
