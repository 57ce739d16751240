"""Validation of the ``sampling`` config group, before any work starts."""

from __future__ import annotations

from typing import Any

from dpgen.checks import require_choice, require_int, require_number, to_plain
from dpgen.errors import ConfigError

SAMPLING = ("default", "cpsample")
# The stages each scheme runs before ``sample`` (``sampling.stages``, set by its config file).
STAGES_BEFORE_SAMPLE = {"default": [], "cpsample": ["train_protection_classifier"]}


def validate_sampling_config(cfg: Any, latent_model: bool) -> None:
    """``cfg`` is the ``sampling`` node; ``latent_model`` whether the generator diffuses latents."""
    s = to_plain(cfg, "sampling")
    name = require_choice(s, "sampling", "name", SAMPLING)
    stages = s.get("stages") or []
    if stages != STAGES_BEFORE_SAMPLE[name]:
        # Other stages here would run after DP training and fail there (the classifier without
        # cpsample's settings, evaluate before sample), or train without privacy on sensitive data.
        raise ConfigError("sampling.stages", stages, f"sampling={name} runs {STAGES_BEFORE_SAMPLE[name]} before "
                          "sample, and nothing else", "drop the sampling.stages override (choose the scheme "
                          "with sampling=default or cpsample)")
    if name != "cpsample":
        return
    if latent_model:
        raise ConfigError("sampling", "cpsample", "the protection classifier guides pixel-space diffusion, and "
                          "this model diffuses latents", "use a pixel-space model (e.g. model=unet_small with "
                          "method=dpdm or nonprivate), or sampling=default")
    require_number(s, "sampling", "threshold", 0.5, 0.9999)
    require_number(s, "sampling", "scale", 0.0, 1e6)
    c, p = s["classifier"], "sampling.classifier"
    for key in ("width", "max_steps", "batch_size", "check_every", "check_timesteps"):
        require_int(c, p, key, minimum=1)
    if c["width"] % 8:
        raise ConfigError(f"{p}.width", c["width"], "must be a multiple of 8 (GroupNorm with 8 groups)",
                          f"e.g. {p}.width=32")
    require_number(c, p, "lr", 1e-8, 1.0)
    require_number(c, p, "target_accuracy", 0.5, 1.0)
