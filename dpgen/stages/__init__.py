"""Stages a run is made of: ``method.stages`` in order, with ``sampling.stages`` before ``sample``."""

from omegaconf import DictConfig

from dpgen.errors import ConfigError
from dpgen.stages.central import dp_central_images, warmup
from dpgen.stages.evaluate import evaluate
from dpgen.stages.latent import dp_finetune, pretrain_autoencoder, pretrain_ldm
from dpgen.stages.protection import train_protection_classifier_stage
from dpgen.stages.sample import sample
from dpgen.stages.semantic import dp_semantic_query, pretrain_selected, train_query_classifier
from dpgen.stages.training import dp_train, pretrain_public, train

STAGES = {
    "pretrain_public": pretrain_public,
    "train": train,
    "dp_train": dp_train,
    "dp_central_images": dp_central_images,
    "warmup": warmup,
    "pretrain_autoencoder": pretrain_autoencoder,
    "pretrain_ldm": pretrain_ldm,
    "dp_finetune": dp_finetune,
    "train_protection_classifier": train_protection_classifier_stage,
    "train_query_classifier": train_query_classifier,
    "dp_semantic_query": dp_semantic_query,
    "pretrain_selected": pretrain_selected,
    "sample": sample,
    "evaluate": evaluate,
}

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
