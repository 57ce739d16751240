"""The ``public=glyphs`` config group: validation, cache, and the final dataset."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import PIL.features
import torch

from dpgen.checks import require_choice, require_int, require_number
from dpgen.data.cache import config_key, load_tensors
from dpgen.data.dataset import DatasetInfo, TensorImageDataset
from dpgen.data.glyphs.augment import Augment
from dpgen.data.glyphs.fonts import CHARSETS, font_files
from dpgen.data.glyphs.render import render_glyph_set
from dpgen.data.transforms import uint8_to_model
from dpgen.errors import ConfigError
from dpgen.io import save_torch

log = logging.getLogger(__name__)

# Bump whenever rendering changes in a way that changes pixels: old cache entries then miss.
GENERATOR_VERSION = 1
_P = "public"
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
    _augment(cfg)


def _augment(cfg: dict[str, Any]) -> Augment:
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


def _generation_spec(cfg: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the rendered pixels (not image_size/channels: applied on load)."""
    return {
        "generator": GENERATOR_VERSION,
        "charset": cfg["charset"],
        "samples_per_class": cfg["samples_per_class"],
        "seed": cfg["seed"],
        "augment": dataclasses.asdict(_augment(cfg)),
        # Another matplotlib may ship other fonts, another FreeType rasterises differently.
        "fonts": [[p.name, p.stat().st_size] for p in font_files()],
        "freetype": PIL.features.version("freetype2"),
    }


def glyph_cache_path(cfg: dict[str, Any]) -> Path | None:
    """Where the rendered set for this config is cached (None when caching is off)."""
    if cfg.get("cache_dir") is None:
        return None
    return (
        Path(cfg["cache_dir"]) / f"glyphs-{cfg['charset']}-{config_key(_generation_spec(cfg))}.pt"
    )


def _render(cfg: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    gs = render_glyph_set(cfg["charset"], cfg["samples_per_class"], cfg["seed"], _augment(cfg))
    log.info(
        "rendered %d glyphs from %d fonts in %.1fs",
        len(gs.labels),
        len(gs.fonts),
        time.perf_counter() - start,
    )
    return {
        "images": gs.images,
        "labels": gs.labels,
        "class_names": list(gs.class_names),
        "fonts": list(gs.fonts),
    }


def build_glyphs(cfg: dict[str, Any]) -> TensorImageDataset:
    """The glyph set at ``image_size``/``channels``, rendered once and then read from the cache.

    Rendered at MNIST's 28×28 and resized by the same function as the sensitive MNIST images,
    so both sets go through identical resampling.
    """
    validate_glyphs_config(cfg)
    path = glyph_cache_path(cfg)
    data = load_tensors(path) if path is not None else None
    if data is None:
        data = _render(cfg)
        if path is not None:
            save_torch(path, data)
    names = tuple(data["class_names"])
    info = DatasetInfo("glyphs", len(names), names, cfg["channels"], cfg["image_size"])
    images = uint8_to_model(data["images"], cfg["image_size"], cfg["channels"])
    return TensorImageDataset(images, data["labels"].to(torch.long), info)
