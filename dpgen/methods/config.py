"""Validation of each method's own settings, before any work starts.

The methods' modules (``dpdm.py``, ``dpldm.py``, ...) import Lightning and diffusers; these
checks need neither, so a refusal comes in seconds. Only DP-LDM's ``method.blocks`` is checked
against a built denoiser (the blocks it has), importing diffusers when the key is set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from omegaconf import DictConfig

from dpgen.checks import is_number_in, require_int, require_number, to_plain
from dpgen.data import has_public_data, validate_public_config
from dpgen.errors import ConfigError
from dpgen.models.config import is_latent_model

# DP-LDM's parameter sets (``method.trainable``; what each selects: ``dpldm.py``).
TRAINABLE = ("attention", "attention_only", "transformer", "all")


def check_method_config(cfg: DictConfig) -> None:
    """``method.*`` as ``method.name``'s module needs it (the name itself is already checked)."""
    name = cfg.method.name
    if name == "dpldm":
        _check_dpldm(cfg)
        return
    if is_latent_model(cfg.model):
        raise ConfigError("model", cfg.model.name, f"method {name} denoises pixels, not latents",
                          "use a pixel-space model such as model=unet_small, or method=dpldm")
    if name == "privimage" and cfg.method.pretrain != "selection":
        raise ConfigError("method.pretrain", cfg.method.pretrain, "privimage pretrains on the public selection",
                          "set method.pretrain=selection (or use method=dpdm)")
    if name in ("feta", "feta_privimage"):
        _check_feta(cfg)


def _check_dpldm(cfg: DictConfig) -> None:
    m = cfg.method
    if not is_latent_model(cfg.model):
        raise ConfigError("model", cfg.model.name, "dpldm diffuses in the latent space of an autoencoder",
                          "use a latent model such as model=ldm_small")
    if not has_public_data(cfg.public):
        raise ConfigError("public", cfg.public.name, "dpldm pretrains its autoencoder and latent model on public data",
                          "select a public set, e.g. public=glyphs")
    validate_public_config(cfg.public)
    if m.trainable not in TRAINABLE:
        raise ConfigError("method.trainable", m.trainable, "unknown parameter set", f"use one of {', '.join(TRAINABLE)}")
    if m.get("blocks") is not None:
        if m.trainable == "all":
            raise ConfigError("method.blocks", list(m.blocks), "selects attention blocks, but trainable=all trains every block",
                              "set method.blocks=null, or method.trainable=attention")
        from dpgen.methods.dpldm import attention_blocks, denoiser_from_config

        available = sorted(attention_blocks(denoiser_from_config(cfg, cfg.data.num_classes)))
        wrong = [b for b in m.blocks if b not in available]
        if wrong or not m.blocks:
            problem = f"{wrong[0]} is not a block with attention" if wrong else "names no block"
            raise ConfigError("method.blocks", list(m.blocks), problem, f"choose from {available}")


_ORDER = ("dp_central_images", "warmup", "dp_train")


def _positive(cfg: Mapping, prefix: str, key: str) -> None:
    require_number(cfg, prefix, key, 0, math.inf, low_open=True, high_open=True, fix=f"set {prefix}.{key} > 0")


def _check_central(cfg: DictConfig) -> None:
    c = cfg.method.central
    require_int(c, "method.central", "rounds", minimum=1)
    require_int(c, "method.central", "resolution", minimum=1)
    if c.resolution > cfg.data.image_size:
        raise ConfigError("method.central.resolution", c.resolution,
                          f"exceeds data.image_size={cfg.data.image_size}", "use a resolution <= the image size")
    require_number(c, "method.central", "sample_rate", 0, 1, low_open=True, fix="use e.g. 0.5")
    if c.clip_norm is not None:
        _positive(c, "method.central", "clip_norm")
    if c.get("noise_multiplier") is not None:
        _positive(c, "method.central", "noise_multiplier")
    else:
        require_number(c, "method.central", "budget_fraction", 0, 1, low_open=True, high_open=True,
                       fix="use e.g. 0.2 (DP-SGD gets the rest), or fix method.central.noise_multiplier")
    props = c.get("class_proportions")
    positive = props is not None and all(is_number_in(p, 0, math.inf, low_open=True, high_open=True) for p in props)
    if props is not None and (len(props) != cfg.data.num_classes or not positive):
        raise ConfigError("method.central.class_proportions", list(props),
                          f"must be {cfg.data.num_classes} positive numbers (public class frequencies)",
                          "give one per class, or null for uniform")


def _check_warmup(cfg: DictConfig) -> None:
    w = cfg.method.warmup
    require_int(w, "method.warmup", "batch_size", minimum=1)
    _positive(w, "method.warmup", "lr")
    if not w.curriculum:
        raise ConfigError("method.warmup.curriculum", w.curriculum, "needs at least one phase",
                          "e.g. [{steps: 100, blur: 1.0}, {steps: 100, blur: 0.0}]")
    for i, phase in enumerate(w.curriculum):
        prefix = f"method.warmup.curriculum[{i}]"
        unknown = sorted(set(phase) - {"steps", "blur"})
        if unknown:  # a mistyped "blurr" would run the phase sharp
            raise ConfigError(f"{prefix}.{unknown[0]}", phase[unknown[0]], "is not a phase setting",
                              "give each phase only steps and blur")
        require_int(phase, prefix, "steps", minimum=1)
        if "blur" in phase:
            require_number(phase, prefix, "blur", 0, math.inf, high_open=True, fix="use 0 for sharp images")
    # The warm-up's per-image affine distortion (dpgen.data.curriculum.random_affine): found wrong
    # only when the warm-up starts, after the central images spent their share of ε.
    prefix = "method.warmup.augment"
    a = to_plain(w.augment, prefix)
    require_number(a, prefix, "degrees", 0, 180, fix="use e.g. 15 (0: no rotation)")
    require_number(a, prefix, "shear", 0, 80, fix="use e.g. 10 (0: no shear)")
    require_number(a, prefix, "translate", 0, 1, fix="use e.g. 0.12, a fraction of the image size")
    scale = a.get("scale")
    if (not isinstance(scale, list) or len(scale) != 2
            or not all(is_number_in(v, 0, math.inf, low_open=True, high_open=True) for v in scale)
            or scale[0] > scale[1]):
        raise ConfigError(f"{prefix}.scale", scale, "must be [low, high] with 0 < low <= high",
                          f"e.g. {prefix}.scale=[0.85,1.15] (or [1,1] for no zoom)")


def _check_feta(cfg: DictConfig) -> None:
    """DP-FETA's stages in order, and the settings of those present."""
    stages = list(cfg.method.stages)
    present = [s for s in _ORDER if s in stages]
    if "warmup" in stages and "dp_central_images" not in stages:
        raise ConfigError("method.stages", stages, "warmup trains on central images, but no stage makes them",
                          "put dp_central_images before warmup")
    if [s for s in stages if s in _ORDER] != present:
        raise ConfigError("method.stages", stages, f"stages {present} must run in that order",
                          f"order them as {list(_ORDER)}")
    if "dp_central_images" in stages:
        _check_central(cfg)
    if "warmup" in stages:
        _check_warmup(cfg)
