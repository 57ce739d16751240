"""DP-FETA (Li et al. 2025): diffusion learnt from easy to hard.

The module is dpdm's: the same objective trains the non-private warm-up on DP central images
and then the DP-SGD stage. What DP-FETA adds are stages (``dpgen/stages/central.py``) and a
mechanism (``dpgen/privacy/class_means.py``); this class checks their configuration.
"""

from __future__ import annotations

from omegaconf import DictConfig

from dpgen.errors import ConfigError
from dpgen.methods.dpdm import DPDMModule

_ORDER = ("dp_central_images", "warmup", "dp_train")


def _positive(key: str, value: object, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ConfigError(key, value, f"must be a positive {'integer' if integer else 'number'}",
                          f"set {key} to a value > 0")


def _check_central(cfg: DictConfig) -> None:
    c = cfg.method.central
    _positive("method.central.rounds", c.rounds, integer=True)
    _positive("method.central.resolution", c.resolution, integer=True)
    if c.resolution > cfg.data.image_size:
        raise ConfigError("method.central.resolution", c.resolution,
                          f"exceeds data.image_size={cfg.data.image_size}", "use a resolution <= the image size")
    if not (isinstance(c.sample_rate, int | float) and 0 < c.sample_rate <= 1):
        raise ConfigError("method.central.sample_rate", c.sample_rate, "must be in (0, 1]", "use e.g. 0.5")
    if c.clip_norm is not None:
        _positive("method.central.clip_norm", c.clip_norm)
    sigma, fraction = c.get("noise_multiplier"), c.get("budget_fraction")
    if sigma is not None:
        _positive("method.central.noise_multiplier", sigma)
    elif not (isinstance(fraction, int | float) and 0 < fraction < 1):
        raise ConfigError("method.central.budget_fraction", fraction, "must be in (0, 1) (DP-SGD gets the rest)",
                          "use e.g. 0.2, or fix method.central.noise_multiplier")
    props = c.get("class_proportions")
    if props is not None and (len(props) != cfg.data.num_classes or any(p <= 0 for p in props)):
        raise ConfigError("method.central.class_proportions", list(props),
                          f"must be {cfg.data.num_classes} positive numbers (public class frequencies)",
                          "give one per class, or null for uniform")


def _check_warmup(cfg: DictConfig) -> None:
    w = cfg.method.warmup
    _positive("method.warmup.batch_size", w.batch_size, integer=True)
    _positive("method.warmup.lr", w.lr)
    if not w.curriculum:
        raise ConfigError("method.warmup.curriculum", w.curriculum, "needs at least one phase",
                          "e.g. [{steps: 100, blur: 1.0}, {steps: 100, blur: 0.0}]")
    for i, phase in enumerate(w.curriculum):
        _positive(f"method.warmup.curriculum[{i}].steps", phase.get("steps"), integer=True)
        blur = phase.get("blur", 0.0)
        if not isinstance(blur, int | float) or blur < 0:
            raise ConfigError(f"method.warmup.curriculum[{i}].blur", blur, "must be a number >= 0",
                              "use 0 for sharp images")


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
