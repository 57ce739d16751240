"""Stages a run is made of; ``method.stages`` names them in order."""

from dpgen.stages.evaluate import evaluate
from dpgen.stages.latent import dp_finetune, pretrain_autoencoder, pretrain_ldm
from dpgen.stages.sample import sample
from dpgen.stages.training import dp_train, pretrain_public, train

STAGES = {
    "pretrain_public": pretrain_public,
    "train": train,
    "dp_train": dp_train,
    "pretrain_autoencoder": pretrain_autoencoder,
    "pretrain_ldm": pretrain_ldm,
    "dp_finetune": dp_finetune,
    "sample": sample,
    "evaluate": evaluate,
}

# Stages that train through ``fit_dp`` (DP-SGD, DDP-capable). When a cluster launcher starts
# one process per device, every rank runs these; every other stage runs on rank 0 alone.
DDP_STAGES = frozenset({"dp_train", "dp_finetune"})
