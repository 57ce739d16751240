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
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dpgen.cli import log_info_to_stderr
from dpgen.config import validate_config
from dpgen.errors import ConfigError
from dpgen.io import atomic_write, sha256_file, write_json
from dpgen.overrides import (
    compose_overrides,
    override_key,
    refuse_unknown_keys,
    run_config_with_todays_groups,
)
from dpgen.privacy.composition import SOURCE_RUN
from dpgen.release.source import ReleaseError, open_run
from dpgen.run_files import PRIVACY_JSON, SAMPLES_NPZ, RunFileError, read_stages
from dpgen.stages import FINAL_WEIGHTS, training_stages

GROUPS = ("sampling", "eval", "audit")
COPIED = (FINAL_WEIGHTS, PRIVACY_JSON)  # what the resampling takes from its source run
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
    # Today's keys count too: a run from before sample.solver existed can be given one.
    if any(OmegaConf.select(cfg, override_key(o), default=_MISSING) is _MISSING for o in sample):
        known = {f"sample.{k}" for k in (*cfg.sample, *compose_overrides([]).sample)}
        refuse_unknown_keys(sample, known, "sample setting", "sampling")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(sample))


def _unfinished_resampling(run_dir: Path, out: Path, cfg: DictConfig) -> tuple[dict[str, Any], list[str]] | None:
    """The record (``source_run.json``) and completed stages of an earlier, failed resampling of
    ``run_dir`` in ``out``; None where ``out`` is anything else."""
    from dpgen.stages import run_stages

    try:
        record = json.loads((out / SOURCE_RUN).read_text())
        completed = json.loads((out / "stages.json").read_text())["completed"]
        source = Path(record["source_run"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if source != run_dir.resolve() or set(run_stages(cfg)) <= set(completed):
        return None
    return record, completed


def _sha256_or_none(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def _copy_source(run_dir: Path, out: Path) -> None:
    """Copy the generator and its ledger into ``out`` and record where from, with the hashes of
    what was copied: a resumed resampling compares the source with them (the copied
    privacy.json itself is rewritten by the ledger when the pipeline starts, so its own hash
    says nothing). Each copy is atomic, so an interrupted copy is never taken for the weights."""
    hashes = {}
    for name in COPIED:
        if (run_dir / name).is_file():
            with open(run_dir / name, "rb") as src:
                atomic_write(out / name, lambda f, src=src: shutil.copyfileobj(src, f))
            hashes[name] = sha256_file(out / name)
        else:
            (out / name).unlink(missing_ok=True)
    write_json(out / SOURCE_RUN, {"source_run": str(run_dir.resolve()), "copied_sha256": hashes})


def _changed_since_copied(run_dir: Path, out: Path, record: dict[str, Any]) -> list[str]:
    """The source's files that differ from what the unfinished resampling in ``out`` copied."""
    copied = record.get("copied_sha256")
    changed = []
    for name in COPIED:
        now = _sha256_or_none(run_dir / name)
        if name == FINAL_WEIGHTS:  # never rewritten in a resampling: compared with the copy itself
            then = _sha256_or_none(out / name)
        elif isinstance(copied, dict):
            then = copied.get(name)
        else:  # recorded by an older dpgen, without hashes: the ledger's copy cannot be checked
            continue
        if now != then:
            changed.append(name)
    return changed


def prepare(run_dir: Path, out: Path, cfg: DictConfig) -> None:
    """``out`` as a run whose training is done: the generator and its ledger copied from ``run_dir``.

    An ``out`` that an earlier, failed resampling of ``run_dir`` prepared is resumed instead, if
    it still holds what the source holds: a source repaired or retrained since (its model.pt was
    truncated, say) is copied again where nothing was sampled yet, and refused where samples of
    the old copy would be evaluated as the source's."""
    if out.exists():
        resumed = _unfinished_resampling(run_dir, out, cfg)
        if resumed is None:
            raise ConfigError("--out", str(out), "exists already", "pass a new directory, or remove it")
        record, completed = resumed
        changed = _changed_since_copied(run_dir, out, record)
        if not changed:
            log.info("%s: an unfinished resampling of %s; resuming it", out, run_dir)
            return
        if "sample" in completed or (out / SAMPLES_NPZ).exists():
            raise ConfigError("--out", str(out), f"an unfinished resampling of {run_dir} that sampled from copies of "
                              f"its {' and '.join(changed)}, which changed in {run_dir} since",
                              "pass a new directory, or remove this one to sample the run as it is now")
        log.info("%s: %s of %s changed since this unfinished resampling copied them; copying them again",
                 out, " and ".join(changed), run_dir)
        _copy_source(run_dir, out)
        return
    out.mkdir(parents=True)
    source = read_stages(run_dir)
    trained = training_stages(cfg)
    write_json(out / "stages.json", {"completed": trained,
                                     "wall_s": {k: v for k, v in source["wall_s"].items() if k in trained}})
    OmegaConf.save(cfg, out / "run_config.yaml", resolve=True)
    _copy_source(run_dir, out)  # source_run.json last: it marks out as a resampling to resume


def default_out(run_dir: Path, sampling_name: str) -> Path:
    """``<run dir>-<sampling name>`` beside the run. Made absolute first: ``.`` (the run being
    the working directory) has no name to extend. Without resolving links: the default lies
    beside the run directory as given."""
    run_dir = Path(os.path.abspath(run_dir))
    return run_dir.with_name(f"{run_dir.name}-{sampling_name}")


def check_out_outside(run_dir: Path, out: Path) -> None:
    """The new run directory must not lie inside the source run, which stays untouched, and whose
    reports would then list the resampling as one more run below it."""
    if out.resolve().is_relative_to(run_dir.resolve()):  # the run directory itself included
        raise ConfigError("--out", str(out), f"lies inside the source run {run_dir}, which resampling leaves "
                          "untouched (reports would list it as another run there)",
                          "pass a directory outside the run, e.g. leave --out out for <run dir>-<sampling name>")


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
        out = args.out or default_out(args.run_dir, cfg.sampling.name)
        check_out_outside(args.run_dir, out)
        if out.exists() and _unfinished_resampling(args.run_dir, out, cfg) is None:  # before the imports below
            raise ConfigError("--out", str(out), "exists already", "pass a new directory, or remove it")
        from dpgen.pipeline import RunContext
        from dpgen.stages.evaluate import check_utility_sizes

        check_utility_sizes(RunContext(cfg=cfg, run_dir=args.run_dir))  # before the new run directory exists
        prepare(args.run_dir, out, cfg)
    except (ConfigError, ReleaseError, RunFileError) as err:
        sys.exit(f"dpgen.sampling: {err}")

    from lightning.pytorch import seed_everything

    from dpgen.pipeline import run_pipeline

    seed_everything(cfg.seed, workers=True, verbose=False)
    run_pipeline(cfg, out)
    print(out / "metrics.json")


if __name__ == "__main__":
    main()
