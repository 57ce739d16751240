"""DP-FETA (Li et al. 2025): diffusion learnt from easy to hard.

The module is dpdm's: the same objective trains the non-private warm-up on DP central images
and then the DP-SGD stage. What DP-FETA adds are stages (``dpgen/stages/central.py``) and a
mechanism (``dpgen/privacy/class_means.py``); this class checks their configuration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from omegaconf import DictConfig

from dpgen.checks import is_number_in, require_int, require_number
from dpgen.errors import ConfigError
from dpgen.methods.dpdm import DPDMModule

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
        require_int(phase, f"method.warmup.curriculum[{i}]", "steps", minimum=1)
        if "blur" in phase:
            require_number(phase, f"method.warmup.curriculum[{i}]", "blur", 0, math.inf, high_open=True,
                           fix="use 0 for sharp images")


class FETAModule(DPDMModule):
    """dpdm's diffusion module, warmed up on central images before DP-SGD."""

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
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
