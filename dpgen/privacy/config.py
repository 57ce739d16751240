"""Validation of the ``privacy`` config group, before any work starts (kept apart from the DP
step in ``strategy.py``, which imports Lightning: a refused config should not wait for it)."""

from __future__ import annotations

import math

from omegaconf import DictConfig

from dpgen.checks import is_number_in, require_int
from dpgen.errors import ConfigError
from dpgen.privacy.accounting import check_accountant

CLIPPING_MODES = ("materialize", "ghost", "mixed")

# Precisions the DP step accepts (Lightning's names). "bf16"/"bf16-mixed" autocast the forward
# only; "-true" half precisions would hold the parameters, the clipped sum and the noise in 16 bits.
DP_PRECISIONS = ("32", "32-true", "64", "64-true", "bf16", "bf16-mixed")


def check_dp_precision(precision: str | int, clipping: str) -> None:
    """Refuse a precision under which the DP step would not clip or noise in full precision."""
    precision = str(precision)
    if precision not in DP_PRECISIONS:
        why = ("GradScaler would rescale the clipped gradients" if precision in ("16", "16-mixed")
               else "the parameters, the clipped sum and the noise would be 16-bit")
        raise ConfigError("trainer.precision", precision, f"not supported under DP: {why}",
                          "use trainer.precision=32-true or bf16-mixed")
    if clipping == "ghost" and precision.startswith("bf16"):
        raise ConfigError("privacy.clipping", clipping, "cannot run under bf16 autocast: its clipped sum "
                          "comes from a second backward through the bf16 graph, not from the gradients "
                          "whose norms were clipped, so an example could exceed the clip bound",
                          "use privacy.clipping=mixed (or materialize), or trainer.precision=32-true")


def validate_privacy_config(p: DictConfig, precision: str | int) -> None:
    """``privacy.*`` of a run whose training is private, and the trainer precision it runs at."""
    # Numbers, not merely values that compare: true is 1 to Python, and an infinite or NaN
    # clip makes the noise σ·C infinite or NaN beside a privacy.json that states an ε.
    if not is_number_in(p.eps, 0, math.inf, low_open=True, high_open=True):
        raise ConfigError("privacy.eps", p.eps, "must be a number > 0", "set privacy.eps to e.g. 1 or 10")
    if not is_number_in(p.delta, 0, 1, low_open=True, high_open=True):
        raise ConfigError("privacy.delta", p.delta, "must be a number in (0, 1) and below 1/N",
                          "set privacy.delta=1e-5")
    if not is_number_in(p.clip, 0, math.inf, low_open=True, high_open=True):
        raise ConfigError("privacy.clip", p.clip, "must be a number > 0", "set privacy.clip=1.0")
    check_accountant(p.accountant)
    if p.clipping not in CLIPPING_MODES:
        raise ConfigError("privacy.clipping", p.clipping, "unknown clipping mode",
                          f"use one of {', '.join(CLIPPING_MODES)}")
    check_dp_precision(precision, p.clipping)
    require_int(p, "privacy", "log_every_n_steps", minimum=1)
    if not isinstance(p.log_train_loss, bool):
        raise ConfigError("privacy.log_train_loss", p.log_train_loss, "must be true or false",
                          "set privacy.log_train_loss=false (the default) or true")
