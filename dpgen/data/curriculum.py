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
import torch.nn.functional as F
from torch.utils.data import IterableDataset
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
                  fill: float = -1.0) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """Per-image random affine distortion of a ``[N, C, S, S]`` batch, in one resampling.

    Rotation in [-degrees, degrees], horizontal shear angle in [-shear, shear] degrees, zoom in
    ``scale``, shift up to ``translate`` of the image size; pixels from outside are ``fill``.
    (torchvision's RandomAffine draws one set of parameters per call, i.e. per batch.)
    """
    lo, hi = scale

    def apply(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        u = torch.rand(len(x), 5, generator=g, dtype=torch.float64) * 2 - 1
        angle, sh = torch.deg2rad(u[:, 0] * degrees), torch.deg2rad(u[:, 1] * shear)
        zoom = lo + (hi - lo) * (u[:, 2] + 1) / 2
        cos, sin, one, zero = angle.cos(), angle.sin(), torch.ones_like(angle), torch.zeros_like(angle)
        rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        shearing = torch.stack([torch.stack([one, sh.tan()], -1), torch.stack([zero, one], -1)], -2)
        forward = rot @ shearing * zoom[:, None, None]
        shift = 2 * translate * u[:, 3:5]  # normalised coordinates span 2 per image side
        # grid_sample pulls: output point p reads the input at forward^-1 (p - shift).
        inverse = torch.linalg.inv(forward)
        theta = torch.cat([inverse, -(inverse @ shift[:, :, None])], -1).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x - fill, grid, align_corners=False, padding_mode="zeros") + fill

    return apply


class CurriculumBatches(IterableDataset):
    """``sum(phase.steps)`` batches ``(images, labels)``: each phase's images blurred by its sigma."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, phases: Sequence[Phase], batch_size: int,
                 augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor], seed: int) -> None:
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
                yield self.augment(blurred[idx], g), self.labels[idx]
