"""Stages a run is made of: ``method.stages`` in order, with ``sampling.stages`` before ``sample``."""

from omegaconf import DictConfig

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
