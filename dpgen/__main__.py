"""``python -m dpgen``: compose the Hydra config, validate it, run the method's stages."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch import seed_everything
from omegaconf import DictConfig

from dpgen.config import validate_config
from dpgen.errors import ConfigError
from dpgen.privacy.ledger import BudgetError

log = logging.getLogger("dpgen")


def main(cfg: DictConfig) -> None:
    # Configuration and budget problems end the run with one line, before any work starts
    # (the privacy plan, which needs N, is the pipeline's first step and touches no stage).
    try:
        validate_config(cfg)
        from dpgen.pipeline import run_pipeline

        seed_everything(cfg.seed, workers=True, verbose=False)
        run_pipeline(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, BudgetError) as err:
        log.error("%s", err)
        sys.exit(f"dpgen: {err}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    _hydra_main()
