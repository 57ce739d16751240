"""Reading and checking config values: every problem becomes a one-line ConfigError."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from dpgen.errors import ConfigError


def to_plain(cfg: Any, prefix: str) -> dict[str, Any]:
    """A resolved plain dict of a config node (DictConfig or mapping).

    Keys are resolved one by one so that a broken interpolation (say ``${paths.cache_dir}``
    when the main config has no ``paths``) is reported against the key that uses it.
    """
    if isinstance(cfg, DictConfig):
        raw = OmegaConf.to_container(cfg, resolve=False)
        out: dict[str, Any] = {}
        for key in cfg:
            try:
                value = cfg[key]
            except MissingMandatoryValue as e:
                raise ConfigError(
                    f"{prefix}.{key}", "???", "is mandatory and unset", f"set {prefix}.{key}"
                ) from e
            except OmegaConfBaseException as e:
                raise ConfigError(
                    f"{prefix}.{key}",
                    raw[key],
                    f"cannot be resolved ({type(e).__name__})",
                    "define the referenced key in the main config or give a literal value",
                ) from e
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
            out[str(key)] = value
        return out
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(prefix, cfg, "is not a config group", f"select one, e.g. {prefix}=<name>")


def require_int(cfg: Mapping[str, Any], prefix: str, key: str, minimum: int | None = None) -> int:
    """``cfg[key]`` as an int (bools rejected), at least ``minimum``."""
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{prefix}.{key}", value, "must be an integer", f"set {prefix}.{key} to an integer"
        )
    if minimum is not None and value < minimum:
        raise ConfigError(
            f"{prefix}.{key}", value, f"must be >= {minimum}", f"set {prefix}.{key} >= {minimum}"
        )
    return value


def require_choice(cfg: Mapping[str, Any], prefix: str, key: str, choices: Iterable[Any]) -> Any:
    """``cfg[key]``, which must be one of ``choices``."""
    options = list(choices)
    value = cfg.get(key)
    if value not in options:
        listed = ", ".join(str(o) for o in options)
        raise ConfigError(
            f"{prefix}.{key}",
            value,
            f"must be one of {listed}",
            f"set {prefix}.{key} to one of {listed}",
        )
    return value


def is_number_in(value: object, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> bool:
    """``value`` is a real number (not a bool, a string or NaN) in the range, each end open or closed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (low < value if low_open else low <= value) and (value < high if high_open else value <= high)


def require_number(cfg: Mapping[str, Any], prefix: str, key: str, low: float, high: float, *,
                   low_open: bool = False, high_open: bool = False, fix: str | None = None) -> float:
    """``cfg[key]`` as a real number in the range [low, high], each end closed unless said open."""
    value = cfg.get(key)
    if not is_number_in(value, low, high, low_open=low_open, high_open=high_open):
        raise ConfigError(
            f"{prefix}.{key}",
            value,
            f"must be a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}",
            fix or f"set {prefix}.{key} within that range",
        )
    return float(value)
