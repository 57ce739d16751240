"""The ``public=glyphs`` config group: cache and the final dataset (its validation: ``config.py``)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import PIL.features
import torch

from dpgen.data.cache import config_key, load_tensors
from dpgen.data.dataset import DatasetInfo, TensorImageDataset
from dpgen.data.glyphs.config import augment_settings, validate_glyphs_config
from dpgen.data.glyphs.fonts import font_files
from dpgen.data.glyphs.render import render_glyph_set
from dpgen.data.transforms import uint8_to_model
from dpgen.io import save_torch

log = logging.getLogger(__name__)

# Bump whenever rendering changes in a way that changes pixels: old cache entries then miss.
GENERATOR_VERSION = 1
def _generation_spec(cfg: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the rendered pixels (not image_size/channels: applied on load)."""
    return {
        "generator": GENERATOR_VERSION,
        "charset": cfg["charset"],
        "samples_per_class": cfg["samples_per_class"],
        "seed": cfg["seed"],
        "augment": dataclasses.asdict(augment_settings(cfg)),
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
    gs = render_glyph_set(cfg["charset"], cfg["samples_per_class"], cfg["seed"], augment_settings(cfg))
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
