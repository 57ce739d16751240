"""The function that runs each stage: ``STAGES[name](ctx)`` (names in :data:`dpgen.stages.STAGE_NAMES`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from dpgen.stages.central import dp_central_images, warmup
from dpgen.stages.evaluate import evaluate
from dpgen.stages.latent import dp_finetune, pretrain_autoencoder, pretrain_ldm
from dpgen.stages.protection import train_protection_classifier_stage
from dpgen.stages.sample import sample
from dpgen.stages.semantic import dp_semantic_query, pretrain_selected, train_query_classifier
from dpgen.stages.training import dp_train, pretrain_public, train

if TYPE_CHECKING:
    from dpgen.pipeline import RunContext

STAGES: dict[str, Callable[[RunContext], None]] = {
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
