"""Clean, high-resolution renders of each (font, character): the input of the augmenter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Rendered large then scaled so that the glyph's longer side is GLYPH pixels, centred on a
# CANVAS-pixel square: the margin leaves room for thicker strokes. Rotation and shear need no
# margin: the augmenter samples from this canvas with zero padding outside it.
FONT_PX = 96
GLYPH = 44
CANVAS = 64


def render_clean(path: Path, char: str) -> torch.Tensor | None:
    """White-on-black float ``[CANVAS, CANVAS]`` in [0, 1], or None when the render is blank."""
    font = ImageFont.truetype(str(path), FONT_PX)
    left, top, right, bottom = font.getbbox(char)
    img = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(img).text((2 - left, 2 - top), char, fill=255, font=font)
    box = img.getbbox()  # the ink, tighter than the font's advance box
    if box is None:
        return None
    img = img.crop(box)
    w, h = img.size
    scale = GLYPH / max(w, h)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    canvas.paste(img, ((CANVAS - img.width) // 2, (CANVAS - img.height) // 2))
    out = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)
    return out if float(out.max()) > 0.5 else None
