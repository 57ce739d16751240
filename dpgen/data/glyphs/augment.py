"""Batched random distortion and MNIST-style framing of clean glyph renders.

MNIST digits were size-normalised to fit a 20×20 box (keeping the aspect ratio, anti-aliased)
and then placed in a 28×28 image so that their centre of mass sits at the centre. We do the
same after distorting the glyph, so the public images match the sensitive ones in framing.
Distortion and framing are one affine map, so each image is resampled only once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpgen.data.glyphs.raster import CANVAS, GLYPH

MNIST_SIZE = 28
MNIST_BOX = 20
# Framing renders at SUPER× resolution and averages SUPER×SUPER blocks: a box-filter
# antialias, like the anti-aliased size normalisation the NIST digits received.
SUPER = 4
_INK = 0.2  # a pixel counts towards the bounding box above this intensity
MIN_INK_PIXELS = 8  # of 784: fewer bright pixels than this is a failed (blank) render


@dataclass(frozen=True)
class Augment:
    """Ranges of the random distortions, each drawn uniformly per image.

    Overall size is not free: framing rescales every glyph into the 20×20 box, as MNIST did.
    ``scale`` therefore acts per axis (x and y factors in [1-scale, 1+scale]), i.e. it changes
    the aspect ratio. ``translate`` shifts the framed glyph by up to that many pixels of the
    28×28 image. ``stroke_width`` is the range of target stroke widths as a fraction of the
    glyph's longer side; the default was set to cover MNIST digits' stroke widths, by a developer
    looking at MNIST (README, "How the defaults were chosen")."""

    rotation: float = 12.0  # degrees
    shear: float = 0.25  # horizontal shear factor
    scale: float = 0.12
    translate: float = 1.0  # pixels at 28×28
    stroke_width: tuple[float, float] = (0.08, 0.18)
    blur: float = 0.5  # max Gaussian sigma in pixels at 28×28

    NUM_PARAMS = 8  # uniform draws per image, in the order `unpack` reads them

    def unpack(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map uniforms ``[B, 8]`` in [0, 1) to distortion parameters."""

        def sym(col: int, r: float) -> torch.Tensor:
            return (2.0 * u[:, col] - 1.0) * r

        lo, hi = self.stroke_width
        return {
            "angle": sym(0, math.radians(self.rotation)),
            "shear": sym(1, self.shear),
            "sx": 1.0 + sym(2, self.scale),
            "sy": 1.0 + sym(3, self.scale),
            "stroke_px": (lo + (hi - lo) * u[:, 4]) * GLYPH,  # in clean-render pixels
            "tx": sym(5, self.translate),
            "ty": sym(6, self.translate),
            "sigma": u[:, 7] * self.blur,
        }


def _distortion(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, 2, 2]`` rotation · shear · per-axis scale."""
    cos, sin = p["angle"].cos(), p["angle"].sin()
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shear = torch.stack([torch.stack([one, p["shear"]], -1), torch.stack([zero, one], -1)], -2)
    stretch = torch.diag_embed(torch.stack([p["sx"], p["sy"]], -1))
    return rot @ shear @ stretch


def warp_and_frame(x: torch.Tensor, m: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Distort ``[B, 1, CANVAS, CANVAS]`` by ``m`` about the canvas centre, then frame it.

    Framing: the distorted glyph's bounding box is scaled to fit 20×20 and its centre of mass
    is put at the centre of 28×28 plus ``shift`` ([B, 2] pixels at 28×28). Both are computed
    analytically from the undistorted render (an affine map moves the centre of mass and
    the ink's corners with it), so one resampling does everything.
    """
    b = len(x)
    half_in, half_out = CANVAS / 2, MNIST_SIZE * SUPER / 2
    # Pixel centres relative to the canvas centre, [H*W, 2] as (x, y).
    c = torch.arange(CANVAS, dtype=x.dtype) + 0.5 - half_in
    rel = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1).reshape(-1, 2)

    w = x.reshape(b, -1)
    com = (w @ rel) / w.sum(1, keepdim=True).clamp(min=1e-6)  # [B, 2], undistorted
    q_com = (m @ com[:, :, None])[:, :, 0]

    moved = rel[None] @ m.transpose(1, 2)  # [B, H*W, 2] distorted pixel centres
    ink = (w > _INK)[:, :, None]
    lo = torch.where(ink, moved, math.inf).amin(1)
    hi = torch.where(ink, moved, -math.inf).amax(1)
    footprint = m.abs().sum(2)  # a pixel's own extent after distortion, per axis
    extent = (hi - lo + footprint).amax(1).clamp(min=1.0)
    s = MNIST_BOX * SUPER / extent  # output pixels per distorted input pixel

    # Output position o = s (m p - q_com) + half_out + SUPER shift, in pixels relative to the
    # canvas centres. affine_grid wants the inverse in normalised coordinates
    # (align_corners=False: u = p / half), which is p = m^-1 ((o - SUPER shift) / s + q_com).
    inv = torch.linalg.inv(m)
    lin = inv * (half_out / (s * half_in))[:, None, None]
    offset = (inv @ (q_com - SUPER * shift / s[:, None])[:, :, None])[:, :, 0] / half_in
    theta = torch.cat([lin, offset[:, :, None]], dim=2)
    out = MNIST_SIZE * SUPER
    grid = F.affine_grid(theta, [b, 1, out, out], align_corners=False)
    hi_res = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(hi_res, SUPER)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``[B, 1, H, W]`` with its own sigma (0 leaves it unchanged)."""
    radius = 2
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    safe = sigma.clamp(min=1e-3)[:, None]
    kernel = torch.exp(-0.5 * (offsets / safe) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    b, _, h, w = x.shape
    y = x.reshape(1, b, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0)), kernel[:, None, None, :], groups=b)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius)), kernel[:, None, :, None], groups=b)
    return y.reshape(b, 1, h, w)


def augment_and_frame(
    x: torch.Tensor, p: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stroke-adjusted renders ``[B, 1, CANVAS, CANVAS]`` -> MNIST-like ``[B, 1, 28, 28]``.

    Intensities are rescaled so each image's brightest pixel is 1 (MNIST strokes saturate).
    Also returns which images are visible: a faint or tiny result would be rescaled noise.
    """
    shift = torch.stack([p["tx"], p["ty"]], -1)
    y = warp_and_frame(x, _distortion(p), shift)
    y = gaussian_blur(y, p["sigma"])
    peak = y.amax(dim=(1, 2, 3), keepdim=True)
    y = (y / peak.clamp(min=1e-6)).clamp_(0.0, 1.0)
    visible = (peak.flatten() > 0.25) & ((y > 0.5).sum(dim=(1, 2, 3)) >= MIN_INK_PIXELS)
    return y, visible
