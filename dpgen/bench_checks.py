"""What ``python -m dpgen.bench`` checks before it measures anything: every ``bench.*`` setting,
each model at ``bench.image_size``, and that ``bench.output`` can be written.

A configuration takes seconds to minutes to measure, and the rows are written after the first:
a setting that cannot work must end the command in one line before the first measurement, not
as a traceback after some.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from dpgen.checks import require_int
from dpgen.errors import ConfigError
from dpgen.models.config import is_latent_model, validate_ldm_config, validate_model_config
from dpgen.overrides import CONF_DIR
from dpgen.privacy.config import CLIPPING_MODES, check_dp_precision

TRAINABLE_SETS = ("full", "attention_only")
# The lists a bench is the product of: an empty one measures nothing.
_LISTS = {"models": "[unet_small]", "trainable": "[full]", "clipping": "[mixed]", "multiplicities": "[1,4]"}


def _refuse(err: ConfigError) -> SystemExit:
    return SystemExit(f"dpgen.bench: {err}")


def load_model_config(name: str) -> dict:
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise SystemExit(f"dpgen.bench: bench.models: unknown model {name!r}. Fix: one of {known}")
    return OmegaConf.to_container(OmegaConf.load(path))


def _plain_list(cfg: DictConfig, key: str) -> list[Any]:
    value = cfg.get(key)
    if not isinstance(value, (list, ListConfig)) or len(value) == 0:
        shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
        raise _refuse(ConfigError(f"bench.{key}", shown, "must be a non-empty list (an empty one measures "
                                  "nothing)", f"e.g. bench.{key}={_LISTS[key]}"))
    return list(value)


def check_bench_config(cfg: DictConfig) -> None:
    """Every setting of ``cfg`` (the ``bench`` node), each refused as a one-line SystemExit."""
    try:
        device_type = torch.device(cfg.device).type
    except RuntimeError:
        device_type = None
    if device_type not in ("cpu", "cuda"):
        raise SystemExit(f"dpgen.bench: bench.device: unknown {cfg.device!r}. Fix: cpu, cuda or cuda:<index>")
    for key, least in (("batch_size", 1), ("warmup", 0), ("repeats", 1), ("image_size", 1), ("channels", 1),
                       ("num_classes", 1)):
        try:
            require_int(cfg, "bench", key, minimum=least)
        except ConfigError as err:
            raise _refuse(err) from err
    if cfg.get("threads") is not None:  # torch.set_num_threads refuses < 1 with a RuntimeError, inside Hydra's handler
        try:
            require_int(cfg, "bench", "threads", minimum=1)
        except ConfigError as err:
            raise _refuse(err) from err
    models, trainables, clippings, multiplicities = (_plain_list(cfg, key) for key in _LISTS)
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in multiplicities):
        raise SystemExit(f"dpgen.bench: bench.multiplicities={multiplicities}: must be integers >= 1, e.g. [1,4,16]")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("dpgen.bench: bench.device=cuda but no CUDA device is visible. Fix: bench.device=cpu")
    if str(cfg.precision) not in ("32", "bf16"):
        raise SystemExit(f"dpgen.bench: bench.precision: unknown {cfg.precision!r}. Fix: 32 or bf16")
    for clipping in clippings:
        if clipping not in CLIPPING_MODES:
            raise SystemExit(f"dpgen.bench: bench.clipping: unknown {clipping!r}. Fix: one of {CLIPPING_MODES}")
        try:
            check_dp_precision("bf16-mixed" if str(cfg.precision) == "bf16" else "32-true", clipping)
        except ConfigError as err:
            raise _refuse(err) from err
    for trainable in trainables:
        if trainable not in TRAINABLE_SETS:
            raise SystemExit(f"dpgen.bench: bench.trainable: unknown {trainable!r}. Fix: one of {TRAINABLE_SETS}")
    for name in models:  # every model before the first is measured
        model_cfg = load_model_config(name)
        validate = validate_ldm_config if is_latent_model(model_cfg) else validate_model_config
        try:
            validate(model_cfg, cfg.image_size, "bench.image_size")
        except ConfigError as err:
            raise _refuse(err) from err


def check_output(output: Path) -> None:
    """``bench.output`` can take the rows, tried as :func:`dpgen.io.atomic_write` will write them
    (a temporary file in its folder, renamed over it): a bad path would otherwise lose the first
    rows at their first write. Creates the folder, as the write would."""
    if output.is_dir():
        raise _refuse(ConfigError("bench.output", str(output), "is a directory", "name a file, e.g. "
                                  "bench.output=outputs/bench.json"))
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output.parent):
            pass
    except OSError as err:
        raise _refuse(ConfigError("bench.output", str(output), f"its folder cannot be created or written ({err})",
                                  "a writable path, e.g. bench.output=outputs/bench.json")) from err
