"""``python -m dpgen``: compose the Hydra config, validate it, run the method's stages."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from dpgen.config import check_run_start, refuse_missing_resume
from dpgen.distributed import export_submitit_local_ranks
from dpgen.errors import BudgetError, ConfigError
from dpgen.eval.config import check_objective

log = logging.getLogger("dpgen")


TUNING_NOTE = ("hyperparameter search on data=%s, declared a public or proxy set (tune_data_is_proxy=true): "
               "the choice among trials is not charged to any ledger")


def objective(cfg: DictConfig, run_dir: Path) -> float | None:
    """The ``objective`` metric of a finished run, e.g. ``downstream_accuracy.mean``: what a
    sweeper such as Optuna optimises (the value ``python -m dpgen`` returns to Hydra)."""
    key = cfg.get("objective")
    if not key:
        return None
    value = json.loads((run_dir / "metrics.json").read_text())
    for part in str(key).split("."):
        value = value[part]
    return float(value)


def main(cfg: DictConfig) -> float | None:
    # Configuration and budget problems end the run with one line, before any work starts
    # (the privacy plan, which needs N, is the pipeline's first step and touches no stage).
    export_submitit_local_ranks()
    try:
        if cfg.get("objective") and cfg.get("tune_data_is_proxy") is not True:
            # Every trial is evaluated on data's held-out split, and picking the best trial is an
            # uncharged decision about that data: on the sensitive set, a leak privacy.json hides.
            raise ConfigError("tune_data_is_proxy", cfg.get("tune_data_is_proxy"),
                              f"a hyperparameter search selects on data={cfg.data.name}'s held-out split, which "
                              "no ledger charges", "tune on public or proxy data and say so with "
                              "tune_data_is_proxy=true; then run the chosen setting once on the sensitive data")
        if cfg.get("objective"):
            check_objective(cfg.objective, cfg.eval)
        check_run_start(cfg)
        # Imported once the config is accepted: Lightning and diffusers take seconds to import,
        # which a refusal (above) or --help should not wait for.
        from lightning.pytorch import seed_everything

        from dpgen.pipeline import run_pipeline

        if cfg.get("objective"):
            log.warning(TUNING_NOTE, cfg.data.name)
        seed_everything(cfg.seed, workers=True, verbose=False)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        run_pipeline(cfg, run_dir)
        return objective(cfg, run_dir)
    except (ConfigError, BudgetError) as err:
        log.error("%s", err)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records this job as failed and runs the others (SystemExit would end the sweep)
        sys.exit(f"dpgen: {err}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    return main(cfg)


if __name__ == "__main__":
    refuse_missing_resume(sys.argv[1:], "dpgen")
    _hydra_main()
