"""Validation of the ``diffusion`` settings and the sampler choice, before any work starts.

Kept apart from :mod:`dpgen.diffusion.sampling`, which imports diffusers: a refused config
should not wait seconds for the library that would only have been needed to train.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dpgen.checks import is_number_in, require_int, require_number, to_plain
from dpgen.diffusion.timesteps import TIMESTEP_SAMPLERS
from dpgen.errors import ConfigError

# The beta schedules that all three of our diffusers schedulers implement: DDPM (training), DDIM
# and DPM-Solver++ (sampling). DDPM alone also has "sigmoid" and "laplace"; a run on those would
# train, spend its budget, then fail at its first sample. Its "cosine" is squaredcos_cap_v2.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SOLVERS = ("ddim", "dpm++")


def run_solver(sample_cfg: Any) -> str:
    """A run's ``sample.solver``; runs from before the choice sampled with DDIM."""
    return sample_cfg.get("solver", "ddim")


def _check_timestep_law(t_cfg: DictConfig, kind: str, num_train_timesteps: int) -> None:
    """The chosen law's own settings, as ``dpgen.diffusion.timesteps`` reads them (its ValueErrors
    would otherwise surface as a traceback when the model is built)."""
    p = "method.timesteps"
    law = to_plain(t_cfg, p)
    if kind == "lognormal":
        require_number(law, p, "p_mean", -math.inf, math.inf, low_open=True, high_open=True, fix="use e.g. -1.2")
        require_number(law, p, "p_std", 0, math.inf, low_open=True, high_open=True, fix="use e.g. 1.2")
    elif kind == "mixture":
        intervals = law.get("intervals")
        fix = f"give [lo, hi, weight] triples with 0 <= lo < hi <= {num_train_timesteps}, e.g. [[0,{num_train_timesteps},1]]"
        if not isinstance(intervals, list) or not intervals:
            raise ConfigError(f"{p}.intervals", intervals, "must be a non-empty list of [lo, hi, weight]", fix)
        for triple in intervals:
            ok = isinstance(triple, list) and len(triple) == 3
            if ok:
                lo, hi, weight = triple
                ok = (all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi))
                      and 0 <= lo < hi <= num_train_timesteps and is_number_in(weight, 0, math.inf, high_open=True))
            if not ok:
                raise ConfigError(f"{p}.intervals", triple, f"is not an interval of the {num_train_timesteps} "
                                  "training timesteps with a weight >= 0", fix)
        if sum(triple[2] for triple in intervals) <= 0:
            raise ConfigError(f"{p}.intervals", intervals, "has no weight", fix)


def validate_diffusion_config(cfg: DictConfig) -> None:
    """``diffusion.*``, ``method.timesteps.kind`` and ``sample.solver``: checked before anything
    is built from them, where a bad value would surface as diffusers' traceback."""
    require_int(cfg.diffusion, "diffusion", "num_train_timesteps", minimum=2)
    schedule = OmegaConf.select(cfg, "diffusion.beta_schedule")
    if schedule not in BETA_SCHEDULES:
        raise ConfigError("diffusion.beta_schedule", schedule, "not a schedule that diffusers' DDPM, DDIM and "
                          "DPM-Solver++ schedulers all have", f"use one of {', '.join(BETA_SCHEDULES)} "
                          "(squaredcos_cap_v2 is the cosine schedule)")
    kind = OmegaConf.select(cfg, "method.timesteps.kind", default="uniform")
    if kind not in TIMESTEP_SAMPLERS:
        raise ConfigError("method.timesteps.kind", kind, "unknown timestep sampler",
                          f"use one of {', '.join(TIMESTEP_SAMPLERS)}")
    law = OmegaConf.select(cfg, "method.timesteps")
    if law is not None:
        _check_timestep_law(law, kind, cfg.diffusion.num_train_timesteps)
    solver = run_solver(cfg.sample)
    if solver not in SOLVERS:
        raise ConfigError("sample.solver", solver, "unknown solver", f"use one of {', '.join(SOLVERS)}")
    # A sampler takes at most one step per training timestep: DDIM refuses more (after training,
    # when the run samples), DPM-Solver++ repeats timesteps without a word.
    t = cfg.diffusion.num_train_timesteps
    runs = [("sample.steps", OmegaConf.select(cfg, "sample.steps"))]
    if (OmegaConf.select(cfg, "logger.sample_every_n_steps") or 0) > 0:  # the training curves' sample grids
        runs.append(("logger.grid_steps", OmegaConf.select(cfg, "logger.grid_steps")))
    for key, steps in runs:
        if isinstance(steps, int) and steps > t:
            raise ConfigError(key, steps, f"exceeds diffusion.num_train_timesteps={t}: a sampler takes at most "
                              "one step per training timestep", f"use at most {t} steps")
