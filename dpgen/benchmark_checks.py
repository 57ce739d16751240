"""What ``python -m dpgen.benchmark`` checks before it times anything: the profile's keys and
types, and the README its table goes into.

The benchmark writes its table only after every sweep has run (hours), so a profile or README
that cannot work must be refused at the start, in one line, not found at the end. Only light
modules are imported here: a refusal must not wait for torch's training libraries.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from dpgen.checks import is_number_in
from dpgen.errors import ConfigError
from dpgen.overrides import CONF_DIR

PROFILES_DIR = CONF_DIR / "benchmark"
# Keys a profile must set, and those it may leave out (their default).
REQUIRED_KEYS = ("name", "device", "budget_s", "min_steps", "calibration", "eps", "methods", "ceiling")
OPTIONAL_KEYS = {"overrides": [], "method_overrides": {}}
CALIBRATION_KEYS = ("warmup", "repeats")
# The name becomes README markers and the folders docs/benchmark/<name>/ and multirun/benchmark-<name>/.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def refuse(key: str, value: object, problem: str, fix: str) -> NoReturn:
    """End the command with dpgen's one-line message shape."""
    raise SystemExit(f"dpgen.benchmark: {ConfigError(key, value, problem, fix)}")


def profile_path(name: str) -> Path:
    """A profile by name (``conf/benchmark/<name>.yaml``) or by the path of a YAML file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        refuse("--profile", name, "no such profile", f"one of {known}, or the path of a profile .yaml")
    return path


def load_profile(name: str) -> DictConfig:
    """The profile ``name`` (see :func:`profile_path`), its keys and types checked and its optional
    keys filled in. The values that only a composed run config can judge (an ε out of range, an
    override that does not apply) are checked by ``dpgen.benchmark.validate_runs``."""
    path = profile_path(name)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OSError, UnicodeDecodeError, YAMLError, OmegaConfBaseException) as err:
        refuse("--profile", str(path), f"cannot be read as YAML ({type(err).__name__})", "fix the file's syntax")
    try:
        profile = check_profile(raw)
    except ConfigError as err:
        raise SystemExit(f"dpgen.benchmark: profile {path}: {err}") from err
    return OmegaConf.create(profile)


def _strings(value: object, key: str, *, empty: bool, example: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value) or (not value and not empty):
        raise ConfigError(key, value, f"must be a {'' if empty else 'non-empty '}list of strings",
                          f"write e.g. {key}: {example}")
    if len(set(value)) != len(value):
        raise ConfigError(key, value, "lists an entry twice (its runs would share one directory)", "list each once")
    return value


def check_profile(raw: object) -> dict[str, Any]:
    """The profile ``raw`` (plain containers) with its optional keys filled in; a ConfigError
    naming the key when a key is missing, unknown or of the wrong type."""
    if not isinstance(raw, Mapping):
        raise ConfigError("profile", raw, "must be a mapping of keys", f"write the keys {', '.join(REQUIRED_KEYS)}")
    known = (*REQUIRED_KEYS, *OPTIONAL_KEYS)
    if unknown := sorted(str(k) for k in raw if k not in known):
        raise ConfigError(unknown[0], raw[unknown[0]], "is no profile key (a typo?)", f"use only {', '.join(known)}")
    if missing := [k for k in REQUIRED_KEYS if k not in raw]:
        raise ConfigError(missing[0], None, "is missing", "set it, as conf/benchmark/cpu.yaml does")
    profile = {**OPTIONAL_KEYS, **raw}

    name = profile["name"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError("name", name, "must be letters, digits, '_', '.' or '-' (it names the README markers "
                          "and the plots' folder)", "e.g. name: cpu")
    if not isinstance(profile["device"], str) or not _DEVICE.fullmatch(profile["device"]):
        raise ConfigError("device", profile["device"], "unknown device", "cpu, cuda or cuda:<index>")
    if not is_number_in(profile["budget_s"], 0, float("inf"), low_open=True, high_open=True):
        raise ConfigError("budget_s", profile["budget_s"], "must be a number of seconds > 0", "e.g. budget_s: 120")
    min_steps = profile["min_steps"]
    if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 1:
        raise ConfigError("min_steps", min_steps, "must be an integer >= 1", "e.g. min_steps: 20")

    calibration = profile["calibration"]
    if not isinstance(calibration, Mapping) or sorted(calibration) != sorted(CALIBRATION_KEYS):
        raise ConfigError("calibration", calibration, f"must set exactly {' and '.join(CALIBRATION_KEYS)}",
                          "e.g. calibration: {warmup: 2, repeats: 5}")
    for key, least in (("warmup", 0), ("repeats", 1)):  # the step time is the median of the repeats
        value = calibration[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"calibration.{key}", value, f"must be an integer >= {least}",
                              f"set calibration.{key} >= {least}")

    eps = profile["eps"]
    if not isinstance(eps, list) or not eps or any(isinstance(e, bool) or not isinstance(e, (int, float))
                                                   for e in eps):
        raise ConfigError("eps", eps, "must be a non-empty list of numbers", "e.g. eps: [1, 10]")
    if len({f"{e:g}" for e in eps}) != len(eps):
        raise ConfigError("eps", eps, "lists an ε twice (its runs would share one directory)", "list each once")
    methods = _strings(profile["methods"], "methods", empty=False, example="[dpdm, dpldm]")
    ceiling = profile["ceiling"]
    if not isinstance(ceiling, str) or not ceiling:
        raise ConfigError("ceiling", ceiling, "must name a method", "e.g. ceiling: nonprivate")
    # Checked here, not left to composing: a later method's name would be found only after the
    # earlier methods' models were built.
    known = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
    for key, value in (("ceiling", ceiling), *(("methods", m) for m in methods)):
        if value not in known:
            raise ConfigError(key, profile[key], f"{value!r} is no method (conf/method/)", f"use one of {known}")
    if ceiling in methods:
        raise ConfigError("methods", methods, f"lists the ceiling {ceiling!r}, which runs once, without ε",
                          f"drop {ceiling} from methods")
    _strings(profile["overrides"], "overrides", empty=True, example="[trainer=gpu]")
    method_overrides = profile["method_overrides"]
    if not isinstance(method_overrides, Mapping):
        raise ConfigError("method_overrides", method_overrides, "must map methods to lists of overrides",
                          "e.g. method_overrides: {nonprivate: [method.pretrain=public]}")
    for method, overrides in method_overrides.items():
        if method not in (ceiling, *methods):
            raise ConfigError(f"method_overrides.{method}", overrides, "is for a method the profile does not run "
                              "(a typo?)", f"use one of {[ceiling, *methods]}")
        _strings(overrides, f"method_overrides.{method}", empty=True, example="[model=unet_medium]")
    return profile


def readme_markers(name: str) -> tuple[str, str]:
    """The lines between which the profile ``name``'s table goes."""
    return f"<!-- benchmark:{name}:start -->", f"<!-- benchmark:{name}:end -->"


