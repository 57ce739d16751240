"""Validation of the ``model`` config group, and the shapes it implies, without importing
diffusers (which the builders in ``unet.py`` and ``ldm.py`` need): a refused config should not
wait seconds for it.

A latent model config (``conf/model/ldm_*.yaml``) has ``kind: latent`` and two sections,
``autoencoder`` and ``unet``; pixel-space UNets have no ``kind``.
"""

from __future__ import annotations

from typing import Any

from dpgen.errors import ConfigError


def downsampling_factor(model_cfg: dict) -> int:
    return 2 ** (len(model_cfg["block_out_channels"]) - 1)


def validate_model_config(model_cfg: dict, image_size: int, size_key: str = "data.image_size") -> None:
    """A pixel UNet's config, at the images of ``image_size``, the value of ``size_key`` (a tool
    with its own size key, ``make bench``'s ``bench.image_size``, names it in the error)."""
    factor = downsampling_factor(model_cfg)
    if image_size % factor:
        raise ConfigError(size_key, image_size,
                          f"model {model_cfg['name']} downsamples {factor}x and needs a multiple of {factor}",
                          f"use {size_key}={max(factor, image_size // factor * factor)} or a model with "
                          "fewer blocks")
    n = len(model_cfg["block_out_channels"])
    for key in ("down_block_types", "up_block_types"):
        if len(model_cfg[key]) != n:
            raise ConfigError(f"model.{key}", list(model_cfg[key]),
                              f"needs one entry per block ({n})", "match model.block_out_channels")
    groups = model_cfg["norm_num_groups"]
    if any(c % groups for c in model_cfg["block_out_channels"]):
        raise ConfigError("model.norm_num_groups", groups, "must divide every block width",
                          "pick a divisor of model.block_out_channels")


LATENT = "latent"


def is_latent_model(model_cfg: Any) -> bool:
    return model_cfg.get("kind") == LATENT


def autoencoder_factor(model_cfg: dict) -> int:
    """Image size / latent size: every encoder block but the last halves the resolution."""
    return 2 ** (len(model_cfg["autoencoder"]["block_out_channels"]) - 1)


def latent_shape(model_cfg: dict, image_size: int) -> tuple[int, int, int]:
    size = image_size // autoencoder_factor(model_cfg)
    return model_cfg["autoencoder"]["latent_channels"], size, size


def validate_ldm_config(model_cfg: dict, image_size: int, size_key: str = "data.image_size") -> None:
    """A latent model's config, at the images of ``image_size`` (see :func:`validate_model_config`)."""
    ae, unet, name = model_cfg["autoencoder"], model_cfg["unet"], model_cfg["name"]
    total = autoencoder_factor(model_cfg) * 2 ** (len(unet["block_out_channels"]) - 1)
    if image_size % total:
        raise ConfigError(size_key, image_size,
                          f"model {name} (autoencoder and latent UNet together) downsamples {total}x "
                          f"and needs a multiple of {total}",
                          f"use {size_key}={max(total, image_size // total * total)} or fewer blocks")
    n = len(unet["block_out_channels"])
    for key in ("down_block_types", "up_block_types"):
        if len(unet[key]) != n:
            raise ConfigError(f"model.unet.{key}", list(unet[key]), f"needs one entry per block ({n})",
                              "match model.unet.block_out_channels")
    for part, cfg in (("autoencoder", ae), ("unet", unet)):
        groups = cfg["norm_num_groups"]
        if any(c % groups for c in cfg["block_out_channels"]):
            raise ConfigError(f"model.{part}.norm_num_groups", groups, "must divide every block width",
                              f"pick a divisor of model.{part}.block_out_channels")
