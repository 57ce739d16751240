"""Batches for an easy-to-hard warm-up: phases of Gaussian-blurred, randomly distorted images.

A few dozen images (DP-FETA's central images) are all the warm-up has, so every batch is drawn
with replacement and every image gets its own random affine distortion; a phase's blur makes
its images easier (low frequencies only) than the next phase's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class Phase:
    steps: int
    blur: float  # Gaussian sigma in pixels; 0 = sharp


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``[N, C, S, S]`` with a kernel of about 3 sigma (reflect padding)."""
    if sigma <= 0:
        return images
    size = images.shape[-1]
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * size - 1)  # reflect padding needs pad < size
    return TF.gaussian_blur(images, [kernel, kernel], [sigma, sigma])


def random_affine(degrees: float, translate: float, scale: Sequence[float], shear: float,
                  fill: float = -1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image random affine distortion of a ``[N, C, S, S]`` batch (background ``fill``)."""
    transform = v2.RandomAffine(degrees=degrees, translate=(translate, translate), scale=tuple(scale),
                                shear=shear, fill=fill)
    # torchvision draws one set of parameters per call, so a batch is distorted image by image.
    return lambda batch: torch.stack([transform(x) for x in batch])


class CurriculumBatches(IterableDataset):
    """``sum(phase.steps)`` batches ``(images, labels)``: each phase's images blurred by its sigma."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, phases: Sequence[Phase], batch_size: int,
                 augment: Callable[[torch.Tensor], torch.Tensor], seed: int) -> None:
        self.images = images
        self.labels = labels
        self.phases = list(phases)
        self.batch_size = batch_size
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return sum(p.steps for p in self.phases)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed)
        for phase in self.phases:
            blurred = blur(self.images, phase.blur)
            for _ in range(phase.steps):
                idx = torch.randint(len(self.images), (self.batch_size,), generator=g)
                yield self.augment(blurred[idx]), self.labels[idx]
