"""Render a labelled glyph set: which fonts draw each class, random draws, batched augmentation."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dpgen.data.glyphs.augment import Augment, augment_and_frame
from dpgen.data.glyphs.config import CHARSETS
from dpgen.data.glyphs.fonts import usable_fonts
from dpgen.data.glyphs.raster import render_clean
from dpgen.data.glyphs.strokes import MIN_RADIUS, radius_towards, stroke_variants, stroke_width

log = logging.getLogger(__name__)

# Images processed per batch: bounds peak memory (the framing pass works at 112×112).
_BATCH = 1024
# A blank render is redrawn with fresh random parameters at most this many times.
_RETRIES = 4


@dataclass(frozen=True)
class GlyphSet:
    images: torch.Tensor  # uint8 [N, 1, 28, 28], white on black
    labels: torch.Tensor  # int64 [N]
    class_names: tuple[str, ...]
    fonts: tuple[str, ...]  # file names of the fonts that contributed


def render_glyph_set(charset: str, samples_per_class: int, seed: int, aug: Augment) -> GlyphSet:
    """``samples_per_class`` MNIST-framed renders of every character of ``charset``.

    Each class cycles through the fonts that draw it (from a random offset), so fonts are
    equally represented within a class. All randomness comes from one generator seeded with
    ``seed`` and is drawn before any batching, so the result does not depend on ``_BATCH``.
    """
    chars = CHARSETS[charset]
    fonts = usable_fonts(chars)
    clean: list[torch.Tensor] = []
    sources: dict[str, list[int]] = {ch: [] for ch in chars}  # char -> indices into `clean`
    used: set[str] = set()
    for path, have in fonts.items():
        for ch in have:
            img = render_clean(path, ch)
            if img is not None:  # a blank clean render is dropped like a missing glyph
                sources[ch].append(len(clean))
                clean.append(img)
                used.add(path.name)
    missing = [ch for ch in chars if not sources[ch]]
    if missing:
        raise RuntimeError(f"no shipped font draws {missing!r}; matplotlib's fonts changed?")
    stack = torch.stack(clean)
    widths = stroke_width(stack)
    variants = stroke_variants(stack)

    gen = torch.Generator().manual_seed(seed)
    source_idx, labels = [], []
    for label, ch in enumerate(chars):
        options = torch.tensor(sources[ch])
        offset = int(torch.randint(len(options), (1,), generator=gen))
        picks = (offset + torch.arange(samples_per_class)) % len(options)
        source_idx.append(options[picks])
        labels.append(torch.full((samples_per_class,), label, dtype=torch.long))
    src = torch.cat(source_idx)
    uniforms = torch.rand(len(src), Augment.NUM_PARAMS, generator=gen)

    images = torch.empty(len(src), 1, 28, 28, dtype=torch.uint8)
    todo = torch.arange(len(src))
    for _ in range(_RETRIES + 1):
        failed = []
        for start in range(0, len(todo), _BATCH):
            idx = todo[start : start + _BATCH]
            glyph = src[idx]
            p = aug.unpack(uniforms[idx])
            level = radius_towards(widths[glyph], p["stroke_px"]) - MIN_RADIUS
            x = variants[level, glyph][:, None].to(torch.float32).div_(255.0)
            out, visible = augment_and_frame(x, p)
            images[idx] = out.mul(255.0).round_().to(torch.uint8)
            failed.append(idx[~visible])
        todo = torch.cat(failed)
        if len(todo) == 0:
            break
        log.debug("re-rendering %d blank glyphs", len(todo))
        uniforms[todo] = torch.rand(len(todo), Augment.NUM_PARAMS, generator=gen)
    else:
        raise RuntimeError(f"{len(todo)} glyph renders stayed blank after {_RETRIES} retries")

    return GlyphSet(images, torch.cat(labels), tuple(chars), tuple(sorted(used)))
