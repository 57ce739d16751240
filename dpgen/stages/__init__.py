"""Stages a run is made of: ``method.stages`` in order, with ``sampling.stages`` before ``sample``."""

from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from dpgen.errors import ConfigError

# Every stage a run may list, in no particular order; ``dpgen.stages.registry.STAGES`` holds
# their functions. The names alone are here: validating a config should not import every stage
# (Lightning, diffusers: seconds before a refusal).
STAGE_NAMES = (
    "pretrain_public",
    "train",
    "dp_train",
    "dp_central_images",
    "warmup",
    "pretrain_autoencoder",
    "pretrain_ldm",
    "dp_finetune",
    "train_protection_classifier",
    "train_query_classifier",
    "dp_semantic_query",
    "pretrain_selected",
    "sample",
    "evaluate",
)

# The final generator's weights in a run directory (EMA weights where the run kept an EMA).
FINAL_WEIGHTS = "model.pt"
# CPSample's record of the protection (written by the sample stage, copied into metrics.json).
PROTECTION_JSON = "protection.json"

# A canary audit's run (``python -m dpgen.audit``) trains the method's generator on canaries: its
# config carries ``canary_audit: true`` from the start, and it writes ``canary_audit.json`` at the
# end. Such a model is never resumed as an ordinary run, sampled, evaluated or released.
CANARY_RUN_KEY = "canary_audit"
CANARY_JSON = "canary_audit.json"


def trained_on_canaries(run_dir: Path, cfg: Mapping) -> bool:
    """``run_dir`` (with its ``run_config.yaml`` as ``cfg``) is a canary audit's run.

    Audits started before the config key existed are known by their ``canary_audit.json`` once
    finished, or by Hydra's record of the config they were started with (published once their
    plan passed). An audit never samples: a run with samples is an ordinary one, even if an old
    ``dpgen.audit +resume=`` of it left those files behind."""
    run_dir = Path(run_dir)
    if cfg.get(CANARY_RUN_KEY, False):
        return True
    if (run_dir / "samples.npz").exists():
        return False
    return (run_dir / CANARY_JSON).exists() or _started_with_config(run_dir) == "canary_audit"


def _started_with_config(run_dir: Path) -> str | None:
    try:
        return OmegaConf.select(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml"), "hydra.job.config_name")
    except (OSError, ValueError, YAMLError, OmegaConfBaseException):  # no record, or unreadable: nothing to tell by
        return None


# Stages that train through ``fit_dp`` (DP-SGD, DDP-capable). When a cluster launcher starts
# one process per device, every rank runs these; every other stage runs on rank 0 alone.
DDP_STAGES = frozenset({"dp_train", "dp_finetune"})


def run_stages(cfg: DictConfig) -> list[str]:
    """The stages of this run: the method's, plus what the sampling scheme needs before sampling."""
    stages = list(cfg.method.stages)
    extra = list(cfg.sampling.get("stages") or [])
    if extra:
        if "sample" not in stages:
            raise ConfigError("sampling", cfg.sampling.name, f"method {cfg.method.name} has no sample stage",
                              "use sampling=default")
        at = stages.index("sample")
        stages[at:at] = extra
    return stages


def training_stages(cfg: DictConfig) -> list[str]:
    """The stages up to the trained generator (everything before ``sample``)."""
    stages = list(cfg.method.stages)
    return stages[: stages.index("sample")] if "sample" in stages else stages
