"""The files of a run directory, read for the tools that start from a finished run
(``dpgen.sampling``, ``dpgen.evaluate``, ``dpgen.release``).

A file that is missing, unreadable or not what dpgen writes ends the tool with one line naming
it, before the tool does any work or writes anything: the libraries' own errors (a YAML parser
error, a JSONDecodeError, torch's zip reader) would come as tracebacks, some only after minutes
of evaluation or with an output directory half made.
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpgen.privacy.guarantee import training_is_private

RUN_CONFIG, STAGES_JSON, PRIVACY_JSON, SAMPLES_NPZ = "run_config.yaml", "stages.json", "privacy.json", "samples.npz"

# Keys every run_config.yaml has held (conf/config.yaml's first version composed them all), and
# those of them the tools read before anything else.
RUN_CONFIG_KEYS = ("data", "model", "method", "privacy", "trainer", "paths", "seed", "diffusion", "sample",
                   "method.name", "method.stages")

RESTORE = "restore it from a copy of the run, or use another run"

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


class RunFileError(ValueError):
    """A run directory's file that is missing, unreadable or not what dpgen writes. The message
    is one line: the file, what is wrong with it, and ``Fix: ...``."""

    def __init__(self, path: Path, problem: str, fix: str = RESTORE) -> None:
        super().__init__(f"{path}: {problem}. Fix: {fix}")


def _why(err: BaseException) -> str:
    """A library's error in a few words: YAML's runs over several lines (with the file name
    again), torch's adds a paragraph of advice after its first sentence."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        return f"{err.problem} at line {err.problem_mark.line + 1}"
    text = " ".join(str(err).split())
    return text.split(". ")[0].rstrip(".") if text else type(err).__name__


def load_run_config(run_dir: Path) -> DictConfig:
    """``run_config.yaml``: valid YAML holding the keys every dpgen run config has."""
    path = Path(run_dir) / RUN_CONFIG
    try:
        cfg = OmegaConf.load(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException) as err:
        raise RunFileError(path, f"unreadable ({_why(err)})") from err
    if not isinstance(cfg, DictConfig) or not cfg:
        raise RunFileError(path, "empty, or not a mapping of config keys")
    missing = [k for k in RUN_CONFIG_KEYS if OmegaConf.select(cfg, k, default=None) is None]
    if missing:
        raise RunFileError(path, f"not a whole dpgen run config (it lacks {', '.join(missing)})")
    return cfg


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that dpgen writes as an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RunFileError(path, f"unreadable ({_why(err)})") from err
    if not isinstance(value, dict):
        raise RunFileError(path, f"holds a JSON {_JSON_TYPES.get(type(value), 'value')}, not the object dpgen writes")
    return value


def read_stages(run_dir: Path) -> dict[str, Any]:
    """``stages.json`` as ``{"completed": [stage, ...], "wall_s": {stage: seconds}}``; a run
    without one has completed nothing."""
    path = Path(run_dir) / STAGES_JSON
    if not path.is_file():
        return {"completed": [], "wall_s": {}}
    state = read_json_object(path)
    completed, wall_s = state.get("completed"), state.get("wall_s", {})
    if not isinstance(completed, list) or not all(isinstance(s, str) for s in completed):
        raise RunFileError(path, f"completed={completed!r} is not a list of stage names")
    if not isinstance(wall_s, dict):
        raise RunFileError(path, f"wall_s={wall_s!r} is not an object of seconds per stage")
    return {**state, "completed": completed, "wall_s": wall_s}


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_privacy(run_dir: Path, cfg: DictConfig) -> dict[str, Any]:
    """``privacy.json``, required where the run's training is private: every ledger such a run
    writes (``PrivacyLedger.to_json``) holds a finite ``epsilon_target`` and ``delta`` and an
    ``epsilon_spent`` (null where the accountant found no finite ε), whether or not it later
    gave the formal guarantee up (CPSample). A private run's file without them states no
    guarantee, as a missing file does. ``{}`` for a non-private run without the file."""
    run_dir = Path(run_dir)
    path = run_dir / PRIVACY_JSON
    private = training_is_private(cfg)
    cannot_state = f"so the guarantee of method {cfg.method.name} cannot be stated"
    if not path.is_file():
        if private:
            raise RunFileError(run_dir, f"no {PRIVACY_JSON}, {cannot_state}", f"restore {PRIVACY_JSON} from a copy "
                               "of the run, or use another run")
        return {}
    privacy = read_json_object(path)
    for key in ("epsilon_target", "delta", "epsilon_spent"):
        if private and key not in privacy:
            raise RunFileError(path, f"no {key}, {cannot_state}")
        value = privacy.get(key)
        # A non-private run's record has nulls; a private run's ε spent is null where it is not finite.
        may_be_null = not private or key == "epsilon_spent"
        if not (_is_finite_number(value) or (value is None and may_be_null)):
            raise RunFileError(path, f"{key}={value!r} is not a finite number, {cannot_state}")
    guarantee = privacy.get("formal_guarantee", False)
    if not isinstance(guarantee, bool):  # bool("false") would claim the guarantee
        raise RunFileError(path, f"formal_guarantee={guarantee!r} is not true or false")
    return privacy


def check_weights(path: Path, fix: str = RESTORE) -> None:
    """``model.pt`` loads as a state dict of tensors. Memory-mapped, so its tensors are not read:
    a truncated or overwritten file fails here (its zip directory is at the end), in a moment."""
    if not Path(path).is_file():
        raise RunFileError(path, "missing", fix)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise RunFileError(path, f"not loadable weights ({_why(err)})", fix) from err
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunFileError(path, "does not hold a state dict of tensors", fix)


def check_samples(path: Path, fix: str) -> None:
    """``samples.npz`` opens and holds ``images`` and ``labels`` (its zip directory is read, not
    the images)."""
    if not Path(path).is_file():
        raise RunFileError(path, "missing", fix)
    try:
        archive = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise RunFileError(path, f"unreadable ({_why(err)})", fix) from err
    if not isinstance(archive, np.lib.npyio.NpzFile):  # a single array saved as .npy
        raise RunFileError(path, "a single array, not an npz archive", fix)
    with archive:
        names = set(archive.files)
    if not {"images", "labels"} <= names:
        raise RunFileError(path, f"holds {sorted(names)}, not images and labels", fix)
