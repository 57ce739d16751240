"""Hydra command-line overrides: composing them outside a run, and naming the one at fault."""

from __future__ import annotations

import difflib
import itertools
import logging
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from dpgen.errors import ConfigError
from dpgen.run_files import load_run_config

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
log = logging.getLogger("dpgen")


def override_key(override: str) -> str:
    """The key a Hydra command-line override sets: ``+eval.audit=true`` -> ``eval.audit``."""
    return override.split("=", 1)[0].lstrip("+~")


# Keys a user adds with ``+key=value`` that dpgen reads although no config file sets them.
APPENDABLE_KEYS = ("resume",)


def config_leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """A plain config as ``{"dotted.key": leaf value}``."""
    if not isinstance(node, dict) or not node:
        return {prefix.rstrip("."): node}
    return {k: v for key, value in node.items() for k, v in config_leaves(value, f"{prefix}{key}.").items()}


def dotted_keys(node: object, prefix: str = "") -> list[str]:
    if not isinstance(node, DictConfig):
        return [prefix[:-1]]
    return [k for key in node for k in dotted_keys(node._get_node(key), f"{prefix}{key}.")]


def check_appended_keys(cfg: DictConfig, overrides: Sequence[str], groups: Collection[str]) -> None:
    """Refuse ``+key=value`` for a key no config defines and dpgen never reads. Hydra suggests
    the ``+`` when a key is mistyped, and the run then ignores it: ``+privacy.epss=1`` ran at the
    default ε=10. ``groups`` are the config groups, which ``+group=option`` selects."""
    for override in overrides:
        key = override_key(override)
        if not override.startswith("+") or override.startswith("++") or key in APPENDABLE_KEYS \
                or key.split("@")[0] in groups:
            continue
        close = difflib.get_close_matches(key, [k for k in dotted_keys(cfg) if k != key], n=1)
        raise ConfigError(key, override.split("=", 1)[-1], "no dpgen config defines this key, so the run would "
                          "ignore it", f"did you mean {close[0]}=...?" if close else "drop it")


def refuse_unknown_keys(overrides: Sequence[str], known: Collection[str], setting: str, reader: str) -> None:
    """Refuse an override whose key is not in ``known``, naming the closest known key. The tools
    merge such overrides with ``OmegaConf.from_dotlist``, which adds any key it is given: a
    mistyped one would be kept and never read. ``setting`` and ``reader`` word the refusal."""
    for override in overrides:
        key = override_key(override)
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1)
        raise ConfigError(key, override.split("=", 1)[-1], f"no {setting} has this key, so {reader} would ignore it",
                          f"did you mean {close[0]}=...?" if close else f"use one of {', '.join(sorted(known))}")


def run_config_with_todays_groups(run_dir: Path, groups: Sequence[str], overrides: Sequence[str]) -> DictConfig:
    """A finished run's ``run_config.yaml`` with today's config ``groups`` (composed with those
    of ``overrides`` that fall in them) in place of its own. The callers decide which overrides
    they accept; everything outside ``groups`` stays what made the run. A ``run_config.yaml``
    that is not a whole run config ends as a one-line RunFileError naming it."""
    mine = [o for o in overrides if override_key(o).split(".")[0] in groups]
    today = compose_overrides(mine)
    cfg = load_run_config(run_dir)
    for group in groups:
        own = config_leaves(OmegaConf.to_container(cfg[group], resolve=True), f"{group}.") if group in cfg else {}
        cfg[group] = OmegaConf.to_container(today[group], resolve=False)  # interpolations resolve against the run
        _warn_unasked_changes(own, config_leaves(OmegaConf.to_container(cfg[group], resolve=True), f"{group}."),
                              [override_key(o) for o in mine])
    return cfg


def _warn_unasked_changes(own: dict[str, Any], today: dict[str, Any], asked: Sequence[str]) -> None:
    """Say which settings differ from the run's own without an override asking for it (a run made
    with eval=fast is scored with today's eval=default): the new numbers are not comparable with
    the run's first ones, which is easy to miss when comparing is the point."""
    changed = [k for k in sorted(set(own) | set(today)) if own.get(k, "<unset>") != today.get(k, "<unset>")
               and not any(k == a or k.startswith(f"{a}.") for a in asked)]
    if changed:
        listed = "; ".join(f"{k}: {own.get(k, '<unset>')!r} -> {today.get(k, '<unset>')!r}" for k in changed[:6])
        log.warning("today's config differs from the run's own in %s%s: the new results use today's; give the "
                    "run's values as overrides to keep them", listed, "; …" if len(changed) > 6 else "")


def override_error(err: Exception, override: str | None) -> ConfigError:
    """Hydra's error composing an ``override`` (a 50-line traceback) as one line naming it."""
    key, value = (override_key(override), override.split("=", 1)[-1]) if override else ("overrides", None)
    first_line = str(err).strip().splitlines()[0]
    if isinstance(err, OverrideParseException):
        return ConfigError(key, value, f"is not a valid override ({first_line})",
                           "write key=value, a list as key=[a,b], and quote it for the shell: 'key=[a,b]'")
    if isinstance(err, MissingConfigException):
        options = _available_options(str(err))
        return ConfigError(key, value, f"no such option of config group {key}",
                           f"use one of {', '.join(options)}" if options else f"see the files in conf/{key}/")
    if isinstance(err.__cause__, (ConfigAttributeError, ConfigKeyError)) or "does not exist" in first_line:
        return ConfigError(key, value, "no such key in the config (a typo?)",
                           "check the key's spelling; python -m dpgen --cfg job prints every key")
    return ConfigError(key, value, first_line.rstrip("."), "check the override against python -m dpgen --cfg job")


def _available_options(message: str) -> list[str]:
    """The options Hydra lists after "Available options in '<group>':", one per tab-indented line."""
    lines = message.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("Available options")), len(lines))
    return [line.strip() for line in itertools.takewhile(lambda line: line.startswith("\t"), lines[start:])]


def _compose(overrides: Sequence[str], return_hydra_config: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)


# What composing a bad override raises: Hydra's errors, and OmegaConf's where Hydra lets them
# through (``eval.fid.metrics.x=1`` indexes a list with ``x``: a ValueError).
_COMPOSE_ERRORS = (HydraException, OmegaConfBaseException, ValueError)


def compose_overrides(overrides: Sequence[str], *, return_hydra_config: bool = False) -> DictConfig:
    """Today's config with ``overrides``; one that cannot apply ends as a one-line ConfigError.
    ``return_hydra_config``: with the ``hydra`` node, which ``${hydra:...}`` interpolations need."""
    try:
        cfg = _compose(overrides, return_hydra_config)
    except _COMPOSE_ERRORS as err:
        raise override_error(err, _first_failing(overrides)) from err
    groups = {p.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*") if p.is_dir()}
    check_appended_keys(cfg, overrides, groups)
    return cfg


def _first_failing(overrides: Sequence[str]) -> str | None:
    """The override whose addition breaks composition. Hydra's messages do not always name it (a
    syntax error does not), and one may apply only after another (``sampling=cpsample`` before
    ``sampling.classifier.width=8``), so the overrides are composed in growing prefixes."""
    for i, override in enumerate(overrides):
        try:
            _compose(overrides[: i + 1])
        except _COMPOSE_ERRORS:
            return override
    return None
