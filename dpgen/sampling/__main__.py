"""``python -m dpgen.sampling <run dir> [--out DIR] [sampling.*|sample.*|eval.*|audit.* ...]``: sample a
finished run's generator again with CPSample (or another sampling scheme, solver or number of
steps), without retraining.

A new run directory (default ``<run dir>-<sampling name>``) gets the run's config with today's
``sampling``, ``eval`` and ``audit`` groups (``sampling=cpsample`` unless overridden), copies of
its final weights and ``privacy.json``, and its training stages marked done; the sampling
scheme's stages, ``sample`` and ``evaluate`` then run there. The source run is left untouched,
so the two directories compare the same generator with and without the protection:
``python -m dpgen.sampling outputs/<date>/<time> eval.audit=true``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dpgen.cli import log_info_to_stderr
from dpgen.config import validate_config
from dpgen.errors import ConfigError
from dpgen.io import write_json
from dpgen.overrides import (
    compose_overrides,
    override_key,
    run_config_with_todays_groups,
)
from dpgen.privacy.composition import SOURCE_RUN
from dpgen.release.source import ReleaseError, open_run
from dpgen.stages import FINAL_WEIGHTS, training_stages

GROUPS = ("sampling", "eval", "audit")
_MISSING = object()
log = logging.getLogger("dpgen")


def resampling_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The finished run's config with today's sampling, eval and audit groups and ``overrides``;
    ``sample.*`` overrides (solver, steps, number of samples) change the run's own settings."""
    for o in overrides:
        if override_key(o).split(".")[0] not in (*GROUPS, "sample"):
            raise ConfigError(override_key(o), o.split("=", 1)[-1], "only sampling.*, sample.*, eval.* and "
                              "audit.* can change here: the rest of the config made the generator",
                              "train a new run with python -m dpgen")
    sample = [o for o in overrides if override_key(o).startswith("sample.")]
    for o in sample:
        if o.startswith("~"):
            raise ConfigError(override_key(o), o, "a run's sample settings can be changed, not deleted",
                              f"set a value: {override_key(o)}=...")
    sample = [o.lstrip("+") for o in sample]
    groups = [o for o in overrides if not override_key(o).startswith("sample.")]
    if not any(override_key(o) == "sampling" for o in groups):
        groups = ["sampling=cpsample", *groups]
    cfg = run_config_with_todays_groups(run_dir, GROUPS, groups)
    # from_dotlist adds any key it is given: a mistyped sample.stepz=4 would be kept and never read.
    # Today's keys count too: a run from before sample.solver existed can be given one.
    unknown = [o for o in sample if OmegaConf.select(cfg, override_key(o), default=_MISSING) is _MISSING]
    if unknown:
        known = sorted({f"sample.{k}" for k in (*cfg.sample, *compose_overrides([]).sample)})
        for o in unknown:
            if override_key(o) not in known:
                close = difflib.get_close_matches(override_key(o), known, n=1)
                raise ConfigError(override_key(o), o.split("=", 1)[-1], "no sample setting has this key, so "
                                  "sampling would ignore it", f"did you mean {close[0]}=...?" if close else
                                  f"use one of {', '.join(known)}")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(sample))


def _unfinished_resampling(run_dir: Path, out: Path, cfg: DictConfig) -> bool:
    from dpgen.stages import run_stages

    try:
        source = json.loads((out / SOURCE_RUN).read_text())["source_run"]
        completed = json.loads((out / "stages.json").read_text())["completed"]
    except (OSError, ValueError, KeyError):
        return False
    return Path(source) == run_dir.resolve() and not set(run_stages(cfg)) <= set(completed)


def prepare(run_dir: Path, out: Path, cfg: DictConfig) -> None:
    """``out`` as a run whose training is done: the generator and its ledger copied from ``run_dir``.
    An ``out`` that an earlier, failed resampling of ``run_dir`` prepared is resumed instead."""
    if out.exists():
        if _unfinished_resampling(run_dir, out, cfg):
            log.info("%s: an unfinished resampling of %s; resuming it", out, run_dir)
            return
        raise ConfigError("--out", str(out), "exists already", "pass a new directory, or remove it")
    out.mkdir(parents=True)
    for name in (FINAL_WEIGHTS, "privacy.json"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / name)
    source = json.loads((run_dir / "stages.json").read_text())
    trained = training_stages(cfg)
    write_json(out / "stages.json", {"completed": trained,
                                     "wall_s": {k: v for k, v in source.get("wall_s", {}).items() if k in trained}})
    OmegaConf.save(cfg, out / "run_config.yaml", resolve=True)
    write_json(out / SOURCE_RUN, {"source_run": str(run_dir.resolve())})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpgen.sampling", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run directory")
    parser.add_argument("--out", type=Path, help="the new run directory (default: <run dir>-<sampling name>)")
    parser.add_argument("overrides", nargs="*", help="sampling.*, eval.* or audit.* overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may follow --out
    log_info_to_stderr()
    try:
        open_run(args.run_dir)  # finished, with its weights and an intact ledger
        cfg = resampling_config(args.run_dir, args.overrides)
        validate_config(cfg)
        from dpgen.pipeline import RunContext
        from dpgen.stages.evaluate import check_utility_sizes

        check_utility_sizes(RunContext(cfg=cfg, run_dir=args.run_dir))  # before the new run directory exists
        out = args.out or args.run_dir.with_name(f"{args.run_dir.name}-{cfg.sampling.name}")
        prepare(args.run_dir, out, cfg)
    except (ConfigError, ReleaseError) as err:
        sys.exit(f"dpgen.sampling: {err}")

    from lightning.pytorch import seed_everything

    from dpgen.pipeline import run_pipeline

    seed_everything(cfg.seed, workers=True, verbose=False)
    run_pipeline(cfg, out)
    print(out / "metrics.json")


if __name__ == "__main__":
    main()
