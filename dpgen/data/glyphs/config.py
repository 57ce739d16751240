"""Validation of ``public=glyphs`` settings, apart from the renderer (which imports torchvision):
a refused config should not wait for it."""

from __future__ import annotations

import dataclasses
import string
from pathlib import Path
from typing import Any

from dpgen.checks import require_choice, require_int, require_number
from dpgen.data.glyphs.augment import Augment
from dpgen.errors import ConfigError

_P = "public"

# Digits first in every charset so that label d is digit d, as in MNIST.
CHARSETS: dict[str, str] = {
    "digits": string.digits,
    "letters": string.ascii_uppercase + string.ascii_lowercase,
    "alnum": string.digits + string.ascii_uppercase + string.ascii_lowercase,
}
_AUGMENT_KEYS = tuple(f.name for f in dataclasses.fields(Augment))


def validate_glyphs_config(cfg: dict[str, Any]) -> None:
    require_choice(cfg, _P, "charset", CHARSETS)
    require_int(cfg, _P, "samples_per_class", minimum=1)
    require_int(cfg, _P, "seed")
    require_int(cfg, _P, "image_size", minimum=1)
    require_choice(cfg, _P, "channels", (1, 3))
    cache_dir = cfg.get("cache_dir")
    if cache_dir is not None and not isinstance(cache_dir, (str, Path)):
        raise ConfigError(
            f"{_P}.cache_dir",
            cache_dir,
            "must be a path or null",
            "set a directory, or null to render without caching",
        )
    augment_settings(cfg)


def augment_settings(cfg: dict[str, Any]) -> Augment:
    """The ``public.augment`` overrides on top of the defaults of :class:`Augment`."""
    given = cfg.get("augment") or {}
    prefix = f"{_P}.augment"
    unknown = sorted(set(given) - set(_AUGMENT_KEYS))
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]}",
            given[unknown[0]],
            "is not a known distortion",
            f"use only {', '.join(_AUGMENT_KEYS)}",
        )
    limits = {"rotation": 180.0, "shear": 1.0, "scale": 0.9, "translate": 4.0, "blur": 3.0}
    values: dict[str, Any] = {
        k: require_number(given, prefix, k, 0.0, hi) for k, hi in limits.items() if k in given
    }
    if "stroke_width" in given:
        sw = given["stroke_width"]
        if not (
            isinstance(sw, (list, tuple))
            and len(sw) == 2
            and all(isinstance(v, (int, float)) for v in sw)
            and 0 < sw[0] <= sw[1] < 0.5
        ):
            raise ConfigError(
                f"{prefix}.stroke_width",
                sw,
                "must be [low, high] with 0 < low <= high < 0.5",
                "e.g. [0.08, 0.18] (fractions of glyph size)",
            )
        values["stroke_width"] = (float(sw[0]), float(sw[1]))
    return Augment(**values)