def check_markers(text: str, name: str, readme: Path | str = "README.md") -> None:
    """``text`` (the README ``readme``) holds profile ``name``'s start marker, then its end marker."""
    start, end = readme_markers(name)
    if start not in text or end not in text.split(start, 1)[1]:
        refuse("--readme", str(readme), f"has no {start} ... {end} markers (in that order)",
               "add them where the table should go, or pass --readme with the README that has them")


def plots_dir(readme: Path, name: str) -> Path:
    """Where the sweep's plots are copied: beside README, which links them (the sweep is not committed)."""
    return readme.parent / "docs" / "benchmark" / name


def check_readme(readme: Path, name: str) -> None:
    """The README can take the table of profile ``name``: it exists, holds the markers, and it
    and its plots' folder can be written."""
    if not readme.is_file():
        refuse("--readme", str(readme), "no such file", "pass the README.md that holds the table's markers")
    try:
        text = readme.read_text()
    except (OSError, UnicodeDecodeError) as err:
        refuse("--readme", str(readme), f"cannot be read ({err})", "pass a readable UTF-8 README.md")
    check_markers(text, name, readme)
    # atomic_write puts a temporary file beside README and renames it over it.
    if not (os.access(readme, os.W_OK) and os.access(readme.parent, os.W_OK)):
        refuse("--readme", str(readme), "it or its folder is not writable", "make both writable")
    plots = plots_dir(readme, name)
    existing = next(p for p in (plots, *plots.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        refuse("--readme", str(readme), f"the plots' folder {plots} cannot be created or written ({existing} "
               f"is {'not a folder' if not existing.is_dir() else 'not writable'})",
               f"make {existing} a writable folder")
