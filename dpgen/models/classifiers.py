"""Small image classifiers for downstream-utility evaluation: three families, so a reported
utility is not an artefact of one architecture.

They are trained without privacy (on synthetic data, or on real data as a reference), so
BatchNorm is allowed here; a DP-trained module would be refused by the strategy's validator.
"""

from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head; works at any input size >= 8."""

    def __init__(self, channels: int, num_classes: int, image_size: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * width * 16, 128),
                                  nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: Tensor) -> Tensor:
        return (self.body(x) + self.skip(x)).relu()


class SmallResNet(nn.Module):
    """A ResNet of three stages with one basic block each (widths w, 2w, 4w), global pooling."""

    def __init__(self, channels: int, num_classes: int, image_size: int, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            _BasicBlock(width, width, 1), _BasicBlock(width, 2 * width, 2), _BasicBlock(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MLP(nn.Module):
    """Pixels in, two hidden layers: the family that cannot exploit spatial structure."""

    def __init__(self, channels: int, num_classes: int, image_size: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * image_size**2, hidden), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


CLASSIFIERS: dict[str, type[nn.Module]] = {"cnn": SmallCNN, "resnet": SmallResNet, "mlp": MLP}


def build_classifier(name: str, channels: int, num_classes: int, image_size: int,
                     width: int | None = None) -> nn.Module:
    """``width``: the family's width (CNN/ResNet channels, MLP hidden units); None = its default."""
    if name not in CLASSIFIERS:
        raise ValueError(f"eval.downstream.classifiers: {name!r} is unknown; choose from {sorted(CLASSIFIERS)}")
    if width is None:
        return CLASSIFIERS[name](channels, num_classes, image_size)
    return CLASSIFIERS[name](channels, num_classes, image_size, width)
