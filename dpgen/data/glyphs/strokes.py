"""Stroke width: measure it on clean renders and change it by grey-scale dilation / erosion.

Fonts range from hairline serifs to heavy bolds while MNIST's pen strokes are fairly uniform,
so instead of adding a random radius to every font we draw a target width per image from an
MNIST-like range and dilate or erode each glyph towards it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CROSS = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
# Erosion removes at most this many pixels per side: more deletes serif hairlines.
MIN_RADIUS = -1
MAX_RADIUS = 6
# Thinning that removes more than this share of the ink broke the glyph; keep it unthinned.
_MAX_INK_LOSS = 0.4


def stroke_width(images: torch.Tensor) -> torch.Tensor:
    """Mean stroke width in pixels of each ``[B, H, W]`` glyph (intensities in [0, 1]).

    A stroke of width w and length L has area w·L and about 2·L boundary pixels, so
    w ≈ 2 · area / boundary. Robust enough to rank fonts and to aim at a target width.
    """
    ink = (images > 0.5).float()[:, None]
    inner = F.conv2d(F.pad(ink, (1, 1, 1, 1)), _CROSS) >= 5  # all 4 neighbours inked
    boundary = (ink > 0) & ~inner
    area = ink.sum(dim=(1, 2, 3))
    return 2.0 * area / boundary.sum(dim=(1, 2, 3)).clamp(min=1)


def _step(x: torch.Tensor, grow: bool) -> torch.Tensor:
    if grow:
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return -F.max_pool2d(-x, 3, stride=1, padding=1)


def stroke_variants(clean: torch.Tensor) -> torch.Tensor:
    """uint8 ``[MAX_RADIUS - MIN_RADIUS + 1, G, H, W]``: each glyph dilated by every radius.

    Computed once per clean glyph rather than per sample (a class has many more samples than
    glyphs). Max/min pooling only selects values, so uint8 storage is exact.
    """
    x = clean[:, None]
    out = [None] * (MAX_RADIUS - MIN_RADIUS + 1)
    out[-MIN_RADIUS] = x
    grown = x
    for r in range(1, MAX_RADIUS + 1):
        grown = _step(grown, grow=True)
        out[r - MIN_RADIUS] = grown
    thin = x
    mass = x.sum(dim=(1, 2, 3))
    for r in range(-1, MIN_RADIUS - 1, -1):
        thin = _step(thin, grow=False)
        broken = thin.sum(dim=(1, 2, 3)) < (1 - _MAX_INK_LOSS) * mass
        out[r - MIN_RADIUS] = torch.where(broken[:, None, None, None], x, thin)
    return torch.stack([v[:, 0] for v in out]).mul(255.0).round_().to(torch.uint8)


def radius_towards(width: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dilation radius that moves strokes of ``width`` towards ``target`` (each step adds 2 px)."""
    r = torch.round((target - width) / 2.0).long()
    return r.clamp_(MIN_RADIUS, MAX_RADIUS)
