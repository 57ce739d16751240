"""``python -m dpgen.evaluate <run dir> [eval.key=value ...]``: evaluate a finished run again.

The generator, its samples and everything that made them are the run's own (``run_config.yaml``);
the evaluation is today's ``conf/eval`` and ``conf/audit`` with the given overrides. So a run made
before a change of the evaluation, or without the utility study or the privacy audits, is
evaluated without retraining: ``python -m dpgen.evaluate outputs/<date>/<time> eval.audit=true``.
Rewrites the run's
``metrics.json`` and writes the evaluation and audit config it used to ``evaluate_config.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dpgen.cli import log_info_to_stderr
from dpgen.errors import ConfigError
from dpgen.eval.config import validate_audit_config, validate_eval_config
from dpgen.io import atomic_write
from dpgen.overrides import (
    dotted_keys,
    override_key,
    refuse_unknown_keys,
    run_config_with_todays_groups,
)
from dpgen.run_files import (
    SAMPLES_NPZ,
    RunFileError,
    check_samples,
    check_weights,
    read_json_object,
    read_privacy,
    read_stages,
)
from dpgen.stages import FINAL_WEIGHTS, PROTECTION_JSON, trained_on_canaries

log = logging.getLogger("dpgen")


def evaluation_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The run's config with today's evaluation and audit config (and ``eval.*``/``audit.*``/
    ``paths.*`` overrides)."""
    for o in overrides:
        key = override_key(o)
        if key not in ("eval", "audit") and not key.startswith(("eval.", "audit.", "paths.")):
            raise ConfigError(key, o.split("=", 1)[-1], "only the evaluation (eval.*, audit.*) and paths.* can "
                              "change here: the rest of the config made the samples",
                              "train a new run with python -m dpgen")
    if not (run_dir / "run_config.yaml").is_file():
        raise ConfigError("run_dir", str(run_dir), "is not a dpgen run (no run_config.yaml)",
                          "pass a run directory such as outputs/<date>/<time>")
    cfg = run_config_with_todays_groups(run_dir, ("eval", "audit"), overrides)
    if trained_on_canaries(run_dir, cfg):
        raise ConfigError("run_dir", str(run_dir), "is a canary audit's run (python -m dpgen.audit): its model was "
                          "trained on canaries and has no samples to evaluate; its result is canary_audit.json",
                          "pass an ordinary run's directory")
    paths = [o for o in overrides if override_key(o).startswith("paths.")]
    for o in paths:
        if o.startswith("~"):
            raise ConfigError(override_key(o), o, "the run's paths can be changed, not deleted",
                              f"set a value: {override_key(o)}=...")
    paths = [o.lstrip("+") for o in paths]
    refuse_unknown_keys(paths, dotted_keys(cfg.paths, "paths."), "path setting of this run", "the evaluation")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(paths)) if paths else cfg


def check_evaluation_inputs(cfg: DictConfig, run_dir: Path) -> None:
    """Read now what the configured evaluation reads (dpgen/stages/evaluate.py): a file it cannot
    read would otherwise end it late, privacy.json after the downstream classifiers trained and
    model.pt (the audit's membership inference) after them and FID too."""
    check_samples(run_dir / SAMPLES_NPZ, f"sample the run again, python -m dpgen.sampling {run_dir} "
                                         "sampling=default, and evaluate the new directory")
    read_privacy(run_dir, cfg)  # the ε and guarantee that metrics.json states
    if cfg.eval.audit or cfg.eval.utility_study:  # membership inference; the utility study samples
        check_weights(run_dir / FINAL_WEIGHTS, "restore it from a copy of the run, or leave eval.audit "
                                               "and eval.utility_study off")
    if (run_dir / PROTECTION_JSON).is_file():  # CPSample's record, copied into metrics.json
        read_json_object(run_dir / PROTECTION_JSON)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpgen.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory whose sample stage has finished")
    parser.add_argument("overrides", nargs="*", help="eval.* or paths.* overrides, e.g. eval.utility_study=true")
    args = parser.parse_args(argv)
    log_info_to_stderr()
    try:
        cfg = evaluation_config(args.run_dir, args.overrides)
        validate_eval_config(cfg.eval, cfg.sample.num_samples, cfg.data.num_classes)
        validate_audit_config(cfg.audit, cfg.diffusion.num_train_timesteps)
        state = read_stages(args.run_dir)
        if "sample" not in state["completed"]:
            raise ConfigError("run_dir", str(args.run_dir), "has no finished sample stage",
                              f"finish the run first: python -m dpgen +resume={args.run_dir}")
        check_evaluation_inputs(cfg, args.run_dir)
        from dpgen.pipeline import RunContext
        from dpgen.stages.evaluate import check_utility_sizes, evaluate

        ctx = RunContext(cfg=cfg, run_dir=args.run_dir, wall_s=state["wall_s"])
        check_utility_sizes(ctx)
    except (ConfigError, RunFileError) as err:
        sys.exit(f"dpgen.evaluate: {err}")

    from lightning.pytorch import seed_everything

    from dpgen.pipeline import only_process_in

    try:
        with only_process_in(args.run_dir):  # a resumed run's own evaluate writes metrics.json too
            seed_everything(cfg.seed, workers=True, verbose=False)
            evaluate(ctx)
            used = OmegaConf.to_yaml({k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("eval", "audit")})
            atomic_write(args.run_dir / "evaluate_config.yaml", lambda f: f.write(used.encode()))
    except ConfigError as err:
        sys.exit(f"dpgen.evaluate: {err}")
    print(args.run_dir / "metrics.json")


if __name__ == "__main__":
    main()
