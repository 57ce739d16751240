"""Which of matplotlib's shipped fonts can draw which characters.

A font's character map alone is not enough: matplotlib ships TeX fonts (cmex10, cmsy10, cmmi10)
whose cmap maps '0'..'9' and letters to math symbols or old-style figures, and LastResort,
which maps every code point to a placeholder box. We therefore also require the glyph's
PostScript name to be the character's standard name (Adobe Glyph List, or uniXXXX), and the
glyph to have an outline.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import matplotlib
from fontTools.agl import UV2AGL
from fontTools.ttLib import TTFont


def font_dir() -> Path:
    """The TTF fonts shipped inside the matplotlib wheel (no system fonts: reproducible)."""
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_files() -> list[Path]:
    return sorted(font_dir().glob("*.ttf"))


def _standard_names(char: str) -> set[str]:
    cp = ord(char)
    names = {f"uni{cp:04X}", f"u{cp:04X}"}
    if cp in UV2AGL:
        names.add(UV2AGL[cp])
    return names


@functools.cache
def drawable_chars(path: Path, chars: str) -> str:
    """The characters of ``chars`` that the font at ``path`` really draws (in order).

    Cached: parsing the fonts takes most of a second and their files do not change.
    """
    # fontTools warns about the TeX fonts' 1970 'created' timestamps: noise, not a problem.
    log = logging.getLogger("fontTools")
    level = log.level
    log.setLevel(logging.ERROR)
    font = TTFont(path, lazy=True)
    try:
        cmap = font.getBestCmap() or {}
        # Fonts without glyph names (post table format 3) can only be judged by their cmap.
        named = "post" in font and font["post"].formatType != 3
        glyf = font.get("glyf")
        keep = []
        for ch in chars:
            name = cmap.get(ord(ch))
            if name is None or (named and name not in _standard_names(ch)):
                continue
            if glyf is not None and glyf[name].numberOfContours == 0:
                continue  # an empty outline renders blank
            keep.append(ch)
        return "".join(keep)
    finally:
        font.close()
        log.setLevel(level)


def usable_fonts(chars: str) -> dict[Path, str]:
    """Font file -> the characters of ``chars`` it draws; fonts that draw none are dropped."""
    found = {path: drawable_chars(path, chars) for path in font_files()}
    return {path: have for path, have in found.items() if have}
